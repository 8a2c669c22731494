"""What one benchmark run measures: the phases, levels and counts (`quick` and `full` presets), checked
before the first phase starts (bench/run.py runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from embcap.contract import ENGINES
from runtime.local import ROOT, PortPool

PHASES = ("perf_analyzer", "gateway", "overhead", "baseline", "offline", "engines", "candidates")  # --skip names
STACK_PHASES = ("perf_analyzer", "gateway", "overhead")  # measured on the one stack the run starts


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
    # Candidates per row served in phases 1-4 (None: the checkpoint's own rerank.candidates, as shipped). The
    # naive baseline, the offline loop and the engines phase decode one caption per row; the candidates phase
    # measures each N.
    candidates: int | None = None
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
        if self.candidates is not None and self.candidates < 1:
            problems.append(f"candidates must be positive, not {self.candidates}")
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
