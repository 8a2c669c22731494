"""In-process captioning for `python -m evaluate --checkpoint`, and the quality-vs-candidates curve.

A row's first n candidates do not depend on how many are decoded (each candidate samples
from its own seeded stream, embcap.sampling), so one decode of the largest count gives the
candidates of every smaller count: each count's captions are the reranker's choice among
the first n. Count 1 is candidate 0 alone (the greedy caption when `include_greedy`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tooling.evaluator import BatchResult, RunResult


def parse_counts(text: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8] (sorted, distinct, each >= 1)."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--candidates takes counts such as 8 or 1,2,4,8, not {text!r}") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"--candidates needs counts >= 1, not {text!r}")
    return counts


def in_process_runs(checkpoint: Path, embeddings: np.ndarray, batch_size: int, counts: list[int] | None,
                    progress: bool) -> dict[int, RunResult]:
    """Count -> the captions the served model would answer with that many candidates per row (default:
    the checkpoint's own count). Latencies are per batch of the one decode (of the largest count)."""
    from tqdm import tqdm

    from embcap.loading import resolve_checkpoint
    from embcap.pipeline import CaptionPipeline

    resolved = resolve_checkpoint(checkpoint, log=print)
    counts = counts or [resolved.spec.rerank.candidates]
    pipeline = CaptionPipeline(resolved, candidates=max(counts), slots=batch_size)
    runs = {count: RunResult() for count in counts}
    try:
        for start in tqdm(range(0, len(embeddings), batch_size), desc="generate", disable=not progress):
            rows = list(range(start, min(start + batch_size, len(embeddings))))
            started = time.monotonic()
            candidates = pipeline.candidate_rows(embeddings[rows])
            for count in counts:
                texts = pipeline.choose(embeddings[rows], [row[:count] for row in candidates]).texts
                runs[count].batches.append(BatchResult(rows, texts, time.monotonic() - started))
    finally:
        pipeline.close()
    return runs


def curve_markdown(rows: list[dict], judges: list[str], retrieval: dict[str, float] | None = None) -> str:
    """The quality-vs-candidates table: a row per count, a column per judge, nearest-caption retrieval last."""
    lines = ["| candidates per row | " + " | ".join(judges) + " |", "|---:|" + "---:|" * len(judges)]
    for row in rows:
        lines.append(f"| {row['candidates']} | " + " | ".join(f"{row['scores'][j]:.3f}" for j in judges) + " |")
    if retrieval:
        lines.append("| nearest training caption | " + " | ".join(
            "-" if retrieval.get(j) is None else f"{retrieval[j]:.3f}" for j in judges) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(rows: list[dict], judges: list[str], path: Path,
               retrieval: dict[str, float] | None = None) -> Path | None:
    """Mean similarity against candidates per row (log scale), a line per judge; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    counts = [row["candidates"] for row in rows]
    figure, axes = plt.subplots(figsize=(6, 4))
    for judge in judges:
        line, = axes.plot(counts, [row["scores"][judge] for row in rows], marker="o", label=judge)
        if retrieval and retrieval.get(judge) is not None:
            axes.axhline(retrieval[judge], linestyle="--", color=line.get_color(),
                         label=f"{judge}: nearest training caption")
    axes.set_xscale("log", base=2)
    axes.set_xticks(counts, [str(c) for c in counts])
    axes.set_xlabel("candidates per row (best of N, reranked)")
    axes.set_ylabel("mean cosine to the reference")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
