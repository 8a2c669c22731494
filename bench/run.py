"""One benchmark run: our stack, the naive baseline and the offline limit, side by side.

Phases run one after the other on the same CPU (never overlapping):
  1. server.py (export + Triton + gateway) started cold: process start -> healthy
  2. perf_analyzer straight at Triton's captioner over gRPC
  3. the load generator against the gateway at each concurrency (Triton statistics per level)
  4. the naive baseline server (bench.baseline), same load
  5. the offline limit: the served engine alone in-process at each batch size (bench.gpu_decoder --checkpoint)
  6. the engines side by side (bench.engines): each decoding engine, normal and realistic inputs, open loop
  7. best-of-N (bench.candidates): latency and captions/s against the candidates per row
then the reports (report.md, plot.png, engines.md, engines.png, candidates.md, candidates.png, results.json)
in the run's folder.

Longer than 250 lines: it is the phase list above, each phase a short function over one Plan.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import candidates, engine_report, engines, loadgen, machine, overhead, perf_analyzer, report, triton_stats
from bench.common import RESULTS, THREAD_SETTINGS_NOTE, embedding_pool, thread_env
from embcap.contract import DEFAULT_ENGINE, ENGINES
from runtime.local import ROOT, Child, PortPool, spawn

PHASES = ("perf_analyzer", "gateway", "baseline", "offline", "engines", "candidates")


class PlanError(ValueError):
    """A plan that cannot run as given (checked before any phase starts)."""


@dataclass
class Plan:
    """What to run; `quick` and `full` are presets (python -m bench run --help)."""

    mode: str = "full"
    checkpoint: Path = ROOT / "models" / "default"
    levels: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    rows_per_request: int = 4
    waves: int = 3  # requests per level = waves * concurrency (each worker sends `waves` requests) ...
    min_requests: int = 8  # ... but at least this many
    level_duration_s: float = 120.0  # stop issuing new requests after this (in-flight ones finish)
    timeout_s: float = 300.0  # client timeout per request; answers after 60 s (the evaluator's) are counted apart
    baseline_waves: int = 2
    baseline_min_requests: int = 6
    offline_batches: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    offline_repeats: int = 2  # timed decodes per batch size after one warm-up: the best counts
    pa_levels: list[int] = field(default_factory=lambda: [1, 16])
    pa_requests_per_level: int = 12  # at concurrency c: max(this, 2c)
    pool_requests: int = 64
    seed: int = 0
    decoder_threads: int = 2
    export_args: list[str] = field(default_factory=list)
    skip: set[str] = field(default_factory=set)  # of: perf_analyzer, gateway, baseline, offline, engines, candidates
    gateway_url: str | None = None  # an already running stack: no cold start measured
    grpc_url: str | None = None
    out: Path | None = None
    ready_timeout_s: float = 300.0
    engines: list[str] = field(default_factory=lambda: ["hf", "continuous"])  # the engines phase
    engine_levels: list[int] = field(default_factory=lambda: [1, 16, 32])
    open_loop_requests: int = 120  # p95 needs many samples for a tight interval
    open_loop_load: float = 0.8  # the open loop's arrival rate, as a share of the hf engine's capacity
    overhead_requests: int = 30  # paired gateway-overhead samples per path (bench/overhead.py); 0 skips
    # Phases 1-6 measure serving speed against one-caption baselines, so they serve one candidate per row
    # whatever the checkpoint says; the candidates phase measures N.
    candidates: int = 1
    candidate_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # the candidates phase
    candidate_requests: int = 16  # sequential 4-row requests per N: the evaluator's 16
    candidate_concurrency: int = 16  # the closed loop for captions/s
    ports: range | None = None  # the servers' ports come from here (default: any free port)
    _pool: PortPool | None = field(default=None, init=False, repr=False)

    def validate(self) -> None:
        """Raise PlanError naming what cannot run: before any phase, not after the first one's minutes."""
        problems = []
        unknown = [name for name in self.engines if name not in ENGINES]
        if unknown:
            problems.append(f"unknown engine(s) {', '.join(map(repr, unknown))}: choose from {', '.join(ENGINES)}")
        if "engines" not in self.skip and not self.engines:
            problems.append("no engines to compare (--engines is empty)")
        wrong = sorted(self.skip - set(PHASES))
        if wrong:
            problems.append(f"unknown phase(s) to skip {', '.join(map(repr, wrong))}: choose from {', '.join(PHASES)}")
        for name in ("levels", "engine_levels", "pa_levels", "offline_batches", "candidate_counts"):
            if any(value < 1 for value in getattr(self, name)):
                problems.append(f"{name} must be positive, not {getattr(self, name)}")
        if self.ports is not None and len(self.ports) < 2:
            problems.append("the port range needs at least 2 ports (a server takes an HTTP and a gRPC port)")
        if problems:
            raise PlanError("; ".join(problems))

    def port(self) -> int:
        """A port for a server of this run (from `ports` when given)."""
        if self._pool is None:
            self._pool = PortPool(self.ports)
        return self._pool.take()

    @classmethod
    def preset(cls, mode: str, **overrides) -> "Plan":
        if mode == "quick":
            base = dict(mode="quick", levels=[1, 4, 16], waves=2, min_requests=4, level_duration_s=45.0,
                        baseline_waves=1, baseline_min_requests=3, offline_batches=[1, 4, 16],
                        offline_repeats=1, pa_levels=[1], pa_requests_per_level=6,
                        pool_requests=16, engine_levels=[1, 16], open_loop_requests=16,
                        overhead_requests=10, candidate_counts=[1], candidate_requests=6)
        elif mode == "full":
            base = dict(mode="full")
        else:
            raise ValueError(f"unknown mode {mode!r} (quick or full)")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def requests_for(self, concurrency: int) -> int:
        return max(self.min_requests, self.waves * concurrency)

    def baseline_requests_for(self, concurrency: int) -> int:
        return max(self.baseline_min_requests, self.baseline_waves * concurrency)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def start_stack(plan: Plan, out: Path, export_args: list[str] | tuple[str, ...] = ()) -> tuple[Child, str, float]:
    """server.py as the container runs it, on free ports; returns (child, grpc url, cold start s)."""
    port, grpc_port = plan.port(), plan.port()
    command = [sys.executable, "server.py", "--checkpoint", str(plan.checkpoint), "--model-repository",
               str(out / "model_repository"), "--bind", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
               f"--candidates={plan.candidates}", *plan.export_args, *export_args]
    child = spawn("server.py", command, out / "logs" / "server.log", f"http://127.0.0.1:{port}", thread_env())
    return child, f"127.0.0.1:{grpc_port}", child.wait_healthy(plan.ready_timeout_s)


