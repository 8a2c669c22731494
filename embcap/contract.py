"""The served model's interface, written once: model names, tensor names, the embedding width.

The gateway, the export, the Triton models and the benchmarks import these; the
Triton config templates receive them as variables. The width a model actually
serves comes from its checkpoint (`embedding_dim`) and reaches the gateway through
the served model's config; `EMBEDDING_DIM` is the evaluator's width and every default.
"""

from __future__ import annotations

ENSEMBLE = "captioner"  # the public model: embedding in, caption out
PROJECTOR = "projector"  # embedding -> prefix vectors
DECODER = "decoder"  # prefix vectors -> caption (or N candidate captions per row)
RERANKER = "reranker"  # candidates + embedding -> the best candidate (only when N > 1)
MODELS = (PROJECTOR, DECODER, RERANKER, ENSEMBLE)  # the order export writes and Triton's stats are read in

EMBEDDING = "EMBEDDING"  # FP32 [rows, embedding_dim]
PREFIX = "PREFIX"  # FP32 [rows, prefix_length, hidden_size]
CAPTION = "CAPTION"  # BYTES [rows, 1], UTF-8
CANDIDATES = "CANDIDATES"  # BYTES [rows, N], UTF-8: a row's N candidate captions (decoder -> reranker)

EMBEDDING_DIM = 1024  # what the evaluator sends per row

# The decoding engines (embcap.engines), named here so that choosing one needs no torch.
ENGINES = ("continuous", "hf")
DEFAULT_ENGINE = "continuous"
# Triton's dynamic-batching queue delay in front of each engine: the hf engine needs
# requests to meet in one batch (bench/RESULTS.md: 20 ms at c=16); the continuous one
# batches by itself and must not wait.
QUEUE_DELAY_US = {"continuous": 0, "hf": 20_000}


def template_names() -> dict[str, str]:
    """The contract's names as the config templates' variables (`${ensemble}`, `${embedding_tensor}`, ...)."""
    return {
        "ensemble": ENSEMBLE, "projector": PROJECTOR, "decoder": DECODER, "reranker": RERANKER,
        "embedding_tensor": EMBEDDING, "prefix_tensor": PREFIX, "caption_tensor": CAPTION,
        "candidates_tensor": CANDIDATES,
    }


def served_models(candidates: int) -> tuple[str, ...]:
    """The models a repository holds: the reranker stage exists only when each row gets N > 1 candidates."""
    return tuple(name for name in MODELS if name != RERANKER or candidates > 1)
