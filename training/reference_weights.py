"""The reference's `meta_model_*.pt`: checked key by key, then split into a Hugging Face Llama and our projector.

The file is what torchtune's `FullModelMetaCheckpointer` saved: one `torch.save`d state dict in
Meta's key layout (LoRA already merged), plus the IBLlama projector under its own names.
The evaluator loaded it strictly into `mmllama3_8b`, so every key and shape is checked here
against the architecture, and anything else is refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from training.reference_format import (CLIP_DIM, IMAGEBIND_DIM, META_LAYER_TO_HF, META_TO_HF,
                                       PROJECTOR_PREFIX, PROJECTOR_TO_EMBCAP, SKIPPED_KEYS, UNUSED_PREFIX,
                                       Architecture)
from training.reference_tokenizer import ReferenceFormatError

_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def load_meta_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, memory-mapped (an 8B file is not read into memory at once)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a state dict
        raise ReferenceFormatError(f"{path}: not a torch state dict torchtune's checkpointer wrote ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReferenceFormatError(f"{path}: expected a dict of tensors (a Meta-layout state dict)")
    return state


def expected_shapes(arch: Architecture, perception_tokens: int) -> dict[str, tuple[int, ...]]:
    """Every key `mmllama3_8b(perception_tokens)` loads, with its shape."""
    dim, kv_dim, width = arch.embed_dim, arch.num_kv_heads * arch.head_dim, arch.embed_dim * perception_tokens
    layer = {"attention.wq.weight": (dim, dim), "attention.wk.weight": (kv_dim, dim),
             "attention.wv.weight": (kv_dim, dim), "attention.wo.weight": (dim, dim),
             "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
             "feed_forward.w1.weight": (arch.intermediate_dim, dim),
             "feed_forward.w2.weight": (dim, arch.intermediate_dim),
             "feed_forward.w3.weight": (arch.intermediate_dim, dim)}
    shapes = {"tok_embeddings.weight": (arch.vocab_size, dim), "norm.weight": (dim,),
              "output.weight": (arch.vocab_size, dim)}
    shapes |= {f"layers.{i}.{name}": shape for i in range(arch.num_layers) for name, shape in layer.items()}
    projector = {"0.weight": (width, IMAGEBIND_DIM), "0.bias": (width,), "2.weight": (width,), "2.bias": (width,),
                 "3.weight": (width, width), "3.bias": (width,)}
    shapes |= {f"{PROJECTOR_PREFIX}.{k}": v for k, v in projector.items()}
    unused = {"0.weight": (CLIP_DIM, dim), "0.bias": (CLIP_DIM,), "2.weight": (CLIP_DIM,), "2.bias": (CLIP_DIM,),
              "3.weight": (CLIP_DIM, CLIP_DIM), "3.bias": (CLIP_DIM,)}
    shapes |= {f"{UNUSED_PREFIX}.{k}": v for k, v in unused.items()}
    return shapes


def check_state(state: dict[str, torch.Tensor], arch: Architecture, perception_tokens: int, path: Path) -> None:
    """Refuse, naming the key, any key that is unknown, missing or of the wrong shape or type."""
    expected = expected_shapes(arch, perception_tokens)
    unknown = sorted(set(state) - set(expected) - set(SKIPPED_KEYS))
    if unknown:
        hint = " (LoRA adapter tensors: the reference merged them before saving)" if any(
            "lora" in key for key in unknown) else ""
        raise ReferenceFormatError(f"{path}: unexpected key {unknown[0]!r}{hint}"
                                   + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""))
    missing = sorted(set(expected) - set(state), key=_key_order)
    if missing:
        raise ReferenceFormatError(f"{path}: key {missing[0]!r} missing" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; the evaluator loaded {arch.num_layers} layers and the projector strictly")
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise ReferenceFormatError(
                f"{path}: {key} has shape {list(tensor.shape)}, expected {list(shape)} "
                f"(a Llama with {arch.num_layers} layers, width {arch.embed_dim}, {arch.num_heads} heads, "
                f"{arch.num_kv_heads} KV heads, vocabulary {arch.vocab_size}; model.perception_tokens = "
                f"{perception_tokens})")
        if not tensor.is_floating_point():
            raise ReferenceFormatError(f"{path}: {key} holds {tensor.dtype}, not floating-point weights")


def _key_order(key: str) -> tuple[int, str]:
    match = _LAYER_KEY.fullmatch(key)
    return (int(match.group(1)), match.group(2)) if match else (-1, key)


def _rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's rotary pairs (2i, 2i+1) -> Hugging Face's halves (i, i + D/2), per head: the permutation
    transformers' `convert_llama_weights_to_hf` applies to wq and wk."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def decoder_state(state: dict[str, torch.Tensor], arch: Architecture, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The decoder's tensors under Hugging Face Llama names, q and k permuted, in `dtype` (the reference's
    `dtype` setting: its model held its weights in it, whatever the file stored)."""
    out = {hf: state[meta].to(dtype) for meta, hf in META_TO_HF.items()}
    for i in range(arch.num_layers):
        for name, hf in META_LAYER_TO_HF.items():
            tensor = state[f"layers.{i}.{name}"]
            if name == "attention.wq.weight":
                tensor = _rotary_permute(tensor, arch.num_heads)
            elif name == "attention.wk.weight":
                tensor = _rotary_permute(tensor, arch.num_kv_heads)
            out[f"model.layers.{i}.{hf}"] = tensor.to(dtype).contiguous()
    return out


def projector_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`tok_embeddings.proj_to_llama` under embcap.projector.Projector's names: the values the reference's
    model held (rounded to `dtype`), stored in float32, the serving projector's dtype."""
    return {ours: state[theirs].to(dtype).float().contiguous() for theirs, ours in PROJECTOR_TO_EMBCAP.items()}
