"""Held-out scores through serving's own generation: a decoding engine of `embcap.engines`, judged like
`python -m evaluate` judges (`evaluate.judges`: MiniLM by default, any judge it accepts), beside the
nearest-training-caption retrieval baseline on the same rows and inputs."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embcap.engines import DEFAULT_ENGINE, create_engine, generate_blocking
from embcap.generation import CaptionGenerator
from evaluate.fluency import fluency, token_counter
from evaluate.judges import Judge, load_judge, mpnet_folder
from evaluate.report import retrieval_baseline, score_rows

AUTO_JUDGE = "auto"  # --also-judge: mpnet when its folder is there (make judges), else none
NO_JUDGE = "none"


@dataclass
class Score:
    """Mean cosine on `rows` held-out rows per judge (the first is the main one), with a few
    (reference, caption) pairs, and the retrieval baseline per judge when it was computed."""

    means: dict[str, float]
    rows: int
    engine: str
    examples: list[tuple[str, str]]
    retrieval: dict[str, float] = field(default_factory=dict)
    fluency: dict = field(default_factory=dict)  # evaluate.fluency's shares of the captions, when computed
    per_row: dict[str, list[float]] = field(default_factory=dict, repr=False)  # judge -> each row's cosine

    @property
    def mean(self) -> float:
        """The main judge's mean."""
        return next(iter(self.means.values()))

    def record(self) -> dict:
        """JSON-ready form for training.json."""
        return {"score": round(self.mean, 4), "judges": {k: round(v, 4) for k, v in self.means.items()},
                "retrieval": {k: round(v, 4) for k, v in self.retrieval.items()}, "rows": self.rows,
                "engine": self.engine, "examples": self.examples, **({"fluency": self.fluency} if self.fluency else {})}


def load_judges(main: str, also: str) -> dict[str, Judge]:
    """{name: judge}, the main judge first. `also` is a judge spec, `auto` (MPNet when available) or `none`;
    an explicitly named judge that cannot load is an error, `auto` without MPNet says so and goes on."""
    name, judge = load_judge(main)
    judges = {name: judge}
    if also == NO_JUDGE:
        return judges
    if also == AUTO_JUDGE:
        if mpnet_folder() is None:
            print("second judge: all-mpnet-base-v2 not found (make judges assembles it); MiniLM only",
                  file=sys.stderr)
            return judges
        also = "mpnet"
    other_name, other = load_judge(also)
    judges.setdefault(other_name, other)
    return judges


def caption_rows(generator: CaptionGenerator, prefix: np.ndarray, engine_name: str, slots: int) -> list[str]:
    """Captions of [N, P, H] prefix vectors by the engine `engine_name`, as the Triton decoder makes them."""
    engine = create_engine(engine_name, generator, slots)
    try:
        texts: list[str] = []
        for start in range(0, len(prefix), slots):
            texts += generate_blocking(engine, prefix[start:start + slots])
        return texts
    finally:
        engine.close()


def judge_score(judges: dict[str, Judge], captions: list[str], references: list[str], engine: str) -> Score:
    """Mean cosine of captions against references, per judge."""
    per_row = {name: score_rows(judge, captions, references) for name, judge in judges.items()}
    means = {name: float(np.mean(rows)) if references else 0.0 for name, rows in per_row.items()}
    return Score(means, len(references), engine, list(zip(references, captions))[:5],
                 per_row={name: [round(float(v), 5) for v in rows] for name, rows in per_row.items()})


@dataclass
class Retrieval:
    """The nearest-training-caption baseline: training captions and their conditioning vectors (the keys)."""

    captions: list[str]
    keys: np.ndarray

    def scores(self, judges: dict[str, Judge], embeddings: np.ndarray, references: list[str]) -> dict[str, float]:
        """Mean cosine, per judge, of the training caption nearest each input (cosine in the conditioning space)."""
        first = next(iter(judges.values()))
        _, picked = retrieval_baseline(first, embeddings, references, self.captions, self.keys)
        return {name: float(np.mean(score_rows(judge, picked, references))) for name, judge in judges.items()}


def score_model(generator: CaptionGenerator, projector: torch.nn.Module, embeddings: np.ndarray,
                references: list[str], judges: dict[str, Judge], engine_name: str, slots: int = 16) -> Score:
    """Score the model being trained (projector in eval mode for the call; state left as it was)."""
    was_training = projector.training
    projector.eval()
    try:
        with torch.inference_mode():
            prefix = projector(torch.from_numpy(embeddings).to(next(projector.parameters()).device))
        captions = caption_rows(generator, prefix.float().cpu().numpy(), engine_name, slots)
    finally:
        projector.train(was_training)
    score = judge_score(judges, captions, references, engine_name)
    score.fluency = fluency(captions, token_counter(generator.tokenizer),
                            generator.spec.generation.max_new_tokens).record()
    return score


def score_checkpoint(checkpoint: Path, inputs: dict[str, np.ndarray], references: list[str],
                     judges: dict[str, Judge], device: str = "cpu", dtype: torch.dtype = torch.float32,
                     slots: int = 16) -> dict[str, Score]:
    """Load a written checkpoint as the server does and score it with the serving default engine on each of
    `inputs` ({shape name: [N, 1024] embeddings of the same rows})."""
    from embcap.loading import resolve_checkpoint

    resolved = resolve_checkpoint(checkpoint, log=print)
    generator, projector = resolved.load_generator(device, dtype), resolved.load_projector()
    return {shape: score_model(generator, projector, embeddings, references, judges, DEFAULT_ENGINE, slots)
            for shape, embeddings in inputs.items()}


__all__ = ["AUTO_JUDGE", "DEFAULT_ENGINE", "NO_JUDGE", "Retrieval", "Score", "caption_rows", "judge_score",
           "load_judges", "score_checkpoint", "score_model"]
