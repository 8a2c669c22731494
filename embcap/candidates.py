"""What each of a row's N candidate captions does: greedy, or sampled from its own stream.

With one candidate a row decodes as `generation` says (greedy, or sampled as the reference
model does). With N > 1 (best-of-N, `rerank` in caption_model.json) candidate 0 is greedy
when `include_greedy` is set and the others sample with the rerank settings; the reranker
then answers the candidate closest to the input embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from embcap.checkpoint import CaptionModelSpec, CheckpointError
from embcap.sampling import Sampling, stream_seed


@dataclass(frozen=True)
class CandidatePlan:
    """Per candidate index: greedy or not, and its sampling stream; `sampling` for the sampled ones."""

    greedy: tuple[bool, ...]
    streams: tuple[int, ...]
    sampling: Sampling | None  # None: every candidate is greedy

    @property
    def count(self) -> int:
        return len(self.greedy)


def candidate_plan(spec: CaptionModelSpec, count: int | None = None) -> CandidatePlan:
    """The plan for `count` candidates per row (default: the checkpoint's `rerank.candidates`)."""
    count = spec.rerank.candidates if count is None else count
    if count < 1:
        raise CheckpointError(f"candidates per row must be >= 1, not {count}")
    generation, rerank = spec.generation, spec.rerank
    if count == 1:
        sampling = Sampling(generation.temperature, generation.top_k, 1.0, generation.seed) \
            if generation.do_sample else None
        greedy = (sampling is None,)
    else:
        sampling = Sampling(rerank.temperature, rerank.top_k, rerank.top_p, generation.seed)
        greedy = tuple(index == 0 and rerank.include_greedy for index in range(count))
    return CandidatePlan(greedy, tuple(stream_seed(generation.seed, index) for index in range(count)), sampling)
