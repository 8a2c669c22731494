"""Config templating: strict variables, Triton-schema validation, export options."""

import argparse
import shutil
from dataclasses import fields
from pathlib import Path

import pytest

from embcap.loading import resolve_checkpoint
from export.options import ExportOptions, add_arguments, from_arguments, to_argv
from export.repository import TEMPLATES, export_repository, render_configs
from export.templates import TemplateError, fill_template, parse_model_config, render_config, template_variables


def test_fill_requires_exactly_the_used_variables():
    text = "max_batch_size: ${n}\nname: \"${name}\""
    assert template_variables(text) == {"n", "name"}
    assert fill_template(text, {"n": 4, "name": "m"}) == 'max_batch_size: 4\nname: "m"'
    with pytest.raises(TemplateError, match="no value for name"):
        fill_template(text, {"n": 4})
    with pytest.raises(TemplateError, match="unknown variables extra"):
        fill_template(text, {"n": 4, "name": "m", "extra": 1})


def test_malformed_variable_is_an_error():
    with pytest.raises(TemplateError, match="malformed"):
        template_variables("max_batch_size: ${n")


def test_schema_rejects_invalid_configs():
    assert parse_model_config('name: "x" max_batch_size: 4').max_batch_size == 4
    with pytest.raises(TemplateError, match="not a valid Triton model config"):
        parse_model_config('name: "x" max_batch_size: "four"')
    with pytest.raises(TemplateError, match="not a valid Triton model config"):
        parse_model_config('name: "x" no_such_field: 1')


def test_every_shipped_template_documents_its_variables():
    table = (TEMPLATES / "VARIABLES.md").read_text()
    for template in TEMPLATES.glob("*/config.pbtxt.tmpl"):
        for name in template_variables(template.read_text()):
            assert f"`{name}`" in table, f"{name} of {template} is not documented in VARIABLES.md"


def test_a_bad_value_fails_at_render_time():
    values = {"max_batch_size": "not-a-number", "embedding_dim": 1024}
    with pytest.raises(TemplateError, match="captioner"):
        render_config(TEMPLATES / "captioner" / "config.pbtxt.tmpl", values)


def test_export_writes_valid_configs_with_the_options(tiny_checkpoint, tmp_path):
    options = ExportOptions(max_batch_size=8, queue_delay_us=250, decoder_instances=2)
    out = export_repository(tiny_checkpoint, tmp_path / "repo", options, log=lambda _: None)
    configs = {name: parse_model_config((out / name / "config.pbtxt").read_text()) for name in
               ("projector", "decoder", "captioner")}
    assert all(config.max_batch_size == 8 for config in configs.values())
    assert configs["decoder"].instance_group[0].count == 2
    assert configs["decoder"].dynamic_batching.max_queue_delay_microseconds == 250
    assert configs["captioner"].platform == "ensemble"
    assert (out / "projector" / "1" / "projector.onnx").is_file()
    assert "${" not in "".join((out / n / "config.pbtxt").read_text() for n in configs)


def test_export_without_dynamic_batching(tiny_checkpoint, tmp_path):
    out = export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(dynamic_batching=False),
                            log=lambda _: None)
    assert not parse_model_config((out / "decoder" / "config.pbtxt").read_text()).HasField("dynamic_batching")


def test_bad_options_fail_at_export_and_leave_nothing(tiny_checkpoint, tmp_path):
    with pytest.raises(TemplateError, match="max_batch_size must be >= 1"):
        export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(max_batch_size=0), log=lambda _: None)
    assert not (tmp_path / "repo").exists()
    assert list(Path(tmp_path).iterdir()) == []


@pytest.mark.parametrize("engine, delay_us", [("continuous", 0), ("hf", 20_000)])
def test_the_engine_and_its_queue_delay_reach_the_decoder_config(tiny_checkpoint, tmp_path, engine, delay_us):
    out = export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(engine=engine), log=lambda _: None)
    decoder = parse_model_config((out / "decoder" / "config.pbtxt").read_text())
    assert decoder.parameters["engine"].string_value == engine
    assert decoder.dynamic_batching.max_queue_delay_microseconds == delay_us
    projector = parse_model_config((out / "projector" / "config.pbtxt").read_text())
    assert projector.dynamic_batching.max_queue_delay_microseconds == delay_us


