"""LoRA adapters with peft: the settings and putting one on a decoder (torch and peft only)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraSettings:
    """A peft LoRA adapter on `modules` (names of Linear layers inside each decoder block)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    modules: tuple[str, ...] = DEFAULT_LORA_MODULES


def add_lora(model, settings: LoraSettings, seed: int):
    """Put a trainable adapter into `model` (frozen otherwise) and return the same transformers model.

    The adapter's initial weights depend on `seed` only; the global RNG is left as it was.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.modules), bias="none", task_type="CAUSAL_LM")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` alias, whose FutureWarning is
            # about peft's code, not ours; checkpointing itself goes through `set_checkpointing`.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = get_peft_model(model, config).get_base_model()
    finally:
        torch.random.set_rng_state(state)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"LoRA modules {','.join(settings.modules)} matched no layer of the decoder")
    return model


def set_checkpointing(model, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, across transformers versions."""
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
