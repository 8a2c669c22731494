"""End to end: server.py serving the embedded default model (models/default), as the container runs it.

Both tests share one server (module scope): starting the default model is the suite's costliest set-up.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from conftest import ROOT, start_server, stop_process
from evaluate.cli import main as evaluate_main

pytestmark = pytest.mark.e2e

# The shipped model (best of 16) scores 0.86 on 200 held-out rows with MiniLM (models/default/MODEL_CARD.md);
# per-row similarities spread with a standard deviation near 0.2, so a 16-row sample's mean has a standard
# error near 0.05 and the bar of 0.55 sits more than 5 errors below the full score. The sample is
# fixed (seed 0) and the candidates' random streams are counter-based, so the test is deterministic up to
# float noise.
E2E_ROWS = 16
E2E_MIN_SCORE = 0.55


@pytest.fixture(scope="module")
def default_stack_url(tmp_path_factory):
    """server.py serving models/default (the embedded default model)."""
    process, base = start_server(ROOT / "models" / "default", tmp_path_factory.mktemp("default_stack"))
    yield base
    assert stop_process(process) == 0


def rows(count: int, seed: int = 0) -> list[float]:
    return np.random.default_rng(seed).standard_normal(count * 1024).astype(np.float32).tolist()


def test_default_model_end_to_end(default_stack_url):
    health = httpx.get(default_stack_url + "/api/v1/health", timeout=5).json()
    assert health["status"] == "healthy"
    response = httpx.post(default_stack_url + "/api/v1/inference", json={"embedding": rows(4, seed=1)}, timeout=60)
    assert response.status_code == 200
    texts = response.json()["texts"]
    assert len(texts) == 4 and all(t.strip() for t in texts)


def test_default_stack_reaches_the_quality_bar(default_stack_url, tmp_path):
    report = evaluate_main(["--url", default_stack_url, "--limit", str(E2E_ROWS), "--out", str(tmp_path),
                            "--name", "e2e", "--quiet"])
    assert report["batches_lost"] == 0, report["loss_details"]
    assert report["mean_similarity"] >= E2E_MIN_SCORE, report["examples"]
