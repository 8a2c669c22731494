"""Decoding engines on CUDA: CUDA-graph replay equals eager decoding and the hf reference (marked gpu).

Runs without the project's conftest (`pytest --noconftest -m gpu tests/test_engines_gpu.py`) on a
bare CUDA host with torch and transformers; EMBCAP_TOKENIZER_DIR names a tokenizer folder there.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def generator(shape: str, dtype: torch.dtype, device: str = "cuda", **generation):
    from transformers import AutoTokenizer

    from embcap.checkpoint import CaptionModelSpec, DecoderSource, GenerationSettings
    from embcap.generation import CaptionGenerator
    from tooling.builders import build_model

    folder = os.environ.get("EMBCAP_TOKENIZER_DIR")
    if folder is None:
        from embcap.decoder_source import smollm2_decoder_dir

        folder = smollm2_decoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = CaptionModelSpec(name=shape, prefix_length=4, decoder=DecoderSource(path="random"),
                            generation=GenerationSettings(**generation))
    torch.manual_seed(0)
    return CaptionGenerator(spec, build_model(shape, len(tokenizer), device, dtype), tokenizer)


def prefix(g, rows: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, 4, g.hidden_size)) * 0.5).astype(np.float32)


def test_graph_replay_with_rows_joining_equals_hf_in_fp32():
    from embcap.engines.continuous.running_batch import RunningBatch

    g = generator("tiny", torch.float32, max_new_tokens=12, min_new_tokens=12)
    rows = prefix(g, 6)
    reference = [g.generate(rows[i:i + 1])[0] for i in range(6)]
    batch = RunningBatch(g, slots=8)
    assert batch.decoder.graphs, "CUDA graphs should be captured on a GPU"
    texts, step = {}, 0
    while batch.active or step < 5:
        if step == 0:
            batch.add(rows[:2], [0, 1])
        if step == 4:
            batch.add(rows[2:], [2, 3, 4, 5])
        batch.step()
        texts.update({row.key: row.text for row in batch.take_finished()})
        step += 1
    assert [texts[i] for i in range(6)] == reference


def test_graph_step_equals_eager_step():
    from embcap.engines.continuous.running_batch import RunningBatch

    g = generator("tiny", torch.float32, max_new_tokens=8, min_new_tokens=8)
    results = []
    for graphs in (True, False):
        batch = RunningBatch(g, slots=4, use_graphs=graphs)
        batch.add(prefix(g, 3, seed=2), [0, 1, 2])
        finished = []
        while batch.active:
            batch.step()
            finished += batch.take_finished()
        results.append(sorted((row.key, tuple(row.tokens)) for row in finished))
    assert results[0] == results[1]


def test_bf16_sampling_is_reproducible_and_never_blank():
    from embcap.engines import create_engine, generate_blocking

    g = generator("smollm2-135m", torch.bfloat16, max_new_tokens=24, min_new_tokens=2, do_sample=True,
                  temperature=0.6, top_k=300, seed=3)
    engine = create_engine("continuous", g, slots=16)
    try:
        rows = prefix(g, 4)
        assert generate_blocking(engine, rows) == generate_blocking(engine, rows)
        many = generate_blocking(engine, prefix(g, 16, seed=1))
        assert len(many) == 16 and all(text.strip() for text in many)
        assert engine.capture_seconds > 0
    finally:
        engine.close()


def test_an_engine_on_the_gpu_triton_assigns_equals_one_on_the_default_gpu():
    """The decoder model puts its engine on cuda:<model_instance_device_id> (export --gpus)."""
    from embcap.engines import create_engine, generate_blocking

    last = torch.cuda.device_count() - 1
    captions = []
    for device in ("cuda", f"cuda:{last}"):
        torch.cuda.set_device(0 if device == "cuda" else last)  # as the decoder model does
        g = generator("tiny", torch.float32, device=device, max_new_tokens=10, min_new_tokens=10)
        engine = create_engine("continuous", g, slots=8)
        try:
            assert engine.capture_seconds > 0  # CUDA graphs captured on that GPU
            captions.append(generate_blocking(engine, prefix(g, 5)))
        finally:
            engine.close()
    assert captions[0] == captions[1] and len(captions[0]) == 5


def test_sampled_candidates_on_an_explicit_gpu_are_reproducible_and_equal_the_default_gpus():
    """Each row samples from its own stream on the device: the same on cuda:N as on cuda, from any thread."""
    from embcap.engines import create_engine, generate_blocking

    last = torch.cuda.device_count() - 1
    answers = []
    for device in ("cuda", f"cuda:{last}"):
        torch.cuda.set_device(0 if device == "cuda" else last)
        g = generator("tiny", torch.float32, device=device, max_new_tokens=10, min_new_tokens=10, do_sample=True,
                      temperature=1.0, top_k=50, seed=5)
        engine = create_engine("continuous", g, slots=4, candidates=4)
        try:
            first, second = (generate_blocking(engine, prefix(g, 3)) for _ in range(2))
            assert first == second and len(first) == 12
            answers.append(first)
        finally:
            engine.close()
    assert answers[0] == answers[1]


def test_candidates_in_captured_graphs_equal_eager_candidates():
    from embcap.candidates import candidate_plan
    from embcap.engines.continuous.running_batch import RunningBatch

    g = generator("tiny", torch.float32, max_new_tokens=8, min_new_tokens=8)
    results = []
    for graphs in (True, False):
        batch = RunningBatch(g, slots=12, use_graphs=graphs, plan=candidate_plan(g.spec, 4))
        batch.add(prefix(g, 3, seed=6), list(range(12)))
        finished = []
        while batch.active:
            batch.step()
            finished += batch.take_finished()
        results.append(sorted((row.key, tuple(row.tokens)) for row in finished))
    assert results[0] == results[1]


# ----------------------------------------------------------------------------- FP8 (compute capability >= 8.9)
def fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(not fp8_capable(), reason="FP8 GEMMs need compute capability >= 8.9")


def fp8_generator(g, mode: str):
    """The same weights with FP8 projections; static scales calibrated on other rows of the test inputs."""
    from embcap.fp8_calibration import calibrate
    from embcap.generation import CaptionGenerator
    from embcap.lean_llama import LeanLlama

    scales = calibrate(g, prefix(g, 6, seed=9)) if mode == "static" else None
    return CaptionGenerator(g.spec, LeanLlama.from_hf(g.model).quantise_fp8(scales), g.tokenizer)


def test_fp8_is_refused_exactly_where_the_gpu_cannot_run_it():
    from embcap.fp8 import serving_problem

    problem = serving_problem("cuda")
    assert (problem is None) == fp8_capable(), problem


@needs_fp8
def test_fp8_casts_saturate_on_the_gpu_as_on_the_cpu():
    from embcap.fp8 import E4M3_MAX, quantise_rows, to_e4m3

    x = torch.tensor([1e4, -1e4, 500.0, 448.0, 1.0, 0.0])
    expected = [E4M3_MAX, -E4M3_MAX, E4M3_MAX, E4M3_MAX, 1.0, 0.0]
    for values in (x, x.bfloat16()):
        assert to_e4m3(values.cuda()).float().cpu().tolist() == expected
        assert to_e4m3(values.cuda() / 2, 2.0).float().cpu().tolist() == expected
    rows = torch.randn(8, 64, dtype=torch.bfloat16) * 50
    (cpu_q, cpu_s), (gpu_q, gpu_s) = quantise_rows(rows), quantise_rows(rows.cuda())
    torch.testing.assert_close(gpu_s.cpu(), cpu_s)
    assert torch.equal(gpu_q.float().cpu(), cpu_q.float())


@needs_fp8
@pytest.mark.parametrize("static", [True, False])
def test_the_fp8_gemm_on_the_gpu_equals_the_cpus(static):
    """Row-wise scales on the GPU's kernels (cuBLASLt or CUTLASS), the bias fused into the bf16 output."""
    from embcap.fp8 import E4M3_MAX, Fp8Linear, unit_rows

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 512, generator=generator).bfloat16()
    weight, bias = torch.randn(256, 512, generator=generator) * 0.05, torch.randn(256, generator=generator) * 0.1
    scale = x.abs().max().item() / E4M3_MAX if static else None
    outputs = []
    for device in ("cpu", "cuda"):
        linear = Fp8Linear(weight.to(device, torch.bfloat16), bias.to(device, torch.bfloat16), scale, torch.bfloat16)
        outputs.append(linear(x.to(device), unit_rows(32, device)).float().cpu())
    error = (outputs[1] - outputs[0]).norm() / outputs[0].norm()
    assert error < 1e-2, error  # the same e4m3 products: accumulation order and bf16 rounding apart


