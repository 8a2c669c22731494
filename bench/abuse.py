"""`python -m bench.abuse`: the hostile-client probes, measured against a server.py it starts (loopback only).

Each probe prints one JSON line; bounded in count and time. Sizes are arguments, so the probes
can be scaled to the machine (the defaults are the scaled ones recorded in the notes):

- idle: N idle + M trickling (a byte a second) connections; how many the server closed within 60 s
- flood: F connections at once against a server limited to `--fd-limit` descriptors; health while
  held, seconds until health answers after release, log bytes written meanwhile
- bodies: B bodies of S MB that fail JSON parsing (end in NaN), in parallel; health latency p50/p99
- echo: the longest log line after 200k unknown fields, a 2 MiB field name and a 2000-char request id
- capacity: R requests of 64 rows at once after one warm-up; status and seconds of each answer
- fds: descriptors exhausted, then tritonserver SIGKILLed: seconds until healthy again
- shm: register the decoder stub's region as Triton system shared memory, infer into it

Longer than 250 lines: one short function per probe, in the order above; the list is the module.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from embcap.contract import EMBEDDING, EMBEDDING_DIM, PREFIX, PROJECTOR
from runtime.local import ROOT, free_port, stop_process, wait_http

URL = "/api/v1/inference"


def emit(name: str, **figures) -> None:
    print(json.dumps({"probe": name, **figures}), flush=True)


class Stack:
    """server.py on the given checkpoint, on free ports, optionally with a descriptor limit."""

    def __init__(self, checkpoint: Path, work: Path, fd_limit: int | None = None, env: dict | None = None) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "server.log"
        command = [sys.executable, "server.py", "--checkpoint", str(checkpoint), "--model-repository",
                   str(work / "repo"), "--bind", "127.0.0.1", "--port", str(self.port), "--grpc-port",
                   str(self.grpc_port)]
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))) if fd_limit else None
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=open(self.log_path, "ab"),
                                        stderr=subprocess.STDOUT, preexec_fn=limit, env={**os.environ, **(env or {})})
        wait_http(self.base + "/api/v1/health", 300, self.process, log_path=self.log_path)

    def health_s(self, timeout_s: float = 5.0) -> float | None:
        started = time.perf_counter()
        try:
            httpx.get(self.base + "/api/v1/health", timeout=timeout_s)
        except httpx.HTTPError:
            return None
        return time.perf_counter() - started

    def stop(self) -> None:
        stop_process(self.process)


def connect(stack: Stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.port), timeout=5)


def probe_idle(stack: Stack, idle: int, trickling: int, hold_s: float = 60.0) -> None:
    socks = [connect(stack) for _ in range(idle + trickling)]
    for sock in socks[idle:]:  # a valid head that never ends: one header byte a second
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    closed_at: dict[int, float] = {}
    started = time.monotonic()
    for sock in socks:
        sock.setblocking(False)
    while time.monotonic() - started < hold_s and len(closed_at) < len(socks):
        for index, sock in enumerate(socks):
            if index in closed_at:
                continue
            try:
                if index >= idle:
                    sock.send(b"a")
                if sock.recv(65536) == b"":
                    closed_at[index] = time.monotonic() - started
            except BlockingIOError:
                pass
            except OSError:
                closed_at[index] = time.monotonic() - started
        time.sleep(1.0)
    for sock in socks:
        sock.close()
    emit("idle", connections=len(socks), closed_within_s=hold_s, closed=len(closed_at),
         last_close_s=round(max(closed_at.values()), 1) if closed_at else None)


def probe_flood(stack: Stack, count: int, hold_s: float = 5.0) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 200), hard))
    log_before = stack.log_path.stat().st_size
    socks = []
    for _ in range(count):
        try:
            socks.append(connect(stack))
        except OSError:
            break
    time.sleep(hold_s)
    during = stack.health_s(5)
    released = time.monotonic()
    for sock in socks:
        sock.close()
    back = None
    while time.monotonic() - released < 60:
        if stack.health_s(5) is not None:
            back = time.monotonic() - released
            break
        time.sleep(0.2)
    time.sleep(1)
    log_bytes = stack.log_path.stat().st_size - log_before
    emit("flood", connections=len(socks), health_during_s=during, health_back_after_release_s=back,
         log_bytes=log_bytes, log_bytes_per_s=round(log_bytes / (hold_s + (back or 0) + 1), 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


POLLER = """
import sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
with httpx.Client(timeout=10) as client:
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            client.get(url)
            print(time.perf_counter() - started, flush=True)
        except httpx.HTTPError:
            print(10.0, flush=True)
        time.sleep(0.05)
