"""Training data: parquet files in the evaluator's layout, or captions embedded with the project's encoder.

Parquet (``omegalabsinc/omega-multimodal``'s layout): ``video_embed`` (1024 floats per row,
norm at most 1) and ``description`` (the reference text); optionally ``description_embed``
(text embeddings of the descriptions, for CapDec-style training), ``video_id`` and
others. Every file is checked before training starts; a bad one stops the run with an
error naming the file, the column and the row.

Captions (today's default recipe): a captions file, or ``wordnet`` for the WordNet corpus of
`tooling.corpus`; the conditioning vectors are `embcap.text_encoder.encode_captions` of
each caption, computed per batch. A captions file is UTF-8 text with one caption per line,
or ``SOURCE<TAB>caption`` (SOURCE tags the row, e.g. ``scene``; scores are reported per tag);
blank lines and lines starting with ``#`` are skipped (`embcap.captions_file`).

Longer than 250 lines: the parquet checks (every file, column and row named in the errors)
and the caption-embedding path yield the same Examples, so they live together.
"""

from __future__ import annotations

import glob
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embcap.contract import EMBEDDING_DIM

DESCRIPTION = "description"
VIDEO_ID = "video_id"
CONDITIONING_COLUMNS = ("video_embed", "description_embed")
DEFAULT_CONDITIONING = "video_embed"
ENCODER = "encoder"  # conditioning by the project's text encoder (captions data)
WORDNET = "wordnet"
CORPUS_SPLIT = "corpus split"  # DataSet.split of the WordNet corpus, whose held-out rows are evaluate's heldout.txt
NORM_TOLERANCE = 1e-3
CAPTIONS_FORMAT = ("a captions file: UTF-8 text, one caption per line, or 'SOURCE<TAB>caption' (SOURCE is a tag such "
                   "as scene or sentence, reported per tag); blank lines and lines starting with # are skipped")


