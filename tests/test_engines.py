"""Decoding engines on the CPU: continuous batching equals the hf reference, rows join and leave freely."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tooling.builders import make_blank_prone_checkpoint
from embcap.checkpoint import load_checkpoint
from embcap.decoder_source import resolve_decoder
from embcap.engines import Cancelled, Job, create_engine, generate_blocking
from embcap.generation import BLANK_FALLBACK, CaptionGenerator
from embcap.inputs import realistic_embeddings
from embcap.projector import load_projector
from embcap.engines.continuous.running_batch import RunningBatch

ROOT = Path(__file__).resolve().parent.parent


def load(checkpoint_dir, **generation) -> CaptionGenerator:
    checkpoint = load_checkpoint(checkpoint_dir)
    spec = checkpoint.spec
    if generation:
        spec = spec.model_copy(update={"generation": spec.generation.model_copy(update=generation)})
    return CaptionGenerator.load(spec, resolve_decoder(checkpoint, log=lambda _: None))


def random_prefix(generator: CaptionGenerator, rows: int, seed: int = 0) -> np.ndarray:
    shape = (rows, generator.spec.prefix_length, generator.hidden_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def drain(batch: RunningBatch, joins: dict[int, tuple[np.ndarray, list]]) -> dict:
    """Step until empty; before step k, the rows in joins[k] join. Returns key -> text."""
    texts, step = {}, 0
    while batch.active or any(k >= step for k in joins):
        if step in joins:
            batch.add(*joins[step])
        batch.step()
        texts.update({row.key: row.text for row in batch.take_finished()})
        step += 1
    return texts


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> CaptionGenerator:
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def default_model():
    """The default SmolLM2 model and realistic prefixes (captions end at their own lengths)."""
    checkpoint = load_checkpoint(ROOT / "models" / "default")
    generator = load(ROOT / "models" / "default")
    projector = load_projector(checkpoint.projector_path, checkpoint.spec.embedding_dim, generator.hidden_size,
                               checkpoint.spec.prefix_length)
    with torch.inference_mode():
        prefix = projector(torch.from_numpy(realistic_embeddings(7, seed=3))).numpy()
    return generator, prefix


def test_rows_joining_at_different_steps_match_hf_token_for_token(tiny):
    prefix = random_prefix(tiny, 6)
    alone = [tiny.generate(prefix[i:i + 1])[0] for i in range(6)]
    batch = RunningBatch(tiny, slots=8)
    texts = drain(batch, {0: (prefix[:2], [0, 1]), 2: (prefix[2:5], [2, 3, 4]), 5: (prefix[5:], [5])})
    assert [texts[i] for i in range(6)] == alone
    assert batch.active == 0 and batch.free_slots == 8


def test_smollm2_rows_leave_at_their_own_lengths_and_match_hf(default_model):
    generator, prefix = default_model
    reference = generator.generate(prefix)
    batch = RunningBatch(generator, slots=4)
    batch.add(prefix[:4], [0, 1, 2, 3])
    waiting, texts, joined_while_busy = [4, 5, 6], {}, False
    while len(texts) < 7:  # the last three join as soon as a slot frees up, beside rows still decoding
        if waiting and batch.free_slots:
            take, waiting = waiting[:batch.free_slots], waiting[batch.free_slots:]
            joined_while_busy |= batch.active > 0
            batch.add(prefix[take], take)
        batch.step()
        texts.update({row.key: row.text for row in batch.take_finished()})
        assert sorted(batch.rows) == list(range(batch.active)), "rows must fill slots 0..n-1 after others leave"
    assert [texts[i] for i in range(7)] == reference
    assert joined_while_busy
    lengths = {len(generator.tokenizer(text)["input_ids"]) for text in reference}
    assert len(lengths) > 1, "realistic inputs should give captions of different lengths"


def test_more_slots_than_cache_positions(tiny):
    batch = RunningBatch(tiny, slots=64)
    assert batch.decoder.max_length < 64
    prefix = random_prefix(tiny, 40, seed=4)
    texts = drain(batch, {0: (prefix, list(range(40)))})
    assert [texts[i] for i in range(40)] == tiny.generate(prefix)


def test_sampling_is_reproducible_for_a_request_alone(tiny_checkpoint):
    sampled = load(tiny_checkpoint, do_sample=True, temperature=1.0, top_k=50, seed=7)
    prefix = random_prefix(sampled, 3, seed=5)
    engine = create_engine("continuous", sampled, slots=8)
    try:
        first, second = generate_blocking(engine, prefix), generate_blocking(engine, prefix)
    finally:
        engine.close()
    greedy = load(tiny_checkpoint).generate(prefix)
    assert first == second
    assert first != greedy, "sampling at temperature 1 should differ from greedy decoding"


@pytest.mark.parametrize("engine_name", ["hf", "continuous"])
@pytest.mark.parametrize("then, expected", [("space", BLANK_FALLBACK), ("word", "cat")])
def test_a_caption_is_never_blank(tmp_path, smollm2_dir, engine_name, then, expected):
    checkpoint = make_blank_prone_checkpoint(tmp_path / "blank", smollm2_dir, then)
    generator = load(checkpoint)
    engine = create_engine(engine_name, generator, slots=4)
    try:
        assert generate_blocking(engine, random_prefix(generator, 3)) == [expected] * 3
        assert engine.stats.blank_fallbacks == (3 if then == "space" else 0)
    finally:
        engine.close()


def test_a_cancelled_request_frees_its_rows(tiny_checkpoint):
    slow = load(tiny_checkpoint, max_new_tokens=4000, min_new_tokens=4000)
    engine = create_engine("continuous", slow, slots=4)
    cancel = threading.Event()
    outcome: dict = {}
    done = threading.Event()

    def finish(texts, error):
        outcome["texts"], outcome["error"] = texts, error
        done.set()

    try:
        engine.submit([Job(random_prefix(slow, 4), finish, cancel.is_set)])
        time.sleep(0.3)
        assert engine.batch.active == 4 and not done.is_set()
        cancel.set()
        assert done.wait(10), "a cancelled request must be answered"
        assert isinstance(outcome["error"], Cancelled) and outcome["texts"] is None
        assert engine.stats.cancelled_rows == 4
        assert engine.batch.active == 0 and engine.batch.free_slots == 4
    finally:
        engine.close()


def test_a_request_larger_than_the_batch_fails_at_once(tiny):
    engine = create_engine("continuous", tiny, slots=2)
    try:
        with pytest.raises(ValueError, match="exceed"):
            generate_blocking(engine, random_prefix(tiny, 3), timeout_s=5)
        assert generate_blocking(engine, random_prefix(tiny, 0), timeout_s=5) == []
    finally:
        engine.close()


def test_unknown_engine_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine("vllm", tiny, slots=2)


def test_min_and_max_new_tokens_are_kept(tiny_checkpoint):
    short = load(tiny_checkpoint, max_new_tokens=3, min_new_tokens=3)
    batch = RunningBatch(short, slots=2)
    batch.add(random_prefix(short, 2), [0, 1])
    finished = []
    while batch.active:
        batch.step()
        finished += batch.take_finished()
    assert [len(row.tokens) for row in finished] == [3, 3]
    assert [row.text for row in sorted(finished, key=lambda r: r.key)] == short.generate(random_prefix(short, 2))


# ------------------------------------------------------------------ best-of-N candidates
def candidates_of(engine_name: str, generator: CaptionGenerator, prefix: np.ndarray, candidates: int,
                  slots: int = 8) -> list[list[str]]:
    engine = create_engine(engine_name, generator, slots=slots, candidates=candidates)
    try:
        texts = generate_blocking(engine, prefix, timeout_s=120)
    finally:
        engine.close()
    assert len(texts) == len(prefix) * candidates
    return [texts[row * candidates:(row + 1) * candidates] for row in range(len(prefix))]


@pytest.fixture(scope="module")
def early_ending(tmp_path_factory, smollm2_dir) -> CaptionGenerator:
    """The tiny model with captions that may end before max_new_tokens (rows leave at their own steps)."""
    from tooling.builders import make_tiny_checkpoint

    return load(make_tiny_checkpoint(tmp_path_factory.mktemp("early") / "ck", smollm2_dir, seed=3,
                                     max_new_tokens=12, min_new_tokens=1))


@pytest.mark.parametrize("engine_name", ["continuous", "hf"])
def test_one_candidate_is_plain_decoding_and_candidate_zero_is_greedy(early_ending, engine_name):
    prefix = random_prefix(early_ending, 3, seed=8)
    greedy = early_ending.generate(prefix)
    assert [row[0] for row in candidates_of(engine_name, early_ending, prefix, 1)] == greedy
    rows = candidates_of(engine_name, early_ending, prefix, 4)
    assert [row[0] for row in rows] == greedy
    assert all(text.strip() for row in rows for text in row)
    assert any(len(set(row)) > 1 for row in rows), "sampled candidates should differ from each other"


def test_candidates_are_reproducible_and_do_not_depend_on_the_batch_or_on_n(early_ending):
    prefix = random_prefix(early_ending, 3, seed=9)
    eight = candidates_of("continuous", early_ending, prefix, 8)
    assert candidates_of("continuous", early_ending, prefix, 8) == eight
    assert candidates_of("continuous", early_ending, prefix[1:2], 8) == eight[1:2], "a row alone gets the same"
    assert [row[:3] for row in eight] == candidates_of("continuous", early_ending, prefix, 3)
    reseeded = early_ending.spec.model_copy(update={"generation": early_ending.spec.generation.model_copy(
        update={"seed": 1})})
    other = CaptionGenerator(reseeded, early_ending.model, early_ending.tokenizer)
    assert candidates_of("continuous", other, prefix, 8) != eight


def test_candidates_share_their_rows_prefill(early_ending):
    # At a temperature near 0 a sampled candidate is the greedy caption, which needs the prompt's
    # KV copied correctly into each candidate's slot.
    spec = early_ending.spec.model_copy(update={"rerank": early_ending.spec.rerank.model_copy(
        update={"include_greedy": False, "temperature": 1e-4, "top_k": 0})})
    cold = CaptionGenerator(spec, early_ending.model, early_ending.tokenizer)
    prefix = random_prefix(cold, 3, seed=10)
    assert candidates_of("continuous", cold, prefix, 4) == [[text] * 4 for text in cold.generate(prefix)]


def test_candidates_count_against_the_slots(early_ending):
    engine = create_engine("continuous", early_ending, slots=2, candidates=4)
    try:
        assert engine.capacity == 2 and engine.batch.capacity == 8
        with pytest.raises(ValueError, match="3 rows exceed the engine's 2 rows"):
            generate_blocking(engine, random_prefix(early_ending, 3), timeout_s=5)
        assert len(generate_blocking(engine, random_prefix(early_ending, 2), timeout_s=60)) == 8
    finally:
        engine.close()


def test_a_request_past_its_deadline_frees_all_its_candidate_rows(tiny_checkpoint):
    from embcap.engines.continuous.engine import ContinuousEngine

    slow = load(tiny_checkpoint, max_new_tokens=4000, min_new_tokens=4000)
    engine = ContinuousEngine(slow, slots=2, timeout_s=0.5, candidates=4)
    try:
        with pytest.raises(Cancelled, match="deadline"):
            generate_blocking(engine, random_prefix(slow, 2), timeout_s=30)
        assert engine.stats.cancelled_rows == 8
        assert engine.batch.active == 0 and engine.batch.free_slots == 8
    finally:
        engine.close()
