"""One benchmark run: our stack, the naive baseline and the offline limit, side by side.

Phases run one after the other on the same CPU (never overlapping):
  1. server.py (export + Triton + gateway) started cold: process start -> healthy ("stack", with its warm-up)
  2. perf_analyzer straight at Triton's captioner over gRPC
  3. the load generator against the gateway at each concurrency (Triton statistics per level)
  4. the gateway's overhead, paired per request against direct gRPC (bench/overhead.py)
  5. the naive baseline server (bench.baseline, greedy), same load
  6. the offline limit: the served engine alone in-process at each batch size (bench.gpu_decoder --checkpoint)
  7. the engines side by side (bench.engines, one candidate per row): each decoding engine, both inputs, open loop
  8. best-of-N (bench.candidates): latency and captions/s against the candidates per row
Phases 1-4 serve the checkpoint's own candidates per row (best-of-N as shipped) unless --candidates says
otherwise. Each phase's results are saved as it ends and a failing phase is recorded while the others run
(bench/phases.py); then the reports (report.md, plot.png, engines.md, engines.png, candidates.md,
candidates.png, results.json) in the run's folder.

Longer than 250 lines: it is the phase list above, each phase a short function over one Plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import candidates, engine_report, engines, loadgen, machine, overhead, perf_analyzer, report, triton_stats
from bench.common import RESULTS, THREAD_SETTINGS_NOTE, embedding_pool, thread_env
from bench.phases import Phases, error_text, save
from bench.plan import STACK_PHASES, Plan
from embcap.contract import DEFAULT_ENGINE, served_models
from runtime.local import ROOT, Child, spawn

def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _healthy(child: Child, timeout_s: float) -> float:
    """Seconds from start to healthy; a child that does not get there is stopped, then the error raised."""
    try:
        return child.wait_healthy(timeout_s)
    except BaseException:
        child.stop()
        raise


def start_stack(plan: Plan, out: Path, export_args: list[str] | tuple[str, ...] = ()) -> tuple[Child, str, float]:
    """server.py as the container runs it, on free ports; returns (child, grpc url, cold start s)."""
    port, grpc_port = plan.port(), plan.port()
    served = [] if plan.candidates is None else [f"--candidates={plan.candidates}"]
    command = [sys.executable, "server.py", "--checkpoint", str(plan.checkpoint), "--model-repository",
               str(out / "model_repository"), "--bind", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
               "--fresh-export", *served, *plan.export_args, *export_args]  # a cold start exports
    child = spawn("server.py", command, out / "logs" / "server.log", f"http://127.0.0.1:{port}", thread_env())
    return child, f"127.0.0.1:{grpc_port}", _healthy(child, plan.ready_timeout_s)


def start_baseline(plan: Plan, out: Path) -> tuple[Child, float]:
    port = plan.port()
    command = [sys.executable, "-m", "bench.baseline", "--checkpoint", str(plan.checkpoint), "--port", str(port),
               "--threads", str(plan.decoder_threads)]
    child = spawn("baseline", command, out / "logs" / "baseline.log", f"http://127.0.0.1:{port}", thread_env())
    return child, _healthy(child, plan.ready_timeout_s)


def run_offline(plan: Plan, out: Path, batches: list[int], engine: str) -> dict:
    """The decoder's own batched throughput in-process, no server: bench.gpu_decoder on the checkpoint, in a
    process of its own with the serving thread settings."""
    folder = out / "offline"
    command = [sys.executable, "-m", "bench.gpu_decoder", "--checkpoint", str(plan.checkpoint), "--device", "cpu",
               "--threads", str(plan.decoder_threads), "--engines", engine, "--fp8=", "--candidates=",
               "--agreement-checkpoint", "none", "--batches", ",".join(map(str, batches)),
               "--repeats", str(plan.offline_repeats), "--out", str(folder)]
    with open(out / "logs" / "offline.log", "ab") as log_file:
        subprocess.run(command, cwd=ROOT, env=thread_env(), stdout=log_file, stderr=subprocess.STDOUT, check=True,
                       timeout=1800)
    report = json.loads((folder / "results.json").read_text())
    (measured,) = report["engines"]
    return {"engine": engine, "threads": plan.decoder_threads, "generation": report["generation"],
            "results": [{"batch": int(batch), **entry} for batch, entry in measured["batches"].items()]}


def checkpoint_info(checkpoint: Path) -> dict:
    from embcap.checkpoint import load_checkpoint

    spec = load_checkpoint(checkpoint).spec
    return {"path": str(checkpoint), "name": spec.name, "prefix_length": spec.prefix_length,
            "generation": spec.generation.model_dump(mode="json"), "candidates": spec.rerank.candidates}


def export_options(plan: Plan, out: Path) -> dict:
    """The options the stack was exported with (from export.json), else the defaults."""
    from export.cache import EXPORT_RECORD

    exported = out / "model_repository" / EXPORT_RECORD
    if exported.is_file():
        return json.loads(exported.read_text()).get("options", {})
    from export.options import ExportOptions

    return ExportOptions().to_dict()


def warm(base_url: str, bodies: list[bytes], plan: Plan, burst: int = 1) -> None:
    """A few sequential requests, then one burst as large as the biggest level (fills the largest batch).
    Raises if a warm-up request fails: the numbers after it would be meaningless. Admission refusals in the
    burst (503 over_capacity) are the gateway's own answer to more than it can serve in time: noted, not fatal."""
    runs = [loadgen.warm_up(base_url, bodies, plan.rows_per_request, 2)]
    if burst > 1:
        runs.append(loadgen.warm_up(base_url, bodies, plan.rows_per_request, burst, concurrency=burst))
    for result in runs:
        if result.errors > result.refused or not result.ok:
            raise RuntimeError(f"warm-up against {base_url} failed: {result.error_samples}")
        if result.refused:
            log(f"warm-up at concurrency {result.concurrency}: {result.refused} of {result.requests} requests "
                "refused over capacity (503, the gateway's admission)")


