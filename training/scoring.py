"""Held-out scores through serving's own generation: a decoding engine of `embcap.engines`, judged like
`python -m evaluate` judges (`evaluate.judges`: MiniLM by default, any judge it accepts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embcap.engines import DEFAULT_ENGINE, create_engine, generate_blocking
from embcap.generation import CaptionGenerator
from evaluate.judges import Judge, load_judge
from evaluate.report import score_rows


@dataclass
class Score:
    """Mean judge cosine on `rows` held-out rows, with a few (reference, caption) pairs."""

    mean: float
    rows: int
    engine: str
    examples: list[tuple[str, str]]


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


def judge_score(judge: Judge, captions: list[str], references: list[str], engine: str) -> Score:
    """Mean cosine of captions against references."""
    scores = score_rows(judge, captions, references)
    return Score(float(np.mean(scores)) if len(scores) else 0.0, len(references), engine,
                 list(zip(references, captions))[:5])


def score_model(generator: CaptionGenerator, projector: torch.nn.Module, embeddings: np.ndarray,
                references: list[str], judge: Judge, engine_name: str, slots: int = 16) -> Score:
    """Score the model being trained (projector in eval mode for the call; state left as it was)."""
    was_training = projector.training
    projector.eval()
    try:
        with torch.inference_mode():
            prefix = projector(torch.from_numpy(embeddings).to(next(projector.parameters()).device))
        captions = caption_rows(generator, prefix.float().cpu().numpy(), engine_name, slots)
    finally:
        projector.train(was_training)
    return judge_score(judge, captions, references, engine_name)


def score_checkpoint(checkpoint: Path, embeddings: np.ndarray, references: list[str], judge: Judge,
                     device: str = "cpu", dtype: torch.dtype = torch.float32, slots: int = 16) -> Score:
    """Load a written checkpoint as the server does and score it with the serving default engine."""
    from embcap.loading import resolve_checkpoint

    resolved = resolve_checkpoint(checkpoint, log=print)
    generator, projector = resolved.load_generator(device, dtype), resolved.load_projector()
    return score_model(generator, projector, embeddings, references, judge, DEFAULT_ENGINE, slots)


__all__ = ["DEFAULT_ENGINE", "Score", "caption_rows", "judge_score", "load_judge", "score_checkpoint",
           "score_model"]
