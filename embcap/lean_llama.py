"""The continuous engine's own Llama-family weights, fused at load time (gpt-fast's way: the model is its own).

Each layer holds one q/k/v matrix and one gate/up matrix (and their biases), plus o/down and
the two RMSNorm weights; the model holds the token embedding, the final norm, the LM head
and the rotary tables. Nothing of Hugging Face's modules is changed or kept alive:

- `LeanLlama.from_pretrained(folder, device, dtype)` reads the safetensors shards memory-mapped,
  tensor by tensor straight onto the device in the serving dtype (no CPU copy of the model,
  no Hugging Face model built at all), with progress in the log;
- `LeanLlama.from_hf(model)` takes a loaded Hugging Face model's tensors (tools and tests; the
  fused matrices are new tensors, the rest are shared).

`LeanLlama.quantise_fp8(scales)` turns the four projections of every layer into FP8 (embcap.fp8)
in place, freeing their unquantised weights; embeddings, norms and the LM head keep the serving dtype.

`unsupported(config, max_length)` lists what a decoder config asks for that this forward
does not implement; the export refuses such a decoder for the continuous engine, naming it
(`fp8_unsupported(config)` likewise for FP8 weights).

Longer than 250 lines on purpose: the layout of a layer's weights, in the serving dtype and in
FP8, and the ways of reading them must change together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from embcap.fp8 import ALIGNMENT, Fp8Linear

# Decoders whose layers have the Llama layout this forward follows (q/k/v/o and gate/up/down projections,
# RMSNorm, rotary positions, grouped-query attention; biases allowed).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def unsupported(config, max_length: int) -> list[str]:
    """What `config` (a transformers config) asks for that the continuous engine's forward does not do."""
    from transformers.activations import ACT2FN

    problems = []
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {model_type!r} (runs {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(config, "hidden_act", "silu") not in ACT2FN:
        problems.append(f"hidden_act {config.hidden_act!r}")
    window = getattr(config, "sliding_window", None)
    sliding = getattr(config, "use_sliding_window", window is not None)
    if sliding and window is not None and window < max_length:
        problems.append(f"sliding_window {window} below the {max_length} positions a caption needs")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types - {"full_attention"} and (window is None or window < max_length):
        problems.append(f"layer_types {sorted(layer_types)}")
    for softcap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, softcap, None) is not None:
            problems.append(f"{softcap} {getattr(config, softcap)}")
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp {config.pretraining_tp}")
    return problems


def fp8_unsupported(config) -> list[str]:
    """Sizes of `config` that FP8 weights cannot have (the scaled GEMM needs multiples of 16)."""
    shape = _shape(config)
    sizes = {"hidden_size": int(config.hidden_size), "intermediate_size": shape.intermediate,
             "q/k/v output (heads x head_dim)": (shape.heads + 2 * shape.kv_heads) * shape.head_dim,
             "attention output (heads x head_dim)": shape.heads * shape.head_dim}
    return [f"{name} {size} is not a multiple of {ALIGNMENT}" for name, size in sizes.items() if size % ALIGNMENT]


class ProjectionScales(NamedTuple):
    """Static FP8 input scales of one layer's projections (the largest |input| seen, over 448)."""

    qkv: float
    o: float
    gate_up: float
    down: float


class Fp8Layer(nn.Module):
    """One layer's projections in FP8, and the norm weights that feed them.

    With static scales the q/k/v and gate/up inputs come out of the norms already divided by their
    scales (folded into the norm weights), and the down projection's input scale is folded into the
    up half of gate/up: of the four inputs only o's is scaled at run time.
    """

    def __init__(self, layer: "LeanLayer", intermediate: int, scales: ProjectionScales | None) -> None:
        super().__init__()
        dtype = layer.input_norm.dtype
        if scales is None:  # dynamic: per-token scales at run time, the norms as they are
            self.register_buffer("input_norm", layer.input_norm, persistent=False)
            self.register_buffer("post_norm", layer.post_norm, persistent=False)
            self.qkv = Fp8Linear(layer.qkv, layer.qkv_bias, None, dtype)
            self.o = Fp8Linear(layer.o, layer.o_bias, None, dtype)
            self.gate_up = Fp8Linear(layer.gate_up, layer.gate_up_bias, None, dtype)
            self.down = Fp8Linear(layer.down, layer.down_bias, None, dtype)
            return
        self.register_buffer("input_norm", (layer.input_norm.float() / scales.qkv).to(dtype), persistent=False)
        self.register_buffer("post_norm", (layer.post_norm.float() / scales.gate_up).to(dtype), persistent=False)
        up_factor = torch.ones(2 * intermediate, device=layer.gate_up.device)
        up_factor[intermediate:] = 1.0 / scales.down
        self.qkv = Fp8Linear(layer.qkv, layer.qkv_bias, scales.qkv, dtype, prescaled=True)
        self.o = Fp8Linear(layer.o, layer.o_bias, scales.o, dtype)
        self.gate_up = Fp8Linear(layer.gate_up, layer.gate_up_bias, scales.gate_up, dtype, prescaled=True,
                                 channel_factor=up_factor)
        self.down = Fp8Linear(layer.down, layer.down_bias, scales.down, dtype, prescaled=True)


class LeanLayer(nn.Module):
    """One decoder layer's weights, q/k/v and gate/up fused; after `LeanLlama.quantise_fp8` the
    projections live in `fp8` and their unquantised buffers are None."""

    def __init__(self, qkv: torch.Tensor, qkv_bias: torch.Tensor | None, o: torch.Tensor, o_bias: torch.Tensor | None,
                 gate_up: torch.Tensor, gate_up_bias: torch.Tensor | None, down: torch.Tensor,
                 down_bias: torch.Tensor | None, input_norm: torch.Tensor, post_norm: torch.Tensor) -> None:
        super().__init__()
        for name, tensor in (("qkv", qkv), ("qkv_bias", qkv_bias), ("o", o), ("o_bias", o_bias), ("gate_up", gate_up),
                             ("gate_up_bias", gate_up_bias), ("down", down), ("down_bias", down_bias),
                             ("input_norm", input_norm), ("post_norm", post_norm)):
            self.register_buffer(name, tensor, persistent=False)
        self.fp8: Fp8Layer | None = None

    def quantise_fp8(self, intermediate: int, scales: ProjectionScales | None) -> None:
        """Move the projections to FP8 (static `scales`, or dynamic when None), freeing their weights."""
        self.fp8 = Fp8Layer(self, intermediate, scales)
        for name in ("qkv", "qkv_bias", "o", "o_bias", "gate_up", "gate_up_bias", "down", "down_bias"):
            setattr(self, name, None)


@dataclass(frozen=True)
class Shape:
    """The sizes the forward needs, read from the config."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scaling: float


def _shape(config) -> Shape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(int(config.num_attention_heads), int(config.num_key_value_heads), int(head_dim),
                 int(config.intermediate_size), float(config.rms_norm_eps), float(head_dim) ** -0.5)


class LeanLlama(nn.Module):
    """A Llama-family decoder's weights in the continuous engine's layout."""

    def __init__(self, config, embed: torch.Tensor, layers: list[LeanLayer], final_norm: torch.Tensor,
                 lm_head: torch.Tensor) -> None:
        from transformers.activations import ACT2FN

        super().__init__()
        self.config = config
        self.shape = _shape(config)
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.register_buffer("final_norm", final_norm, persistent=False)
        self.register_buffer("lm_head", lm_head, persistent=False)
        self.act_fn = ACT2FN[config.hidden_act]

    @property
    def device(self) -> torch.device:
        return self.lm_head.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    @property
    def fp8_mode(self) -> str:
        """"off", or how the FP8 projections scale their inputs: "static" or "dynamic"."""
        fp8 = self.layers[0].fp8
        return "off" if fp8 is None else "dynamic" if fp8.qkv.dynamic else "static"

    @torch.no_grad()
    def quantise_fp8(self, scales: list[ProjectionScales] | None = None,
                     log: Callable[[str], None] = lambda _: None) -> "LeanLlama":
        """Put every layer's projections in FP8, in place, one layer at a time (the unquantised weights go as
        it goes): static input scales per layer, or dynamic per-token ones when `scales` is None."""
        if self.fp8_mode != "off":
            raise ValueError(f"the projections are already FP8 ({self.fp8_mode})")
        problems = fp8_unsupported(self.config)
        if problems:
            raise ValueError(f"FP8 weights: {'; '.join(problems)}")
        if scales is not None and len(scales) != len(self.layers):
            raise ValueError(f"{len(scales)} layers of FP8 input scales for a decoder of {len(self.layers)}")
        started = time.perf_counter()
        for index, layer in enumerate(self.layers):
            layer.quantise_fp8(self.shape.intermediate, None if scales is None else ProjectionScales(*scales[index]))
        log(f"decoder weights: projections of {len(self.layers)} layers in FP8 ({self.fp8_mode} input scales), "
            f"{self.weight_bytes() / 1e9:.2f} GB read per step, {time.perf_counter() - started:.1f} s")
        return self

    def weight_bytes(self) -> int:
        """Bytes a decode step reads: every weight but the input embedding table (only gathered; a head tied
        to it is read once)."""
        seen, total = {self.embed.weight.data_ptr()}, 0
        for tensor in self.buffers():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        if self.lm_head.data_ptr() == self.embed.weight.data_ptr():
            total += self.lm_head.numel() * self.lm_head.element_size()
        return total

    @torch.no_grad()
    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, head_dim] for positions 0..length-1, as the model's own rotary embedding has them."""
        positions = torch.arange(length, device=self.device)
        parameters = getattr(self.config, "rope_parameters", None) or {}
        if parameters.get("rope_type") == "default":
            # The original RoPE, step for step as LlamaRotaryEmbedding computes it (tests/test_lean_llama.py
            # compares them bit for bit): importing that module would cost every decoder start about a second.
            dim = self.shape.head_dim
            inverse = 1.0 / (parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            angles = positions[:, None].float() * inverse.to(device=self.device)
            table = torch.cat((angles, angles), dim=-1)
            return table.cos().to(self.dtype), table.sin().to(self.dtype)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # scaled variants: its own code

        rotary = LlamaRotaryEmbedding(self.config).to(self.device)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = rotary(probe, positions[None])
        return cos[0], sin[0]

    @classmethod
    def from_hf(cls, model: nn.Module) -> "LeanLlama":
        """The weights of a loaded Hugging Face causal LM (fused q/k/v and gate/up are new tensors)."""
        body = model.get_decoder()
        layers = []
        for layer in body.layers:
            attention, mlp = layer.self_attn, layer.mlp
            layers.append(LeanLayer(
                *_fused([attention.q_proj, attention.k_proj, attention.v_proj]), attention.o_proj.weight.detach(),
                _bias(attention.o_proj), *_fused([mlp.gate_proj, mlp.up_proj]), mlp.down_proj.weight.detach(),
                _bias(mlp.down_proj), layer.input_layernorm.weight.detach(),
                layer.post_attention_layernorm.weight.detach()))
        return cls(model.config, model.get_input_embeddings().weight.detach(), layers, body.norm.weight.detach(),
                   model.get_output_embeddings().weight.detach())

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        log: Callable[[str], None] = lambda _: None) -> "LeanLlama":
        """Read a Hugging Face folder's safetensors straight onto `device` in `dtype`, fusing as it goes."""
        from transformers import AutoConfig

        folder, device = Path(folder), torch.device(device)
        config = AutoConfig.from_pretrained(folder)
        tensors = _ShardedTensors(folder, device, dtype)
        started, count = time.perf_counter(), int(config.num_hidden_layers)
        embed = tensors.get("model.embed_tokens.weight")
        lm_head = tensors.optional("lm_head.weight")
        if lm_head is None:
            if not getattr(config, "tie_word_embeddings", False):
                raise ValueError(f"{folder}: no lm_head.weight and the config does not tie it to the embeddings")
            lm_head = embed
        final_norm = tensors.get("model.norm.weight")
        layers = []
        for index in range(count):
            prefix = f"model.layers.{index}."
            layers.append(LeanLayer(
                *tensors.fused([f"{prefix}self_attn.{name}_proj" for name in "qkv"]),
                tensors.get(f"{prefix}self_attn.o_proj.weight"), tensors.optional(f"{prefix}self_attn.o_proj.bias"),
                *tensors.fused([f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj"]),
                tensors.get(f"{prefix}mlp.down_proj.weight"), tensors.optional(f"{prefix}mlp.down_proj.bias"),
                tensors.get(f"{prefix}input_layernorm.weight"),
                tensors.get(f"{prefix}post_attention_layernorm.weight")))
            if index + 1 == count or (index + 1) % max(1, count // 4) == 0:
                log(f"decoder weights: {index + 1}/{count} layers on {device} ({tensors.bytes / 1e9:.3f} GB with the "
                    f"embeddings, {time.perf_counter() - started:.2f} s)")
        model = cls(config, embed, layers, final_norm, lm_head)
        tensors.close()
        return model


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _fused(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears on the same input."""
    biases = [linear.bias for linear in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("cannot fuse linears where only some have a bias")
    weight = torch.cat([linear.weight.detach() for linear in linears], dim=0)
    return weight, None if biases[0] is None else torch.cat([b.detach() for b in biases])


class _ShardedTensors:
    """Tensors of a Hugging Face folder's safetensors shards, each read once onto the device."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        index = folder / INDEX_FILE
        if index.is_file():
            self.where = {key: folder / shard for key, shard in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE_FILE), "pt") as single:
                self.where = {key: folder / SINGLE_FILE for key in single.keys()}
        else:
            raise FileNotFoundError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}: the continuous engine "
                                    "reads safetensors weights")
        self.device, self.dtype, self.bytes = device, dtype, 0
        self.open: dict[Path, object] = {}

    def optional(self, key: str) -> torch.Tensor | None:
        if key not in self.where:
            return None
        from safetensors import safe_open

        path = self.where[key]
        if path not in self.open:
            # Memory-mapped, and put on the device tensor by tensor: the host never holds the model.
            device = str(self.device) if self.device.type == "cuda" else "cpu"
            self.open[path] = safe_open(str(path), "pt", device=device)
        tensor = self.open[path].get_tensor(key)
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {key} is {tensor.dtype}; the continuous engine reads floating-point weights "
                             "(de-quantise the decoder first)")
        tensor = tensor.to(device=self.device, dtype=self.dtype)
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def get(self, key: str) -> torch.Tensor:
        tensor = self.optional(key)
        if tensor is None:
            raise KeyError(f"{key} is in none of the decoder's safetensors files")
        return tensor

    def fused(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = [self.get(f"{name}.weight") for name in names]
        biases = [self.optional(f"{name}.bias") for name in names]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ValueError(f"cannot fuse {names}: only some have a bias")
        weight = torch.cat(weights, dim=0)
        del weights  # the pieces go as soon as the fused matrix exists
        return weight, None if biases[0] is None else torch.cat(biases)

    def close(self) -> None:
        self.open.clear()
