"""FP8 weights in the continuous engine on the CPU (torch's CPU `_scaled_mm`), their calibration and the export.

Serving FP8 on the CPU is refused at export; the engine itself runs it here so that its numerics can be tested.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embcap.engines import create_engine, generate_blocking
from embcap.fp8 import dequantise, quantise_weight
from embcap.fp8_calibration import (CALIBRATION_ROWS, calibrate, calibrate_checkpoint, format_scales,
                                    heldout_problem, heldout_rows, observe_amax, parse_scales)
from embcap.generation import CaptionGenerator
from embcap.lean_llama import LeanLlama, ProjectionScales
from embcap.loading import resolve_checkpoint
from embcap.engines.continuous.running_batch import RunningBatch
from embcap.engines.continuous.slot_decoder import SlotKVDecoder
from export.options import ExportOptions, to_argv
from export.repository import export_repository, render_configs
from export.templates import TemplateError, parse_model_config
from test_engines import ROOT, drain, load, random_prefix
from tooling.builders import make_tiny_checkpoint, minilm_rerank


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> CaptionGenerator:
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def scales(tiny) -> list[ProjectionScales]:
    return calibrate(tiny, random_prefix(tiny, 6, seed=11))


def fp8_generator(tiny: CaptionGenerator, folder, scales, dtype=torch.float32) -> CaptionGenerator:
    return CaptionGenerator(tiny.spec, LeanLlama.from_pretrained(folder, "cpu", dtype).quantise_fp8(scales),
                            tiny.tokenizer)


def logits(generator: CaptionGenerator, prefix: np.ndarray) -> torch.Tensor:
    """Teacher-forced logits at every prompt position."""
    decoder = SlotKVDecoder(generator.lean, len(prefix), generator.prompt_length, generator.stop_ids)
    return decoder.sequence_logits(generator.prompt_embeddings(torch.from_numpy(prefix)))


def test_quantising_frees_the_projections_and_reads_about_a_quarter_of_their_fp32_bytes(tiny_checkpoint):
    model = LeanLlama.from_pretrained(tiny_checkpoint / "decoder")
    names = ("qkv", "o", "gate_up", "down")
    projections = sum(getattr(layer, name).numel() for layer in model.layers for name in names)
    before = model.weight_bytes()
    assert model.fp8_mode == "off"
    model.quantise_fp8(None)
    assert model.fp8_mode == "dynamic"
    assert all(layer.qkv is None and layer.down is None and layer.fp8 is not None for layer in model.layers)
    channels = sum(layer.fp8.qkv.scale.numel() + layer.fp8.o.scale.numel() + layer.fp8.gate_up.scale.numel()
                   + layer.fp8.down.scale.numel() for layer in model.layers)
    assert before - model.weight_bytes() == 3 * projections - 4 * channels  # 4 bytes -> 1, plus fp32 scales
    with pytest.raises(ValueError, match="already FP8"):
        model.quantise_fp8(None)
    with pytest.raises(ValueError, match="1 layers of FP8 input scales for a decoder of 2"):
        LeanLlama.from_pretrained(tiny_checkpoint / "decoder").quantise_fp8([ProjectionScales(1, 1, 1, 1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_logits_are_as_close_as_the_rounding_of_the_weights_allows(tiny, tiny_checkpoint, scales, dtype):
    """Against the fp32 model, an FP8 model's logits differ about as much as those of a model whose weights
    alone went through e4m3 and back: the activations' rounding adds less than as much again. A misplaced
    scale (or a folded one applied twice) would be off by that scale, 10-100x here."""
    prefix = random_prefix(tiny, 4, seed=3)
    exact = logits(tiny, prefix)
    folder = tiny_checkpoint / "decoder"

    def error(model: LeanLlama) -> float:
        generator = CaptionGenerator(tiny.spec, model, tiny.tokenizer)
        return ((logits(generator, prefix) - exact).norm() / exact.norm()).item()

    rounded = LeanLlama.from_pretrained(folder, "cpu", dtype)
    for layer in rounded.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, dequantise(*quantise_weight(getattr(layer, name)), dtype))
    weights_alone = error(rounded)
    assert error(LeanLlama.from_pretrained(folder, "cpu", dtype)) < weights_alone / 4
    for mode in (scales, None):
        assert weights_alone < error(LeanLlama.from_pretrained(folder, "cpu", dtype).quantise_fp8(mode)) \
            < 2 * weights_alone, mode is None


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fp8_rows_joining_at_different_steps_decode_as_they_do_alone(tiny, tiny_checkpoint, scales, mode):
    """Both input scalings are per row or per tensor, never across rows: a row's caption is its own."""
    generator = fp8_generator(tiny, tiny_checkpoint / "decoder", scales if mode == "static" else None)
    prefix = random_prefix(generator, 5)
    alone = [drain(RunningBatch(generator, slots=1), {0: (prefix[i:i + 1], [0])})[0] for i in range(5)]
    together = drain(RunningBatch(generator, slots=8), {0: (prefix[:2], [0, 1]), 3: (prefix[2:], [2, 3, 4])})
    assert [together[i] for i in range(5)] == alone
    engine = create_engine("continuous", generator, slots=4, candidates=3)
    try:
        answers = generate_blocking(engine, prefix[:2], timeout_s=60)
        assert len(answers) == 6 and all(text.strip() for text in answers)
    finally:
        engine.close()


