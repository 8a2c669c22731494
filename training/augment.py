"""The training input noise model: conditioning vectors shaped like the evaluator's, plus optional CapDec noise.

The evaluator's embeddings are means of 15 unit clip embeddings (`embcap.inputs`): norm below 1 and a
direction that wanders from the caption's. A model trained only on clean unit-norm text embeddings
falls to the level of nearest-caption retrieval on such inputs, so each training row is, with
probability `fraction`, replaced by `embcap.inputs.realistic_around` of itself (fresh clips every
step), and then, if `noise_std` > 0, N(0, noise_std^2) is added per dimension (CapDec's noise).
Everything is a function of (seed, step), so a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from embcap.inputs import CLIP_COSINE_RANGE, CLIPS_PER_EMBEDDING, realistic_around

AUTO, REALISTIC, NONE = "auto", "realistic", "none"
AUGMENTS = (AUTO, REALISTIC, NONE)
# Conditioning that already comes from video clips (the evaluator's layout): shaping it again would
# average clip means; text-embedding conditioning (the encoder, description_embed) gets the evaluator's shape.
VIDEO_CONDITIONING = "video_embed"


def resolve(augment: str, conditioning: str) -> str:
    """`auto` -> `realistic` for text-embedding conditioning, `none` for video_embed; others stay."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, not {augment!r}")
    if augment == AUTO:
        return NONE if conditioning == VIDEO_CONDITIONING else REALISTIC
    return augment


@dataclass(frozen=True)
class NoiseModel:
    """What `apply` does to a batch; recorded as it is in training.json and the model card."""

    augment: str
    fraction: float
    noise_std: float
    clips_per_embedding: int = CLIPS_PER_EMBEDDING
    clip_cosine_range: tuple[float, float] = CLIP_COSINE_RANGE

    def __post_init__(self) -> None:
        if self.augment not in (REALISTIC, NONE):
            raise ValueError(f"a resolved augment is realistic or none, not {self.augment!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"augment fraction must be in [0, 1], got {self.fraction}")
        if self.noise_std < 0:
            raise ValueError(f"noise std must be >= 0, got {self.noise_std}")

    def record(self) -> dict:
        """The settings as JSON-ready data."""
        record = asdict(self)
        record["clip_cosine_range"] = list(self.clip_cosine_range)
        record["source"] = "embcap.inputs.realistic_around" if self.augment == REALISTIC else None
        return record

    def describe(self) -> str:
        """One sentence for the model card."""
        parts = []
        if self.augment == REALISTIC and self.fraction > 0:
            low, high = self.clip_cosine_range
            parts.append(f"{self.fraction:.0%} of the rows of every batch replaced by the mean of "
                         f"{self.clips_per_embedding} unit 'clips' around them (clip-to-direction cosine uniform in "
                         f"[{low}, {high}], norms about 0.43-0.95: `embcap.inputs.realistic_around`), drawn anew "
                         "each step")
        if self.noise_std > 0:
            parts.append(f"N(0, {self.noise_std}^2) per dimension added (CapDec noise)")
        return "; ".join(parts) + "." if parts else "none (clean conditioning vectors)."

    def apply(self, embeddings: np.ndarray, seed: int, step: int) -> np.ndarray:
        """The batch as the model sees it at `step`: float32, a pure function of (embeddings, seed, step)."""
        out = np.array(embeddings, dtype=np.float32, copy=True)
        rng = np.random.default_rng(_stream(seed, step))
        if self.augment == REALISTIC and self.fraction > 0 and len(out):
            rows = np.flatnonzero(rng.random(len(out)) < self.fraction)
            if rows.size:
                out[rows] = realistic_around(out[rows], seed=int(rng.integers(1 << 62)))
        if self.noise_std > 0:
            out += (self.noise_std * rng.standard_normal(out.shape)).astype(np.float32)
        return out


def _stream(seed: int, step: int) -> int:
    """A seed for step `step` that no other stream of the run shares (held-out inputs use small seeds)."""
    return int.from_bytes(hashlib.sha256(f"augment:{seed}:{step}".encode()).digest()[:8], "little")