def run(plan: Plan) -> dict:
    """Run every phase of `plan`; the results, with `failed_phases` naming any phase that raised."""
    plan.validate()
    started = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = (plan.out or RESULTS / f"{stamp}-{plan.mode}").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log(f"results -> {out}")
    checkpoint = checkpoint_info(plan.checkpoint)
    results: dict = {
        "mode": plan.mode, "machine": machine.describe(), "checkpoint": checkpoint,
        "served_candidates": plan.candidates or (None if plan.gateway_url else checkpoint["candidates"]),  # expected
        "thread_settings": {"env": THREAD_SETTINGS_NOTE, "decoder_threads": plan.decoder_threads},
        "plan": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                 for k, v in plan.__dict__.items() if not k.startswith("_")},
        "gateway": [], "baseline": [], "offline": None, "perf_analyzer": [], "cold_start_s": None,
    }
    if results["machine"]["busy_processes_at_start"]:
        log("WARNING: other busy processes, timings will be skewed: "
            + "; ".join(results["machine"]["busy_processes_at_start"]))
    phases = Phases(results, out, log)
    save(results, out)
    monitor = machine.ContentionMonitor().start()
    try:
        _run_phases(plan, out, results, monitor, phases)
    except BaseException as exc:  # interrupted (Ctrl-C, SIGTERM as SystemExit): the report says so, then it ends
        results["interrupted"] = error_text(exc) or type(exc).__name__
        raise
    finally:
        monitor.stop()
        results["wall_s"] = time.perf_counter() - started
        results["machine"]["other_cpu_cores_by_phase"] = monitor.summary()
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        save(results, out)
        _write_reports(results, out)
    log(f"done in {results['wall_s']:.0f} s: {out / 'report.md'}, {out / 'plot.png'}"
        + (f"; FAILED phases: {', '.join(phases.failed)}" if phases.failed else ""))
    return results


def _write_reports(results: dict, out: Path) -> None:
    """report.md and plot.png always; a completed engines or candidates phase adds its own files."""
    try:
        text = report.write(results, out)
    except Exception as exc:  # results.json is saved already: what was measured is kept
        log(f"report.md not written: {error_text(exc)}")
        return
    for name, write in (("engines", engine_report.write), ("candidates", candidates.write)):
        if results.get(name) and name not in results["failed_phases"]:
            try:
                text += "\n" + write(results[name], out)
            except Exception as exc:  # the main report is written already: say what is missing, keep going
                text += f"\n{name} report not written: {error_text(exc)}\n"
    print(text, flush=True)


def _run_phases(plan: Plan, out: Path, results: dict, monitor, phases: Phases) -> None:
    pool = embedding_pool(plan.pool_requests, plan.rows_per_request, plan.seed)
    bodies = loadgen.encode_bodies(pool)
    _stack_phases(plan, out, results, monitor, phases, pool, bodies)

    if "baseline" not in plan.skip:
        monitor.phase = "baseline"
        phases.run("baseline", lambda: _baseline(plan, out, results, bodies))

    if "offline" not in plan.skip:
        monitor.phase = "offline"
        phases.run("offline", lambda: _offline(plan, out, results))

    if "engines" not in plan.skip:  # one candidate per row: the engines are compared on their decoding alone
        monitor.phase = "engines"
        phases.run("engines", lambda: engines.run_engines(plan, out, start_stack, warm, log,
                                                          results.setdefault("engines", {})))

    if "candidates" not in plan.skip:
        monitor.phase = "candidates"
        phases.run("candidates", lambda: candidates.run_candidates(plan, out, start_stack, warm, log,
                                                                   results.setdefault("candidates", {})))


