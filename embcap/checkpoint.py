"""The checkpoint format: a folder with a decoder, a projector and `caption_model.json`.

Layout of a checkpoint folder::

    caption_model.json        # this module's CaptionModelSpec
    projector.safetensors     # Projector state dict (see embcap.projector)
    decoder/                  # optional: a Hugging Face Llama-family folder

The decoder is either a Hugging Face folder (``decoder.path``, relative to the
checkpoint or absolute) or a GGUF file shipped inside an installed Python package
(``decoder.gguf_package`` + ``decoder.gguf_file``), de-quantised once into a cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from embcap.contract import EMBEDDING_DIM

SPEC_FILE = "caption_model.json"
PREFIX_PLACEHOLDER = "{prefix}"
FORMAT_VERSION = 1
# What the decoder does when a GPU is visible but torch cannot use it (embcap.device decides;
# server.py --on-unusable-gpu overrides it). Why auto is the default: docs/gpu-builds.md.
UnusableGpuPolicy = Literal["auto", "serve-cpu", "refuse"]
DEFAULT_UNUSABLE_GPU_POLICY: UnusableGpuPolicy = "auto"
POLICIES: tuple[str, ...] = get_args(UnusableGpuPolicy)
MAX_CANDIDATES = 64  # captions per row with best-of-N (each takes a decode slot)
# What the projector does to each embedding before its first layer (embcap.projector applies it, inside
# the ONNX graph too): "unit" scales it to length 1, so the evaluator's norms (0.5-0.9) look like training's.
InputNorm = Literal["none", "unit"]
INPUT_NORMS: tuple[str, ...] = get_args(InputNorm)


class CheckpointError(ValueError):
    """A checkpoint folder or its JSON is missing or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecoderSource(_Strict):
    """Where the decoder weights come from."""

    path: str | None = Field(None, description="HF folder, relative to the checkpoint or absolute")
    gguf_package: str | None = Field(None, description="installed Python package holding a GGUF file")
    gguf_file: str | None = Field(None, description="GGUF file name inside gguf_package")

    @model_validator(mode="after")
    def _one_source(self) -> "DecoderSource":
        has_path = self.path is not None
        has_gguf = self.gguf_package is not None or self.gguf_file is not None
        if has_path == has_gguf:
            raise ValueError("decoder needs exactly one of 'path' or 'gguf_package'+'gguf_file'")
        if has_gguf and not (self.gguf_package and self.gguf_file):
            raise ValueError("decoder GGUF source needs both 'gguf_package' and 'gguf_file'")
        return self


class PromptTemplate(_Strict):
    """Text around the prefix vectors; `{prefix}` marks where they go."""

    template: str = "Video:\n{prefix}\nCaption the previous video.\n"
    chat: bool = Field(False, description="wrap the template as a user turn with the tokenizer's chat template")
    add_bos: bool = Field(False, description="prepend the tokenizer's BOS token")
    prefix_slots: tuple[int, ...] | None = Field(
        None, min_length=1,
        description="which of the P prefix vectors fills each position at {prefix}, in order (default: 0..P-1 "
                    "once each); an imported reference model repeats some, as its embedding layer did")

    @model_validator(mode="after")
    def _one_placeholder(self) -> "PromptTemplate":
        if self.template.count(PREFIX_PLACEHOLDER) != 1:
            raise ValueError(f"prompt template must contain {PREFIX_PLACEHOLDER!r} exactly once")
        return self


class GenerationSettings(_Strict):
    """Decoding settings applied to every row."""

    max_new_tokens: int = Field(32, ge=1, le=4096)
    min_new_tokens: int = Field(1, ge=0, description="EOS is suppressed before this many tokens")
    do_sample: bool = False
    temperature: float = Field(0.6, gt=0.0)
    top_k: int = Field(300, ge=0)
    stop_tokens: tuple[str, ...] = Field((), description="extra tokens that end a caption (EOS always does)")
    seed: int = 0

    @model_validator(mode="after")
    def _min_le_max(self) -> "GenerationSettings":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        return self


class SentenceTransformerEncoder(_Strict):
    """A sentence-transformers model folder, or the one shipped inside an installed Python package."""

    kind: Literal["sentence-transformers"] = "sentence-transformers"
    path: str | None = Field(None, description="model folder, relative to the checkpoint or absolute")
    package: str | None = Field(None, description="installed Python package whose folder holds the model")
    lift_seed: int | None = Field(None, description="map the encoder's vectors into the embedding space with "
                                                    "the fixed orthonormal lift of embcap.text_encoder drawn from "
                                                    "this seed")
    chunk_tokens: int | None = Field(None, ge=1, description="split longer texts into pieces of at most this many "
                                                            "tokens and average their embeddings")

    @model_validator(mode="after")
    def _one_source(self) -> "SentenceTransformerEncoder":
        if (self.path is None) == (self.package is None):
            raise ValueError("a sentence-transformers encoder needs exactly one of 'path' or 'package'")
        return self


