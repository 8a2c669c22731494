"""Shared pieces of the benchmark: paths, the measured processes' environment, the request pool."""

from __future__ import annotations

import numpy as np

from embcap.contract import EMBEDDING_DIM
from runtime.local import ROOT
from runtime.threads import worker_environment

RESULTS = ROOT / "bench" / "results"


def thread_env() -> dict[str, str]:
    """The environment every measured process gets: the serving processes' thread settings
    (runtime.threads), forced, so that the baseline and the stack run under the same ones."""
    env = worker_environment(force=True)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("EMBCAP_CACHE_DIR", str(ROOT / ".cache"))
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
