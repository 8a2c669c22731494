"""Token choice: greedy rows take the argmax; sampled rows draw from their own counter-based stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embcap.sampling import Sampling, choose_tokens, stream_seed, uniform_noise


def test_noise_is_uniform_deterministic_and_per_row():
    streams = torch.tensor([stream_seed(0, c) for c in range(4)])
    positions = torch.tensor([5, 5, 9, 9])
    noise = uniform_noise(streams, positions, 50_000)
    assert noise.shape == (4, 50_000) and noise.dtype == torch.float32
    assert 0.0 < float(noise.min()) and float(noise.max()) < 1.0
    assert abs(float(noise.mean()) - 0.5) < 0.01 and abs(float(noise.var()) - 1 / 12) < 0.005
    np.testing.assert_array_equal(noise, uniform_noise(streams, positions, 50_000))
    # A row's noise depends on its own stream and position only, not on the rows beside it.
    np.testing.assert_array_equal(noise[2], uniform_noise(streams[2:3], positions[2:3], 50_000)[0])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[2], uniform_noise(
        streams[2:3], positions[2:3] + 1, 50_000)[0])
    assert abs(float(torch.corrcoef(noise[:2])[0, 1])) < 0.02


def test_streams_differ_by_candidate_and_seed():
    seeds = {stream_seed(seed, candidate) for seed in range(3) for candidate in range(16)}
    assert len(seeds) == 48 and all(0 <= s < 2**32 for s in seeds)
    assert stream_seed(7, 3) == stream_seed(7, 3)


def test_greedy_rows_take_the_argmax_and_none_sampling_is_all_greedy():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    streams, positions = torch.arange(3), torch.zeros(3, dtype=torch.long)
    greedy = torch.tensor([True, True, True])
    expected = logits.argmax(-1)
    assert torch.equal(choose_tokens(logits, greedy, streams, positions, Sampling(1.0, 0, 1.0)), expected)
    assert torch.equal(choose_tokens(logits, ~greedy, streams, positions, None), expected)


def draws(logits: torch.Tensor, sampling: Sampling, count: int = 20_000) -> np.ndarray:
    """Token counts over `count` independent streams sampling from the same logits row."""
    rows = logits.expand(count, -1)
    streams = torch.tensor([stream_seed(1, c) for c in range(count)])
    tokens = choose_tokens(rows, torch.zeros(count, dtype=torch.bool), streams, torch.zeros(count, dtype=torch.long),
                           sampling)
    return np.bincount(tokens.numpy(), minlength=logits.shape[-1])


def test_sampling_follows_the_softmax_at_its_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -20.0]])
    for temperature in (0.5, 1.0):
        counts = draws(logits, Sampling(temperature=temperature))
        expected = torch.softmax(logits[0] / temperature, -1).numpy()
        np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.015)


@pytest.mark.parametrize("sampling, allowed", [(Sampling(top_k=2), {0, 1}), (Sampling(top_p=0.7), {0, 1}),
                                               (Sampling(top_p=0.5), {0})])
def test_top_k_and_top_p_keep_only_the_likeliest_tokens(sampling, allowed):
    # softmax([2, 1.5, 0, -1]) = 0.53, 0.32, 0.07, 0.03: the top two hold 0.85 of the mass.
    counts = draws(torch.tensor([[2.0, 1.5, 0.0, -1.0]]), sampling, 4000)
    assert set(np.flatnonzero(counts)) == allowed


def test_banned_tokens_are_never_drawn():
    logits = torch.zeros(1, 6)
    logits[0, 2] = float("-inf")
    assert draws(logits, Sampling(), 3000)[2] == 0
