"""Best-of-N reranked by an imported ImageBind text tower, behind a real tritonserver and gateway."""

from __future__ import annotations

import httpx
import pytest
import torch

import meta_imagebind as meta
from conftest import in_process_choice, start_gateway, start_triton, stop_process
from embcap.checkpoint import ImageBindTowerEncoder, RerankSettings
from embcap.inputs import realistic_embeddings
from export.options import ExportOptions
from export.repository import export_repository
from tooling.builders import make_tiny_checkpoint
from training.import_text_tower import import_text_tower


@pytest.fixture(scope="module")
def tower_stack(tmp_path_factory, smollm2_dir):
    work = tmp_path_factory.mktemp("tower-live")
    torch.save(meta.tiny_imagebind(text_width=64, text_heads=2, seed=4), work / "videobind.pth")
    import_text_tower(work / "videobind.pth", work / "ck-tower", log=lambda *_: None)
    rerank = RerankSettings(candidates=4, encoder=ImageBindTowerEncoder(path=str(work / "ck-tower")))
    checkpoint = make_tiny_checkpoint(work / "ck", smollm2_dir, seed=3, max_new_tokens=12, min_new_tokens=1,
                                      rerank=rerank)
    repository = export_repository(checkpoint, work / "repo", ExportOptions(max_batch_size=8, decoder_threads=1),
                                   log=lambda _: None)
    triton = start_triton(repository, work / "triton.log")
    gateway, base = start_gateway(triton.url, work / "gateway.log")
    yield checkpoint, base
    stop_process(gateway)
    triton.stop()


def test_the_stack_reranks_with_the_imported_tower(tower_stack):
    checkpoint, base = tower_stack
    embeddings = realistic_embeddings(5, seed=8)
    expected = in_process_choice(checkpoint, embeddings)
    response = httpx.post(base + "/api/v1/inference", json={"embedding": embeddings.reshape(-1).tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["texts"] == expected.texts
    assert any(index != 0 for index in expected.indices), "the tower should prefer a sampled candidate somewhere"
