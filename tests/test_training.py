"""The trainer: parquet data in the evaluator's layout (and malformed variants), the input noise model, a tiny
Llama trained with and without LoRA, resume equivalence, the options and messages a new user sees, and the
written checkpoint served by the real stack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from tooling.builders import make_tiny_checkpoint  # noqa: E402
from embcap.inputs import realistic_embeddings  # noqa: E402
from evaluate.datasets import DEFAULT_HELDOUT  # noqa: E402
from tests.conftest import ROOT, start_server, stop_process  # noqa: E402
from training.augment import NoiseModel, resolve  # noqa: E402
from training.data import DataError, Examples, expand, read_parquet, split, write_parquet  # noqa: E402
from training.record import PLOT_FILE, read_log  # noqa: E402
from training.train import build_parser  # noqa: E402
from training.train import main as train_main  # noqa: E402

ROWS = 48


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    """Two files in the evaluator's layout: encoder embeddings (norm 0.8) of corpus captions, 2 rows per video."""
    from embcap.text_encoder import encode_captions

    captions = [line.split("\t")[1] for line in DEFAULT_HELDOUT.read_text().splitlines()[:ROWS]]
    examples = Examples(texts=captions, embeddings=(0.8 * encode_captions(captions)).astype(np.float32),
                        video_ids=[f"video-{i // 2}" for i in range(ROWS)])
    folder = tmp_path_factory.mktemp("parquet")
    write_parquet(folder / "part-0.parquet", examples.subset(list(range(ROWS // 2))))
    write_parquet(folder / "part-1.parquet", examples.subset(list(range(ROWS // 2, ROWS))))
    return folder


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", smollm2_dir) / "decoder"


def tiny_args(data: Path, decoder: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(data / "*.parquet"), "--heldout-size", "8", "--decoder", str(decoder),
            "--batch-size", "4", "--grad-accum", "2", "--steps", "8", "--warmup", "1", "--lr", "1e-2",
            "--lora-lr", "1e-2", "--prefix-length", "2", "--max-new-tokens", "6", "--max-caption-tokens", "12",
            "--eval-every", "0", "--final-eval-samples", "0", "--save-every", "100", "--threads", "1",
            "--run-dir", str(run_dir), *extra]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_parquet_fixture_has_the_evaluators_layout(parquet_dir):
    table = pq.read_table(parquet_dir / "part-0.parquet")
    assert set(table.column_names) == {"video_embed", "description", "video_id"}
    vectors = np.asarray(table.column("video_embed").to_pylist(), dtype=np.float32)
    assert vectors.shape == (ROWS // 2, 1024)
    assert np.all(np.linalg.norm(vectors, axis=1) <= 1.0 + 1e-4)
    examples = read_parquet(expand(str(parquet_dir)))
    assert len(examples) == ROWS and examples.video_ids[:3] == ["video-0", "video-0", "video-1"]


def test_heldout_split_keeps_each_video_on_one_side(parquet_dir):
    train, held, how = split(read_parquet(expand(str(parquet_dir))), heldout_size=9, seed=3)
    assert how == "by video_id" and len(held) >= 9 and len(train) + len(held) == ROWS
    assert not set(train.video_ids) & set(held.video_ids)


def _write_variant(folder: Path, source: Path, change) -> Path:
    table = change(pq.read_table(source))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "bad.parquet")
    return folder / "bad.parquet"


def _set_row(table, column: str, row: int, value):
    values = table.column(column).to_pylist()
    values[row] = value
    index = table.column_names.index(column)
    return table.set_column(index, column, pa.array(values, type=table.schema.field(column).type))


MALFORMED = {
    "missing column": (lambda t: t.drop_columns(["description"]), "column 'description' missing"),
    "wrong width": (lambda t: _set_row(t, "video_embed", 5, [0.01] * 512), "column 'video_embed' row 5: 512 values"),
    "NaN": (lambda t: _set_row(t, "video_embed", 3, [float("nan")] + [0.0] * 1023), "column 'video_embed' row 3: NaN"),
    "empty description": (lambda t: _set_row(t, "description", 2, "  "), "column 'description' row 2: empty"),
    "norm above 1": (lambda t: _set_row(t, "video_embed", 4, [1.0] * 1024), "column 'video_embed' row 4: norm"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_data_fails_before_training_naming_file_column_row(case, parquet_dir, tiny_decoder, tmp_path):
    change, message = MALFORMED[case]
    bad = _write_variant(tmp_path / "data", parquet_dir / "part-0.parquet", change)
    shutil.copy(parquet_dir / "part-1.parquet", tmp_path / "data" / "good.parquet")
    with pytest.raises(DataError) as error:
        train_main(tiny_args(tmp_path / "data", tiny_decoder, tmp_path / "run"))
    assert str(bad) in str(error.value) and message in str(error.value)
    assert not (tmp_path / "run" / "state.pt").exists() and not (tmp_path / "run" / "log.jsonl").exists()


def test_frozen_decoder_loss_falls(parquet_dir, tiny_decoder, tmp_path):
    report = train_main(tiny_args(parquet_dir, tiny_decoder, tmp_path / "run", "--steps", "12"))
    curve = losses(tmp_path / "run")
    assert len(curve) == 12 and np.mean(curve[-3:]) < np.mean(curve[:3])
    assert report["lora"] is None and report["examples_seen"] == 12 * 8


def _state(run_dir: Path) -> dict:
    state = torch.load(run_dir / "state.pt", weights_only=False)
    return {"step": state["step"], **{f"projector.{k}": v for k, v in state["projector"].items()},
            **{f"adapter.{k}": v for k, v in state["adapter"].items()}}


def test_lora_resume_reaches_the_uninterrupted_state(parquet_dir, tiny_decoder, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main(tiny_args(parquet_dir, tiny_decoder, straight, "--lora"))
    train_main(tiny_args(parquet_dir, tiny_decoder, resumed, "--lora", "--stop-at", "3"))
    assert _state(resumed)["step"] == 3
    train_main(tiny_args(parquet_dir, tiny_decoder, resumed, "--lora"))
    a, b = _state(straight), _state(resumed)
    assert a["step"] == b["step"] == 8 and a.keys() == b.keys()
    assert any(k.startswith("adapter.") and "lora_B" in k for k in a)
    for key in a:
        if key != "step":
            assert torch.equal(a[key], b[key]), key
    curve = losses(straight)
    assert np.mean(curve[-3:]) < np.mean(curve[:3])
    assert losses(resumed) == curve  # the resumed run's log continues where it stopped


def test_resume_refuses_other_settings(parquet_dir, tiny_decoder, tmp_path):
    train_main(tiny_args(parquet_dir, tiny_decoder, tmp_path / "run", "--stop-at", "1"))
    with pytest.raises(SystemExit, match="other settings"):
        train_main(tiny_args(parquet_dir, tiny_decoder, tmp_path / "run", "--lora"))


def test_merged_adapter_gives_the_adapted_outputs(tiny_decoder):
    from training.decoder import LoraSettings, load_decoder, merged_decoder

    model, _ = load_decoder(tiny_decoder, torch.device("cpu"), torch.float32, LoraSettings(rank=4), False, seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    ids = torch.tensor([[5, 17, 99, 4]])
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = merged_decoder(model)
        assert not any("lora" in name for name, _ in merged.named_parameters())
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)


# A second, real judge whose name differs from MiniLM's: the lifted 1024-d MiniLM space, so its cosines equal
# MiniLM's, which the record must show for the model and for retrieval alike.
SECOND_JUDGE = "embcap.text_encoder:encode_captions"


@pytest.fixture(scope="module")
def trained_checkpoint(parquet_dir, tiny_decoder, tmp_path_factory, smollm2_dir) -> tuple[Path, dict]:
    """A tiny LoRA run on evaluator-shaped inputs with periodic and final held-out scores by two judges, served
    best-of-2 with a (tiny) ONNX text tower as a miner's reranking encoder."""
    from tooling.builders import make_onnx_text_tower

    run = tmp_path_factory.mktemp("trained")
    make_onnx_text_tower(run / "tower", smollm2_dir)
    report = train_main(tiny_args(parquet_dir, tiny_decoder, run / "run", "--lora", "--steps", "4", "--eval-every",
                                  "2", "--eval-samples", "4", "--final-eval-samples", "6", "--augment", "realistic",
                                  "--eval-norms", "realistic", "--also-judge", SECOND_JUDGE, "--candidates", "2",
                                  "--rerank-encoder", str(run / "tower"), "--out", str(run / "checkpoint")))
    return run / "checkpoint", report


def test_checkpoint_records_how_it_was_trained(trained_checkpoint):
    checkpoint, report = trained_checkpoint
    record = json.loads((checkpoint / "training.json").read_text())
    assert record == json.loads(json.dumps(report))
    assert record["steps"] == 4 and record["lora"]["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert record["data"]["conditioning"] == "video_embed" and len(record["data"]["files"]) == 2
    assert record["data"]["split"] == "by video_id"
    assert record["command"].startswith("python -m training --data ") and record["stopped_by"] == "steps"
    assert record["input_norm"] == "unit"
    spec = json.loads((checkpoint / "caption_model.json").read_text())
    assert spec["rerank"]["candidates"] == 2 and spec["rerank"]["encoder"]["path"] == "text_encoder/model.onnx"
    assert (checkpoint / "text_encoder" / "tokenizer.json").is_file() and record["rerank"] == spec["rerank"]
    assert "best-of-2" in (checkpoint / "MODEL_CARD.md").read_text()
    noise = record["noise_model"]
    assert noise["augment"] == "realistic" and noise["fraction"] == 0.75 and noise["noise_std"] == 0.0
    assert noise["clips_per_embedding"] == 15 and noise["source"] == "embcap.inputs.realistic_around"
    assert record["judges"] == ["all-MiniLM-L6-v2", SECOND_JUDGE]
    history = record["scores"]["history"]
    assert [h["step"] for h in history] == [2, 4] and history[0]["engine"] == "hf"
    assert record["scores"]["eval_inputs"] == "realistic" and history[0]["inputs"] == "realistic"
    for entry in history:
        assert set(entry["judges"]) == set(entry["retrieval"]) == set(record["judges"])
    final = record["scores"]["final"]
    assert list(final) == ["realistic", "as-is"]
    for score in final.values():
        assert score["rows"] == 6 and score["engine"] == "continuous"
        judged, retrieved = score["judges"], score["retrieval"]
        assert all(-1.0 <= v <= 1.0 for v in [*judged.values(), *retrieved.values()])
        assert judged[SECOND_JUDGE] == pytest.approx(judged["all-MiniLM-L6-v2"], abs=2e-4)
        assert retrieved[SECOND_JUDGE] == pytest.approx(retrieved["all-MiniLM-L6-v2"], abs=2e-4)
    card = (checkpoint / "MODEL_CARD.md").read_text()
    assert "part-0.parquet" in card and "video_embed" in card and "nearest training caption" in card
    assert "input_norm: unit" in card and "mean of 15 unit 'clips'" in card and f"]({PLOT_FILE})" in card
    assert "| realistic: evaluator-shaped" in card and "| as-is: the held-out conditioning vectors" in card
    plot = (checkpoint / PLOT_FILE).read_bytes()
    assert plot.startswith(b"\x89PNG") and len(plot) > 10_000
    config = json.loads((checkpoint / "caption_model.json").read_text())
    assert config["decoder"] == {"path": "decoder"} and config["input_norm"] == "unit"
    assert not list((checkpoint / "decoder").glob("adapter*")), "serving must not need peft"


def test_doctor_accepts_the_checkpoint(trained_checkpoint, tmp_path):
    from doctor.checks import PASS, Options, check_export, check_models

    checkpoint, _ = trained_checkpoint
    repo = tmp_path / "repo"
    shutil.copytree(checkpoint, repo / "models" / "trained")
    shutil.copy2(ROOT / ".gitattributes", repo / ".gitattributes")  # weight files go to Git LFS, as on Hugging Face
    os.symlink(ROOT / "export", repo / "export")
    options = Options(repo=repo, checkpoint="models/trained")
    results = {r.check: r for r in check_models(options) + check_export(options)}
    for name in ("models", "weights-size", "export"):
        assert results[name].status == PASS, results[name]
    assert "weights-readable" not in results


def test_trained_checkpoint_serves_through_the_stack(trained_checkpoint, tmp_path):
    checkpoint, _ = trained_checkpoint
    process, base = start_server(checkpoint, tmp_path, ready_timeout_s=180)
    try:
        rows = 5
        body = {"embedding": realistic_embeddings(rows, seed=11).reshape(-1).tolist()}
        response = httpx.post(f"{base}/api/v1/inference", json=body, timeout=60)
        assert response.status_code == 200, response.text
        texts = response.json()["texts"]
        assert len(texts) == rows and all(text.strip() for text in texts)
    finally:
        assert stop_process(process) == 0


def test_gpu_bench_smoke_on_the_cpu(smollm2_dir, tmp_path):
    from training.gpu_bench import main as bench_main

    report = bench_main(["--shape", "tiny", "--device", "cpu", "--batch", "2", "--steps", "2", "--warmup", "1",
                         "--caption-tokens", "4", "--tokenizer", str(smollm2_dir), "--out", str(tmp_path)])
    modes = {row["mode"]: row for row in report["results"]}
    assert set(modes) == {"frozen", "lora"} and modes["frozen"]["ratio_to_frozen"] == 1.0
    assert modes["lora"]["trainable_params"] > modes["frozen"]["trainable_params"]
    assert all(row["steps_per_s"] > 0 for row in modes.values())
    assert json.loads((tmp_path / "results.json").read_text())["shape"] == "tiny"
    assert "vs frozen" in (tmp_path / "results.md").read_text()


def test_noise_model_draws_evaluator_shaped_rows_per_step():
    clean = realistic_embeddings(64, seed=2)
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    model = NoiseModel("realistic", 1.0, 0.0)
    shaped = model.apply(clean, seed=0, step=5)
    norms = np.linalg.norm(shaped, axis=1)
    assert np.all((norms > 0.3) & (norms < 1.0)) and 0.5 < np.mean((norms > 0.5) & (norms < 0.9))
    assert np.all(np.sum(shaped * clean, axis=1) / norms > 0.7)  # still about the caption's direction
    assert np.array_equal(shaped, model.apply(clean, seed=0, step=5))  # a pure function of (seed, step)
    assert not np.allclose(shaped, model.apply(clean, seed=0, step=6))
    half = NoiseModel("realistic", 0.5, 0.0).apply(clean, seed=0, step=5)
    kept = np.all(half == clean, axis=1)
    assert 16 < kept.sum() < 48  # the rest were replaced
    assert np.array_equal(NoiseModel("none", 0.0, 0.0).apply(clean, seed=0, step=5), clean)
    noisy = NoiseModel("none", 0.0, 0.01).apply(clean, seed=0, step=5)
    assert np.std(noisy - clean) == pytest.approx(0.01, rel=0.05)
    assert resolve("auto", "video_embed") == "none" and resolve("auto", "encoder") == "realistic"
    assert resolve("auto", "description_embed") == "realistic"
    with pytest.raises(ValueError, match="fraction"):
        NoiseModel("realistic", 1.5, 0.0)


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 40
    for action in options:
        assert action.help and len(action.help) > 10, action.option_strings
    text = parser.format_help()
    assert text.count("(default:") == len(options)
    assert "--reserve-minutes" in text and "kept for writing the checkpoint and the final evaluation" in text
    assert "SOURCE<TAB>caption" in text


def test_time_budget_says_it_keeps_time_for_the_final_evaluation(parquet_dir, tiny_decoder, tmp_path, capsys):
    report = train_main(tiny_args(parquet_dir, tiny_decoder, tmp_path / "run", "--steps", "100000", "--max-minutes",
                                  "0.5", "--reserve-minutes", "0.499"))  # 0.06 s of training
    out = capsys.readouterr().out
    assert report["stopped_by"] == "time" and report["steps"] < 100
    assert f"time budget: training stops at step {report['steps']} after" in out
    assert "the last 0.499 of --max-minutes 0.5 are kept for writing the checkpoint and the final evaluation" in out


def test_data_errors_are_one_line_naming_file_column_and_row(parquet_dir, tiny_decoder, tmp_path):
    change, _ = MALFORMED["wrong width"]
    bad = _write_variant(tmp_path / "data", parquet_dir / "part-0.parquet", change)
    cases = {str(tmp_path / "data" / "*.parquet"): [str(bad), "column 'video_embed' row 5: 512 values, expected 1024"],
             str(tmp_path / "none" / "*.parquet"): [str(tmp_path / "none" / "*.parquet"), "no parquet files found"]}
    for data, expected in cases.items():
        args = tiny_args(parquet_dir, tiny_decoder, tmp_path / "run")
        args[args.index("--data") + 1] = data
        result = subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("python -m training: data error: ") and "Traceback" not in result.stderr
        assert all(part in lines[0] for part in expected), lines[0]


def test_lora_with_gradient_checkpointing_warns_nothing(tiny_decoder):
    from training.decoder import LoraSettings, load_decoder

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model, _ = load_decoder(tiny_decoder, torch.device("cpu"), torch.float32, LoraSettings(rank=4), True, seed=0)
        model.train()
        ids = torch.tensor([[5, 17, 99, 4]])
        model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_log_reader_keeps_the_last_record_of_a_repeated_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": loss}) + "\n" for s, loss in
                           [(1, 3.0), (2, 2.5), (3, 2.4), (2, 2.6), (3, 2.3), (4, 2.0)]))
    assert [(e["step"], e["loss"]) for e in read_log(log)] == [(1, 3.0), (2, 2.6), (3, 2.3), (4, 2.0)]


def test_heldout_evaluation_judges_retrieval_by_every_judge(tiny_checkpoint, tmp_path):
    """`make evaluate-heldout`'s command on a small split: the retrieval baseline is scored by the second judge too."""
    from evaluate.cli import main as evaluate_main

    lines = DEFAULT_HELDOUT.read_text().splitlines()
    (tmp_path / "held.txt").write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "train.txt").write_text("\n".join(line.split("\t")[1] for line in lines[6:40]) + "\n")
    report = evaluate_main(["--checkpoint", str(tiny_checkpoint), "--dataset", str(tmp_path / "held.txt"),
                            "--norms", "realistic", "--also-judge", SECOND_JUDGE, "--baseline-train",
                            str(tmp_path / "train.txt"), "--quiet", "--out", str(tmp_path), "--name", "held"])
    assert report["dataset"] == "held.txt (realistic norms)" and report["rows"] == 6
    second = report["other_judges_retrieval_baseline"][SECOND_JUDGE]
    assert second == pytest.approx(report["retrieval_baseline"], abs=2e-4)
    assert report["other_judges"][SECOND_JUDGE] == pytest.approx(report["mean_similarity"], abs=2e-4)
    assert f"nearest-training-caption baseline, judge {SECOND_JUDGE}" in (tmp_path / "held.md").read_text()
    shares = report["fluency"]  # the tiny model writes exactly max_new_tokens tokens: every caption hits the limit
    assert shares["captions"] == 6 and shares["over_token_limit"] == 1.0 and shares["degenerate"] == 1.0
    table = (tmp_path / "held.md").read_text()
    assert "| degenerate captions (empty, repeated words, at the token limit) | 100.0%" in table


def test_best_of_n_needs_an_encoder_for_conditioning_the_project_does_not_know(parquet_dir, tiny_decoder, tmp_path,
                                                                              capsys):
    from training.train import DEFAULT_CANDIDATES, parse_args

    with pytest.raises(SystemExit):
        parse_args(tiny_args(parquet_dir, tiny_decoder, tmp_path, "--candidates", "4"))
    assert "needs --rerank-encoder" in capsys.readouterr().err
    assert parse_args(tiny_args(parquet_dir, tiny_decoder, tmp_path)).candidates == 1  # video_embed: no reranker
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog runs\na cat sleeps\n" * 8)
    args = parse_args(["--data", str(captions), "--run-dir", str(tmp_path / "run")])
    assert args.condition == "encoder" and args.candidates == DEFAULT_CANDIDATES  # the project's own space reranks


def test_a_merged_decoder_is_written_in_hugging_faces_shard_layout_and_serves(tiny_decoder, tmp_path, smollm2_dir):
    """An 8B decoder becomes several safetensors shards plus their index: the layout Hugging Face reads, the
    continuous engine loads straight onto its device, and doctor accepts in a Git LFS repository."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from doctor.checks import PASS, Options, check_models
    from embcap.lean_llama import LeanLlama
    from training.decoder import write_decoder

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder)
    repo = tmp_path / "repo"
    checkpoint = make_tiny_checkpoint(repo / "models" / "big", smollm2_dir)
    write_decoder(model, AutoTokenizer.from_pretrained(tiny_decoder), checkpoint / "decoder", torch.float32, "3MB")
    shards = sorted((checkpoint / "decoder").glob("model-*-of-*.safetensors"))
    index = json.loads((checkpoint / "decoder" / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    lean = LeanLlama.from_pretrained(checkpoint / "decoder")
    torch.testing.assert_close(lean.lm_head, model.get_output_embeddings().weight.detach())
    shutil.copy2(ROOT / ".gitattributes", repo / ".gitattributes")
    results = {r.check: r for r in check_models(Options(repo=repo, checkpoint="models/big"))}
    for name in ("models", "checkpoint-complete", "weights-size"):
        assert results[name].status == PASS, results[name]
