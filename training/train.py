"""Train a caption model: a projector in front of a Llama-family decoder, frozen or with a LoRA adapter.

Each step: conditioning vectors of a batch (a parquet column such as ``video_embed``, or the
project's text encoder applied to captions), plus Gaussian noise, are projected to P prefix
vectors and placed in the prompt that serving builds (`CaptionGenerator.prompt_embeddings`);
the caption's tokens plus the end token follow, and the loss is the cross-entropy on the
caption tokens only. Only the projector and the adapter (with ``--lora``) learn.

Seeded and resumable: the rows, the noise and any dropout of step ``i`` depend only on
``(seed, i)``, and ``state.pt`` in the run folder holds the projector, the adapter, the
optimiser and the step, so a resumed run reaches the state of an uninterrupted one.
The result is a checkpoint folder that `server.py` serves as it is (the adapter merged into
the decoder), with its training record in ``MODEL_CARD.md`` and ``training.json``.
The defaults are the default model's recipe. Run ``python -m training --help``.

Longer than 250 lines: the training loop, its resumable state and its record (model card,
training.json) must agree field by field.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from embcap.checkpoint import (INPUT_NORMS, MAX_CANDIDATES, CaptionModelSpec, DecoderSource, GenerationSettings,
                               ImageBindTowerEncoder, OnnxTextEncoder, PromptTemplate, RerankSettings,
                               SentenceTransformerEncoder, load_checkpoint, save_spec)
from embcap.engines import DEFAULT_ENGINE, ENGINES
from tooling.builders import minilm_rerank
from embcap.generation import CaptionGenerator
from embcap.projector import save_projector, seeded_projector
from embcap.tower_folder import CONFIG_FILE as TOWER_CONFIG, is_tower_folder
from evaluate.datasets import NORMS, cached_encoding, shape_inputs
from training import compare, reward, start
from training import decoder as decoders
from training.augment import AUGMENTS, VIDEO_CONDITIONING, NoiseModel, resolve
from training.data import CAPTIONS_FORMAT, ENCODER, WORDNET, DataSet, is_parquet, load_data, write_parquet
from training.record import CARD_FILE, LOG_FILE, PLOT_FILE, RECORD_FILE, model_card, print_summary, write_plot
from training.scoring import AUTO_JUDGE, Retrieval, Score, load_judges, score_model
from training.sequences import batch_loss, caption_ids

DEFAULT_TEMPLATE = "Video:\n{prefix}\nCaption:"
# Best-of-N of the default recipe: the largest N measured that keeps the CPU latency target (docs/best-of-n.md).
DEFAULT_CANDIDATES = 16
RERANK_ENCODER_DIR = "text_encoder"  # where --rerank-encoder is copied inside the checkpoint
STATE_FILE = "state.pt"
AS_IS, REALISTIC = NORMS
# Settings a resumed run must share with the run it continues.
IDENTITY = ("data", "heldout", "condition", "decoder", "lora", "lora_rank", "lora_alpha", "lora_modules",
            "prefix_length", "template", "batch_size", "grad_accum", "seed", "max_caption_tokens", "steps",
            "augment", "augment_fraction", "noise_std", "input_norm", "objective", "init_from", "samples",
            "reward_baseline", "ce_weight", "reward_target")


def rerank_settings(args: argparse.Namespace) -> RerankSettings:
    """Best-of-N for the written checkpoint: the project's own conditioning space reranks with MiniLM lifted
    (embcap.text_encoder); any other needs --rerank-encoder, copied into the checkpoint."""
    if args.candidates == 1:
        return RerankSettings()
    if args.rerank_encoder is not None:
        return RerankSettings(candidates=args.candidates, encoder=copied_encoder_spec(args.rerank_encoder))
    return minilm_rerank(args.candidates)


def copied_encoder_spec(folder: Path) -> SentenceTransformerEncoder | OnnxTextEncoder | ImageBindTowerEncoder:
    """The spec of an encoder folder once copied to the checkpoint's RERANK_ENCODER_DIR: an imported ImageBind
    text tower (text_tower.json), an ONNX text tower (model.onnx + tokenizer.json) or a sentence-transformers
    folder (modules.json)."""
    if is_tower_folder(folder):
        return ImageBindTowerEncoder(path=RERANK_ENCODER_DIR)
    if (folder / "model.onnx").is_file() and (folder / "tokenizer.json").is_file():
        return OnnxTextEncoder(path=f"{RERANK_ENCODER_DIR}/model.onnx",
                               tokenizer=f"{RERANK_ENCODER_DIR}/tokenizer.json")
    if (folder / "modules.json").is_file():
        return SentenceTransformerEncoder(path=RERANK_ENCODER_DIR)
    raise ValueError(f"--rerank-encoder {folder}: neither an imported ImageBind text tower ({TOWER_CONFIG}), "
                     "model.onnx + tokenizer.json nor a sentence-transformers folder (modules.json)")


def make_spec(args: argparse.Namespace, decoder: DecoderSource, stop_tokens: tuple[str, ...] = ()) -> CaptionModelSpec:
    """The caption_model.json of the trained model (greedy decoding; best-of-N when --candidates asks)."""
    return CaptionModelSpec(
        name=args.name, prefix_length=args.prefix_length, decoder=decoder, input_norm=args.input_norm,
        prompt=PromptTemplate(template=args.template),
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=1, stop_tokens=stop_tokens),
        rerank=rerank_settings(args),
    )


def learning_rate(step: int, total: int, peak: float, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up then cosine decay to 10% of the peak.

    The decay follows whichever is further along: steps out of `total`, or `time_fraction` of the
    wall-time budget, so that a run cut short by --max-minutes still ends annealed.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_rows(step: int, order: list[int], per_step: int) -> list[int]:
    """The training rows of `step`: consecutive slices of one seeded permutation, wrapping around."""
    start = (step * per_step) % len(order)
    return [order[(start + i) % len(order)] for i in range(per_step)]


def set_threads(setting: str) -> int:
    """Apply --threads. Under 'auto' a busy machine gets one thread: a niced multi-threaded step stalls
    whenever one of its threads is descheduled, which costs far more than the lost parallelism."""
    cores = max(1, os.cpu_count() or 1)
    if setting != "auto":
        threads = int(setting)
    else:
        threads = 1 if os.getloadavg()[0] > cores + 0.5 else cores
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; an option without a value by default says in its help what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None and "(default: " in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's options; every one has help text, and --help shows its default."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m training", description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=WORDNET,
                      help="parquet files in the evaluator's layout (a glob, file or folder), "
                           f"{CAPTIONS_FORMAT}, or 'wordnet' (the default model's corpus)")
    data.add_argument("--heldout", default=None,
                      help="held-out files of the same kind (default: none, --heldout-size rows split off --data)")
    data.add_argument("--heldout-size", type=int, default=1000,
                      help="rows held out of --data (whole videos when there is a video_id column)")
    data.add_argument("--condition", default=None,
                      help="conditioning column of the parquet data: video_embed, description_embed (text "
                           "embeddings, CapDec-style), ...; 'encoder' for captions data (default: video_embed for "
                           "parquet, encoder otherwise)")
    data.add_argument("--max-caption-tokens", type=int, default=32, help="descriptions are cut to this many tokens")
    data.add_argument("--max-train", type=int, default=80000, help="training captions of the wordnet corpus")
    inputs = parser.add_argument_group("inputs: the noise model and the projector's normalisation")
    inputs.add_argument("--augment", choices=AUGMENTS, default="auto",
                        help="'realistic': replace rows by evaluator-shaped clip means around them "
                             "(embcap.inputs: mean of 15 unit clips, norm mostly 0.5-0.9); 'auto': realistic for "
                             f"text-embedding conditioning, none for {VIDEO_CONDITIONING}")
    inputs.add_argument("--augment-fraction", type=float, default=0.75,
                        help="share of each batch's rows that --augment realistic replaces (the rest stay clean)")
    inputs.add_argument("--noise-std", type=float, default=0.0,
                        help="per-dimension std of N(0, s^2) noise added after the augmentation (CapDec-style; 0: "
                             "none)")
    inputs.add_argument("--input-norm", choices=INPUT_NORMS, default="unit",
                        help="the checkpoint's input normalisation: 'unit' scales every embedding to length 1 "
                             "before the projector, in training, PyTorch serving and the ONNX/TensorRT export alike")
    model = parser.add_argument_group("model")
    model.add_argument("--decoder", default=decoders.DEFAULT_DECODER,
                       help="a Hugging Face Llama-family folder, or gguf:PACKAGE:FILE")
    model.add_argument("--lora", action="store_true", help="train a LoRA adapter on the decoder too (peft)")
    model.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r")
    model.add_argument("--lora-alpha", type=int, default=32, help="LoRA scale alpha (the update is alpha/r * BA)")
    model.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input")
    model.add_argument("--lora-modules", default=",".join(decoders.DEFAULT_LORA_MODULES),
                       help="comma-separated Linear names inside each block (q_proj,...,gate_proj,up_proj,down_proj)")
    model.add_argument("--prefix-length", type=int, default=4, help="prefix vectors P the projector makes")
    model.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt, {prefix} marks the prefix vectors")
    model.add_argument("--max-new-tokens", type=int, default=32, help="generation limit in caption_model.json")
    model.add_argument("--candidates", default="auto",
                       help=f"best-of-N written into caption_model.json: captions decoded per row, the one closest "
                            f"to the input served (auto: {DEFAULT_CANDIDATES} when conditioned by the project's text "
                            "encoder, which then reranks; 1 otherwise, or N with --rerank-encoder)")
    model.add_argument("--rerank-encoder", type=Path, default=None,
                       help="a text encoder into the input embeddings' space (the evaluator's ImageBind tower from "
                            "python -m training.import_text_tower, an ONNX text tower with model.onnx and "
                            "tokenizer.json, or a sentence-transformers folder), copied into the checkpoint "
                            "to rerank candidates (default: none; the project's encoder for its own conditioning)")
    model.add_argument("--name", default=None, help="the checkpoint's name (default: from decoder and data)")
    model.add_argument("--device", default="auto", help="auto (CUDA in bfloat16 when present, else CPU float32), "
                                                        "cpu or cuda[:N]")
    model.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, slower (large decoders)")
    train = parser.add_argument_group("optimisation")
    train.add_argument("--seed", type=int, default=0, help="seeds the data order, initialisation, noise and split")
    train.add_argument("--steps", type=int, default=4000, help="optimiser steps the schedule spans")
    train.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    train.add_argument("--lr", type=float, default=2e-3, help="projector's peak learning rate")
    train.add_argument("--lora-lr", type=float, default=2e-4, help="adapter's peak learning rate")
    train.add_argument("--warmup", type=int, default=50, help="linear warm-up steps before the cosine decay")
    train.add_argument("--stop-at", type=int, default=None,
                       help="stop at this step, the schedule still spanning --steps (default: none, run to --steps)")
    train.add_argument("--max-minutes", type=float, default=None,
                       help="wall-time budget of the whole run, resumes included: training stops once only "
                            "--reserve-minutes of it are left, and the cosine decay follows the time (default: none, "
                            "no budget)")
    train.add_argument("--reserve-minutes", type=float, default=2.0,
                       help="minutes of --max-minutes kept for writing the checkpoint and the final evaluation")
    train.add_argument("--threads", default="auto",
                       help="torch threads, or 'auto': all cores when the machine is idle, 1 when it is busy")
    run = parser.add_argument_group("run, evaluation and output")
    run.add_argument("--run-dir", type=Path, default=Path(".cache/train_run"),
                     help="state, log, held-out split (re-run with the same folder to resume)")
    run.add_argument("--out", "--export", dest="out", type=Path, default=None,
                     help="checkpoint folder to write (default: RUN_DIR/checkpoint)")
    run.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                     help="dtype of a decoder written into the checkpoint")
    run.add_argument("--max-shard-size", default=decoders.SHARD_SIZE,
                     help="largest safetensors shard of a decoder written into the checkpoint (Hugging Face's "
                          "layout, in Git LFS on a miner's repository; 90MB keeps files under GitHub's 100 MiB)")
    run.add_argument("--save-every", type=int, default=50, help="steps between resume states")
    run.add_argument("--eval-every", type=int, default=300, help="steps between held-out scores (0: none)")
    run.add_argument("--eval-samples", type=int, default=32, help="held-out rows scored during training")
    run.add_argument("--eval-norms", choices=("auto", *NORMS), default="auto",
                     help="inputs of the held-out scores: 'realistic' (evaluator-shaped clip means around each "
                          f"row), 'as-is'; 'auto': as-is for {VIDEO_CONDITIONING}, realistic otherwise. The final "
                          "evaluation scores as-is inputs too")
    run.add_argument("--final-eval-samples", type=int, default=128, help="held-out rows scored at the end (0: none)")
    run.add_argument("--curve-samples", type=int, default=0,
                     help="held-out rows of the final best-of-N curve (candidates 1, 2, 4, 8, 16, evaluator-shaped; "
                          "with --init-from before and after; the rows of python -m evaluate --limit N; 0: none)")
    run.add_argument("--judge", default="minilm", help="any judge python -m evaluate accepts (minilm, mpnet, "
                                                       "a sentence-transformers folder, module:function)")
    run.add_argument("--also-judge", default=AUTO_JUDGE,
                     help="a second judge scored beside --judge: 'auto' (all-mpnet-base-v2 when make judges has "
                          "assembled it), 'none', or any --judge value")
    run.add_argument("--eval-engine", default="auto", choices=("auto", *ENGINES),
                     help="decoding engine for scores during training (auto: the serving default, hf with LoRA, "
                          "whose adapter the continuous engine's fused weights do not carry)")
    reward.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the options; fill in the ones that depend on others."""
    parser = build_parser()
    args = parser.parse_args(argv)
    reward.check_arguments(args, parser)
    start.apply_init(args, parser)
    if args.condition is None:
        args.condition = "video_embed" if is_parquet(args.data) else ENCODER
    if args.grad_accum < 1 or args.batch_size < 1:
        parser.error("--batch-size and --grad-accum must be at least 1")
    if not 0.0 <= args.augment_fraction <= 1.0:
        parser.error("--augment-fraction must be between 0 and 1")
    if args.noise_std < 0:
        parser.error("--noise-std must be at least 0")
    if args.max_minutes is not None and not 0 <= args.reserve_minutes < args.max_minutes:
        parser.error("--reserve-minutes must be at least 0 and below --max-minutes")
    args.augment = resolve(args.augment, args.condition)
    if args.eval_norms == "auto":
        args.eval_norms = AS_IS if args.condition == VIDEO_CONDITIONING else REALISTIC
    if args.candidates == "auto":
        args.candidates = DEFAULT_CANDIDATES if args.condition == ENCODER or args.rerank_encoder else 1
    try:
        args.candidates = int(args.candidates)
    except ValueError:
        parser.error(f"--candidates takes a number or auto, not {args.candidates!r}")
    if not 1 <= args.candidates <= MAX_CANDIDATES:
        parser.error(f"--candidates must be between 1 and {MAX_CANDIDATES}")
    if args.candidates > 1 and args.condition != ENCODER and args.rerank_encoder is None:
        parser.error(f"--candidates {args.candidates} on {args.condition} conditioning needs --rerank-encoder: a text "
                     "encoder into that space to choose between the candidates")
    if args.rerank_encoder is not None:
        try:
            copied_encoder_spec(args.rerank_encoder)
        except ValueError as exc:
            parser.error(str(exc))
    args.out = args.out or args.run_dir / "checkpoint"
    return args