def start_baseline(plan: Plan, out: Path) -> tuple[Child, float]:
    port = plan.port()
    command = [sys.executable, "-m", "bench.baseline", "--checkpoint", str(plan.checkpoint), "--port", str(port),
               "--threads", str(plan.decoder_threads)]
    child = spawn("baseline", command, out / "logs" / "baseline.log", f"http://127.0.0.1:{port}", thread_env())
    return child, child.wait_healthy(plan.ready_timeout_s)


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
            "generation": spec.generation.model_dump(mode="json")}


def export_options(plan: Plan, out: Path) -> dict:
    """The options the stack was exported with (from export.json), else the defaults."""
    exported = out / "model_repository" / "export.json"
    if exported.is_file():
        return json.loads(exported.read_text()).get("options", {})
    from export.options import ExportOptions

    return ExportOptions().to_dict()


def warm(base_url: str, bodies: list[bytes], plan: Plan, burst: int = 1) -> None:
    """A few sequential requests, then one burst as large as the biggest level (fills the largest batch).
    Raises if a warm-up request fails: the numbers after it would be meaningless."""
    runs = [loadgen.warm_up(base_url, bodies, plan.rows_per_request, 2)]
    if burst > 1:
        runs.append(loadgen.warm_up(base_url, bodies, plan.rows_per_request, burst, concurrency=burst))
    for result in runs:
        if result.errors:
            raise RuntimeError(f"warm-up against {base_url} failed: {result.error_samples}")


def run(plan: Plan) -> dict:
    plan.validate()
    started = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = (plan.out or RESULTS / f"{stamp}-{plan.mode}").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log(f"results -> {out}")
    results: dict = {
        "mode": plan.mode, "machine": machine.describe(), "checkpoint": checkpoint_info(plan.checkpoint),
        "thread_settings": {"env": THREAD_SETTINGS_NOTE, "decoder_threads": plan.decoder_threads},
        "plan": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                 for k, v in plan.__dict__.items() if not k.startswith("_")},
        "gateway": [], "baseline": [], "offline": None, "perf_analyzer": [], "cold_start_s": None,
    }
    if results["machine"]["busy_processes_at_start"]:
        log("WARNING: other busy processes, timings will be skewed: "
            + "; ".join(results["machine"]["busy_processes_at_start"]))
    monitor = machine.ContentionMonitor().start()
    try:
        return _run_phases(plan, out, results, monitor, started)
    finally:
        monitor.stop()


