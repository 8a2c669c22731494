"""What an engine tells operators: its counters, gauges and step-time histogram, as Triton custom metrics.

The Triton decoder model hands `EngineMetrics` a factory over `pb_utils.MetricFamily`; a
reporter thread pushes the engine's state every `interval_s` (off the decode loop: each
metric update is a round trip to the Triton server), and once more when the model stops.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

from embcap.engines.base import Engine

# EngineStats field -> (counter name, help). Each counter only ever grows.
COUNTERS = {
    "blank_fallbacks": ("embcap_blank_caption_fallbacks_total",
                        "Caption rows (candidates, with best-of-N) that stayed blank up to max_new_tokens and "
                        "were answered with the fallback text"),
    "cancelled_rows": ("embcap_cancelled_rows_total",
                       "Caption rows (candidates, with best-of-N) dropped mid-decode because their request was "
                       "cancelled or timed out"),
    "refused_rows": ("embcap_engine_refused_rows_total", "Rows refused at once because the engine's backlog was full"),
    "failed_steps": ("embcap_engine_failed_steps_total", "Decode steps or admissions that raised"),
    "steps": ("embcap_engine_steps_total", "Decode steps (hf: generate() calls)"),
    "step_rows": ("embcap_engine_step_rows_total", "Rows decoded, summed over steps (per step: / steps_total)"),
    "admitted_jobs": ("embcap_engine_admitted_requests_total", "Requests that started decoding"),
    "queue_wait_s": ("embcap_engine_queue_wait_seconds_total",
                     "Seconds requests waited in the engine before their prefill (per request: / admitted)"),
}
# Engine attribute -> (gauge name, help)
GAUGES = {
    "active_rows": ("embcap_engine_active_rows", "Rows decoding now"),
    "queued_rows": ("embcap_engine_queued_rows", "Rows submitted and waiting for a free slot"),
}
STEP_HISTOGRAM = ("embcap_engine_step_seconds", "Duration of one decode step (hf: one generate() call)")
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class MetricFactory(Protocol):
    """Makes labelled metrics (in the stub: pb_utils.MetricFamily); each returned object has
    increment(v), set(v) or observe(v)."""

    def counter(self, name: str, description: str, labels: dict[str, str]): ...

    def gauge(self, name: str, description: str, labels: dict[str, str]): ...

    def histogram(self, name: str, description: str, labels: dict[str, str], buckets: tuple[float, ...]): ...


class EngineMetrics:
    """Pushes an engine's stats into metrics from a background thread."""

    def __init__(self, engine: Engine, factory: MetricFactory, labels: dict[str, str], interval_s: float = 1.0,
                 warn: Callable[[str], None] = lambda _: None) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.warn = warn
        self.counters = {field: factory.counter(name, text, labels) for field, (name, text) in COUNTERS.items()}
        self.gauges = {field: factory.gauge(name, text, labels) for field, (name, text) in GAUGES.items()}
        self.steps = factory.histogram(*STEP_HISTOGRAM, labels, STEP_BUCKETS)
        self.reported = {field: 0 for field in COUNTERS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-metrics", daemon=True)

    def start(self) -> "EngineMetrics":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and report what is left."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.report()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.report()
            except Exception as exc:  # a metrics failure must never touch serving
                self.warn(f"engine metrics: {type(exc).__name__}: {exc}")

    def report(self) -> None:
        """Add what the counters gained since the last report; set the gauges; observe new step times."""
        stats = self.engine.stats
        for field, metric in self.counters.items():
            value = getattr(stats, field)
            if value > self.reported[field]:
                if field == "blank_fallbacks":
                    self.warn(f"decoder: {value - self.reported[field]} blank row(s) answered with the fallback "
                              f"caption ({value} in all)")
                metric.increment(value - self.reported[field])
                self.reported[field] = value
        for field, metric in self.gauges.items():
            metric.set(getattr(self.engine, field))
        times, stats.step_times = stats.step_times, []  # swapped, not cleared: the loop appends to the new list
        for seconds in times:
            self.steps.observe(seconds)