def default_name(args: argparse.Namespace, folder: Path) -> str:
    """e.g. `smollm2-135m-instruct-lora-video_embed`."""
    folder = folder.parent if folder.name == "decoder" else folder
    base = folder.name.split("--")[-1].split(".")[0].lower()
    return f"{base}-{'lora' if args.lora else 'frozen'}-{args.condition}"


def training_seconds(args: argparse.Namespace) -> float:
    """Seconds of --max-minutes that training may use: the rest is reserved for the checkpoint and final scores."""
    return (args.max_minutes - args.reserve_minutes) * 60


class Run:
    """One training run: model, data, optimiser and the resume state in `args.run_dir`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device, self.dtype = decoders.pick_device(args.device)
        self.init = load_checkpoint(args.init_from) if args.init_from else None
        self.data: DataSet = load_data(args.data, conditioning=args.condition, heldout=args.heldout,
                                       heldout_size=args.heldout_size, seed=args.seed, run_dir=args.run_dir,
                                       max_train=args.max_train, target=start.target_column(args))
        self.source = decoders.parse_source(args.decoder)
        folder = decoders.decoder_folder(self.source)
        lora = None
        if args.lora:
            lora = decoders.LoraSettings(args.lora_rank, args.lora_alpha, args.lora_dropout,
                                         tuple(m for m in args.lora_modules.split(",") if m))
        self.lora = lora
        model, self.tokenizer = decoders.load_decoder(folder, self.device, self.dtype, lora,
                                                      args.gradient_checkpointing, args.seed)
        args.name = args.name or default_name(args, folder)
        self.spec = start.run_spec(self.init, args.name) if self.init else make_spec(args, self.source)
        self.generator = CaptionGenerator(self.spec, model, self.tokenizer)
        self.model = model.train()
        self.end_id = self.generator.stop_ids[0] if self.tokenizer.eos_token_id is None else self.tokenizer.eos_token_id
        self.projector = seeded_projector(self.spec.embedding_dim, self.generator.hidden_size,
                                          self.spec.prefix_length, args.seed, args.input_norm).to(self.device)
        if self.init:
            self.projector.load_state_dict(load_file(str(self.init.projector_path), device=str(self.device)))
        self.objective, self.encoder = self.reward_objective()
        self.objective_settings = self.objective.settings if self.objective else None
        self.noise = NoiseModel(args.augment, args.augment_fraction if args.augment != "none" else 0.0,
                                args.noise_std)
        groups = [{"params": list(self.projector.parameters()), "lr": args.lr, "peak": args.lr}]
        adapter = [p for p in self.model.parameters() if p.requires_grad]
        if adapter:
            groups.append({"params": adapter, "lr": args.lora_lr, "peak": args.lora_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        self.step, self.elapsed_before, self.history = 0, 0.0, []
        self.before_minutes = None
        self.order = list(range(len(self.data.train)))
        random.Random(args.seed).shuffle(self.order)
        held = self.data.heldout
        self.eval_rows = compare.sample_rows(len(held), args.eval_samples, args.seed) if args.eval_every else []
        self.eval_embeddings = (shape_inputs(held.embed(self.eval_rows), args.eval_norms, args.seed)
                                if self.eval_rows else None)
        scoring = len(held) and (self.eval_rows or args.final_eval_samples)
        self.judges = load_judges(args.judge, args.also_judge) if scoring else {}
        self.retrieval = self.retrieval_keys() if scoring else None
        self.eval_retrieval = (self.retrieval.scores(self.judges, self.eval_embeddings, self.eval_references())
                               if self.eval_rows else {})
        self.started = time.monotonic()  # training time: loading, encoding the retrieval keys and judging are not

    def reward_objective(self) -> tuple[reward.RewardObjective | None, object]:
        """The reward or raft objective with its encoder (the checkpoint continued reranks with it); None for ce."""
        args = self.args
        if args.objective == reward.CE:
            return None, None
        encoder = start.reward_encoder(self.init)
        target, _ = start.resolve_target(args.reward_target, self.data, encoder)
        rerank = self.spec.rerank
        settings = reward.ObjectiveSettings(args.objective, args.samples, args.reward_baseline, args.ce_weight, target,
                                            rerank.temperature, rerank.top_k, rerank.top_p)
        return reward.RewardObjective(settings, self.generator, self.projector, encoder, self.end_id,
                                      self.spec.generation.max_new_tokens, args.max_caption_tokens, args.seed), encoder

    def retrieval_keys(self) -> Retrieval:
        """The training captions and their conditioning vectors, for the nearest-caption baseline."""
        train = self.data.train
        keys = train.embeddings if train.embeddings is not None else cached_encoding(train.texts)
        return Retrieval(train.texts, np.asarray(keys, dtype=np.float32))

    def eval_references(self) -> list[str]:
        return [self.data.heldout.texts[i] for i in self.eval_rows]

    @property
    def state_path(self) -> Path:
        return self.args.run_dir / STATE_FILE

    def identity(self) -> dict:
        return {key: getattr(self.args, key) for key in IDENTITY}

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def save(self) -> None:
        """Write the resume state atomically."""
        state = {"projector": self.projector.state_dict(), "adapter": decoders.trainable_state(self.model),
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed(),
                 "history": self.history, "identity": self.identity()}
        torch.save(state, self.state_path.with_suffix(".tmp"))
        os.replace(self.state_path.with_suffix(".tmp"), self.state_path)

    def resume(self) -> bool:
        """Load `state.pt` if the run folder has one; refuse one written with other settings."""
        if not self.state_path.is_file():
            return False
        state = torch.load(self.state_path, weights_only=False, map_location=self.device)
        changed = {k: (v, self.identity().get(k)) for k, v in state["identity"].items() if self.identity().get(k) != v}
        if changed:
            raise SystemExit(f"{self.state_path} was written with other settings {changed} (saved, now): "
                             "use another --run-dir, or the same settings")
        self.projector.load_state_dict(state["projector"])
        decoders.load_trainable_state(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed_before, self.history = state["step"], state["elapsed"], state["history"]
        print(f"resumed from {self.state_path} at step {self.step}")
        return True

    def eval_engine(self) -> str:
        if self.args.eval_engine != "auto":
            return self.args.eval_engine
        return "hf" if self.lora else DEFAULT_ENGINE

    def score(self) -> Score:
        """Held-out score of the model as it is now, through a serving engine, beside retrieval on the same rows."""
        try:
            score = score_model(self.generator, self.projector, self.eval_embeddings, self.eval_references(),
                                self.judges, self.eval_engine())
        finally:
            self.model.train()
        score.retrieval = self.eval_retrieval
        return score

    def train_step(self) -> tuple[float, dict]:
        """One optimiser step over `grad_accum` micro-batches; returns the mean loss and, under a reward
        objective, the mean of what its micro-batches saw (rewards, sample fluency)."""
        args = self.args
        rows = step_rows(self.step, self.order, args.batch_size * args.grad_accum)
        inputs = torch.from_numpy(self.noise.apply(self.data.train.embed(rows), args.seed, self.step))
        torch.manual_seed(args.seed * 7919 + self.step)  # adapter dropout, if any
        time_fraction = self.elapsed() / training_seconds(args) if args.max_minutes else 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, args.steps, group["peak"], args.warmup, time_fraction)
        self.optimizer.zero_grad(set_to_none=True)
        total, seen = 0.0, []
        for first in range(0, len(rows), args.batch_size):
            chunk = rows[first:first + args.batch_size]
            embeddings = inputs[first:first + args.batch_size]
            texts = [self.data.train.texts[i] for i in chunk]
            if self.objective is None:
                loss = batch_loss(self.generator, self.projector, embeddings,
                                  caption_ids(self.tokenizer, texts, self.end_id, args.max_caption_tokens))
            else:
                targets = start.unit_targets(self.data.train.targets, self.objective.settings.target, chunk, texts,
                                             self.encoder)
                loss, stats = self.objective.loss(chunk, embeddings, texts, targets, self.step)
                seen.append(stats)
            loss = loss / args.grad_accum
            loss.backward()
            total += loss.item()
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        self.optimizer.step()
        self.step += 1
        return total, {key: float(np.mean([s[key] for s in seen])) for key in (seen[0] if seen else {})}


def write_checkpoint(run: Run, out: Path) -> Path:
    """Write caption_model.json, projector and (merged) decoder into `out`, replacing what they replace.

    A GGUF-package decoder left frozen is referenced, as the default model does; any other decoder
    is written into `out/decoder` (with a LoRA adapter merged into it) so the folder is complete.
    """
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    spec = run.spec
    if run.lora is not None or run.source.path is not None:
        model = decoders.merged_decoder(run.model)
        decoders.write_decoder(model, run.tokenizer, staging / "decoder", getattr(torch, run.args.save_dtype),
                               run.args.max_shard_size)
        spec = spec.model_copy(update={"decoder": DecoderSource(path="decoder")})
    save_projector(run.projector.cpu(), staging / spec.projector)
    if run.init is not None:
        start.copy_encoder(run.init, staging)
    if run.args.rerank_encoder is not None:
        shutil.copytree(run.args.rerank_encoder, staging / RERANK_ENCODER_DIR)
    save_spec(staging, spec)
    out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    for path in [out, *out.rglob("*")]:  # the container runs as nobody; safetensors writes 0600
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return out


def main(argv: list[str] | None = None) -> dict:
    """Train, write the checkpoint, score it and record how it was made; returns the training record."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    set_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    run.resume()
    data = run.data
    print(f"data: {len(data.train)} training rows, {len(data.heldout)} held out ({data.split}); conditioning "
          f"{data.conditioning}; decoder {args.decoder} on {run.device} ({run.dtype}); "
          f"{'LoRA ' + args.lora_modules if run.lora else 'frozen decoder'}; inputs: {run.noise.describe()} "
          f"Input norm: {args.input_norm}; held-out scores on {args.eval_norms} inputs, judges "
          f"{', '.join(run.judges) or '-'}")
    if run.eval_retrieval:
        print("nearest training caption on the held-out score rows: "
              + ", ".join(f"{name} {value:.3f}" for name, value in run.eval_retrieval.items()))
    if run.objective is not None:
        print(f"objective: {run.objective.settings.describe()}")
    before = before_scores(run) if run.init is not None else None
    log_path = args.run_dir / LOG_FILE
    smoothed, stopped_by = None, "steps"
    stop = min(args.steps, args.stop_at or args.steps)
    bar = tqdm(total=args.steps, initial=run.step, desc="train", dynamic_ncols=True)
    with log_path.open("a") as log:
        while run.step < stop:
            if args.max_minutes and run.elapsed() > training_seconds(args):
                stopped_by = "time"
                tqdm.write(f"time budget: training stops at step {run.step} after {run.elapsed() / 60:.1f} min; "
                           f"the last {args.reserve_minutes:g} of --max-minutes {args.max_minutes:g} are kept for "
                           "writing the checkpoint and the final evaluation")
                break
            if run.step % 10 == 0:
                set_threads(args.threads)
            loss, seen = run.train_step()
            smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.3f}", **({"reward": f"{seen['reward']:.3f}"} if seen else {}))
            record = {"step": run.step, "loss": round(loss, 4), "lr": run.optimizer.param_groups[0]["lr"],
                      "elapsed_s": round(run.elapsed(), 1), **{key: round(value, 4) for key, value in seen.items()}}
            if args.eval_every and run.step % args.eval_every == 0 and run.eval_rows:
                score = run.score()
                record["heldout_score"] = round(score.mean, 4)
                run.history.append({"step": run.step, "loss": smoothed, "inputs": args.eval_norms, **score.record()})
                ref, gen = score.examples[0]
                tqdm.write(f"step {run.step}: loss {smoothed:.3f}, held-out ({args.eval_norms} inputs, "
                           f"n={score.rows}, {score.engine}) "
                           + ", ".join(f"{name} {value:.3f}" for name, value in score.means.items())
                           + f"; e.g. {ref!r} -> {gen!r}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if run.step % args.save_every == 0:
                run.save()
    bar.close()
    run.save()
    train_minutes = round(run.elapsed() / 60, 1)
    out = write_checkpoint(run, args.out)
    if data.conditioning == ENCODER and args.data == WORDNET:
        held = Path(args.heldout) if args.heldout else args.run_dir / start.HELDOUT_FILE
        if not (out / start.HELDOUT_FILE).exists() or not (out / start.HELDOUT_FILE).samefile(held):
            shutil.copyfile(held, out / start.HELDOUT_FILE)  # evaluate's built-in split
    elif len(data.heldout) and data.heldout.embeddings is not None:
        write_parquet(args.run_dir / "heldout.parquet", data.heldout, data.conditioning)
    after = final_scores(run, out)
    record = training_record(run, smoothed, train_minutes, after, before, stopped_by, argv)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_plot(args.run_dir / LOG_FILE, record, out / PLOT_FILE)
    (out / CARD_FILE).write_text(model_card(record))
    (args.run_dir / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    print_summary(record, out)
    return record


def final_shapes(args: argparse.Namespace) -> list[str]:
    """Input shapes of the final evaluation: the held-out scores' shape, then as-is inputs if that differs."""
    return [args.eval_norms] + ([AS_IS] if args.eval_norms != AS_IS else [])


def comparison(run: Run, checkpoint: Path) -> dict:
    """`checkpoint` scored as training.compare scores it: greedy on `--final-eval-samples` held-out rows in each
    input shape, the best-of-N curve on `--curve-samples` rows, by every judge, beside retrieval on the same rows."""
    args, held = run.args, run.data.heldout
    references, inputs = compare.comparison_inputs(held, args.final_eval_samples, args.curve_samples,
                                                   final_shapes(args), args.seed, args.seed + 1)
    scores = compare.evaluate_checkpoint(checkpoint, references, inputs, run.judges, str(run.device), run.dtype)
    return compare.with_retrieval(scores, run.retrieval, run.judges, references, inputs)


def evaluation_settings(run: Run) -> dict:
    args = run.args
    return {"init_from": str(Path(args.init_from).resolve()), "final_eval_samples": args.final_eval_samples,
            "curve_samples": args.curve_samples, "shapes": final_shapes(args), "seed": args.seed,
            "judges": list(run.judges), "heldout": run.data.split}


def before_scores(run: Run) -> dict | None:
    """The checkpoint continued, scored once when the run starts (a resumed run reuses the scores)."""
    if not (run.args.final_eval_samples and len(run.data.heldout)):
        return None
    settings = evaluation_settings(run)
    saved = compare.load_before(run.args.run_dir, settings)
    if saved is not None:
        scores, run.before_minutes = saved
        return scores
    print(f"scoring the checkpoint continued, {run.args.init_from}, before training")
    began = time.monotonic()
    scores = comparison(run, run.init.root)
    run.before_minutes = round((time.monotonic() - began) / 60, 1)
    run.started += time.monotonic() - began  # not training time: the budget and the schedule ignore it
    compare.save_before(run.args.run_dir, settings, scores, run.before_minutes)
    return scores


def final_scores(run: Run, out: Path) -> dict:
    """The written checkpoint, loaded as the server loads it, scored as `before_scores` scores the one continued."""
    if not (run.args.final_eval_samples and len(run.data.heldout)):
        return {}
    del run.generator, run.model
    run.objective = None  # it holds the decoder too
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    return comparison(run, out)


def scores_record(run: Run, after: dict, before: dict | None) -> dict:
    """training.json's `scores`: held-out scores during training, the written checkpoint's final scores (greedy per
    input shape, the best-of-N curve) and, with --init-from, the same of the checkpoint continued."""
    history = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()} for h in run.history]
    if before:  # the paired change of every score over the same rows, with its 95% interval
        for part in ("greedy", "curve"):
            for key, entry in after.get(part, {}).items():
                if key in before.get(part, {}):
                    entry["change"] = compare.changes(entry, before[part][key])
    after, before = compare.without_rows(after), before and compare.without_rows(before)
    scores = {"eval_inputs": run.args.eval_norms, "history": history, "final": after.get("greedy", {})}
    if "curve" in after:
        scores.update(curve=after["curve"], curve_rows=run.args.curve_samples, curve_inputs=compare.CURVE_INPUTS,
                      curve_retrieval=after["curve_retrieval"])
    if before:
        scores["before"] = {"checkpoint": run.args.init_from, "final": before["greedy"],
                            **({"curve": before["curve"]} if "curve" in before else {})}
    return scores


