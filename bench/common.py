"""Shared pieces of the benchmark: paths, the measured processes' environment, the request pool, and the
helpers the reports share (tables, numbers, verdict lines, plots)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from embcap.contract import EMBEDDING_DIM
from runtime.local import ROOT
from runtime.threads import worker_environment
from tooling.stats import VERDICT_WORDS

RESULTS = ROOT / "bench" / "results"


def thread_env() -> dict[str, str]:
    """The environment every measured process gets: the serving processes' thread settings
    (runtime.threads), forced, so that the baseline and the stack run under the same ones."""
    env = worker_environment(force=True)
    env["PYTHONUNBUFFERED"] = "1"
    return env


THREAD_SETTINGS_NOTE = "runtime.threads (one thread per library, OMP_WAIT_POLICY=PASSIVE), " \
                       "torch.set_num_threads(decoder_threads)"


INPUT_KINDS = ("normal", "realistic")


def embedding_pool(requests: int, rows: int, seed: int = 0, kind: str = "normal") -> np.ndarray:
    """[requests, rows, 1024] float32 embeddings; the same pool feeds the gateway, the baseline,
    perf_analyzer and the offline loop.

    "normal": standard-normal rows (norm ~32): the default model writes to its token limit, so
    every caption has the same length. "realistic": like the evaluator's (embcap.inputs: norms
    0.5-1), so captions end at their own lengths.
    """
    if kind == "realistic":
        from embcap.inputs import realistic_embeddings

        return realistic_embeddings(requests * rows, EMBEDDING_DIM, seed).reshape(requests, rows, EMBEDDING_DIM)
    if kind != "normal":
        raise ValueError(f"unknown input kind {kind!r}: one of {INPUT_KINDS}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((requests, rows, EMBEDDING_DIM)).astype(np.float32)


def level(rows: list[dict], concurrency: int) -> dict | None:
    return next((r for r in rows if r["concurrency"] == concurrency), None)


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def verdict_lines(title: str, targets: list[dict]) -> str:
    """One line per target: [MET|MISSED|n/a] target: detail."""
    return "\n".join([title] + [f"  [{VERDICT_WORDS[t['met']]:6}] {t['target']}: {t['detail']}" for t in targets])


def table(*columns: str, align: str = "---:") -> list[str]:
    """A markdown table's header and alignment rows."""
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(align for _ in columns) + "|"]


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path, dpi: int = 110) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path
