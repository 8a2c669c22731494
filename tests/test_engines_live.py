"""Both engines behind a real tritonserver: staggered mixed requests, parity, cancellation, deadlines."""

from __future__ import annotations

import re
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import free_port, send_staggered, start_gateway, stop_process, wait_http
from tooling.builders import make_tiny_checkpoint
from embcap.checkpoint import load_checkpoint, save_spec
from embcap.deadlines import REQUEST_TIMEOUT_ENV
from embcap.inputs import realistic_embeddings
from runtime.triton import TritonOptions, TritonProcess
from export.options import ExportOptions
from export.repository import export_repository

ROW_COUNTS = (1, 3, 4, 33)


def start(repository, log_path, metrics: bool = False) -> TritonProcess:
    """A ready tritonserver on free ports."""
    options = TritonOptions(repository, grpc_port=free_port(), metrics_port=free_port() if metrics else None)
    triton = TritonProcess(options, log_file=open(log_path, "ab"))
    triton.start()
    triton.wait_ready(timeout_s=120)
    return triton


def caption(base: str, rows: np.ndarray) -> list[str]:
    response = httpx.post(base + "/api/v1/inference", json={"embedding": rows.reshape(-1).tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["texts"]


@pytest.fixture(scope="module", params=["continuous", "hf"])
def engine_gateway(request, tiny_checkpoint, tmp_path_factory):
    """(engine name, gateway url) for a Triton serving the tiny checkpoint through that engine."""
    work = tmp_path_factory.mktemp(f"live-{request.param}")
    options = ExportOptions(max_batch_size=16, engine=request.param, decoder_threads=1)
    repository = export_repository(tiny_checkpoint, work / "repo", options, log=lambda _: None)
    triton = start(repository, work / "triton.log")
    gateway, base = start_gateway(triton.url, work / "gateway.log")
    yield request.param, base
    stop_process(gateway)
    triton.stop()


def test_staggered_mixed_requests_get_exactly_their_own_captions(engine_gateway):
    engine, base = engine_gateway
    inputs = {rows: realistic_embeddings(rows, seed=rows) for rows in ROW_COUNTS}
    alone = {rows: caption(base, embeddings) for rows, embeddings in inputs.items()}
    together = send_staggered(lambda embeddings: caption(base, embeddings), inputs)
    for rows in ROW_COUNTS:
        assert len(together[rows]) == rows, f"{engine}: {rows} rows sent, {len(together[rows])} captions"
        assert together[rows] == alone[rows], f"{engine}: rows sent together differ from rows sent alone"
        assert all(text.strip() for text in together[rows])


def test_both_engines_write_the_same_captions(engine_gateway, tiny_checkpoint):
    from embcap.generation import CaptionGenerator

    _, base = engine_gateway
    checkpoint = load_checkpoint(tiny_checkpoint)
    generator = CaptionGenerator.load(checkpoint.spec, checkpoint.root / "decoder")
    embeddings = realistic_embeddings(5, seed=9)
    from embcap.projector import load_projector

    projector = load_projector(checkpoint.projector_path, 1024, generator.hidden_size, checkpoint.spec.prefix_length)
    import torch

    with torch.inference_mode():
        expected = generator.generate(projector(torch.from_numpy(embeddings)))
    assert caption(base, embeddings) == expected


@pytest.fixture(scope="module")
def slow_triton(tiny_checkpoint, tmp_path_factory, smollm2_dir):
    """A continuous-engine Triton whose captions take seconds (3000 tokens each), with metrics on."""
    work = tmp_path_factory.mktemp("slow")
    checkpoint = make_tiny_checkpoint(work / "checkpoint", smollm2_dir)
    spec = load_checkpoint(checkpoint).spec
    save_spec(checkpoint, spec.model_copy(update={"generation": spec.generation.model_copy(
        update={"max_new_tokens": 3000, "min_new_tokens": 3000})}))
    options = ExportOptions(max_batch_size=4, decoder_threads=1, request_timeout_s=1)
    repository = export_repository(checkpoint, work / "repo", options, log=lambda _: None)
    triton = start(repository, work / "triton.log", metrics=True)
    yield triton
    triton.stop()


def cancelled_rows(triton: TritonProcess) -> float:
    text = httpx.get(f"http://127.0.0.1:{triton.options.metrics_port}/metrics", timeout=5).text
    found = re.findall(r'^embcap_cancelled_rows_total\{[^}]*\} ([0-9.e+]+)$', text, re.MULTILINE)
    return sum(float(value) for value in found)


def test_an_abandoned_request_frees_its_rows(slow_triton):
    """Past EMBCAP_REQUEST_TIMEOUT_S (the gateway has given up by then) the decoder drops the request's rows."""
    client = grpcclient.InferenceServerClient(slow_triton.url)
    try:
        tensor = grpcclient.InferInput("EMBEDDING", [4, 1024], "FP32")
        tensor.set_data_from_numpy(realistic_embeddings(4))
        before = cancelled_rows(slow_triton)
        with pytest.raises(InferenceServerException, match="(?i)deadline"):
            client.infer("captioner", [tensor], client_timeout=0.5)
        deadline = time.monotonic() + 10
        while cancelled_rows(slow_triton) < before + 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cancelled_rows(slow_triton) >= before + 4, "the abandoned rows kept decoding"
        assert time.monotonic() < deadline - 7, "rows should be dropped about 1 s after the request arrived"
    finally:
        client.close()


def test_a_request_past_the_deadline_is_an_error_never_a_partial_answer(slow_triton, tmp_path):
    gateway, base = start_gateway(slow_triton.url, tmp_path / "gateway.log", env={REQUEST_TIMEOUT_ENV: "1"})
    try:
        body = {"embedding": realistic_embeddings(4).reshape(-1).tolist()}
        response = httpx.post(base + "/api/v1/inference", json=body,
                              timeout=30)
        assert response.status_code == 504 and response.json()["error"] == "triton_timeout"
        assert "texts" not in response.json()
        assert wait_http(base + "/api/v1/health", 10).json()["status"] == "healthy"
    finally:
        stop_process(gateway)
