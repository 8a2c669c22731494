"""Before and after: the checkpoint a run continued (`--init-from`) and the one it wrote, scored the same way.

For each: greedy captions on the final evaluation's held-out rows in each input shape, and the best-of-N
curve (`python -m evaluate --candidates 1,2,4,8,16`: one decode of N candidates per row, reranked as served)
on `--curve-samples` evaluator-shaped rows, every score by every judge, with the share of degenerate
captions (`evaluate.fluency`) and their mean length. The "before" half is measured when the run starts, so
a run that writes over the checkpoint it continues (`--out` = `--init-from`) still compares both, and a
resumed run reuses it. The rows are those of `python -m evaluate --limit N --seed SEED`, so its commands
give the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evaluate.curve import in_process_runs
from evaluate.datasets import shape_inputs
from evaluate.fluency import fluency, token_counter
from evaluate.judges import Judge
from evaluate.report import score_rows
from training.scoring import Retrieval, score_checkpoint

CURVE_COUNTS = (1, 2, 4, 8, 16)
PER_ROW = "per_row"  # each row's cosine per judge: kept in before.json for the paired changes, not in training.json
CURVE_INPUTS = "realistic"
BEFORE_FILE = "before.json"


def sample_rows(count: int, limit: int, seed: int) -> list[int]:
    """A seeded sample of `limit` of `count` rows, in order (all rows when fewer): evaluate's `--limit`."""
    import random

    if limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


def curve_scores(folder: Path, embeddings: np.ndarray, references: list[str], judges: dict[str, Judge],
                 counts: tuple[int, ...] = CURVE_COUNTS) -> dict:
    """{count: {judges, fluency}} of the served caption with each count of candidates per row."""
    from transformers import AutoTokenizer

    from embcap.loading import resolve_checkpoint

    resolved = resolve_checkpoint(folder)
    counter = token_counter(AutoTokenizer.from_pretrained(resolved.decoder_dir))
    limit = resolved.spec.generation.max_new_tokens
    runs = in_process_runs(folder, embeddings, 16, list(counts), progress=False)
    curve = {}
    for count, run in runs.items():
        captions = run.captions(len(references))
        per_row = {name: score_rows(judge, captions, references) for name, judge in judges.items()}
        curve[str(count)] = {"judges": {name: round(float(np.mean(rows)), 4) for name, rows in per_row.items()},
                             "fluency": fluency(captions, counter, limit).record(),
                             PER_ROW: {name: [round(float(v), 5) for v in rows] for name, rows in per_row.items()}}
    return curve


def evaluate_checkpoint(folder: Path, references: dict[str, list[str]], inputs: dict[str, dict[str, np.ndarray]],
                        judges: dict[str, Judge], device: str, dtype) -> dict:
    """Greedy scores per input shape (`inputs["greedy"]`) and the best-of-N curve (`inputs["curve"]`)."""
    greedy = score_checkpoint(folder, inputs["greedy"], references["greedy"], judges, device, dtype)
    record = {"greedy": {shape: {**score.record(), PER_ROW: score.per_row} for shape, score in greedy.items()}}
    if inputs.get("curve"):
        from embcap.checkpoint import load_checkpoint

        if load_checkpoint(folder).spec.rerank.encoder is not None:
            record["curve"] = curve_scores(folder, inputs["curve"][CURVE_INPUTS], references["curve"], judges)
    return record


def comparison_inputs(held, final_rows: int, curve_rows: int, shapes: list[str], seed: int,
                      final_seed: int) -> tuple[dict, dict]:
    """(references, inputs) of the greedy rows (`final_rows`, drawn with `final_seed` as the final evaluation
    draws them) and of the curve's rows (`curve_rows`, drawn as `python -m evaluate --limit` draws them)."""
    greedy_rows = sample_rows(len(held), final_rows, final_seed)
    clean = held.embed(greedy_rows)
    references = {"greedy": [held.texts[i] for i in greedy_rows]}
    inputs = {"greedy": {shape: shape_inputs(clean, shape, seed) for shape in shapes}}
    if curve_rows:
        rows = sample_rows(len(held), curve_rows, seed)
        references["curve"] = [held.texts[i] for i in rows]
        inputs["curve"] = {CURVE_INPUTS: shape_inputs(held.embed(rows), CURVE_INPUTS, seed)}
    return references, inputs


def with_retrieval(record: dict, retrieval: Retrieval, judges: dict[str, Judge], references: dict,
                   inputs: dict) -> dict:
    """Add the nearest-training-caption baseline of the same rows and inputs to each greedy score and the curve."""
    for shape, score in record["greedy"].items():
        score["retrieval"] = {k: round(v, 4) for k, v in
                              retrieval.scores(judges, inputs["greedy"][shape], references["greedy"]).items()}
    if "curve" in record:
        record["curve_retrieval"] = {k: round(v, 4) for k, v in retrieval.scores(
            judges, inputs["curve"][CURVE_INPUTS], references["curve"]).items()}
    return record


def changes(after: dict, before: dict) -> dict[str, list[float]]:
    """Per judge, the paired change after - before over the same rows: [mean, 95% low, 95% high]."""
    from tooling.stats import paired_difference

    estimates = {judge: paired_difference(rows, before[PER_ROW][judge]) for judge, rows in after[PER_ROW].items()
                 if judge in before.get(PER_ROW, {})}
    return {judge: [round(e.value, 4), round(e.low, 4), round(e.high, 4)] for judge, e in estimates.items()}


def without_rows(scores: dict) -> dict:
    """`scores` (evaluate_checkpoint's) without the per-row lists, for training.json."""
    return {key: ({inner: {k: v for k, v in entry.items() if k != PER_ROW} for inner, entry in value.items()}
                  if key in ("greedy", "curve") else value) for key, value in scores.items()}


def load_before(run_dir: Path, settings: dict) -> tuple[dict, float] | None:
    """(scores, minutes) of the "before" half measured at the start of this run with these settings, if any."""
    path = run_dir / BEFORE_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return (saved["scores"], saved["minutes"]) if saved.get("settings") == settings else None


def save_before(run_dir: Path, settings: dict, scores: dict, minutes: float) -> None:
    """Keep the "before" half for a resumed run."""
    text = json.dumps({"settings": settings, "minutes": minutes, "scores": scores}, indent=2) + "\n"
    (run_dir / BEFORE_FILE).write_text(text)


__all__ = ["BEFORE_FILE", "CURVE_COUNTS", "CURVE_INPUTS", "PER_ROW", "changes", "comparison_inputs", "curve_scores",
           "evaluate_checkpoint", "load_before", "sample_rows", "save_before", "with_retrieval", "without_rows"]
