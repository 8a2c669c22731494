"""Text encoders that map candidate captions into the space of the input embeddings (for reranking).

A checkpoint that reranks names one in `rerank.encoder` (embcap.checkpoint):

- a sentence-transformers folder (or the folder inside an installed package), optionally
  lifted into a wider embedding space by the fixed orthonormal lift of embcap.text_encoder
  (the default model's conditioning space is MiniLM lifted to 1024-d);
- an ONNX text tower with a Hugging Face `tokenizer.json` (ids padded to 77 positions with 0, start
  and end tokens from the tokenizer);
- an imported ImageBind text tower folder (embcap.imagebind_encoder): the evaluator's own scorer,
  its tokenizer and its splitting rule reproduced exactly.

Either can split long texts as the evaluator does before embedding (`split_by_token_limit`:
recursively on newline, ".", "!", "?", "," and space into pieces of at most 74 tokens) and
average the pieces' embeddings. Every encoder returns unit-norm float32 rows.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from embcap.checkpoint import (Checkpoint, CheckpointError, ImageBindTowerEncoder, OnnxTextEncoder,
                               SentenceTransformerEncoder)
from embcap.text_pieces import embed_in_pieces, split_by_token_limit
from embcap.tower_folder import TOWER_FILES, TowerError


class TextEncoder(Protocol):
    """Captions in, [N, dim] unit-norm float32 vectors out."""

    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class SentenceTransformerTextEncoder:
    """A sentence-transformers model, its unit vectors optionally lifted to `dim` dimensions."""

    def __init__(self, folder: Path, dim: int, lift_seed: int | None = None, chunk_tokens: int | None = None,
                 device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(folder), device=device)
        self.source_dim = int(self.model.get_embedding_dimension())
        self.dim = dim
        self.lift = None
        if lift_seed is not None:
            from embcap.text_encoder import lift_matrix

            self.lift = lift_matrix(lift_seed, self.source_dim, dim).astype(np.float32)
        elif self.source_dim != dim:
            raise CheckpointError(f"text encoder {folder} gives {self.source_dim}-d vectors but the inputs are "
                                  f"{dim}-d: set rerank.encoder.lift_seed or use an encoder of that width")
        tokenizer = self.model.tokenizer
        self.pieces_of = None if chunk_tokens is None else lambda text: split_by_token_limit(
            text, lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]),
            lambda t, parts: [tokenizer.decode(ids) for ids in
                              np.array_split(tokenizer(t, add_special_tokens=False)["input_ids"], parts)],
            chunk_tokens)

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        return vectors if self.lift is None else vectors @ self.lift

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N, dim] unit vectors of `texts`."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return embed_in_pieces(texts, self.pieces_of, self._embed)


class OnnxTextTower:
    """An ONNX text tower: token ids [B, context_length] (and an attention mask if it takes one) -> [B, D]."""

    def __init__(self, model: Path, tokenizer: Path, dim: int, context_length: int = 77, pad_id: int = 0,
                 chunk_tokens: int | None = 74, providers: list | None = None, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=providers or ["CPUExecutionProvider"])
        inputs = [tensor.name for tensor in self.session.get_inputs()]
        self.ids_input, self.mask_input = inputs[0], next((n for n in inputs[1:] if "mask" in n), None)
        self.dim, self.context_length, self.pad_id = dim, context_length, pad_id
        self.pieces_of = None if chunk_tokens is None else lambda text: split_by_token_limit(
            text, self._count, self._cut, chunk_tokens)

    def _content(self, text: str) -> list[int]:
        """Token ids without start/end tokens and without pad ids (the evaluator counts them so)."""
        return [i for i in self.tokenizer.encode(text, add_special_tokens=False).ids if i != self.pad_id]

    def _count(self, text: str) -> int:
        return len(self._content(text))

    def _cut(self, text: str, parts: int) -> list[str]:
        return [self.tokenizer.decode([int(i) for i in ids]) for ids in np.array_split(self._content(text), parts)]

    def _embed(self, texts: list[str]) -> np.ndarray:
        ids = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(self.tokenizer.encode_batch(texts)):
            tokens = encoding.ids[:self.context_length]  # longer texts are truncated, as the evaluator's are
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        feeds = {self.ids_input: ids}
        if self.mask_input is not None:
            feeds[self.mask_input] = mask
        vectors = self.session.run(None, feeds)[0]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"the ONNX text tower returned shape {list(vectors.shape)}, expected [B, {self.dim}]")
        return vectors

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N, dim] unit vectors of `texts`."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return embed_in_pieces(texts, self.pieces_of, self._embed)


def package_model_folder(package: str) -> Path:
    """The one sentence-transformers folder (holding modules.json) inside an installed package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"text encoder package {package!r} is not installed")
    folders = sorted({config.parent for location in spec.submodule_search_locations
                      for config in Path(location).rglob("modules.json")})
    if len(folders) != 1:
        raise CheckpointError(f"text encoder package {package!r} holds {len(folders)} sentence-transformers "
                              f"folders, expected one")
    return folders[0]


