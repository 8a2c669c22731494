"""The local evaluator: health rules, loss accounting against deliberately broken peers, datasets (its score of
the default model end to end: tests/test_e2e.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import ROOT, free_port
from embcap.inputs import realistic_embeddings
from tooling.evaluator import NotReady, run_requests, wait_ready
from evaluate.datasets import DEFAULT_HELDOUT, from_parquet, load_dataset
from evaluate.judges import minilm_judge
from evaluate.report import retrieval_baseline

DIM = 1024
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "42%|####"

class BrokenPeer(BaseHTTPRequestHandler):
    """A deliberately wrong server: one caption too few on /api/v1/inference, 500 on /api/v1/v2t,
    a slow answer on /slow; health reports `self.server.health_status`."""

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/api/v1/health":
            self._json(200, {"status": self.server.health_status})
        else:
            self._json(404, {"detail": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rows = len(body["embedding"]) // DIM
        if self.path == "/api/v1/inference":
            self._json(200, {"texts": ["a man is walking in a park"] * (rows - 1)})
        elif self.path == "/slow":
            time.sleep(1.5)
            self._json(200, {"texts": ["late"] * rows})
        else:
            self._json(500, {"detail": "boom"})


@pytest.fixture
def broken_peer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenPeer)
    server.health_status = "healthy"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_wrong_count_loses_every_batch(broken_peer):
    _, url = broken_peer
    run = run_requests(url, realistic_embeddings(10), batch_size=4, progress=False)
    assert [len(b.rows) for b in run.batches] == [4, 4, 2]
    assert [b.loss_reason for b in run.batches] == ["count_mismatch"] * 3
    assert run.captions(10) == [None] * 10


def test_http_error_and_timeout_are_lost(broken_peer):
    _, url = broken_peer
    run = run_requests(url, realistic_embeddings(4), endpoint="v2t", progress=False)
    assert run.batches[0].loss_reason == "http_error"
    run = run_requests(url, realistic_embeddings(4), endpoint="/slow", timeout_s=0.3, progress=False)
    assert run.batches[0].loss_reason == "timeout"


def test_health_rules(broken_peer):
    server, url = broken_peer
    server.health_status = "loading"
    with pytest.raises(NotReady):
        wait_ready(url, "o1", overall_s=0.5)  # o1 needs status == "healthy"
    assert wait_ready(url, "v2", overall_s=5) < 5  # later versions accept any 200
    server.health_status = "healthy"
    assert wait_ready(url, "o1", overall_s=5) < 5


def test_cli_reports_lost_batches(broken_peer, tmp_path):
    _, url = broken_peer
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog runs on a beach\na woman cooks rice in a kitchen\na boy rides a bike\n"
                        "two cats sleep on a sofa\na man plays a guitar\nan old car drives through snow\n")
    run = subprocess.run([sys.executable, "-m", "evaluate", "--url", url, "--dataset", str(captions), "--out",
                          str(tmp_path / "reports"), "--name", "broken", "--quiet"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert not PROGRESS_BAR.search(run.stdout + run.stderr), f"--quiet showed a progress bar:\n{run.stderr}"
    report = json.loads((tmp_path / "reports" / "broken.json").read_text())
    assert report["batches"] == 2 and report["batches_lost"] == 2
    assert report["lost_by_reason"]["count_mismatch"] == 2
    assert report["mean_similarity"] == 0.0 and report["rows_lost"] == 6
    assert "batches lost / sent | 2 / 2" in (tmp_path / "reports" / "broken.md").read_text()


def test_no_server_is_said_at_once_and_ends_without_a_traceback(tmp_path):
    port = free_port()  # nothing listens there
    command = [sys.executable, "-m", "evaluate", "--url", f"http://127.0.0.1:{port}", "--limit", "4", "--quiet",
               "--out", str(tmp_path)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()  # said before the dataset is built or the 180 s deadline runs out
    said_after = time.monotonic() - started
    stdout, stderr = process.communicate(timeout=60)
    assert "nothing answers at" in first and said_after < 8, (first, said_after)
    assert process.returncode == 2 and "Traceback" not in stderr, stderr
    assert f"no server at http://127.0.0.1:{port}" in stderr and "make serve" in stderr
    assert time.monotonic() - started < 30


def test_parquet_layout(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pyarrow >= 22 refuses numpy < 2, which Triton's stub needs
        pytest.skip(f"pyarrow unusable here: {exc}")

    rng = np.random.default_rng(0)
    table = pa.table({"video_embed": [rng.standard_normal(DIM).astype(np.float32).tolist() for _ in range(3)],
                      "description": ["one", "two", "three"]})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "part-0.parquet")
    dataset = load_dataset(str(tmp_path / "data"))
    assert dataset.embeddings.shape == (3, DIM) and dataset.references == ["one", "two", "three"]
    assert from_parquet(tmp_path / "data" / "part-0.parquet").sample(2).embeddings.shape == (2, DIM)
    realistic = dataset.with_norms("realistic", seed=1)  # what the evaluator sends: means of 15 unit vectors
    norms = np.linalg.norm(realistic.embeddings, axis=1)
    assert realistic.references == dataset.references and np.all((norms > 0.3) & (norms < 1.0))
    unit = dataset.embeddings / np.linalg.norm(dataset.embeddings, axis=1, keepdims=True)
    assert np.all(np.sum(realistic.embeddings * unit, axis=1) / norms > 0.7)  # still about the same direction


def test_retrieval_baseline_finds_the_nearest_caption():
    from embcap.text_encoder import encode_captions

    train = ["a dog runs on a beach", "a chef slices bread in a kitchen", "a plane lands at an airport"]
    refs = ["a puppy running along the beach", "a cook cutting a loaf of bread"]
    scores, picked = retrieval_baseline(minilm_judge(), encode_captions(refs), refs, train, encode_captions(train))
    assert picked == train[:2]
    assert np.all(scores > 0.5)


def test_builtin_heldout_split_ships():
    if not DEFAULT_HELDOUT.is_file():
        pytest.skip("models/default/heldout.txt not written yet")
    lines = DEFAULT_HELDOUT.read_text().splitlines()
    assert 200 <= len(lines) <= 2000
    assert {line.split("\t")[0] for line in lines} == {"scene", "sentence"}
