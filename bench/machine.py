"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import time


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first `key` line of a /proc file, None where there is none."""
    try:
        return next((line.split(":", 1)[1].strip() for line in open(path) if line.startswith(key)), None)
    except OSError:
        return None


def cpu_model() -> str:
    return _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    flags = set((_proc_field("/proc/cpuinfo", "flags") or "").split())
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"})


def memory_gib() -> float:
    total = _proc_field("/proc/meminfo", "MemTotal")
    return int(total.split()[0]) / 1024 / 1024 if total else float("nan")


def busy_processes(sample_s: float = 1.0, threshold: float = 20.0) -> list[str]:
    """Other processes using more than `threshold`% CPU (a training run, say): they skew timings."""
    try:
        import psutil
    except ImportError:
        return []
    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            usage = p.cpu_percent(None)
        except psutil.Error:
            continue
        if usage >= threshold:
            command = " ".join(p.info.get("cmdline") or [])[:100]
            busy.append(f"pid {p.pid} {usage:.0f}% {command}")
    return busy


def describe() -> dict:
    import numpy
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(memory_gib(), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "busy_processes_at_start": busy_processes(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


class ContentionMonitor:
    """Samples, every `interval_s`, how much CPU processes outside this benchmark use (in cores):
    the machine's busy time minus that of this process and its children. Per phase means go
    into the report, so a run disturbed by other work says so."""

    def __init__(self, interval_s: float = 2.0) -> None:
        import threading

        self.interval_s = interval_s
        self.phase = "start"
        self.samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contention-monitor", daemon=True)

    @staticmethod
    def _busy_and_ours() -> tuple[float, float]:
        import psutil

        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        me = psutil.Process()
        ours = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                ours += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return busy, ours

    def _run(self) -> None:
        try:
            last = self._busy_and_ours()
        except Exception:
            return
        last_time = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                now = self._busy_and_ours()
            except Exception:
                continue
            elapsed = time.monotonic() - last_time
            others = max(0.0, (now[0] - last[0]) - max(0.0, now[1] - last[1])) / elapsed if elapsed > 0 else 0.0
            self.samples.setdefault(self.phase, []).append(others)
            last, last_time = now, time.monotonic()

    def start(self) -> "ContentionMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict[str, float]:
        """Phase -> mean CPU cores used by other processes."""
        return {phase: round(sum(v) / len(v), 2) for phase, v in self.samples.items() if v}