def encoder_files(checkpoint: Checkpoint) -> list[Path]:
    """The files and folders the checkpoint's reranking encoder is read from (none without one)."""
    spec = checkpoint.spec.rerank.encoder
    if spec is None:
        return []
    if isinstance(spec, OnnxTextEncoder):
        return [checkpoint.resolve_path(spec.path), checkpoint.resolve_path(spec.tokenizer)]
    if isinstance(spec, ImageBindTowerEncoder):
        return [checkpoint.resolve_path(spec.path) / name for name in TOWER_FILES]
    return [checkpoint.resolve_path(spec.path) if spec.path else package_model_folder(spec.package)]


def load_text_encoder(checkpoint: Checkpoint, device: str = "cpu", providers: list | None = None,
                      threads: int = 1) -> TextEncoder:
    """The checkpoint's reranking encoder; CheckpointError naming the file when it is missing or broken."""
    spec = checkpoint.spec.rerank.encoder
    if spec is None:
        raise CheckpointError(f"{checkpoint.root} names no rerank.encoder")
    files = encoder_files(checkpoint)
    missing = [str(path) for path in files if not path.exists()]
    if missing:
        raise CheckpointError(f"rerank.encoder: {', '.join(missing)} not found")
    dim = checkpoint.spec.embedding_dim
    try:
        if isinstance(spec, SentenceTransformerEncoder):
            return SentenceTransformerTextEncoder(files[0], dim, spec.lift_seed, spec.chunk_tokens, device)
        if isinstance(spec, ImageBindTowerEncoder):
            from embcap.imagebind_encoder import ImageBindTextEncoder

            return ImageBindTextEncoder(files[0].parent, dim, device)
        return OnnxTextTower(files[0], files[1], dim, spec.context_length, spec.pad_id, spec.chunk_tokens,
                             providers, threads)
    except CheckpointError:
        raise
    except TowerError as exc:
        raise CheckpointError(f"rerank.encoder: {exc}") from exc
    except Exception as exc:  # a corrupt file surfaces as whatever its reader raises
        raise CheckpointError(f"rerank.encoder {files[0]} cannot be loaded: {type(exc).__name__}: {exc}") from exc


def check_text_encoder(checkpoint: Checkpoint) -> str:
    """Load the encoder and embed two probe captions (at export time); a one-line summary, or CheckpointError."""
    encoder = load_text_encoder(checkpoint)
    started = time.perf_counter()
    try:
        vectors = encoder.encode(["a person is walking a dog in a park", "a red car drives down a street"])
    except Exception as exc:
        raise CheckpointError(f"rerank.encoder {encoder_files(checkpoint)[0]} failed on a probe caption: "
                              f"{type(exc).__name__}: {exc}") from exc
    if vectors.shape != (2, checkpoint.spec.embedding_dim) or not np.isfinite(vectors).all():
        raise CheckpointError(f"rerank.encoder {encoder_files(checkpoint)[0]} gave {list(vectors.shape)} "
                              f"{'non-finite ' if not np.isfinite(vectors).all() else ''}vectors for 2 captions, "
                              f"expected [2, {checkpoint.spec.embedding_dim}]")
    seconds = time.perf_counter() - started  # the reranker pays this per 2 new captions on the export's CPU
    return (f"{type(encoder).__name__} from {encoder_files(checkpoint)[0]} -> {encoder.dim}-d, 2 probe captions "
            f"in {1e3 * seconds:.0f} ms on the CPU")
