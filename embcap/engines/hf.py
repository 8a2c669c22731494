"""The reference engine: each submitted group of jobs is one Hugging Face `generate()` call."""

from __future__ import annotations

import logging
import time
from itertools import islice

import numpy as np

from embcap.candidates import candidate_plan
from embcap.engines.base import EngineStats, Job, answer
from embcap.generation import BLANK_FALLBACK, CaptionGenerator

log = logging.getLogger(__name__)


class HFEngine:
    """Request-level batching: the rows of all submitted jobs decode together until the longest ends
    (each row's `candidates` captions too)."""

    name = "hf"

    failure = None  # a failed generate() fails its batch only: nothing outlives a call
    active_rows = 0  # rows decode only inside submit()
    queued_rows = 0

    def __init__(self, generator: CaptionGenerator, candidates: int = 1) -> None:
        self.generator = generator
        self.plan = candidate_plan(generator.spec, candidates)
        self.candidates = self.plan.count
        self.stats = EngineStats()

    def submit(self, jobs: list[Job]) -> None:
        """Decode every job's rows in one batch and answer each job before returning."""
        started = time.perf_counter()
        try:
            captions, fallbacks = self.generator.generate_counting_fallbacks(
                np.concatenate([job.prefix for job in jobs]), self.plan)
        except Exception as exc:  # every job of the batch fails with the same error
            self.stats.failed_steps += 1
            for job in jobs:
                answer(job, None, exc)
            return
        self.stats.record_step(sum(job.rows for job in jobs), time.perf_counter() - started)
        if fallbacks:
            self.stats.blank_fallbacks += fallbacks
            log.warning("%d row(s) stayed blank up to max_new_tokens: answered %r", fallbacks, BLANK_FALLBACK)
        rows = iter(captions)
        for job in jobs:
            answer(job, list(islice(rows, job.rows * self.candidates)), None)

    def close(self) -> None:
        """Nothing runs in the background."""