class OnnxTextEncoder(_Strict):
    """An ONNX text tower (token ids in, one vector per text out) with a Hugging Face `tokenizer.json`: ids
    padded to `context_length` with `pad_id`, the tokenizer adding its start and end tokens, long texts split
    and averaged as the evaluator does."""

    kind: Literal["onnx"] = "onnx"
    path: str = Field(description="the ONNX file, relative to the checkpoint or absolute")
    tokenizer: str = Field(description="a tokenizers `tokenizer.json`, relative to the checkpoint or absolute")
    context_length: int = Field(77, ge=2, description="token positions of the model's input")
    pad_id: int = Field(0, ge=0)
    chunk_tokens: int | None = Field(74, ge=1, description="split longer texts into pieces of at most this many "
                                                          "tokens (start and end not counted) and average them")


class ImageBindTowerEncoder(_Strict):
    """The evaluator's ImageBind text tower: a folder from `python -m training.import_text_tower`."""

    kind: Literal["imagebind"] = "imagebind"
    path: str = Field(description="the tower folder, relative to the checkpoint or absolute")


TextEncoderSpec = Annotated[Union[SentenceTransformerEncoder, OnnxTextEncoder, ImageBindTowerEncoder],
                            Field(discriminator="kind")]


class RerankSettings(_Strict):
    """Best-of-N: each row gets `candidates` captions; the one closest to the input embedding is answered.

    Candidates are scored by the cosine between their embedding by `encoder` (which maps text into
    the space the input embeddings live in) and the row's input embedding, optionally blended with
    consensus (each candidate's mean cosine to the row's other candidates). One candidate is plain
    decoding with `generation`'s settings and needs no encoder.
    """

    candidates: int = Field(1, ge=1, le=MAX_CANDIDATES, description="captions decoded per row (1: no reranking)")
    include_greedy: bool = Field(True, description="candidate 0 is the greedy caption")
    temperature: float = Field(0.7, gt=0.0, description="sampling temperature of the other candidates")
    top_k: int = Field(50, ge=0, description="sample among the k most likely tokens (0: all)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1: off)")
    consensus_weight: float = Field(0.0, ge=0.0, le=1.0,
                                    description="score = (1 - w) * cosine to the input + w * consensus")
    encoder: TextEncoderSpec | None = None

    @model_validator(mode="after")
    def _encoder_when_reranking(self) -> "RerankSettings":
        if self.candidates > 1 and self.encoder is None:
            raise ValueError("rerank.candidates > 1 needs rerank.encoder (the text encoder that scores candidates)")
        return self


class CaptionModelSpec(_Strict):
    """Contents of `caption_model.json`."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str = "caption-model"
    embedding_dim: int = Field(EMBEDDING_DIM, ge=1)
    prefix_length: int = Field(2, ge=1, description="number of prefix vectors P")
    decoder: DecoderSource
    projector: str = "projector.safetensors"
    input_norm: InputNorm = Field("none", description="'unit': each embedding is scaled to length 1 before the "
                                                      "projector (in PyTorch, ONNX and TensorRT alike)")
    prompt: PromptTemplate = PromptTemplate()
    generation: GenerationSettings = GenerationSettings()
    rerank: RerankSettings = RerankSettings()
    on_unusable_gpu: UnusableGpuPolicy = Field(
        DEFAULT_UNUSABLE_GPU_POLICY,
        description="GPU visible but unusable: serve-cpu, refuse, or auto (serve on the CPU only if the "
                    "decoder answers in time there); server.py --on-unusable-gpu overrides it")

    @model_validator(mode="after")
    def _slots_name_prefix_vectors(self) -> "CaptionModelSpec":
        slots = self.prompt.prefix_slots
        if slots is not None and not all(0 <= slot < self.prefix_length for slot in slots):
            raise ValueError(f"prompt.prefix_slots {list(slots)} must index the {self.prefix_length} prefix "
                             f"vectors (0..{self.prefix_length - 1})")
        return self


class Checkpoint:
    """A checkpoint folder with its parsed spec."""

    def __init__(self, root: Path, spec: CaptionModelSpec) -> None:
        self.root = root
        self.spec = spec

    @property
    def projector_path(self) -> Path:
        return self.root / self.spec.projector

    def resolve_path(self, path: str) -> Path:
        """A path from the spec: relative to the checkpoint folder unless absolute."""
        candidate = Path(path)
        return candidate if candidate.is_absolute() else self.root / candidate

    def local_decoder_path(self) -> Path | None:
        """The decoder folder named by `decoder.path`, resolved; None for a GGUF source."""
        if self.spec.decoder.path is None:
            return None
        return self.resolve_path(self.spec.decoder.path)


def load_checkpoint(root: str | Path) -> Checkpoint:
    """Parse and check `root/caption_model.json`; raise CheckpointError naming the problem."""
    root = Path(root).resolve()
    spec_path = root / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"{spec_path} not found: a checkpoint folder needs {SPEC_FILE}")
    try:
        raw = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{spec_path} is not valid JSON: {exc}") from exc
    try:
        spec = CaptionModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{spec_path} is invalid:\n{exc}") from exc
    checkpoint = Checkpoint(root, spec)
    if not checkpoint.projector_path.is_file():
        raise CheckpointError(f"projector weights {checkpoint.projector_path} not found")
    local = checkpoint.local_decoder_path()
    if local is not None and not (local / "config.json").is_file():
        raise CheckpointError(f"decoder folder {local} has no config.json")
    return checkpoint


def save_spec(root: str | Path, spec: CaptionModelSpec) -> Path:
    """Write `spec` as `root/caption_model.json` and return its path."""
    path = Path(root) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.model_dump(mode="json", exclude_none=True), indent=2) + "\n")
    return path
