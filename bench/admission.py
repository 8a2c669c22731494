"""Admission under a burst: does the stack refuse what it answers in time, and how close are its predictions?

    python -m bench.admission --runs 10 --out DIR        # server.py --candidates 1, the default model

Phase "burst", `--runs` times on a fresh server.py (the repository is exported once and then served with
--skip-export): one warm-up request of `--rows` rows, then `--clients` clients at once, each sending
`--requests` requests of `--rows` rows back to back (the evaluator's request shape). Counts the refusals
(503 over_capacity) and the slowest answer.

Phase "predictions", on one more fresh server: `--warm-requests` requests one after another (until about
ten requests were answered the engine judges a request's steps by the most any can take: a start-up
estimate, not the one measured here), then concurrency 1, 4 and 16 (closed loop, `--level-requests`
requests per client). For every admitted request, the gateway's predicted completion time (`expected_s` of
its "request served" log line, found by request id) against the time the client measured: predicted /
actual near 1 is right, below 1 admits what may finish late, above 1 refuses early.

Inputs are evaluator-shaped (embcap.inputs: captions end at their own lengths). Writes admission.json,
admission.md and admission.png; every figure stands beside the machine's load (`uptime`), since these
timings come from a shared machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import orjson

from bench.common import RESULTS, embedding_pool, pyplot, table, thread_env
from runtime.local import ROOT, Child, free_port, spawn

LEVELS = (1, 4, 16)


def load_average() -> str:
    """`uptime`'s load averages (1, 5, 15 min)."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def start(checkpoint: Path, work: Path, candidates: int, skip_export: bool, timeout_s: float) -> Child:
    """server.py on free ports, waited for until healthy; the repository is kept for the next start."""
    port = free_port()
    command = [sys.executable, "server.py", "--checkpoint", str(checkpoint), "--model-repository",
               str(work / "model_repository"), "--bind", "127.0.0.1", "--port", str(port), "--grpc-port",
               str(free_port()), f"--candidates={candidates}", "--keep-repository",
               *(["--skip-export"] if skip_export else [])]
    child = spawn("server.py", command, work / "server.log", f"http://127.0.0.1:{port}", thread_env())
    try:
        child.wait_healthy(timeout_s)
    except BaseException:
        child.stop()
        raise
    return child


def post(base_url: str, body: bytes, request_id: str, timeout_s: float = 120.0) -> dict:
    """One request on a connection of its own (as the evaluator sends them): status, seconds, detail."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    started = time.perf_counter()
    try:
        connection.request("POST", "/api/v1/inference", body,
                           {"Content-Type": "application/json", "X-Request-ID": request_id})
        response = connection.getresponse()
        status, payload = response.status, response.read()
    except OSError as exc:
        status, payload = 0, repr(exc).encode()
    finally:
        connection.close()
    return {"id": request_id, "status": status, "seconds": time.perf_counter() - started,
            "detail": "" if status == 200 else payload[:300].decode(errors="replace")}


def clients(base_url: str, bodies: list[bytes], count: int, requests: int, tag: str) -> list[dict]:
    """`count` clients at once, each sending `requests` requests back to back; every answer."""
    answers: list[dict] = []  # list.append is atomic: the clients' threads share it

    def client(index: int) -> None:
        for number in range(requests):
            answers.append(post(base_url, bodies[(index * requests + number) % len(bodies)],
                                f"{tag}-{index}-{number}"))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def predictions(log_path: Path) -> dict[str, float]:
    """request id -> the gateway's predicted seconds, from its JSON "request served" log lines."""
    found = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line) if line.startswith("{") else {}
        except ValueError:
            continue
        if entry.get("request_id") and entry.get("expected_s") is not None:
            found[entry["request_id"]] = float(entry["expected_s"])
    return found


def warm_up(base_url: str, bodies: list[bytes], requests: int = 1) -> None:
    for number in range(requests):
        if (answer := post(base_url, bodies[number % len(bodies)], f"warm-up-{number}"))["status"] != 200:
            raise RuntimeError(f"a warm-up request failed: {answer}")


def burst_run(args: argparse.Namespace, bodies: list[bytes], run: int) -> dict:
    load_before = load_average()
    child = start(args.checkpoint, args.out, args.candidates, run > 0, args.ready_timeout_s)
    try:
        warm_up(child.base_url, bodies)
        started = time.perf_counter()
        answers = clients(child.base_url, bodies, args.clients, args.requests, f"burst{run}")
        wall = time.perf_counter() - started
    finally:
        child.stop()
    refused = [a for a in answers if a["status"] == 503]
    served = [a["seconds"] for a in answers if a["status"] == 200]
    return {"run": run, "load": f"{load_before} -> {load_average()}", "requests": len(answers),
            "refused": len(refused), "other_errors": len(answers) - len(refused) - len(served),
            "slowest_s": max(served, default=None), "wall_s": wall,
            "rows_per_s": len(served) * args.rows / wall if wall else None,
            "refusal_sample": refused[0]["detail"] if refused else ""}


