"""Evaluation datasets: conditioning embeddings plus reference captions.

Three kinds:

* the built-in held-out split (``models/default/heldout.txt``, ``source<TAB>caption`` lines),
* any captions file (one caption per line, or ``source<TAB>caption``), embedded with
  the project's encoder (`embcap.text_encoder.encode_captions`),
* parquet files in the evaluator's own layout: columns ``video_embed`` (1024 floats
  per row) and ``description`` (the reference text).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embcap.captions_file import read_caption_lines

DEFAULT_HELDOUT = Path(__file__).resolve().parent.parent / "models" / "default" / "heldout.txt"
NORMS = ("as-is", "realistic")


def shape_inputs(embeddings: np.ndarray, norms: str, seed: int = 0) -> np.ndarray:
    """'as-is' keeps the embeddings; 'realistic' makes each row the mean of 15 unit vectors around its
    direction (`embcap.inputs.realistic_around`: norm at most 1, mostly 0.5-0.9), as the evaluator's are."""
    if norms == "as-is":
        return embeddings
    if norms != "realistic":
        raise ValueError(f"norms must be one of {', '.join(NORMS)}, not {norms!r}")
    from embcap.inputs import realistic_around

    return realistic_around(embeddings, seed)


@dataclass
class Dataset:
    """Rows to caption: embeddings [N, D] float32, references and a source tag per row."""

    name: str
    embeddings: np.ndarray
    references: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.references)

    def with_norms(self, norms: str, seed: int = 0) -> "Dataset":
        """The same rows with their embeddings shaped by `shape_inputs` ('as-is' returns self)."""
        if norms == "as-is":
            return self
        return Dataset(f"{self.name} ({norms} norms)", shape_inputs(self.embeddings, norms, seed), self.references,
                       self.sources)

    def sample(self, limit: int | None, seed: int = 0) -> "Dataset":
        """A seeded random subset of `limit` rows (all rows when limit is None or too large)."""
        if limit is None or limit >= len(self):
            return self
        rows = sorted(random.Random(seed).sample(range(len(self)), limit))
        return Dataset(self.name, self.embeddings[rows], [self.references[i] for i in rows],
                       [self.sources[i] for i in rows])


def from_captions(path: str | Path, name: str | None = None) -> Dataset:
    """Embed a captions file with the project's 1024-d encoder."""
    from embcap.text_encoder import encode_captions

    captions, sources = read_caption_lines(path)
    if not captions:
        raise ValueError(f"{path} holds no captions")
    return Dataset(name or Path(path).name, encode_captions(captions), captions, sources)


def parquet_files(path: str | Path) -> list[Path]:
    """A parquet file, or every *.parquet below a folder (sorted)."""
    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no parquet files under {path}")
    return files


def from_parquet(path: str | Path) -> Dataset:
    """Rows of `video_embed` (list of floats) and `description` from parquet file(s)."""
    import pyarrow.parquet as pq

    embeddings: list[np.ndarray] = []
    references: list[str] = []
    for file in parquet_files(path):
        table = pq.read_table(file, columns=["video_embed", "description"])
        for embed, text in zip(table.column("video_embed").to_pylist(), table.column("description").to_pylist()):
            if embed is None or text is None:
                continue
            embeddings.append(np.asarray(embed, dtype=np.float32).reshape(-1))
            references.append(str(text))
    if not references:
        raise ValueError(f"{path}: no rows with both video_embed and description")
    widths = {e.shape[0] for e in embeddings}
    if len(widths) != 1:
        raise ValueError(f"{path}: video_embed rows have different lengths {sorted(widths)}")
    return Dataset(Path(path).name, np.stack(embeddings), references, ["parquet"] * len(references))


def load_dataset(spec: str | None) -> Dataset:
    """`None`/"heldout" -> built-in split; a .parquet file or folder -> parquet; else a captions file."""
    if spec in (None, "heldout"):
        if not DEFAULT_HELDOUT.is_file():
            raise FileNotFoundError(f"built-in held-out split {DEFAULT_HELDOUT} is missing")
        return from_captions(DEFAULT_HELDOUT, name="heldout")
    path = Path(spec)
    if path.is_dir() or path.suffix == ".parquet":
        return from_parquet(path)
    return from_captions(path)


def cached_encoding(captions: list[str], progress: bool = True) -> np.ndarray:
    """encode_captions() of many captions (float16), cached under the embcap cache by content hash."""
    from embcap.decoder_source import cache_dir
    from embcap.staged_folder import staged_file
    from embcap.text_encoder import encode_captions

    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    path = cache_dir() / "embeddings" / f"{digest}.npy"
    if path.is_file():
        return np.load(path)
    vectors = encode_captions(captions, batch_size=128, progress=progress).astype(np.float16)
    with staged_file(path) as file:  # two processes may fill the same entry at once
        np.save(file, vectors)
    return vectors
