"""Runs inside the sandbox (tests/sandbox/sandbox.sh) as nobody and prints JSON.

`probe.py environment REPO`: who we are and what can be written or executed where.
`probe.py wait BASE SECONDS`: poll /api/v1/health until it says healthy.
`probe.py api BASE`: the evaluator's calls against the server in the sandbox.
`probe.py throughput BASE`: captions per second at batch 4 and 64.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.getcwd())  # the repository (nsenter --wd): the shared input generator
from embcap.inputs import realistic_embeddings  # noqa: E402


def writable(folder: str) -> bool:
    try:
        fd, path = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(path)
    return True


def executable_from(folder: str) -> bool:
    target = os.path.join(folder, f"probe-true-{os.getpid()}")
    shutil.copy("/bin/true", target)
    os.chmod(target, 0o755)
    try:
        return subprocess.run([target]).returncode == 0
    except PermissionError:
        return False
    finally:
        os.unlink(target)


def environment(repo: str, *extra: str) -> dict:
    status = dict(line.rstrip("\n").split(":\t", 1) for line in open("/proc/self/status") if ":\t" in line)
    folders = [repo, os.path.join(repo, "models"), os.path.join(repo, ".venv"), "/", "/usr", "/root",
               "/tmp", "/run", "/dev/shm", *extra]
    return {
        "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "cap_effective": status["CapEff"], "cap_bounding": status["CapBnd"], "no_new_privs": status["NoNewPrivs"],
        "home": os.environ.get("HOME"),
        "interfaces": [name for _, name in socket.if_nameindex()],
        "writable": {folder: writable(folder) for folder in folders},
        "executable": {folder: executable_from(folder) for folder in ("/tmp", "/run", "/dev/shm", *extra)},
        "shm_bytes": shutil.disk_usage("/dev/shm").total,
        "entries": {folder: sorted(os.listdir(folder)) for folder in extra},
        "tmp_entries": sorted(os.listdir("/tmp")),
        "shm_entries": sorted(os.listdir("/dev/shm")),
    }


def wait(base: str, seconds: float) -> dict:
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(base + "/api/v1/health", timeout=5)
            last = response.status_code, response.json()
            if response.status_code == 200 and last[1].get("status") == "healthy":
                return {"healthy": True, "body": last[1]}
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    return {"healthy": False, "last": str(last)}


def api(base: str) -> dict:
    def body(rows: int) -> dict:
        return {"embedding": realistic_embeddings(rows, seed=rows).ravel().tolist()}

    paths = ("/api/v1/health", "/health", "/")
    out = {"health": {path: httpx.get(base + path, timeout=5).status_code for path in paths}}
    counts = {}
    for path in ("/api/v1/inference", "/api/v1/v2t"):
        for rows in (1, 4, 33):
            response = httpx.post(base + path, json=body(rows), timeout=60)
            texts = response.json().get("texts", []) if response.status_code == 200 else []
            counts[f"{path}:{rows}"] = [response.status_code, len(texts), all(isinstance(t, str) for t in texts)]
    out["captions"] = counts

    async def concurrent() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=60) as client:
            posts = (client.post(base + "/api/v1/inference", json=body(4)) for _ in range(16))
            responses = await asyncio.gather(*posts)
        return [[r.status_code, len(r.json().get("texts", []))] for r in responses]

    out["concurrent"] = asyncio.run(concurrent())
    out["invalid"] = httpx.post(base + "/api/v1/inference", json={"embedding": [1.0] * 1000}, timeout=10).status_code
    return out


def throughput(base: str) -> dict:
    """Captions per second at batch 4 and 64 (8 requests each, after one warm-up)."""
    rates = {}
    for rows in (4, 64):
        body = {"embedding": realistic_embeddings(rows, seed=1).ravel().tolist()}
        httpx.post(base + "/api/v1/inference", json=body, timeout=120).raise_for_status()
        started = time.perf_counter()
        for _ in range(8):
            httpx.post(base + "/api/v1/inference", json=body, timeout=120).raise_for_status()
        rates[f"batch{rows}"] = round(8 * rows / (time.perf_counter() - started), 1)
    return rates


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    result = {"environment": lambda: environment(*args), "wait": lambda: wait(args[0], float(args[1])),
              "api": lambda: api(args[0]), "throughput": lambda: throughput(args[0])}[command]()
    print(json.dumps(result))