def prediction_levels(args: argparse.Namespace, bodies: list[bytes]) -> list[dict]:
    child = start(args.checkpoint, args.out, args.candidates, args.runs > 0, args.ready_timeout_s)
    levels = []
    try:
        warm_up(child.base_url, bodies, args.warm_requests)
        for concurrency in LEVELS:
            load = load_average()
            answers = clients(child.base_url, bodies, concurrency, args.level_requests, f"level{concurrency}")
            levels.append({"concurrency": concurrency, "load": f"{load} -> {load_average()}", "answers": answers})
            print(f"  concurrency {concurrency}: {sum(a['status'] == 200 for a in answers)}/{len(answers)} served",
                  flush=True)
    finally:
        child.stop()
    expected = predictions(args.out / "server.log")
    for level in levels:
        found = [a for a in level["answers"] if a["status"] == 200 and a["id"] in expected]
        pairs = [(expected[a["id"]], a["seconds"]) for a in found]
        ratios = [predicted / actual for predicted, actual in pairs]
        # after each client's first request: the level's steady state, not its ramp
        steady = [expected[a["id"]] / a["seconds"] for a in found if not a["id"].endswith("-0")]
        level.update(pairs=pairs, predicted_requests=len(pairs), steady_min=min(steady, default=None),
                     refused=sum(a["status"] == 503 for a in level["answers"]),
                     ratio_min=min(ratios, default=None), ratio_median=statistics.median(ratios) if ratios else None,
                     ratio_max=max(ratios, default=None))
        del level["answers"]
    return levels


def number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(args: argparse.Namespace, bursts: list[dict], levels: list[dict]) -> str:
    total = sum(run["refused"] for run in bursts)
    lines = [f"# Admission: {args.clients} clients x {args.requests} requests of {args.rows} rows at once",
             "", f"server.py --candidates {args.candidates}, {args.checkpoint.name}, one {args.rows}-row warm-up "
                 "per fresh server; load = 1-min load average before -> after (`uptime`)", "",
             *table("run", "refused", "other errors", "slowest answer (s)", "rows/s", "load"),
             *[f"| {r['run']} | {r['refused']} | {r['other_errors']} | {number(r['slowest_s'], 1)} | "
               f"{number(r['rows_per_s'], 1)} | {r['load']} |" for r in bursts],
             "", f"Refused in all: {total} of {sum(r['requests'] for r in bursts)} requests "
                 f"({sum(r['refused'] > 0 for r in bursts)} of {len(bursts)} runs with a refusal)."]
    samples = [r["refusal_sample"] for r in bursts if r["refusal_sample"]]
    if samples:
        lines += ["", f"A refusal: `{samples[0][:300]}`"]
    if levels:
        lines += ["", "## Predicted vs actual completion of admitted requests",
                  "", "predicted: the gateway's estimate when it admitted the request; actual: the client's time",
                  "", *table("concurrency", "requests with a prediction", "refused", "predicted/actual min",
                             "median", "max", "min after each client's first", "load"),
                  *[f"| {lv['concurrency']} | {lv['predicted_requests']} | {lv['refused']} | "
                    f"{number(lv['ratio_min'])} | {number(lv['ratio_median'])} | {number(lv['ratio_max'])} | "
                    f"{number(lv['steady_min'])} | {lv['load']} |" for lv in levels]]
    return "\n".join(lines) + "\n"


def plot(levels: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None or not any(level["pairs"] for level in levels):
        return
    figure, axes = plt.subplots(figsize=(6, 5))
    top = max(max(p, a) for level in levels for p, a in level["pairs"])
    for level in (level for level in levels if level["pairs"]):
        predicted, actual = zip(*level["pairs"])
        axes.scatter(actual, predicted, s=14, label=f"concurrency {level['concurrency']}")
    axes.plot([0, top], [0, top], color="grey", linewidth=0.8, label="predicted = actual")
    axes.plot([0, top], [0, top / 2], color="grey", linewidth=0.8, linestyle=":", label="predicted = actual / 2")
    axes.set(xlabel="actual completion (s)", ylabel="predicted at admission (s)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.admission", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10, help="fresh servers, one burst each (0: skip the phase)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client in a burst, back to back")
    parser.add_argument("--warm-requests", type=int, default=12, help="sequential requests before the levels")
    parser.add_argument("--level-requests", type=int, default=8, help="requests per client at each level")
    parser.add_argument("--rows", type=int, default=4, help="embeddings per request (the evaluator's 4)")
    parser.add_argument("--skip-predictions", action="store_true")
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=RESULTS / f"admission-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    os.environ.setdefault("EMBCAP_CACHE_DIR", str(ROOT / ".cache"))
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    pool = embedding_pool(max(64, args.clients * args.requests), args.rows, kind="realistic")
    bodies = [orjson.dumps({"embedding": request.reshape(-1).tolist()}) for request in pool]
    bursts: list[dict] = []
    try:
        for run in range(args.runs):
            bursts.append(result := burst_run(args, bodies, run))
            print(f"run {run}: refused {result['refused']}/{result['requests']}, slowest "
                  f"{number(result['slowest_s'], 1)} s, {number(result['rows_per_s'], 1)} rows/s, "
                  f"load {result['load']}", flush=True)
        levels = [] if args.skip_predictions else prediction_levels(args, bodies)
    finally:
        shutil.rmtree(args.out / "model_repository", ignore_errors=True)
    (args.out / "admission.md").write_text(report := render(args, bursts, levels))
    (args.out / "admission.json").write_text(json.dumps({"bursts": bursts, "levels": levels}, indent=1))
    plot(levels, args.out / "admission.png")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
