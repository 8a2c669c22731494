"""The continuous engine's own weights: read straight from safetensors, the same as from a loaded model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from embcap.engines import create_engine, generate_blocking
from embcap.generation import CaptionGenerator
from embcap.lean_llama import LeanLlama, unsupported
from export.options import ExportOptions
from export.repository import export_repository
from export.templates import TemplateError
from test_engines import load, random_prefix
from tooling.builders import make_tiny_checkpoint


def test_weights_read_from_safetensors_equal_those_of_the_loaded_model(tiny_checkpoint):
    generator = load(tiny_checkpoint)
    from_files = LeanLlama.from_pretrained(tiny_checkpoint / "decoder")
    from_model = generator.lean
    assert len(from_files.layers) == len(from_model.layers)
    for mine, theirs in zip(from_files.layers, from_model.layers):
        for name in ("qkv", "o", "gate_up", "down", "input_norm", "post_norm"):
            torch.testing.assert_close(getattr(mine, name), getattr(theirs, name), rtol=0, atol=0)
    torch.testing.assert_close(from_files.lm_head, from_model.lm_head, rtol=0, atol=0)
    # served lean (what the decoder model does): the same captions, and no Hugging Face model behind it
    lean = CaptionGenerator.load(generator.spec, tiny_checkpoint / "decoder", lean=True)
    assert lean.model is lean.lean and not hasattr(lean.model, "generate")
    prefix = random_prefix(generator, 5, seed=4)
    engine = create_engine("continuous", lean, slots=8)
    try:
        assert generate_blocking(engine, prefix, timeout_s=60) == generator.generate(prefix)
    finally:
        engine.close()
    with pytest.raises(TypeError, match="generate"):
        lean.generate(prefix)


def test_the_hugging_face_model_is_left_as_it_was(tiny_checkpoint):
    generator = load(tiny_checkpoint)
    q_proj = generator.model.model.layers[0].self_attn.q_proj
    before = q_proj.weight.data_ptr(), q_proj.weight.clone()
    create_engine("continuous", generator, slots=2).close()
    assert q_proj.weight.data_ptr() == before[0] and torch.equal(q_proj.weight, before[1])


def test_a_tied_head_and_a_sharded_folder_load(tmp_path, smollm2_dir):
    checkpoint = make_tiny_checkpoint(tmp_path / "ck", smollm2_dir)
    decoder = checkpoint / "decoder"
    tensors = load_file(decoder / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    index = {"metadata": {}, "weight_map": {}}
    for shard, part in (("model-00001-of-00002.safetensors", keys[:half]),
                        ("model-00002-of-00002.safetensors", keys[half:])):
        save_file({k: tensors[k].contiguous() for k in part}, decoder / shard)
        index["weight_map"].update({k: shard for k in part})
    (decoder / "model.safetensors").unlink()
    (decoder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = LeanLlama.from_pretrained(decoder)
    torch.testing.assert_close(sharded.layers[1].down, tensors["model.layers.1.mlp.down_proj.weight"])

    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (decoder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match="model.layers.1.mlp.down_proj.weight"):
        LeanLlama.from_pretrained(decoder)


def test_a_decoder_config_the_engine_does_not_implement_is_refused_at_export(tmp_path, smollm2_dir):
    checkpoint = make_tiny_checkpoint(tmp_path / "ck", smollm2_dir)
    config_path = checkpoint / "decoder" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4)
    config_path.write_text(json.dumps(config))
    with pytest.raises(TemplateError, match="sliding_window 4 below the .* positions a caption needs"):
        export_repository(checkpoint, tmp_path / "repo", ExportOptions(), log=lambda _: None)
    # the reference engine runs it
    export_repository(checkpoint, tmp_path / "repo", ExportOptions(engine="hf"), log=lambda _: None)
    from transformers import AutoConfig

    assert unsupported(AutoConfig.from_pretrained(checkpoint / "decoder"), 4) == []


@pytest.mark.parametrize("rope", [
    {"rope_theta": 10000.0}, {"rope_theta": 100000.0, "head_dim": 24},  # SmolLM2's theta; a head_dim of its own
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
], ids=["default", "default-theta-head-dim", "llama3-scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_tables_are_the_models_own_bit_for_bit(rope, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=32, max_position_embeddings=512, **rope)
    assert (config.rope_parameters["rope_type"] == "default") == ("rope_scaling" not in rope)
    model = LeanLlama(config, torch.zeros(32, 64, dtype=dtype), [], torch.ones(64, dtype=dtype),
                      torch.zeros(32, 64, dtype=dtype))
    cos, sin = model.rotary(300)
    theirs = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), torch.arange(300)[None])
    assert cos.dtype == sin.dtype == dtype and cos.shape == (300, model.shape.head_dim)
    assert torch.equal(cos, theirs[0][0]) and torch.equal(sin, theirs[1][0])
