"""Best-of-N behind a real tritonserver and gateway: decoder candidates -> the reranker stage -> one caption."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import in_process_choice, send_staggered, start_gateway, start_triton, stop_process
from embcap.contract import RERANKER
from embcap.inputs import realistic_embeddings
from export.options import ExportOptions
from export.repository import export_repository
from tooling.builders import make_tiny_checkpoint, minilm_rerank

ROW_COUNTS = (1, 3, 4, 9)


def caption(base: str, rows: np.ndarray) -> list[str]:
    response = httpx.post(base + "/api/v1/inference", json={"embedding": rows.reshape(-1).tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["texts"]


@pytest.fixture(scope="module")
def reranked(tmp_path_factory, smollm2_dir):
    """(checkpoint, triton, gateway url): 4 candidates per row whose captions end at their own lengths."""
    work = tmp_path_factory.mktemp("rerank-live")
    checkpoint = make_tiny_checkpoint(work / "ck", smollm2_dir, seed=3, max_new_tokens=12, min_new_tokens=1,
                                      rerank=minilm_rerank(4))
    repository = export_repository(checkpoint, work / "repo", ExportOptions(max_batch_size=8, decoder_threads=1,
                                                                            reranker_threads=1),
                                   log=lambda _: None)
    triton = start_triton(repository, work / "triton.log")
    gateway, base = start_gateway(triton.url, work / "gateway.log")
    yield checkpoint, triton, base
    stop_process(gateway)
    triton.stop()


def test_staggered_requests_with_candidates_get_exactly_their_own_captions(reranked):
    _, _, base = reranked
    inputs = {rows: realistic_embeddings(rows, seed=rows) for rows in ROW_COUNTS}
    alone = {rows: caption(base, embeddings) for rows, embeddings in inputs.items()}
    together = send_staggered(lambda embeddings: caption(base, embeddings), inputs, gap_s=0.03)
    for rows in ROW_COUNTS:
        assert len(together[rows]) == rows
        assert together[rows] == alone[rows], "rows sent together differ from rows sent alone"
        assert all(text.strip() for text in together[rows])


def test_the_stack_answers_what_the_in_process_pipeline_chooses(reranked):
    checkpoint, triton, base = reranked
    embeddings = realistic_embeddings(6, seed=21)
    expected = in_process_choice(checkpoint, embeddings)
    assert caption(base, embeddings) == expected.texts
    assert any(index != 0 for index in expected.indices), "some row should prefer a sampled candidate"
    client = grpcclient.InferenceServerClient(triton.url)
    try:  # the reranker is a Triton model of its own, with its own statistics
        stats = client.get_inference_statistics(RERANKER).model_stats[0]
        assert stats.inference_stats.success.count >= 1
    finally:
        client.close()