def training_record(run: Run, final_loss: float | None, train_minutes: float, after: dict, before: dict | None,
                    stopped_by: str, argv: list[str]) -> dict:
    """How the checkpoint was made: data files, columns, inputs, steps, scores (training.json and the model card)."""
    args, data = run.args, run.data
    return {
        "name": run.spec.name, "command": shlex.join(["python", "-m", "training", *argv]).replace(f"{Path.cwd()}/", ""),
        "decoder": args.decoder, "prefix_length": args.prefix_length, "template": args.template,
        "max_new_tokens": args.max_new_tokens, "rerank": run.spec.rerank.model_dump(mode="json", exclude_none=True),
        "lora": None if run.lora is None else {"rank": run.lora.rank, "alpha": run.lora.alpha,
                                                 "dropout": run.lora.dropout, "modules": list(run.lora.modules)},
        "data": {"files": data.files, "conditioning": data.conditioning, "target": "description",
                 "train_rows": len(data.train), "heldout_rows": len(data.heldout), "split": data.split},
        "input_norm": args.input_norm, "noise_model": run.noise.record(), "max_caption_tokens": args.max_caption_tokens,
        "steps": run.step, "stopped_by": stopped_by, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "examples_per_step": args.batch_size * args.grad_accum, "examples_seen": run.step * args.batch_size
        * args.grad_accum, "lr": args.lr, "lora_lr": args.lora_lr if run.lora else None, "warmup": args.warmup,
        "seed": args.seed, "device": str(run.device), "dtype": str(run.dtype).removeprefix("torch."),
        "gradient_checkpointing": args.gradient_checkpointing, "train_minutes": train_minutes,
        "total_minutes": round(run.elapsed() / 60, 1),
        "final_loss": None if final_loss is None else round(final_loss, 4), "judges": list(run.judges),
        "init_from": args.init_from, "before_minutes": run.before_minutes,
        "objective": (run.objective_settings.record() if run.objective_settings else {"name": reward.CE}),
        "scores": scores_record(run, after, before),
    }