"""


def probe_bodies(stack: Stack, count: int, megabytes: float, poll_s: float = 8.0) -> None:
    """Health is polled from a process of its own: the senders' threads would share its interpreter lock."""
    body = b'{"embedding": [' + b"0.1234567, " * int(megabytes * 1024 * 1024 / 11) + b"NaN]}"
    statuses = []
    poller = subprocess.Popen([sys.executable, "-c", POLLER, stack.base + "/api/v1/health", str(poll_s)],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)

    def send():
        try:
            answer = httpx.post(stack.base + URL, content=body, headers={"content-type": "application/json"},
                                timeout=120)
            statuses.append(answer.status_code)
        except httpx.HTTPError as exc:
            statuses.append(type(exc).__name__)

    senders = [threading.Thread(target=send) for _ in range(count)]
    started = time.monotonic()
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(300)
    seconds = time.monotonic() - started
    latencies = sorted(float(line) for line in poller.communicate(timeout=poll_s + 30)[0].split())
    emit("bodies", bodies=count, megabytes=round(len(body) / 2**20, 1), seconds=round(seconds, 1),
         statuses={str(s): statuses.count(s) for s in set(statuses)}, health_samples=len(latencies),
         health_p50_ms=round(1000 * statistics.median(latencies), 1),
         health_p99_ms=round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
         health_max_ms=round(1000 * latencies[-1], 1))


def probe_echo(stack: Stack) -> None:
    row = [0.5] * 1024
    answers = []
    fields = json.dumps({f"field{i}": 1 for i in range(200_000)} | {"embedding": row})
    answers.append(httpx.post(stack.base + URL, content=fields, headers={"content-type": "application/json"},
                              timeout=60))
    name = json.dumps({"x" * (2 * 1024 * 1024): 1, "embedding": row})
    answers.append(httpx.post(stack.base + URL, content=name, headers={"content-type": "application/json"}, timeout=60))
    answers.append(httpx.post(stack.base + URL, json={"embedding": row}, headers={"X-Request-ID": "r" * 2000},
                              timeout=60))
    time.sleep(0.5)
    longest = max(len(line) for line in stack.log_path.read_bytes().splitlines())
    emit("echo", answer_bytes=[len(a.content) for a in answers], echoed_id_chars=len(answers[2].headers.get(
        "x-request-id", "")), longest_log_line_bytes=longest)