@needs_fp8
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fp8_graph_replay_equals_eager_with_rows_joining(mode):
    from embcap.engines.continuous.running_batch import RunningBatch

    g = fp8_generator(generator("tiny", torch.bfloat16, max_new_tokens=10, min_new_tokens=10), mode)
    results = []
    for graphs in (True, False):
        batch = RunningBatch(g, slots=8, use_graphs=graphs)
        assert bool(batch.decoder.graphs) == graphs
        texts, step = {}, 0
        while batch.active or step < 4:
            if step == 0:
                batch.add(prefix(g, 2), [0, 1])
            if step == 3:
                batch.add(prefix(g, 4, seed=1), [2, 3, 4, 5])
            batch.step()
            texts.update({row.key: tuple(row.tokens) for row in batch.take_finished()})
            step += 1
        results.append(texts)
    assert results[0] == results[1] and len(results[0]) == 6


@needs_fp8
def test_fp8_smollm2_shape_serves_from_captured_graphs_reading_fewer_bytes():
    from embcap.engines import create_engine, generate_blocking

    g = generator("smollm2-135m", torch.bfloat16, max_new_tokens=16, min_new_tokens=2)
    fp8 = fp8_generator(g, "static")
    assert fp8.lean.weight_bytes() < 0.65 * g.lean.weight_bytes()  # projections at 1 byte, the big head at 2
    engine = create_engine("continuous", fp8, slots=16, candidates=2)
    try:
        assert engine.capture_seconds > 0
        answers = generate_blocking(engine, prefix(fp8, 8))
        assert len(answers) == 16 and all(text.strip() for text in answers)
        assert generate_blocking(engine, prefix(fp8, 8)) == answers
    finally:
        engine.close()
