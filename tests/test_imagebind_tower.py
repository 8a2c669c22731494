"""The imported ImageBind text tower against Meta's own code and the evaluator's scoring rule.

Tiny towers are built by Meta's `ImageBindModel` (tests/meta_imagebind.py), their weights moved off
their initialisation, and saved both ways the scorers load them (a state dict, a whole pickled model).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import meta_imagebind as meta
from conftest import ROOT
from embcap.checkpoint import CheckpointError, ImageBindTowerEncoder, RerankSettings, load_checkpoint
from embcap.clip_bpe import ClipBpe
from embcap.imagebind_encoder import ImageBindTextEncoder
from embcap.tower_folder import TowerError, read_config
from evaluate.judges import load_judge
from tooling.tower_check import agreement
from training.import_text_tower import import_text_tower
from training.restricted_pickle import UnsafePickleError

QUIET = dict(log=lambda *_: None)


def unit(vector: torch.Tensor) -> np.ndarray:
    return (vector / vector.norm()).numpy()


@pytest.fixture(scope="module")
def bpe() -> ClipBpe:
    return ClipBpe(meta.bpe_path())


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """{form: (Meta's model, our imported folder)} for a state dict and a whole pickled model."""
    work = tmp_path_factory.mktemp("towers")
    state_model = meta.tiny_imagebind(text_width=128, text_heads=2, seed=1)  # 2 heads: width / 64, the default
    pickled_model = meta.tiny_imagebind(text_width=64, text_heads=4, seed=2)  # heads read from the pickle
    torch.save(state_model.state_dict(), work / "imagebind_huge.pth")
    torch.save(pickled_model, work / "videobind.pth")
    import_text_tower(work / "imagebind_huge.pth", work / "v1", **QUIET)
    import_text_tower(work / "videobind.pth", work / "v2", **QUIET)
    return {"state-dict": (state_model, work / "v1"), "pickled-model": (pickled_model, work / "v2")}


def long_word(bpe: ClipBpe) -> str:
    """A word of 120 to 147 tokens with no delimiter: one piece by the evaluator's cut, longer than 77."""
    rng = random.Random(7)
    letters = "".join(rng.choice("bcdfghjklmnpqrstvwxzaeiou") for _ in range(400))
    word = next(letters[:n] for n in range(200, 400, 5) if len(bpe.length_ids(letters[:n])) >= 120)
    assert len(bpe.length_ids(word)) < 148
    return word


def scoring_texts(bpe: ClipBpe) -> list[str]:
    description = " ".join(f"Clip {i}: a woman in a red coat walks her dog along the river, waving at the camera."
                           for i in range(7))  # ~150 tokens: several pieces
    return ["a dog runs 🐕 on the beach 🌊", "Tom &amp; Jerry &lt;3 &quot;cartoon&quot; &#39;classic&#39;",
            "visit https://example.com/path?q=1&x=y#frag for more", "café naïve Ünïcödé 日本語 العربية",
            "tabs\tand\nnewlines   and\u00a0spaces", description, long_word(bpe), "wow!!! really?! !?",
            "A MAN IS PLAYING A GUITAR"]


def varied_strings(count: int) -> list[str]:
    """Seeded strings mixing words, punctuation, emoji, entities, URLs, scripts, digits and whitespace."""
    rng = random.Random(0)
    words = ["the", "a", "dog", "Running", "café", "naïve", "日本", "über", "don't", "it's", "we'll", "NASA",
             "x86_64", "3.14", "1,000", "C++", "e-mail", "São", "Paulo", "straße", "ﬁne", "cafÃ©", "â€œquoteâ€\x9d"]
    extras = ["😀", "🐕‍🦺", "👍🏽", "&amp;", "&lt;b&gt;", "&#x27;", "&nbsp;", "https://example.com/a?b=c",
              "www.test.org", "!", "?", "...", "—", "–", "\t", "\n", "  ", "\u00a0", "\u200b", "#tag", "@user",
              "<|endoftext|>", "(", ")", "[x]", "$5", "100%", "½", "Ω", "ß", "İ", "ǅ", "ÅÄÖ", "עברית", "हिन्दी"]
    texts = []
    for _ in range(count):
        parts = [rng.choice(words if rng.random() < 0.6 else extras) for _ in range(rng.randint(1, 14))]
        joiners = [rng.choice([" ", "", ", ", ". ", "\n", "!"]) for _ in parts]
        texts.append("".join(part + joiner for part, joiner in zip(parts, joiners)))
    return texts


def test_token_ids_are_simple_tokenizers_on_thousands_of_strings(bpe):
    _, preprocessors, _ = meta.load_meta()
    packaged = preprocessors.SimpleTokenizer(str(meta.bpe_path()))
    upstream, length = meta.upstream_tokenizer(77), meta.upstream_tokenizer(1024)
    texts = varied_strings(3000) + [" ".join(["word"] * 90)]  # the last one longer than 77 positions
    for text in texts:
        assert bpe.encode(text) == packaged.encode(text), text
        assert bpe.batch([text])[0].tolist() == upstream(text).tolist(), text
        ids = length(text)
        assert bpe.length_ids(text) == ids[ids != 0][1:-1].tolist(), text
    assert bpe.decode(bpe.encode("Hello, World!")) == packaged.decode(packaged.encode("Hello, World!"))


def test_the_pieces_are_the_evaluators(bpe):
    length = meta.upstream_tokenizer(1024)
    texts = scoring_texts(bpe) + varied_strings(200)
    for text in texts:
        assert bpe.evaluator_pieces(text) == meta.evaluator_pieces(text, length), text
    assert len(bpe.evaluator_pieces(texts[5])) > 1, "the 150-token description is embedded in several pieces"
    assert len(bpe.evaluator_pieces(texts[6])) == 1 and len(bpe.context_ids(texts[6])) == 77  # cut, no end token


@pytest.mark.parametrize("form", ["state-dict", "pickled-model"])
def test_embeddings_are_the_evaluators_within_1e5(towers, bpe, form):
    model, folder = towers[form]
    encoder = ImageBindTextEncoder(folder)
    texts = scoring_texts(bpe)
    ours = encoder.encode(texts)
    upstream, length = meta.upstream_tokenizer(77), meta.upstream_tokenizer(1024)
    for text, vector in zip(texts, ours):
        expected = unit(meta.evaluator_embedding(text, model, upstream, length))
        assert np.abs(vector - expected).max() < 1e-5, text
    config = read_config(folder)
    assert (config.width, config.layers, config.heads) == ((128, 2, 2) if form == "state-dict" else (64, 2, 4))
    assert config.source.form == form and len(config.source.sha256) == 64


def test_the_judge_scores_as_the_evaluator(towers, bpe):
    model, folder = towers["pickled-model"]
    name, judge = load_judge(str(folder))
    assert name.startswith("imagebind:")
    captions, references = ["a dog on a beach", "a man plays guitar"], scoring_texts(bpe)[5:7]
    upstream, length = meta.upstream_tokenizer(77), meta.upstream_tokenizer(1024)
    for caption, reference in zip(captions, references):
        expected = torch.nn.functional.cosine_similarity(
            meta.evaluator_embedding(caption, model, upstream, length),
            meta.evaluator_embedding(reference, model, upstream, length), dim=0)
        assert float(np.dot(*judge([caption, reference]))) == pytest.approx(float(expected), abs=1e-5)


def write_rows(path, texts: list[str], model) -> None:
    """A parquet in the evaluator's layout whose description_embed is made by `model` the evaluator's way."""
    upstream, length = meta.upstream_tokenizer(77), meta.upstream_tokenizer(1024)
    embeds = [meta.evaluator_embedding(text, model, upstream, length).tolist() for text in texts]
    pq.write_table(pa.table({"description": texts, "description_embed": embeds}), path)


def test_check_passes_on_its_own_data_and_fails_on_another_towers(towers, bpe, tmp_path):
    model, folder = towers["pickled-model"]
    texts = scoring_texts(bpe)[:6]
    write_rows(tmp_path / "own.parquet", texts, model)
    write_rows(tmp_path / "other.parquet", texts, meta.tiny_imagebind(text_width=64, text_heads=4, seed=9))
    own = agreement(folder, tmp_path / "own.parquet", **QUIET)
    assert own.exit_code == 0 and own.minimum > 0.99999 and own.rows == 6
    other = agreement(folder, tmp_path / "other.parquet", **QUIET)
    assert other.exit_code == 1 and other.below == 6
    assert "not the one that made the data" in other.summary(folder, tmp_path / "other.parquet")
    run = subprocess.run([sys.executable, "-m", "training.import_text_tower", str(folder.parent / "videobind.pth"),
                          str(tmp_path / "tower"), "--check", str(tmp_path / "other.parquet")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1, run.stderr
    assert "v1 imagebind_huge vs v2 videobind-v0.2" in run.stdout


class Payload:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


def test_a_pickle_naming_any_other_global_is_refused_naming_it(tmp_path):
    torch.save({"modality_preprocessors.text.token_embedding.weight": torch.zeros(2, 2), "x": Payload()},
               tmp_path / "evil.pth")
    with pytest.raises(UnsafePickleError, match=r"names the global (posix|os)\.system"):
        import_text_tower(tmp_path / "evil.pth", tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pth")
    with pytest.raises(TowerError, match="not an ImageBind model"):
        import_text_tower(tmp_path / "plain.pth", tmp_path / "out", **QUIET)


def test_unknown_text_tensors_and_wrong_heads_are_refused(towers, tmp_path):
    model, _ = towers["state-dict"]
    state = dict(model.state_dict())
    state["modality_trunks.text.blocks.0.attn.bias_k"] = torch.zeros(1, 1, 128)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(TowerError, match="bias_k"):
        import_text_tower(tmp_path / "extra.pth", tmp_path / "out", **QUIET)
    with pytest.raises(TowerError, match="pickles its attention with 4 heads"):
        import_text_tower(towers["pickled-model"][1].parent / "videobind.pth", tmp_path / "out", heads=2, **QUIET)


def test_a_tower_of_another_width_fails_at_export(tmp_path, smollm2_dir):
    from export.options import ExportOptions
    from export.repository import export_repository
    from tooling.builders import make_tiny_checkpoint

    torch.save(meta.tiny_imagebind(text_width=64, text_heads=1, out_dim=512), tmp_path / "narrow.pth")
    import_text_tower(tmp_path / "narrow.pth", tmp_path / "narrow", **QUIET)
    rerank = RerankSettings(candidates=2, encoder=ImageBindTowerEncoder(path=str(tmp_path / "narrow")))
    checkpoint = make_tiny_checkpoint(tmp_path / "ck", smollm2_dir, rerank=rerank)
    with pytest.raises(CheckpointError, match=r"narrow gives 512-d vectors but the inputs are 1024-d"):
        export_repository(checkpoint, tmp_path / "repo", ExportOptions(), log=lambda _: None)
    assert not (tmp_path / "repo").exists()
    assert load_checkpoint(checkpoint).spec.rerank.encoder.kind == "imagebind"


def test_doctor_checks_the_data_against_the_checkpoints_tower(towers, bpe, tmp_path, smollm2_dir):
    from doctor.checks import FAIL, PASS, SKIP, Options
    from doctor.tower_data import check_tower_data
    from tooling.builders import make_tiny_checkpoint

    model, folder = towers["pickled-model"]
    rerank = RerankSettings(candidates=2, encoder=ImageBindTowerEncoder(path=str(folder)))
    make_tiny_checkpoint(tmp_path / "models" / "ck", smollm2_dir, rerank=rerank)
    make_tiny_checkpoint(tmp_path / "models" / "plain", smollm2_dir)
    texts = scoring_texts(bpe)[:3]
    write_rows(tmp_path / "own.parquet", texts, model)
    write_rows(tmp_path / "other.parquet", texts, towers["state-dict"][0])
    row = check_tower_data(Options(repo=tmp_path, checkpoint="models/ck", data=tmp_path / "own.parquet"))[0]
    assert (row.check, row.status) == ("tower-data", PASS) and "the tower made this data" in row.reason
    row = check_tower_data(Options(repo=tmp_path, checkpoint="models/ck", data=tmp_path / "other.parquet"))[0]
    assert row.status == FAIL and "not the one that made the data" in row.reason
    row = check_tower_data(Options(repo=tmp_path, checkpoint="models/plain", data=tmp_path / "own.parquet"))[0]
    assert row.status == SKIP and "not an imported ImageBind tower" in row.reason
    assert check_tower_data(Options(repo=tmp_path, checkpoint="models/ck")) == []


def test_the_trainer_and_the_cost_bench_take_a_tower(towers, tmp_path):
    from bench.rerank_cost import run
    from training.train import RERANK_ENCODER_DIR, copied_encoder_spec

    assert copied_encoder_spec(towers["state-dict"][1]) == ImageBindTowerEncoder(path=RERANK_ENCODER_DIR)
    results = run("tiny", [2], [1], 2, tmp_path / "out", cache=tmp_path)
    row = results["rows"][0]
    assert (row["candidates"], row["texts"]) == (2, 8) and row["tower"]["n"] == 2 and row["tokens"] > 8
    assert {path.name for path in (tmp_path / "out").iterdir()} >= {"results.json", "results.md", "plot.png"}


@pytest.mark.gpu
def test_the_tower_on_cuda_agrees_with_the_cpu(towers, bpe):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, folder = towers["state-dict"]
    texts = scoring_texts(bpe)
    on_cpu = ImageBindTextEncoder(folder).encode(texts)
    on_gpu = ImageBindTextEncoder(folder, device="cuda").encode(texts)
    assert np.abs(on_cpu - on_gpu).max() < 1e-4  # fp32 on both; TF32 is off by default for matmuls
