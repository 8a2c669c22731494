"""Does this text tower make the evaluator's data? Embed each row's `description` the evaluator's way and
compare it with the row's `description_embed` (the evaluator's dataset carries both).

A tower that is the scorer's reproduces every row to float precision (cosine 1.000000 up to rounding);
another tower (v1's imagebind_huge where the data came from videobind-v0.2, or the reverse) lands far
below. `check_tower` prints the agreement and says which.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DESCRIPTION, DESCRIPTION_EMBED = "description", "description_embed"
THRESHOLD = 0.999  # the least cosine a row of the tower's own data reaches (fp32 rounding is ~1e-6)


@dataclass
class Agreement:
    """How the tower's embeddings of the descriptions compare with the data's own."""

    rows: int
    minimum: float
    median: float
    below: int
    worst: list[tuple[float, str]]
    seconds: float

    @property
    def exit_code(self) -> int:
        return 0 if self.below == 0 else 1

    def summary(self, tower: Path, data: Path) -> str:
        head = (f"{tower} against {data}: {self.rows} rows, cosine min {self.minimum:.6f}, median {self.median:.6f}, "
                f"{self.below} below {THRESHOLD} ({self.seconds:.1f} s)")
        if self.below == 0:
            return head + ": the tower made this data"
        examples = "; ".join(f"{cosine:.4f} {text[:60]!r}" for cosine, text in self.worst)
        return (head + f". This tower is not the one that made the data (v1 imagebind_huge vs v2 videobind-v0.2 is "
                       f"the usual cause): its captions would be ranked in another space. Worst rows: {examples}")


def read_rows(path: Path, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """(descriptions, [rows, D] description_embed) of a parquet file or folder; ValueError naming the file."""
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    texts: list[str] = []
    vectors: list[np.ndarray] = []
    for file in files:
        names = pq.read_schema(file).names
        missing = [column for column in (DESCRIPTION, DESCRIPTION_EMBED) if column not in names]
        if missing:
            raise ValueError(f"{file}: column {missing[0]!r} missing (found: {', '.join(names)})")
        table = pq.read_table(file, columns=[DESCRIPTION, DESCRIPTION_EMBED])
        for row, (text, embed) in enumerate(zip(table.column(DESCRIPTION).to_pylist(),
                                                table.column(DESCRIPTION_EMBED).to_pylist())):
            if not isinstance(text, str) or not text or embed is None:
                raise ValueError(f"{file}: row {row}: empty description or description_embed")
            texts.append(text)
            vectors.append(np.asarray(embed, dtype=np.float32).reshape(-1))
            if limit is not None and len(texts) >= limit:
                return texts, np.stack(vectors)
    if not texts:
        raise ValueError(f"{path}: no parquet rows")
    return texts, np.stack(vectors)


def agreement(tower: Path, data: Path, limit: int | None = None, log=print) -> Agreement:
    """Embed the descriptions of `data` with `tower` (batches of 16 rows, progress logged) and compare."""
    from embcap.imagebind_encoder import ImageBindTextEncoder

    texts, reference = read_rows(data, limit)
    encoder = ImageBindTextEncoder(tower)
    if reference.shape[1] != encoder.dim:
        raise ValueError(f"{data}: description_embed has {reference.shape[1]} values per row, the tower makes "
                         f"{encoder.dim}")
    started, ours = time.time(), []
    for start in range(0, len(texts), 16):
        ours.append(encoder.encode(texts[start:start + 16]))
        log(f"  embedded {min(start + 16, len(texts))}/{len(texts)} descriptions")
    reference = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    cosine = np.sum(np.concatenate(ours) * reference, axis=1)
    order = np.argsort(cosine)[:3]
    return Agreement(len(texts), float(cosine.min()), float(np.median(cosine)), int((cosine < THRESHOLD).sum()),
                     [(float(cosine[i]), texts[i]) for i in order], time.time() - started)


def check_tower(tower: str | Path, data: str | Path, limit: int | None = None) -> Agreement:
    """`agreement`, printed; its exit_code is 1 when any row is below THRESHOLD."""
    tower, data = Path(tower), Path(data)
    result = agreement(tower, data, limit, log=lambda line: print(line, file=sys.stderr))
    print(result.summary(tower, data))
    return result