def probe_capacity(stack: Stack, requests: int) -> None:
    rows = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    httpx.post(stack.base + URL, json={"embedding": rows[:32].ravel().tolist()}, timeout=120)
    body = json.dumps({"embedding": rows.ravel().tolist()})
    results = []

    def send():
        started = time.monotonic()
        answer = httpx.post(stack.base + URL, content=body, headers={"content-type": "application/json"}, timeout=120)
        results.append((answer.status_code, round(time.monotonic() - started, 2)))

    threads = [threading.Thread(target=send) for _ in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    refused = [s for code, s in results if code in (429, 503)]
    late = [s for code, s in results if code == 504]
    emit("capacity", results=sorted(results), refused=len(refused), refused_max_s=max(refused, default=None),
         timed_out=len(late), timed_out_after_s=max(late, default=None))


def probe_fds(stack: Stack, fd_limit: int) -> None:
    socks = []
    for _ in range(fd_limit + 100):
        try:
            socks.append(connect(stack))
        except OSError:
            break
    time.sleep(3)
    for sock in socks:
        sock.close()
    time.sleep(1.5)
    [triton] = [p for p in psutil.Process(stack.process.pid).children() if p.name() == "tritonserver"]
    triton.kill()
    killed = time.monotonic()
    healthy_after = None
    while time.monotonic() - killed < 90:
        answer = None
        try:
            answer = httpx.get(stack.base + "/api/v1/health", timeout=5)
        except httpx.HTTPError:
            pass
        if answer is not None and answer.status_code == 200 and time.monotonic() - killed > 0.5:
            healthy_after = time.monotonic() - killed
            break
        time.sleep(0.5)
    emit("fds", fd_limit=fd_limit, connections=len(socks), healthy_after_kill_s=healthy_after)


def probe_shm(stack: Stack) -> None:
    import tritonclient.grpc as grpcclient

    triton = [p for p in psutil.Process(stack.process.pid).children() if p.name() == "tritonserver"][0]
    prefix = next(a.split("=", 2)[-1] for a in triton.cmdline() if "shm-region-prefix-name=" in a)
    stubs = {p.pid: p.cmdline()[1] for p in triton.children() if p.name() == "triton_python_backend_stub"}
    decoder = next(pid for pid, path in stubs.items() if "/decoder/" in path)
    regions = sorted(Path("/dev/shm").glob(f"{prefix}*"))
    modes = sorted({oct(r.stat().st_mode & 0o777) for r in regions})
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc_port}")
    outcome = "registered"
    try:
        for region in regions:
            client.register_system_shared_memory(f"attack-{region.name[-6:]}", "/" + region.name, 1024)
        inputs = grpcclient.InferInput(EMBEDDING, [1, EMBEDDING_DIM], "FP32")
        inputs.set_data_from_numpy(np.zeros((1, EMBEDDING_DIM), np.float32))
        output = grpcclient.InferRequestedOutput(PREFIX)
        output.set_shared_memory(f"attack-{regions[0].name[-6:]}", 1024)
        client.infer(PROJECTOR, [inputs], outputs=[output])
    except Exception as exc:  # the probe reports whatever Triton answers
        outcome = f"refused: {str(exc)[:160]}"
    finally:
        client.close()
    time.sleep(2)
    alive = psutil.pid_exists(decoder) and psutil.Process(decoder).status() != psutil.STATUS_ZOMBIE
    emit("shm", region_modes=modes, outcome=outcome, decoder_stub_alive_after=alive,
         health_after=getattr(httpx.get(stack.base + "/api/v1/health", timeout=10), "status_code", None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.abuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--probes", default="idle,flood,bodies,echo,capacity,fds,shm")
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--trickling", type=int, default=20)
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--flood-fd-limit", type=int, default=4096)
    parser.add_argument("--bodies", type=int, default=40)
    parser.add_argument("--body-mb", type=float, default=14.6)
    parser.add_argument("--capacity-requests", type=int, default=16)
    parser.add_argument("--capacity-timeout-s", type=float, default=10.0, help="EMBCAP_REQUEST_TIMEOUT_S of that run")
    parser.add_argument("--fd-limit", type=int, default=256)
    args = parser.parse_args(argv)
    probes = args.probes.split(",")
    plain = [p for p in probes if p in ("idle", "bodies", "echo", "shm")]
    if plain:
        stack = Stack(args.checkpoint, args.work / "plain")
        try:
            for name in plain:
                {"idle": lambda: probe_idle(stack, args.idle, args.trickling), "bodies": lambda: probe_bodies(
                    stack, args.bodies, args.body_mb), "echo": lambda: probe_echo(stack),
                 "shm": lambda: probe_shm(stack)}[name]()
        finally:
            stack.stop()
    runs = {"flood": (dict(fd_limit=args.flood_fd_limit), lambda stack: probe_flood(stack, args.flood)),
            "capacity": (dict(env={"EMBCAP_REQUEST_TIMEOUT_S": str(args.capacity_timeout_s)}),
                         lambda stack: probe_capacity(stack, args.capacity_requests)),
            "fds": (dict(fd_limit=args.fd_limit), lambda stack: probe_fds(stack, args.fd_limit))}
    for name, (settings, probe) in runs.items():  # each on a server of its own, started with its limits
        if name in probes:
            stack = Stack(args.checkpoint, args.work / name, **settings)
            try:
                probe(stack)
            finally:
                stack.stop()

if __name__ == "__main__":
    main()