class DataError(ValueError):
    """Training data that cannot be used; the message, one line, names the file, column and row."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class Examples:
    """Rows to train or score on: target texts and their conditioning vectors.

    `embeddings` is None for captions data: `embed()` then encodes the texts on the fly.
    """

    texts: list[str]
    embeddings: np.ndarray | None
    video_ids: list[str] | None = None
    sources: list[str] = field(default_factory=list)
    targets: np.ndarray | None = None  # a reward objective's target column (e.g. description_embed), if read

    def __len__(self) -> int:
        return len(self.texts)

    def embed(self, rows: list[int]) -> np.ndarray:
        """[len(rows), 1024] float32 conditioning vectors of `rows`."""
        if self.embeddings is not None:
            return self.embeddings[rows]
        from embcap.text_encoder import encode_captions

        return encode_captions([self.texts[i] for i in rows])

    def subset(self, rows: list[int]) -> "Examples":
        """The given rows, in order."""
        return Examples(
            texts=[self.texts[i] for i in rows],
            embeddings=None if self.embeddings is None else self.embeddings[rows],
            video_ids=None if self.video_ids is None else [self.video_ids[i] for i in rows],
            sources=[self.sources[i] for i in rows] if self.sources else [],
            targets=None if self.targets is None else self.targets[rows],
        )


@dataclass
class DataSet:
    """A train and a held-out split, and what they were read from (for the model card)."""

    train: Examples
    heldout: Examples
    files: list[str]
    conditioning: str
    split: str


def expand(pattern: str) -> list[Path]:
    """Parquet files named by a glob, a file or a folder (sorted); DataError when none match."""
    path = Path(pattern)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not files:
        raise DataError(f"{pattern}: no parquet files found")
    return files


def is_parquet(spec: str) -> bool:
    """True when `spec` names parquet data (a .parquet file or glob, or a folder)."""
    return spec.endswith(".parquet") or Path(spec).is_dir()


def _vectors(file: Path, column, name: str, width: int) -> np.ndarray:
    """A list<float> column as [rows, width] float32, checked row by row."""
    import pyarrow as pa

    array = column.combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)):
        raise DataError(f"{file}: column {name!r} has type {array.type}, expected a list of {width} floats")
    nulls = np.asarray(array.is_null().to_numpy(zero_copy_only=False))
    if nulls.any():
        raise DataError(f"{file}: column {name!r} row {int(np.argmax(nulls))}: missing value")
    widths = np.asarray(pa.compute.list_value_length(array).to_numpy(zero_copy_only=False))
    wrong = np.flatnonzero(widths != width)
    if wrong.size:
        row = int(wrong[0])
        raise DataError(f"{file}: column {name!r} row {row}: {int(widths[row])} values, expected {width}")
    flat = np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    if flat.size != len(array) * width:  # a null inside a list
        raise DataError(f"{file}: column {name!r}: missing values inside the lists")
    vectors = flat.reshape(len(array), width)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DataError(f"{file}: column {name!r} row {int(np.argmin(finite))}: NaN or infinite value")
    return vectors


def read_parquet(files: list[Path], conditioning: str = DEFAULT_CONDITIONING, width: int = EMBEDDING_DIM,
                 max_norm: float | None = None, target: str | None = None) -> Examples:
    """Read and check every file; raise DataError naming the file, column and row of the first problem.
    `target` names a second vector column to read (a reward objective's targets)."""
    import pyarrow.parquet as pq

    texts: list[str] = []
    vectors: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    ids: list[str] = []
    with_ids = True
    for file in files:
        try:
            names = pq.read_schema(file).names
        except Exception as exc:  # pyarrow raises several types for a file that is not parquet
            raise DataError(f"{file}: not a readable parquet file ({exc})") from exc
        for column in (conditioning, DESCRIPTION, *([target] if target else [])):
            if column not in names:
                raise DataError(f"{file}: column {column!r} missing (found: {', '.join(names)})")
        has_id = VIDEO_ID in names
        with_ids = with_ids and has_id
        extra = [target] if target and target != conditioning else []
        table = pq.read_table(file, columns=[conditioning, DESCRIPTION, *extra] + ([VIDEO_ID] if has_id else []))
        if table.num_rows == 0:
            raise DataError(f"{file}: no rows")
        file_vectors = _vectors(file, table.column(conditioning), conditioning, width)
        if max_norm is not None:
            norms = np.linalg.norm(file_vectors, axis=1)
            over = np.flatnonzero(norms > max_norm + NORM_TOLERANCE)
            if over.size:
                raise DataError(f"{file}: column {conditioning!r} row {int(over[0])}: norm {norms[over[0]]:.3f} "
                                f"above {max_norm}")
        descriptions = table.column(DESCRIPTION).to_pylist()
        for row, text in enumerate(descriptions):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{file}: column {DESCRIPTION!r} row {row}: empty description")
        texts += [text.strip() for text in descriptions]
        vectors.append(file_vectors)
        if target:
            targets.append(_vectors(file, table.column(target), target, width) if extra else file_vectors)
        if has_id:
            ids += [str(v) for v in table.column(VIDEO_ID).to_pylist()]
    return Examples(texts=texts, embeddings=np.concatenate(vectors), video_ids=ids if with_ids else None,
                    sources=["parquet"] * len(texts), targets=np.concatenate(targets) if target else None)


def _stable_order(keys: list[str], seed: int) -> list[str]:
    """`keys` in a seeded order that does not depend on their original order."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())


def split(examples: Examples, heldout_size: int, seed: int) -> tuple[Examples, Examples, str]:
    """Hold out about `heldout_size` rows: whole videos when ids are present (no id on both sides)."""
    if heldout_size <= 0:
        return examples, examples.subset([]), "none"
    if examples.video_ids is not None:
        rows_of: dict[str, list[int]] = {}
        for row, key in enumerate(examples.video_ids):
            rows_of.setdefault(key, []).append(row)
        held: list[int] = []
        for key in _stable_order(list(rows_of), seed):
            if len(held) >= heldout_size:
                break
            held += rows_of[key]
        how = "by video_id"
    else:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        held = order[:heldout_size]
        how = "by row (no video_id column)"
    if len(held) >= len(examples):
        raise DataError(f"held-out split of {heldout_size} rows leaves no training rows ({len(examples)} in all)")
    held_set = set(held)
    return (examples.subset([i for i in range(len(examples)) if i not in held_set]),
            examples.subset(sorted(held_set)), how)


def captions_examples(captions: list[str], sources: list[str], name: str = "captions") -> Examples:
    """Captions conditioned on the project's encoder (encoded per batch); `name` is the file, for errors."""
    if not captions:
        raise DataError(f"{name}: no captions")
    for row, text in enumerate(captions):
        if not text.strip():
            raise DataError(f"{name}: caption number {row + 1}: empty caption")
    return Examples(texts=list(captions), embeddings=None, sources=list(sources))


def read_captions_file(path: str | Path) -> tuple[list[str], list[str]]:
    """(captions, sources) of a captions file; DataError when it is missing or unreadable."""
    from embcap.captions_file import read_caption_lines

    if not Path(path).is_file():
        raise DataError(f"{path}: no such captions file (nor parquet files)")
    try:
        return read_caption_lines(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def load_data(spec: str, *, conditioning: str, heldout: str | None, heldout_size: int, seed: int,
              run_dir: Path, max_train: int = 80000, target: str | None = None) -> DataSet:
    """Read `spec` (parquet glob/folder, a captions file or "wordnet") and split it, checking everything first.
    `target`: a vector column of parquet data read beside the conditioning (a reward objective's targets).
    With "wordnet" and a `heldout` captions file, that file is the held-out split and its captions are taken
    out of the corpus's training rows (a run continuing a checkpoint keeps the checkpoint's split)."""
    if is_parquet(spec):
        files = expand(spec)
        max_norm = 1.0 if conditioning == DEFAULT_CONDITIONING else None
        data = read_parquet(files, conditioning, max_norm=max_norm, target=target)
        names = [str(f) for f in files]
        if heldout:
            held_files = expand(heldout)
            held = read_parquet(held_files, conditioning, max_norm=max_norm, target=target)
            names += [str(f) for f in held_files]
            return DataSet(data, held, names, conditioning, f"separate files ({heldout})")
        train, held, how = split(data, heldout_size, seed)
        return DataSet(train, held, names, conditioning, how)
    if conditioning != ENCODER:
        raise DataError(f"{spec}: captions data is conditioned on the encoder, not {conditioning!r} "
                        "(give parquet files for a column)")
    if spec == WORDNET:
        from tooling.corpus import build_corpus, read_captions, write_captions

        train_path, held_path = run_dir / "train.txt", run_dir / "heldout.txt"
        if not (train_path.is_file() and held_path.is_file()):
            corpus = build_corpus(seed=seed, heldout_size=heldout_size, max_train=max_train)
            write_captions(corpus.train, train_path)
            write_captions(corpus.heldout, held_path)
        train = read_captions(train_path)
        corpus = [f"WordNet corpus (tooling/corpus.py, seed {seed})"]
        if heldout:
            held_captions, held_sources = read_captions_file(heldout)
            kept = set(held_captions)
            train = [c for c in train if c.text not in kept]
            return DataSet(captions_examples([c.text for c in train], [c.source for c in train]),
                           captions_examples(held_captions, held_sources, heldout), corpus + [heldout], ENCODER,
                           f"{CORPUS_SPLIT}, held out: {heldout}")
        held = read_captions(held_path)
        return DataSet(captions_examples([c.text for c in train], [c.source for c in train]),
                       captions_examples([c.text for c in held], [c.source for c in held]), corpus, ENCODER,
                       CORPUS_SPLIT)
    captions, sources = read_captions_file(spec)
    data = captions_examples(captions, sources, spec)
    if heldout:
        held_captions, held_sources = read_captions_file(heldout)
        return DataSet(data, captions_examples(held_captions, held_sources, heldout), [spec, heldout], ENCODER,
                       f"separate file ({heldout})")
    train, held, how = split(data, heldout_size, seed)
    return DataSet(train, held, [spec], ENCODER, how)


def write_parquet(path: Path, examples: Examples, conditioning: str = DEFAULT_CONDITIONING) -> Path:
    """Write `examples` in the evaluator's layout (`conditioning` column, description, video_id if known)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = examples.embed(list(range(len(examples)))).astype(np.float32)
    columns = {conditioning: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
               .cast(pa.list_(pa.float32())), DESCRIPTION: pa.array(examples.texts)}
    if examples.video_ids is not None:
        columns[VIDEO_ID] = pa.array(examples.video_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path