def test_calibration_records_the_largest_input_of_each_projection(tiny):
    prefix = random_prefix(tiny, 3, seed=5)
    observer = observe_amax(tiny, prefix)
    # Layer 0's q/k/v input is the normed embedding of every position the decoder ran: the prompt, and every
    # generated token but the last of each row. Recompute it from the rows' own tokens.
    batch = RunningBatch(tiny, slots=3)
    batch.add(prefix, [0, 1, 2])
    finished = []
    while batch.active:
        batch.step()
        finished += batch.take_finished()
    lean = tiny.lean
    fed = [tiny.prompt_embeddings(torch.from_numpy(prefix)).flatten(0, 1)]
    fed += [lean.embed(torch.tensor(row.tokens[:-1])) for row in finished]
    normed = F.rms_norm(torch.cat(fed), lean.layers[0].input_norm.shape, lean.layers[0].input_norm, lean.shape.eps)
    assert observer.amax[0, 0].item() == pytest.approx(normed.abs().max().item(), rel=1e-6)
    assert (observer.amax > 0).all()
    headroom_1 = observer.scales(1.0)
    assert headroom_1[0].qkv == pytest.approx(normed.abs().max().item() / 448, rel=1e-6)
    assert observer.scales(2.0)[1].down == pytest.approx(2 * headroom_1[1].down)


def test_scales_travel_through_the_config_text(scales):
    text = format_scales(scales)
    assert '"' not in text  # a config.pbtxt string value
    back = parse_scales(text, layers=2)
    np.testing.assert_allclose(np.asarray(back), np.asarray(scales), rtol=1e-5)
    for bad, message in (("[[1,2,3]]", "JSON list"), ("nonsense", "JSON list"), ("[[1,2,3,-4],[1,2,3,4]]", "positive"),
                         ("[[1,2,3,4]]", "1 layers of FP8 input scales for a decoder of 2 layers")):
        with pytest.raises(ValueError, match=message):
            parse_scales(bad, layers=2)


def test_the_default_model_calibrates_from_its_own_heldout_split():
    resolved = resolve_checkpoint(ROOT / "models" / "default")
    assert heldout_problem(resolved.checkpoint) is None
    rows = heldout_rows(resolved.checkpoint, CALIBRATION_ROWS, 3)
    assert rows.embeddings.shape == (3, 1024) and "heldout.txt" in rows.source
    norms = np.linalg.norm(rows.embeddings, axis=1)
    assert (norms < 1).all() and (norms > 0.3).all()  # evaluator-shaped
    lines = (ROOT / "models" / "default" / "heldout.txt").read_text().splitlines()
    assert rows.references[0] == lines[CALIBRATION_ROWS].split("\t", 1)[1]  # after the calibration rows


