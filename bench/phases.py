"""A run keeps what it measured: each phase's results are written as the phase ends, a phase that fails
is recorded (its error in results.json and the report, its traceback in logs/<phase>.traceback) and the
other phases still run; the command then exits non-zero naming the failed phases (bench/__main__.py)."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Callable

MAX_ERROR_CHARS = 1000  # of a failed phase's error in results.json and the report


def error_text(exc: BaseException) -> str:
    """`Type: message` on one line (a subprocess's output has many), cut to MAX_ERROR_CHARS."""
    text = " / ".join(line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "...(cut)"


def save(results: dict, out: Path) -> Path:
    """results.json, replaced whole (a reader never sees half a file)."""
    path = out / "results.json"
    staging = path.with_suffix(".json.partial")
    staging.write_text(json.dumps(results, indent=2, default=str) + "\n")
    staging.replace(path)
    return path


class Phases:
    """Runs the phases of one run over its `results` dict, saving it after each one."""

    def __init__(self, results: dict, out: Path, log: Callable[[str], None]) -> None:
        self.results, self.out, self.log = results, out, log
        results.setdefault("failed_phases", {})
        results.setdefault("phases_not_run", {})
        results.setdefault("phase_seconds", {})

    def run(self, name: str, phase: Callable[[], object]) -> bool:
        """Run `phase`; True when it ended normally. What it stored in `results` is kept either way."""
        started = time.perf_counter()
        try:
            phase()
            return True
        except Exception as exc:  # a phase's failure is recorded; the run goes on
            error = error_text(exc)
            trace = self.out / "logs" / f"{name}.traceback"
            trace.write_text("".join(traceback.format_exception(exc)))
            self.results["failed_phases"][name] = {"error": error, "traceback": str(trace),
                                                   "after_s": round(time.perf_counter() - started, 1)}
            self.log(f"phase {name} FAILED: {error} (traceback: {trace}); the other phases still run")
            return False
        finally:
            self.results["phase_seconds"][name] = round(time.perf_counter() - started, 1)
            save(self.results, self.out)

    def not_run(self, name: str, reason: str) -> None:
        """A phase that could not start because one it needs failed."""
        self.results["phases_not_run"][name] = reason
        self.log(f"phase {name} not run: {reason}")

    @property
    def failed(self) -> list[str]:
        return list(self.results["failed_phases"])