def _stack_phases(plan: Plan, out: Path, results: dict, monitor, phases: Phases, pool, bodies) -> None:
    """Phases 1-4 on one stack: server.py started here (or the given one), warmed, then measured."""
    wanted = [name for name in STACK_PHASES if name not in plan.skip]
    if "overhead" in wanted and not plan.overhead_requests:
        wanted.remove("overhead")
    if not wanted:
        return
    stack: dict = {"child": None, "base": plan.gateway_url, "grpc": plan.grpc_url}

    def start() -> None:
        if not plan.gateway_url:
            monitor.phase = "ours"
            log("starting server.py (cold)")
            stack["child"], stack["grpc"], cold = start_stack(plan, out)
            stack["base"] = stack["child"].base_url
            results["cold_start_s"] = cold
            log(f"healthy after {cold:.1f} s")
        results["export_options"] = export_options(plan, out)
        if stack["grpc"]:  # what the running decoder really serves (an external stack: as it was started)
            results["served_candidates"] = triton_stats.served_candidates(stack["grpc"])
        warm(stack["base"], bodies, plan, max(plan.levels))

    try:
        if not phases.run("stack", start):
            for name in wanted:
                phases.not_run(name, "our stack did not start or warm up (phase 'stack')")
            return
        base, grpc_url = stack["base"], stack["grpc"]
        if "perf_analyzer" in wanted and grpc_url:
            phases.run("perf_analyzer", lambda: _perf_analyzer(plan, out, results, pool, grpc_url))
        if "gateway" in wanted:
            phases.run("gateway", lambda: _gateway(plan, results, bodies, base, grpc_url))
        if "overhead" in wanted and grpc_url:
            def paired() -> None:
                log(f"gateway overhead, paired per request: {plan.overhead_requests} requests per path (direct "
                    "gRPC, the gateway on a kept connection and on a new one per request)")
                results["overhead_paired"] = overhead.measure(base, grpc_url, plan.overhead_requests)
            phases.run("overhead", paired)
    finally:
        if stack["child"] is not None:
            results["stack_exit_code"] = stack["child"].stop()


def _perf_analyzer(plan: Plan, out: Path, results: dict, pool, grpc_url: str) -> None:
    input_data = perf_analyzer.write_input_data(pool, out / "perf_analyzer_input.json")
    models = served_models(results["served_candidates"] or 1)
    for c in plan.pa_levels:
        count = max(plan.pa_requests_per_level, 2 * c)
        log(f"perf_analyzer -> Triton {grpc_url}, concurrency {c}, {count} requests")
        snap = triton_stats.snapshot(grpc_url, models)
        try:
            measured = perf_analyzer.run(grpc_url, c, count, plan.rows_per_request, input_data,
                                         out / "perf_analyzer", log=log)
        except perf_analyzer.Refused as refusal:  # the server's answer to more than it can serve in time
            log(f"perf_analyzer at concurrency {c}: refused over capacity ({refusal})")
            measured = {"concurrency": c, "requests": count, "refused": str(refusal)}
        measured["extra"] = {"triton": triton_stats.delta(snap, triton_stats.snapshot(grpc_url, models))}
        results["perf_analyzer"].append(measured)


def _gateway(plan: Plan, results: dict, bodies: list[bytes], base: str, grpc_url: str | None) -> None:
    models = served_models(results["served_candidates"] or 1)
    for c in plan.levels:  # level by level into results: a failing level keeps the ones before it
        log(f"gateway: concurrency {c}, {plan.requests_for(c)} requests")
        snap = triton_stats.snapshot(grpc_url, models) if grpc_url else None
        (measured,) = loadgen.sweep(base, bodies, plan.rows_per_request, [c], plan.requests_for,
                                    plan.level_duration_s, plan.timeout_s)
        if snap:
            measured.extra["triton"] = triton_stats.delta(snap, triton_stats.snapshot(grpc_url, models))
        results["gateway"].append(measured.to_dict())


def _baseline(plan: Plan, out: Path, results: dict, bodies: list[bytes]) -> None:
    log("starting the naive baseline (greedy: one caption per row)")
    baseline, ready = start_baseline(plan, out)
    results["baseline_start_s"] = ready
    try:
        warm(baseline.base_url, bodies, plan)
        for c in plan.levels:
            log(f"baseline: concurrency {c}, {plan.baseline_requests_for(c)} requests")
            (measured,) = loadgen.sweep(baseline.base_url, bodies, plan.rows_per_request, [c],
                                        plan.baseline_requests_for, plan.level_duration_s, plan.timeout_s)
            results["baseline"].append(measured.to_dict())
    finally:
        baseline.stop()


def _offline(plan: Plan, out: Path, results: dict) -> None:
    """The offline limit at the listed batch sizes plus the batch the decoder really ran at top load."""
    batches = list(plan.offline_batches)
    if 16 in plan.levels and 16 * plan.rows_per_request not in batches:  # the c=16 speed-up's ceiling
        batches.append(16 * plan.rows_per_request)
    top = next((r for r in results["gateway"] if r["concurrency"] == max(plan.levels)), None)
    if top and "triton" in top.get("extra", {}):
        mean_batch = round(top["extra"]["triton"]["decoder"]["mean_batch_rows"])
        if mean_batch > 0 and mean_batch not in batches:
            batches.append(mean_batch)
    log(f"offline loop at batch sizes {batches} (one caption per row)")
    engine = results.get("export_options", {}).get("engine") or DEFAULT_ENGINE  # the engine the stack served
    results["offline"] = run_offline(plan, out, sorted(batches), engine)
