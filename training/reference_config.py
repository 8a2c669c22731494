"""The reference miner's `training_config.yml`: the settings its inference read, checked one by one.

The evaluator loaded the file with OmegaConf, replaced `model` by `mmllama3_8b` keeping only
`model.perception_tokens`, and called `generate_batch`, which reads the top-level
`max_new_tokens`, `temperature` and `top_k` (the evaluator's override of
`inference.max_new_tokens = 300` is never read there) and `inference.prompt_template`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.reference_format import (CHECKPOINTER_COMPONENT, DTYPES, MARKERS, PLACEHOLDERS, TOKENIZER_COMPONENT,
                                       VIDEO_PLACEHOLDER)
from training.reference_tokenizer import ReferenceFormatError

_ABSENT = object()


@dataclass(frozen=True)
class ReferenceConfig:
    """What the reference's inference took from `training_config.yml`."""

    perception_tokens: int
    prompt_template: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    seed: int | None
    dtype: str  # torchtune's name: bf16, fp16 or fp32
    unused: dict[str, Any] = field(default_factory=dict)  # settings a reader might expect to count, and which do not


def _select(config, path: Path, key: str):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.select(config, key, default=_ABSENT, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ReferenceFormatError(f"{path}: {key} cannot be read ({exc})") from exc


def _required(config, path: Path, key: str, kinds: tuple[type, ...], what: str):
    value = _select(config, path, key)
    if value is _ABSENT:
        raise ReferenceFormatError(f"{path}: key {key!r} missing ({what}; the reference's inference read it)")
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ReferenceFormatError(f"{path}: {key} is {value!r}, expected {what}")
    return value


def read_config(path: Path) -> ReferenceConfig:
    """Parse and check `path`; raise ReferenceFormatError naming the key for anything not understood."""
    from omegaconf import DictConfig, OmegaConf

    try:
        config = OmegaConf.load(path)
    except Exception as exc:  # yaml and OmegaConf raise many types for a malformed file
        raise ReferenceFormatError(f"{path}: not an OmegaConf YAML file ({exc})") from exc
    if not isinstance(config, DictConfig):
        raise ReferenceFormatError(f"{path}: expected a mapping at the top level")
    for key, expected in (("tokenizer._component_", TOKENIZER_COMPONENT),
                          ("checkpointer._component_", CHECKPOINTER_COMPONENT)):
        found = _select(config, path, key)
        if found != expected:
            raise ReferenceFormatError(f"{path}: {key} is {None if found is _ABSENT else found!r}; this importer "
                                       f"reads checkpoints of {expected!r} only")
    quantizer = _select(config, path, "inference.quantizer")
    if quantizer not in (None, _ABSENT):
        raise ReferenceFormatError(f"{path}: inference.quantizer is set ({quantizer!r}): the reference quantized "
                                   "the model before serving it, which this importer does not reproduce")

    perception = _required(config, path, "model.perception_tokens", (int,), "an integer >= 1")
    template = _required(config, path, "inference.prompt_template", (str,), "a string with {video} once")
    max_new = _required(config, path, "max_new_tokens", (int,), "an integer >= 1")
    temperature = _required(config, path, "temperature", (int, float), "a number > 0")
    top_k = _select(config, path, "top_k")
    if top_k is _ABSENT:
        raise ReferenceFormatError(f"{path}: key 'top_k' missing (an integer >= 1, or null for no cut)")
    seed = _select(config, path, "seed")
    dtype = _select(config, path, "dtype")
    dtype = "fp32" if dtype in (None, _ABSENT) else dtype  # torchtune's get_dtype(None)

    if perception < 1:
        raise ReferenceFormatError(f"{path}: model.perception_tokens is {perception}, expected >= 1")
    check_template(template, path)
    if max_new < 1:
        raise ReferenceFormatError(f"{path}: max_new_tokens is {max_new}, expected >= 1")
    if temperature <= 0:
        raise ReferenceFormatError(f"{path}: temperature is {temperature}: the reference sampled at "
                                   "max(temperature, 1e-5); serve such a model greedy by hand instead")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ReferenceFormatError(f"{path}: top_k is {top_k!r}, expected an integer >= 1 or null")
    if seed is not _ABSENT and seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ReferenceFormatError(f"{path}: seed is {seed!r}, expected an integer or null")
    if dtype not in DTYPES or dtype == "fp64":
        raise ReferenceFormatError(f"{path}: dtype is {dtype!r}, expected one of bf16, fp16, fp32")
    unused = {key: value for key in ("inference.max_new_tokens", "inference.temperature", "inference.top_k",
                                     "model._component_", "model.use_clip")
              if (value := _select(config, path, key)) is not _ABSENT}
    return ReferenceConfig(perception_tokens=perception, prompt_template=template, max_new_tokens=max_new,
                           temperature=float(temperature), top_k=top_k,
                           seed=None if seed is _ABSENT else seed, dtype=dtype, unused=unused)


def check_template(template: str, path: Path) -> None:
    """The template holds {video} once, no other placeholder, and no marker text of its own."""
    if template.count(VIDEO_PLACEHOLDER) != 1:
        raise ReferenceFormatError(f"{path}: inference.prompt_template {template!r} holds {VIDEO_PLACEHOLDER} "
                                   f"{template.count(VIDEO_PLACEHOLDER)} times; one video embedding goes in once")
    for placeholder in PLACEHOLDERS:
        if placeholder != VIDEO_PLACEHOLDER and placeholder in template:
            raise ReferenceFormatError(f"{path}: inference.prompt_template holds {placeholder}: the reference "
                                       "filled it with the video embedding too; one prefix place is served")
    for marker in MARKERS:
        if marker in template:
            raise ReferenceFormatError(f"{path}: inference.prompt_template holds {marker} as text")