def test_an_unknown_engine_or_an_unsupported_decoder_fails_at_export(tiny_checkpoint, tmp_path):
    with pytest.raises(TemplateError, match="engine must be one of"):
        export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(engine="vllm"), log=lambda _: None)
    other = shutil.copytree(tiny_checkpoint, tmp_path / "other")
    config = other / "decoder" / "config.json"
    config.write_text(config.read_text().replace('"model_type": "llama"', '"model_type": "gpt2"'))
    with pytest.raises(TemplateError, match="export with --engine hf"):
        export_repository(other, tmp_path / "repo", ExportOptions(), log=lambda _: None)
    assert not (tmp_path / "repo").exists()


def test_the_command_line_is_generated_from_the_options_and_round_trips():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(parser)
    options = ExportOptions(max_batch_size=8, engine="hf", queue_delay_us=0, dynamic_batching=False,
                            gpus=(1, 3), dtype="float16", engine_cache_dir="/x y")
    assert from_arguments(parser.parse_args(to_argv(options))) == options
    assert from_arguments(parser.parse_args([])) == ExportOptions()
    assert to_argv(ExportOptions()) == []
    for field in fields(ExportOptions):  # every option has a flag
        assert f"--{field.name.replace('_', '-')}" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpus", "0,x"])


@pytest.mark.parametrize("gpus, expected", [((0, 1), [0, 1]), (None, [])])
def test_gpus_place_every_instance_group_on_the_listed_gpus(tiny_checkpoint, tmp_path, gpus, expected):
    resolved = resolve_checkpoint(tiny_checkpoint)
    options = ExportOptions(gpus=gpus, decoder_instances=2, projector_instances=1)
    configs = {name: parse_model_config(text) for name, text in
               render_configs(resolved, options, "cuda").items()}
    for name, count in (("decoder", 2), ("projector", 1)):
        (group,) = configs[name].instance_group
        assert group.kind == group.KIND_GPU and group.count == count and list(group.gpus) == expected
    assert not configs["captioner"].instance_group  # the ensemble runs nowhere itself


def test_gpus_without_a_gpu_or_with_repeats_fail_at_export(tiny_checkpoint, tmp_path):
    resolved = resolve_checkpoint(tiny_checkpoint)
    with pytest.raises(TemplateError, match="needs the models on a GPU"):
        render_configs(resolved, ExportOptions(gpus=(0,)), "cpu")
    with pytest.raises(TemplateError, match="gpus must be distinct"):
        render_configs(resolved, ExportOptions(gpus=(0, 0)), "cuda")
    with pytest.raises(TemplateError, match="gpus needs a GPU"):
        export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(gpus=(0,), device="cpu"),
                          log=lambda _: None)
    assert not (tmp_path / "repo").exists()


def test_parameter_keys_are_the_contracts_and_models_read_them_through_it(tiny_checkpoint, tmp_path):
    from embcap.contract import parameter_keys
    from tooling.builders import make_tiny_checkpoint, minilm_rerank

    checkpoint = make_tiny_checkpoint(tmp_path / "ck", tiny_checkpoint / "decoder", rerank=minilm_rerank(2))
    resolved = resolve_checkpoint(checkpoint)
    configs = render_configs(resolved, ExportOptions(request_timeout_s=7.5, max_queued_rows=12), "cpu")
    assert set(configs) == {"projector", "decoder", "reranker", "captioner"}
    for name, text in configs.items():
        keys = set(parse_model_config(text).parameters)
        assert keys <= parameter_keys(), f"{name}: {sorted(keys - parameter_keys())} not in embcap.contract.Param"
    decoder = parse_model_config(configs["decoder"]).parameters
    assert decoder["request_timeout_s"].string_value == "7.5" and decoder["max_queued_rows"].string_value == "12"
    for model_py in TEMPLATES.glob("*/1/model.py"):
        assert 'params["' not in model_py.read_text(), f"{model_py} reads a parameter by a bare string"