def test_heldout_inputs_come_from_a_parquet_file_in_the_evaluators_layout(tmp_path, smollm2_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    checkpoint = resolve_checkpoint(make_tiny_checkpoint(tmp_path / "ck", smollm2_dir)).checkpoint
    assert "neither heldout.parquet" in heldout_problem(checkpoint)
    (checkpoint.root / "heldout.txt").write_text("scene\ta dog runs\n")
    assert "names no rerank.encoder" in heldout_problem(checkpoint)
    embeddings = np.random.default_rng(0).standard_normal((5, 1024)).astype(np.float32)
    pq.write_table(pa.table({"video_embed": list(embeddings), "description": [f"row {i}" for i in range(5)]}),
                   checkpoint.root / "heldout.parquet")
    assert heldout_problem(checkpoint) is None
    rows = heldout_rows(checkpoint, 2, 10)
    np.testing.assert_array_equal(rows.embeddings, embeddings[2:])
    assert rows.references == ["row 2", "row 3", "row 4"]


def test_a_checkpoint_calibrates_once_and_then_from_the_cache(tmp_path, smollm2_dir, monkeypatch):
    monkeypatch.setenv("EMBCAP_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tiny_checkpoint(tmp_path / "ck", smollm2_dir, rerank=minilm_rerank(2))
    (root / "heldout.txt").write_text("".join(f"scene\ta dog number {i} runs in a park\n" for i in range(6)))
    resolved = resolve_checkpoint(root)
    lines = []
    first = calibrate_checkpoint(resolved, "cpu", torch.float32, candidates=2, log=lines.append)
    assert len(first.scales) == 2 and first.record["rows"] == 6 and "heldout.txt" in first.record["source"]
    again = calibrate_checkpoint(resolved, "cpu", torch.float32, candidates=2, log=lines.append)
    assert again.scales == first.scales and "calibrated before" in lines[-1]
    (root / "heldout.txt").write_text("scene\ta cat sleeps\n")  # other inputs: measured again
    third = calibrate_checkpoint(resolved, "cpu", torch.float32, candidates=2, log=lines.append)
    assert third.record["rows"] == 1 and "calibrated on cpu" in lines[-1]


def test_fp8_is_refused_at_export_with_every_reason(tiny_checkpoint, tmp_path):
    with pytest.raises(TemplateError) as refused:
        export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(fp8="static", engine="hf"),
                          log=lambda _: None)
    message = str(refused.value)
    assert message.startswith("--fp8 static cannot be served: ")
    assert "continuous engine's (--engine hf" in message
    assert "neither heldout.parquet" in message and "--fp8 dynamic" in message
    assert "served on a GPU only" in message and "runs on cpu" in message
    with pytest.raises(TemplateError, match="bfloat16 activations .*not float16.*GPU only"):
        export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(fp8="dynamic", dtype="float16"),
                          log=lambda _: None)
    assert not (tmp_path / "repo").exists()
    assert to_argv(ExportOptions(fp8="dynamic")) == ["--fp8=dynamic"]


def test_the_decoder_config_carries_the_mode_and_the_scales(tiny_checkpoint, tmp_path, scales):
    resolved = resolve_checkpoint(tiny_checkpoint)
    for options, text in ((ExportOptions(), ""), (ExportOptions(fp8="static"), format_scales(scales))):
        config = render_configs(resolved, options, "cuda", text)["decoder"]
        parameters = parse_model_config(config).parameters
        assert parameters["fp8"].string_value == options.fp8
        assert parameters["fp8_input_scales"].string_value == text
    assert parse_scales(parameters["fp8_input_scales"].string_value, 2) == parse_scales(text)
    assert json.loads(text)[0][3] == pytest.approx(scales[0].down, rel=1e-5)


def test_a_config_edited_to_fp8_fails_the_decoders_load_on_the_cpu_naming_why(tiny_checkpoint, tmp_path):
    """The export refuses FP8 here; a config changed afterwards is refused by the decoder model when it loads."""
    import re

    from conftest import TritonOptions, TritonProcess, free_port

    repository = export_repository(tiny_checkpoint, tmp_path / "repo", ExportOptions(max_batch_size=4),
                                   log=lambda _: None)
    config = repository / "decoder" / "config.pbtxt"
    config.write_text(re.sub(r'(key: "fp8" value: \{ string_value: )"off"', r'\1"dynamic"', config.read_text()))
    log = tmp_path / "triton.log"
    triton = TritonProcess(TritonOptions(repository, grpc_port=free_port()), log_file=open(log, "wb"))
    triton.start()
    try:
        with pytest.raises(RuntimeError, match="exited"):
            triton.wait_ready(timeout_s=120)
    finally:
        triton.stop()  # its temp folder and shared memory
    assert "FP8 weights (dynamic) cannot be served: FP8 weights are served on a GPU only" in log.read_text()
