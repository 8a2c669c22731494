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

    from bench.gpu_decoder import build_model
    from embcap.checkpoint import CaptionModelSpec, DecoderSource, GenerationSettings
    from embcap.generation import CaptionGenerator

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
    from embcap.running_batch import RunningBatch

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
    from embcap.running_batch import RunningBatch

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
    from embcap.running_batch import RunningBatch

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