def _run_phases(plan: Plan, out: Path, results: dict, monitor, started: float) -> dict:
    pool = embedding_pool(plan.pool_requests, plan.rows_per_request, plan.seed)
    bodies = loadgen.encode_bodies(pool)
    burst = max(plan.levels)

    # 1-3: our stack
    if not {"gateway", "perf_analyzer"} <= plan.skip:
        stack = None
        if plan.gateway_url:
            base, grpc_url = plan.gateway_url, plan.grpc_url
        else:
            monitor.phase = "ours"
            log("starting server.py (cold)")
            stack, grpc_url, cold = start_stack(plan, out)
            base = stack.base_url
            results["cold_start_s"] = cold
            log(f"healthy after {cold:.1f} s")
        results["export_options"] = export_options(plan, out)
        try:
            warm(base, bodies, plan, burst)
            if "perf_analyzer" not in plan.skip and grpc_url:
                input_data = perf_analyzer.write_input_data(pool, out / "perf_analyzer_input.json")
                for c in plan.pa_levels:
                    count = max(plan.pa_requests_per_level, 2 * c)
                    log(f"perf_analyzer -> Triton {grpc_url}, concurrency {c}, {count} requests")
                    snap = triton_stats.snapshot(grpc_url)
                    measured = perf_analyzer.run(grpc_url, c, count, plan.rows_per_request, input_data,
                                                 out / "perf_analyzer", log=log)
                    measured["extra"] = {"triton": triton_stats.delta(snap, triton_stats.snapshot(grpc_url))}
                    results["perf_analyzer"].append(measured)
            if "gateway" not in plan.skip:
                def before(c):
                    log(f"gateway: concurrency {c}, {plan.requests_for(c)} requests")
                    return triton_stats.snapshot(grpc_url) if grpc_url else None

                def after(c, snap):
                    return {"triton": triton_stats.delta(snap, triton_stats.snapshot(grpc_url))} if snap else {}

                levels = loadgen.sweep(base, bodies, plan.rows_per_request, plan.levels, plan.requests_for,
                                       plan.level_duration_s, plan.timeout_s, before, after)
                results["gateway"] = [r.to_dict() for r in levels]
            if plan.overhead_requests and grpc_url:
                log(f"gateway overhead, paired per request: {plan.overhead_requests} requests per path")
                results["overhead_paired"] = overhead.measure(base, grpc_url, plan.overhead_requests)
        finally:
            if stack is not None:
                results["stack_exit_code"] = stack.stop()

    # 4: the naive baseline
    if "baseline" not in plan.skip:
        monitor.phase = "baseline"
        log("starting the naive baseline")
        baseline, ready = start_baseline(plan, out)
        results["baseline_start_s"] = ready
        try:
            warm(baseline.base_url, bodies, plan)

            def announce(c):
                log(f"baseline: concurrency {c}, {plan.baseline_requests_for(c)} requests")

            levels = loadgen.sweep(baseline.base_url, bodies, plan.rows_per_request, plan.levels,
                                   plan.baseline_requests_for, plan.level_duration_s, plan.timeout_s, announce)
            results["baseline"] = [r.to_dict() for r in levels]
        finally:
            baseline.stop()

    # 5: the offline limit, at the listed batch sizes plus the batch the decoder really ran at top load
    if "offline" not in plan.skip:
        batches = list(plan.offline_batches)
        if 16 in plan.levels and 16 * plan.rows_per_request not in batches:  # the c=16 speed-up's ceiling
            batches.append(16 * plan.rows_per_request)
        top = next((r for r in results["gateway"] if r["concurrency"] == max(plan.levels)), None)
        if top and "triton" in top.get("extra", {}):
            mean_batch = round(top["extra"]["triton"]["decoder"]["mean_batch_rows"])
            if mean_batch > 0 and mean_batch not in batches:
                batches.append(mean_batch)
        monitor.phase = "offline"
        log(f"offline loop at batch sizes {batches}")
        engine = results.get("export_options", {}).get("engine") or DEFAULT_ENGINE  # the engine the stack served
        results["offline"] = run_offline(plan, out, sorted(batches), engine)

    # 6: the decoding engines side by side
    if "engines" not in plan.skip:
        monitor.phase = "engines"
        results["engines"] = engines.run_engines(plan, out, start_stack, warm, log)

    # 7: best-of-N against the candidates per row
    if "candidates" not in plan.skip:
        monitor.phase = "candidates"
        results["candidates"] = candidates.run_candidates(plan, out, start_stack, warm, log)

    results["wall_s"] = time.perf_counter() - started
    results["machine"]["other_cpu_cores_by_phase"] = monitor.summary()
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = report.write(results, out)
    if results.get("engines"):
        text += "\n" + engine_report.write(results["engines"], out)
    if results.get("candidates"):
        text += "\n" + candidates.write(results["candidates"], out)
    print(text, flush=True)
    log(f"done in {results['wall_s']:.0f} s: {out / 'report.md'}, {out / 'plot.png'}")
    return results
