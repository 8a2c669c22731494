"""Scores, loss accounting, latency percentiles and the retrieval baseline, as JSON and a table."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from tooling.evaluator import LOSS_REASONS, RunResult
from evaluate.judges import Judge


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


def score_rows(judge: Judge, captions: Sequence[str | None], references: Sequence[str]) -> np.ndarray:
    """Per-row cosine; rows whose batch was lost score 0, like the evaluator."""
    scores = np.zeros(len(references), dtype=np.float32)
    answered = [i for i, c in enumerate(captions) if c is not None]
    if answered:
        generated = judge([captions[i] for i in answered])
        reference = judge([references[i] for i in answered])
        scores[answered] = np.sum(generated * reference, axis=1)
    return scores


def retrieval_baseline(
    judge: Judge, embeddings: np.ndarray, references: Sequence[str], train_captions: Sequence[str],
    train_embeddings: np.ndarray,
) -> tuple[np.ndarray, list[str]]:
    """Nearest training caption (by cosine in the conditioning space) scored by the judge."""
    query = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    keys = train_embeddings / np.maximum(np.linalg.norm(train_embeddings, axis=1, keepdims=True), 1e-12)
    chunks = np.array_split(query, max(1, len(query) // 256))
    nearest = np.concatenate([np.argmax(chunk @ keys.T, axis=1) for chunk in chunks])
    picked = [train_captions[i] for i in nearest]
    return score_rows(judge, picked, references), picked


def build_report(
    *,
    dataset_name: str,
    references: Sequence[str],
    sources: Sequence[str],
    run: RunResult,
    scores: np.ndarray,
    judge_name: str,
    target: str,
    settings: dict,
    extra_judges: dict[str, np.ndarray] | None = None,
    baseline: tuple[np.ndarray, list[str]] | None = None,
    extra_baselines: dict[str, np.ndarray] | None = None,
    n_examples: int = 5,
    fluency: dict | None = None,
) -> dict:
    """Everything the evaluator would measure, plus diagnostics (`fluency`: evaluate.fluency's shares)."""
    captions = run.captions(len(references))
    answered = [i for i, c in enumerate(captions) if c is not None]
    latencies = [b.latency_s for b in run.batches]
    reasons = Counter(b.loss_reason for b in run.batches if b.loss_reason)
    by_source = {}
    for source in sorted(set(sources)):
        rows = [i for i, s in enumerate(sources) if s == source]
        entry = {"rows": len(rows), "mean_similarity": float(np.mean(scores[rows]))}
        if baseline is not None:
            entry["retrieval_baseline"] = float(np.mean(baseline[0][rows]))
        by_source[source] = entry
    step = max(1, len(answered) // n_examples) if answered else 1
    examples = [{"reference": references[i], "generated": captions[i], "similarity": round(float(scores[i]), 4)}
                for i in answered[::step][:n_examples]]
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "target": target,
        "dataset": dataset_name,
        "rows": len(references),
        "judge": judge_name,
        "settings": settings,
        "mean_similarity": float(np.mean(scores)) if len(scores) else 0.0,
        "mean_similarity_answered": float(np.mean(scores[answered])) if answered else None,
        "std_similarity": float(np.std(scores)) if len(scores) else None,
        "batches": len(run.batches),
        "batches_lost": sum(reasons.values()),
        "rows_lost": len(references) - len(answered),
        "lost_by_reason": {reason: reasons.get(reason, 0) for reason in LOSS_REASONS},
        "loss_details": [b.detail for b in run.batches if b.loss_reason][:5],
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                      "max": max(latencies) if latencies else None},
        "by_source": by_source,
        "examples": examples,
    }
    report["row_scores"] = [round(float(x), 4) for x in scores]
    if fluency:
        report["fluency"] = fluency
    if extra_judges:
        report["other_judges"] = {name: float(np.mean(s)) for name, s in extra_judges.items()}
    if baseline is not None:
        report["retrieval_baseline"] = float(np.mean(baseline[0]))
        if extra_baselines:
            report["other_judges_retrieval_baseline"] = {name: float(np.mean(s)) for name, s in extra_baselines.items()}
        report["retrieval_examples"] = [{"reference": references[i], "nearest_training_caption": baseline[1][i]}
                                        for i in answered[::step][:n_examples]]
    return report


def markdown(report: dict) -> str:
    """A readable table of the report."""
    def fmt(value):
        return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    lines = [f"## Evaluation of {report['target']}", "", "| metric | value |", "|---|---|"]
    lines.append(f"| dataset | {report['dataset']} ({report['rows']} rows) |")
    lines.append(f"| judge | {report['judge']} |")
    lines.append(f"| **mean similarity (evaluator score)** | **{fmt(report['mean_similarity'])}** |")
    lines.append(f"| mean similarity, answered rows only | {fmt(report['mean_similarity_answered'])} |")
    if "retrieval_baseline" in report:
        lines.append(f"| nearest-training-caption baseline | {fmt(report['retrieval_baseline'])} |")
    for name, value in report.get("other_judges", {}).items():
        lines.append(f"| mean similarity, judge {name} | {fmt(value)} |")
    for name, value in report.get("other_judges_retrieval_baseline", {}).items():
        lines.append(f"| nearest-training-caption baseline, judge {name} | {fmt(value)} |")
    lines.append(f"| batches lost / sent | {report['batches_lost']} / {report['batches']} |")
    for reason, count in report["lost_by_reason"].items():
        if count:
            lines.append(f"| lost: {reason} | {count} |")
    lat = report["latency_s"]
    lines.append(f"| latency p50 / p95 / max (s) | {fmt(lat['p50'])} / {fmt(lat['p95'])} / {fmt(lat['max'])} |")
    if "fluency" in report:
        shares = report["fluency"]
        limit = shares.get("over_token_limit")
        lines.append(f"| degenerate captions (empty, repeated words, at the token limit) | "
                     f"{100 * shares['degenerate']:.1f}% ({100 * shares['empty']:.1f}%, "
                     f"{100 * shares['repeated_words']:.1f}%, {'-' if limit is None else f'{100 * limit:.1f}%'}) |")
        lines.append(f"| mean caption length (words) | {shares['mean_words']:.2f} |")
    for source, entry in report["by_source"].items():
        base = f", baseline {fmt(entry['retrieval_baseline'])}" if "retrieval_baseline" in entry else ""
        lines.append(f"| source `{source}` ({entry['rows']} rows) | {fmt(entry['mean_similarity'])}{base} |")
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines += ["", "| similarity | reference | generated |", "|---|---|---|"]
    for ex in report["examples"]:
        lines.append(f"| {ex['similarity']:.3f} | {cell(ex['reference'])} | {cell(ex['generated'])} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write `stem`.json and `stem`.md under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
