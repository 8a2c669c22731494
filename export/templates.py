"""Fill `config.pbtxt.tmpl` files strictly and validate them with Triton's schema."""

from __future__ import annotations

import re
import string
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from embcap.contract import template_names

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(ValueError):
    """A template could not be filled or its result is not a valid model config."""


def template_variables(text: str) -> set[str]:
    """Names of the `${name}` variables a template uses."""
    stray = re.sub(_VARIABLE, "", text)
    if "${" in stray:
        raise TemplateError(f"malformed variable near {stray[stray.index('${'):][:30]!r}")
    return set(_VARIABLE.findall(text))


def fill_template(text: str, values: dict[str, object], source: str = "template") -> str:
    """Substitute every variable; missing or unknown names raise TemplateError."""
    used = template_variables(text)
    missing = sorted(used - values.keys())
    unknown = sorted(values.keys() - used)
    if missing:
        raise TemplateError(f"{source}: no value for {', '.join(missing)}")
    if unknown:
        raise TemplateError(f"{source}: unknown variables {', '.join(unknown)} (not in the template)")
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


def parse_model_config(text: str, source: str = "config") -> model_config_pb2.ModelConfig:
    """Parse a filled config with Triton's ModelConfig protobuf; raise TemplateError if invalid."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise TemplateError(f"{source}: not a valid Triton model config: {exc}") from exc
    return config


def render_snippet(template_path: Path, values: dict[str, object]) -> str:
    """Fill a template of part of a config (the contract's names come from embcap.contract); the whole
    config it goes into is checked when that is rendered."""
    template = template_path.read_text()
    used = template_variables(template)
    names = {key: value for key, value in template_names().items() if key in used}
    return fill_template(template, {**names, **values}, source=str(template_path))


def render_config(template_path: Path, values: dict[str, object]) -> tuple[str, model_config_pb2.ModelConfig]:
    """Fill a template file (the contract's names come from embcap.contract) and return the text
    with its parsed config."""
    text = render_snippet(template_path, values)
    return text, parse_model_config(text, source=str(template_path))
