"""The decoder being trained: where it comes from, frozen or LoRA, and how it is written for serving.

`--decoder` is a Hugging Face Llama-family folder, or ``gguf:PACKAGE:FILE`` for a GGUF file
inside an installed package (de-quantised once, as serving does). With `--lora` a peft
adapter is put on the chosen modules; the checkpoint gets the adapter merged into the
weights, so serving needs no peft.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from embcap.decoder_source import SMOLLM2
from embcap.checkpoint import CaptionModelSpec, Checkpoint, DecoderSource
from embcap.decoder_source import resolve_decoder
from training.lora import DEFAULT_LORA_MODULES, LoraSettings, add_lora, set_checkpointing

DEFAULT_DECODER = f"gguf:{SMOLLM2.gguf_package}:{SMOLLM2.gguf_file}"
# GitHub refuses files over 100 MiB, and the evaluator clones models/ from it.
# Hugging Face's own shard layout (model-0000k-of-0000n.safetensors + index), what a miner's repository carries
# in Git LFS; --max-shard-size 90MB keeps every file under GitHub's 100 MiB instead.
SHARD_SIZE = "5GB"


def parse_source(spec: str) -> DecoderSource:
    """`gguf:PACKAGE:FILE` or a folder -> DecoderSource (folders are made absolute)."""
    if spec.startswith("gguf:"):
        package, _, file_name = spec[len("gguf:"):].partition(":")
        if not (package and file_name):
            raise ValueError(f"--decoder {spec!r}: expected gguf:PACKAGE:FILE")
        return DecoderSource(gguf_package=package, gguf_file=file_name)
    folder = Path(spec).resolve()
    if not (folder / "config.json").is_file():
        raise ValueError(f"--decoder {spec}: not a Hugging Face folder (no config.json)")
    return DecoderSource(path=str(folder))


def decoder_folder(source: DecoderSource) -> Path:
    """A Hugging Face folder for `source` (de-quantising a GGUF source once into the cache)."""
    return resolve_decoder(Checkpoint(Path("."), CaptionModelSpec(decoder=source)))


def pick_device(setting: str) -> tuple[torch.device, torch.dtype]:
    """`auto`: CUDA in bfloat16 when present, else the CPU in float32."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_decoder(folder: Path, device: torch.device, dtype: torch.dtype, lora: LoraSettings | None,
                 gradient_checkpointing: bool, seed: int):
    """(model, tokenizer): the decoder frozen, plus a trainable LoRA adapter when asked for.

    The returned model is the plain transformers model (with the adapter's layers inside it);
    `merged_decoder` turns it back into one without them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if lora is not None:
        model = add_lora(model, lora, seed)
    if gradient_checkpointing:
        set_checkpointing(model, True)
    model.config.use_cache = False
    return model, tokenizer


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The decoder's trainable tensors (the LoRA adapter), for the resume state."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put back what `trainable_state` saved; the names must match exactly."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(state):
        raise ValueError("the saved adapter does not match this decoder and --lora settings")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def merged_decoder(model):
    """The model with any LoRA adapter merged into its weights and removed (in place)."""
    if not any(p.requires_grad for p in model.parameters()):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    # The adapter's layers stay in the model after get_peft_model; merge each and swap in its base layer.
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def write_decoder(model, tokenizer, out: Path, dtype: torch.dtype = torch.bfloat16,
                  max_shard_size: str = SHARD_SIZE) -> None:
    """save_pretrained in `dtype` (the model is cast in place), in shards of at most `max_shard_size`, with the
    tokenizer. bfloat16 halves the files (SmolLM2's fp32 embedding table alone is 108 MiB); serving casts to
    its own dtype when it loads them."""
    if out.exists():
        shutil.rmtree(out)
    model.to(dtype)
    model.config.use_cache = True
    set_checkpointing(model, False)
    # A folder de-quantised from GGUF still names its quantiser, which refuses to save; its weights are plain.
    if getattr(model, "hf_quantizer", None) is not None and "gguf" in type(model.hf_quantizer).__name__.lower():
        model.hf_quantizer = None
    with torch.no_grad():  # serving's engine may have made weights views of one fused matrix: save them apart
        for parameter in model.parameters():
            if parameter.data.untyped_storage().nbytes() != parameter.numel() * parameter.element_size():
                parameter.data = parameter.data.clone()
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)


__all__ = ["DEFAULT_DECODER", "DEFAULT_LORA_MODULES", "LoraSettings", "decoder_folder", "load_decoder",
           "merged_decoder", "parse_source", "pick_device", "trainable_state", "load_trainable_state",
           "write_decoder"]
