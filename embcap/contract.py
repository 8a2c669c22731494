"""The served model's interface, written once: model names, tensor names, the embedding width.

The gateway, the export, the Triton models and the benchmarks import these; the
Triton config templates receive them as variables. The width a model actually
serves comes from its checkpoint (`embedding_dim`) and reaches the gateway through
the served model's config; `EMBEDDING_DIM` is the evaluator's width and every default.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
# The continuous engine's attention kernels on a GPU (embcap.engines.continuous.slot_decoder; "auto" lets PyTorch pick).
ATTENTION_BACKENDS = ("auto", "cudnn", "efficient", "math")
# The continuous engine's projections in FP8 on a GPU (embcap.fp8): off, or how their inputs are scaled.
FP8_MODES = ("off", "static", "dynamic")


class Param:
    """Keys of the Python-backend models' config `parameters`: the export writes them, model.py reads them."""

    CHECKPOINT_DIR = "checkpoint_dir"
    DECODER_DIR = "decoder_dir"
    DEVICE = "device"
    DTYPE = "dtype"
    THREADS = "threads"
    ENGINE = "engine"
    CANDIDATES = "candidates"
    REQUEST_TIMEOUT_S = "request_timeout_s"
    ATTENTION_BACKEND = "attention_backend"
    FP8 = "fp8"
    FP8_INPUT_SCALES = "fp8_input_scales"
    MAX_QUEUED_ROWS = "max_queued_rows"
    ONNX_PATH = "onnx_path"
    ACCELERATOR = "accelerator"
    ENGINE_CACHE_DIR = "engine_cache_dir"


# How the engine's refusal of a request it cannot answer in time begins; it reaches the gateway inside Triton's
# UNAVAILABLE error, which the gateway then answers as over capacity (503, Retry-After) rather than unreachable.
OVERLOAD_MARK = "over capacity:"
# How the engine's answer to a request whose deadline passed begins: the gateway answers it as too slow (504),
# as it does when its own gRPC deadline fires first, not as a failed model (502).
DEADLINE_MARK = "deadline passed:"


def parameter_keys() -> set[str]:
    """Every key of `Param`."""
    return {value for key, value in vars(Param).items() if key.isupper()}


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


def engine_failure_file(model: str, temp_dir: str | Path | None = None) -> Path:
    """Where a model's stub leaves the reason its engine failed before it exits: in the stub's $TMPDIR, which
    runtime.triton gives each tritonserver (and so the supervisor that started it) as a folder of its own."""
    return Path(temp_dir or os.environ.get("TMPDIR") or tempfile.gettempdir()) / f"embcap-engine-failure-{model}.txt"


def engine_profile_file(model: str, instance: str, temp_dir: str | Path | None = None) -> Path:
    """Where a model instance's stub publishes its engine's load profile (embcap.load_profile), beside the
    failure file; server.py's gateway judges its queue with it."""
    folder = Path(temp_dir or os.environ.get("TMPDIR") or tempfile.gettempdir())
    return folder / f"embcap-engine-profile-{model}-{instance}.json"


def engine_profile_files(model: str, temp_dir: str | Path) -> list[Path]:
    """The load profiles the instances of `model` have published in `temp_dir`."""
    return sorted(Path(temp_dir).glob(engine_profile_file(model, "*", temp_dir).name))
