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
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from embcap.checkpoint import CaptionModelSpec, DecoderSource, GenerationSettings, PromptTemplate, save_spec
from embcap.engines import DEFAULT_ENGINE, ENGINES
from embcap.generation import CaptionGenerator
from embcap.projector import Projector, save_projector, seeded_projector
from training import decoder as decoders
from training.data import ENCODER, WORDNET, DataSet, is_parquet, load_data, write_parquet
from training.scoring import Score, load_judge, score_checkpoint, score_model

DEFAULT_TEMPLATE = "Video:\n{prefix}\nCaption:"
STATE_FILE = "state.pt"
RECORD_FILE = "training.json"
CARD_FILE = "MODEL_CARD.md"
# Settings a resumed run must share with the run it continues.
IDENTITY = ("data", "heldout", "condition", "decoder", "lora", "lora_rank", "lora_alpha", "lora_modules",
            "prefix_length", "template", "batch_size", "grad_accum", "seed", "max_caption_tokens", "steps")


def make_spec(args: argparse.Namespace, decoder: DecoderSource, stop_tokens: tuple[str, ...] = ()) -> CaptionModelSpec:
    """The caption_model.json of the trained model (greedy, deterministic decoding)."""
    return CaptionModelSpec(
        name=args.name, prefix_length=args.prefix_length, decoder=decoder,
        prompt=PromptTemplate(template=args.template),
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=1, stop_tokens=stop_tokens),
    )


def caption_ids(tokenizer, captions: list[str], end_id: int, max_tokens: int) -> list[list[int]]:
    """Token ids of " caption" (leading space, as it follows "Caption:"), cut to `max_tokens` with the end token."""
    encoded = tokenizer([" " + c for c in captions], add_special_tokens=False)["input_ids"]
    return [ids[: max_tokens - 1] + [end_id] for ids in encoded]


def batch_loss(generator: CaptionGenerator, projector: Projector, embeddings: torch.Tensor,
               targets: list[list[int]]) -> torch.Tensor:
    """Teacher-forced cross-entropy over caption tokens given the conditioning embeddings."""
    device = generator.device
    prompt = generator.prompt_embeddings(projector(embeddings.to(device)))
    batch, prompt_len = prompt.shape[:2]
    width = max(len(t) for t in targets)
    ids = torch.full((batch, width), generator.pad_id, dtype=torch.long)
    labels = torch.full((batch, prompt_len + width), -100, dtype=torch.long)
    mask = torch.zeros((batch, prompt_len + width), dtype=torch.long)
    for row, target in enumerate(targets):
        ids[row, : len(target)] = torch.tensor(target)
        labels[row, prompt_len: prompt_len + len(target)] = torch.tensor(target)
        mask[row, : prompt_len + len(target)] = 1
    token_embeds = generator.model.get_input_embeddings()(ids.to(device))
    out = generator.model(inputs_embeds=torch.cat([prompt, token_embeds], dim=1), attention_mask=mask.to(device),
                          labels=labels.to(device))
    return out.loss


def noisy(embeddings: np.ndarray, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, std^2) per dimension (CapDec noise) to the conditioning embeddings."""
    tensor = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    if std > 0:
        tensor = tensor + std * torch.randn(tensor.shape, generator=generator)
    return tensor


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=WORDNET,
                      help="parquet files in the evaluator's layout (a glob, file or folder), a captions file, "
                           "or 'wordnet' (the default model's corpus)")
    data.add_argument("--heldout", default=None, help="held-out files of the same kind (else a split of --data)")
    data.add_argument("--heldout-size", type=int, default=1000,
                      help="rows held out of --data (whole videos when there is a video_id column)")
    data.add_argument("--condition", default=None,
                      help="conditioning column of the parquet data: video_embed (default), description_embed "
                           "(CapDec-style, with --noise-std), ...; 'encoder' for captions data")
    data.add_argument("--noise-std", type=float, default=0.01, help="per-dimension std of N(0, s^2) noise")
    data.add_argument("--max-caption-tokens", type=int, default=32, help="descriptions are cut to this many tokens")
    data.add_argument("--max-train", type=int, default=80000, help="training captions of the wordnet corpus")
    model = parser.add_argument_group("model")
    model.add_argument("--decoder", default=decoders.DEFAULT_DECODER,
                       help="a Hugging Face Llama-family folder, or gguf:PACKAGE:FILE")
    model.add_argument("--lora", action="store_true", help="train a LoRA adapter on the decoder too (peft)")
    model.add_argument("--lora-rank", type=int, default=16)
    model.add_argument("--lora-alpha", type=int, default=32)
    model.add_argument("--lora-dropout", type=float, default=0.0)
    model.add_argument("--lora-modules", default=",".join(decoders.DEFAULT_LORA_MODULES),
                       help="comma-separated Linear names inside each block (q_proj,...,gate_proj,up_proj,down_proj)")
    model.add_argument("--prefix-length", type=int, default=4)
    model.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt, {prefix} marks the prefix vectors")
    model.add_argument("--max-new-tokens", type=int, default=32, help="generation limit in caption_model.json")
    model.add_argument("--name", default=None, help="the checkpoint's name (default: from decoder and data)")
    model.add_argument("--device", default="auto", help="auto (CUDA in bfloat16 when present, else CPU float32), "
                                                        "cpu or cuda[:N]")
    model.add_argument("--gradient-checkpointing", action="store_true", help="for large decoders")
    train = parser.add_argument_group("optimisation")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, default=4000)
    train.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    train.add_argument("--lr", type=float, default=2e-3, help="projector's peak learning rate")
    train.add_argument("--lora-lr", type=float, default=2e-4, help="adapter's peak learning rate")
    train.add_argument("--warmup", type=int, default=50)
    train.add_argument("--stop-at", type=int, default=None, help="stop at this step (schedule still spans --steps)")
    train.add_argument("--max-minutes", type=float, default=None,
                       help="stop (and write) once the run's total wall time, resumes included, passes this")
    train.add_argument("--threads", default="auto",
                       help="torch threads, or 'auto': all cores when the machine is idle, 1 when it is busy")
    run = parser.add_argument_group("run, evaluation and output")
    run.add_argument("--run-dir", type=Path, default=Path(".cache/train_run"), help="state, log, held-out split")
    run.add_argument("--out", "--export", dest="out", type=Path, default=None,
                     help="checkpoint folder to write (default: RUN_DIR/checkpoint)")
    run.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                     help="dtype of a decoder written into the checkpoint")
    run.add_argument("--save-every", type=int, default=50)
    run.add_argument("--eval-every", type=int, default=300)
    run.add_argument("--eval-samples", type=int, default=32, help="held-out rows scored during training")
    run.add_argument("--final-eval-samples", type=int, default=128, help="held-out rows scored at the end (0: none)")
    run.add_argument("--judge", default="minilm", help="any judge python -m evaluate accepts (minilm, mpnet, "
                                                       "a sentence-transformers folder, module:function)")
    run.add_argument("--eval-engine", default="auto", choices=("auto", *ENGINES),
                     help="decoding engine for scores during training (auto: the serving default, hf with LoRA, "
                          "whose adapter the continuous engine's fused weights do not carry)")
    args = parser.parse_args(argv)
    if args.condition is None:
        args.condition = "video_embed" if is_parquet(args.data) else ENCODER
    if args.grad_accum < 1 or args.batch_size < 1:
        parser.error("--batch-size and --grad-accum must be at least 1")
    args.out = args.out or args.run_dir / "checkpoint"
    return args


def default_name(args: argparse.Namespace, folder: Path) -> str:
    """e.g. `smollm2-135m-instruct-lora-video_embed`."""
    folder = folder.parent if folder.name == "decoder" else folder
    base = folder.name.split("--")[-1].split(".")[0].lower()
    return f"{base}-{'lora' if args.lora else 'frozen'}-{args.condition}"


def sample_rows(count: int, limit: int, seed: int) -> list[int]:
    """A seeded sample of `limit` of `count` rows, in order (all rows when fewer)."""
    if limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


class Run:
    """One training run: model, data, optimiser and the resume state in `args.run_dir`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device, self.dtype = decoders.pick_device(args.device)
        self.data: DataSet = load_data(args.data, conditioning=args.condition, heldout=args.heldout,
                                       heldout_size=args.heldout_size, seed=args.seed, run_dir=args.run_dir,
                                       max_train=args.max_train)
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
        self.spec = make_spec(args, self.source)
        self.generator = CaptionGenerator(self.spec, model, self.tokenizer)
        self.model = model.train()
        self.end_id = self.generator.stop_ids[0] if self.tokenizer.eos_token_id is None else self.tokenizer.eos_token_id
        self.projector = seeded_projector(self.spec.embedding_dim, self.generator.hidden_size,
                                          self.spec.prefix_length, args.seed).to(self.device)
        groups = [{"params": list(self.projector.parameters()), "lr": args.lr, "peak": args.lr}]
        adapter = [p for p in self.model.parameters() if p.requires_grad]
        if adapter:
            groups.append({"params": adapter, "lr": args.lora_lr, "peak": args.lora_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        self.step, self.elapsed_before, self.history = 0, 0.0, []
        self.started = time.monotonic()
        self.order = list(range(len(self.data.train)))
        random.Random(args.seed).shuffle(self.order)
        held = self.data.heldout
        self.eval_rows = sample_rows(len(held), args.eval_samples, args.seed)
        self.eval_embeddings = held.embed(self.eval_rows) if self.eval_rows else None
        self.judge_name, self.judge = load_judge(args.judge) if len(held) else (args.judge, None)

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
        """Held-out score of the model as it is now, through a serving engine."""
        refs = [self.data.heldout.texts[i] for i in self.eval_rows]
        try:
            return score_model(self.generator, self.projector, self.eval_embeddings, refs, self.judge,
                               self.eval_engine())
        finally:
            self.model.train()

    def train_step(self) -> float:
        """One optimiser step over `grad_accum` micro-batches; returns the mean loss."""
        args = self.args
        rows = step_rows(self.step, self.order, args.batch_size * args.grad_accum)
        noise_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + self.step)
        torch.manual_seed(args.seed * 7919 + self.step)  # adapter dropout, if any
        time_fraction = self.elapsed() / (args.max_minutes * 60) if args.max_minutes else 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, args.steps, group["peak"], args.warmup, time_fraction)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            embeddings = noisy(self.data.train.embed(chunk), args.noise_std, noise_rng)
            targets = caption_ids(self.tokenizer, [self.data.train.texts[i] for i in chunk], self.end_id,
                                  args.max_caption_tokens)
            loss = batch_loss(self.generator, self.projector, embeddings, targets) / args.grad_accum
            loss.backward()
            total += loss.item()
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        self.optimizer.step()
        self.step += 1
        return total


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
        decoders.write_decoder(model, run.tokenizer, staging / "decoder", getattr(torch, run.args.save_dtype))
        spec = spec.model_copy(update={"decoder": DecoderSource(path="decoder")})
    save_projector(run.projector.cpu(), staging / spec.projector)
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


def model_card(record: dict) -> str:
    """MODEL_CARD.md of a trained checkpoint: what it is, the data, the run and its scores."""
    scores = record["scores"]
    lines = [f"# `{record['name']}`", "", "Written by `python -m training`; the same record is in `training.json`.", "",
             "## Model",
             f"- Decoder: `{record['decoder']}`" + (f", LoRA (rank {record['lora']['rank']}, alpha "
                                                     f"{record['lora']['alpha']}, on {', '.join(record['lora']['modules'])}) "
                                                     "merged into its weights" if record["lora"] else ", frozen"),
             f"- Projector: 1024 -> {record['prefix_length']} prefix vectors; prompt `{record['template']!r}`",
             "", "## Data",
             f"- Files: {', '.join(f'`{f}`' for f in record['data']['files'])}",
             f"- Conditioning: `{record['data']['conditioning']}` (+ N(0, {record['noise_std']}^2) noise); target: "
             f"`description`, cut to {record['max_caption_tokens']} tokens",
             f"- Rows: {record['data']['train_rows']} training, {record['data']['heldout_rows']} held out "
             f"({record['data']['split']})",
             "", "## Training",
             f"- {record['steps']} steps of {record['examples_per_step']} rows ({record['examples_seen']} seen), "
             f"seed {record['seed']}, {record['device']} {record['dtype']}, {record['train_minutes']} min",
             f"- Final training loss {record['final_loss']}",
             "", f"## Held-out scores (judge {record['judge']})", "", "| step | rows | engine | score |", "|---|---|---|---|"]
    for entry in scores["history"]:
        lines.append(f"| {entry['step']} | {entry['rows']} | {entry['engine']} | {entry['score']:.4f} |")
    if scores.get("final"):
        final = scores["final"]
        lines.append(f"| **final, this checkpoint** | {final['rows']} | {final['engine']} | **{final['score']:.4f}** |")
        lines += ["", "Examples (reference -> generated):"]
        lines += [f"- {ref!r} -> {gen!r}" for ref, gen in final["examples"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    run.resume()
    data = run.data
    print(f"data: {len(data.train)} training rows, {len(data.heldout)} held out ({data.split}); conditioning "
          f"{data.conditioning}; decoder {args.decoder} on {run.device} ({run.dtype}); "
          f"{'LoRA ' + args.lora_modules if run.lora else 'frozen decoder'}")
    log_path = args.run_dir / "log.jsonl"
    smoothed = None
    stop = min(args.steps, args.stop_at or args.steps)
    bar = tqdm(total=args.steps, initial=run.step, desc="train", dynamic_ncols=True)
    with log_path.open("a") as log:
        while run.step < stop:
            if args.max_minutes and run.elapsed() > args.max_minutes * 60 - 90:
                tqdm.write(f"time budget of {args.max_minutes} min reached at step {run.step}")
                break
            if run.step % 10 == 0:
                set_threads(args.threads)
            loss = run.train_step()
            smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.3f}")
            record = {"step": run.step, "loss": round(loss, 4), "lr": run.optimizer.param_groups[0]["lr"],
                      "elapsed_s": round(run.elapsed(), 1)}
            if args.eval_every and run.step % args.eval_every == 0 and run.eval_rows:
                score = run.score()
                record["heldout_score"] = round(score.mean, 4)
                run.history.append({"step": run.step, "score": score.mean, "rows": score.rows,
                                    "engine": score.engine, "loss": smoothed})
                ref, gen = score.examples[0]
                tqdm.write(f"step {run.step}: loss {smoothed:.3f}, held-out {run.judge_name} {score.mean:.3f} "
                           f"(n={score.rows}, {score.engine}); e.g. {ref!r} -> {gen!r}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if run.step % args.save_every == 0:
                run.save()
    bar.close()
    run.save()
    train_minutes = round(run.elapsed() / 60, 1)
    out = write_checkpoint(run, args.out)
    if data.conditioning == ENCODER and args.data == WORDNET:
        shutil.copyfile(args.run_dir / "heldout.txt", out / "heldout.txt")  # evaluate's built-in split
    elif len(data.heldout) and data.heldout.embeddings is not None:
        write_parquet(args.run_dir / "heldout.parquet", data.heldout, data.conditioning)
    final = None
    if args.final_eval_samples and len(data.heldout):
        del run.generator, run.model
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        rows = sample_rows(len(data.heldout), args.final_eval_samples, args.seed + 1)
        final = score_checkpoint(out, data.heldout.embed(rows), [data.heldout.texts[i] for i in rows], run.judge,
                                 str(run.device), run.dtype)
    record = training_record(run, smoothed, train_minutes, final)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (out / CARD_FILE).write_text(model_card(record))
    (args.run_dir / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    print_summary(record, out)
    return record


def training_record(run: Run, final_loss: float | None, train_minutes: float, final: Score | None) -> dict:
    """How the checkpoint was made: data files, columns, steps, scores (training.json and the model card)."""
    args, data = run.args, run.data
    return {
        "name": run.spec.name, "decoder": args.decoder, "prefix_length": args.prefix_length, "template": args.template,
        "lora": None if run.lora is None else {"rank": run.lora.rank, "alpha": run.lora.alpha,
                                                 "dropout": run.lora.dropout, "modules": list(run.lora.modules)},
        "data": {"files": data.files, "conditioning": data.conditioning, "target": "description",
                 "train_rows": len(data.train), "heldout_rows": len(data.heldout), "split": data.split},
        "noise_std": args.noise_std, "max_caption_tokens": args.max_caption_tokens,
        "steps": run.step, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "examples_per_step": args.batch_size * args.grad_accum, "examples_seen": run.step * args.batch_size
        * args.grad_accum, "lr": args.lr, "lora_lr": args.lora_lr if run.lora else None, "warmup": args.warmup,
        "seed": args.seed, "device": str(run.device), "dtype": str(run.dtype).removeprefix("torch."),
        "gradient_checkpointing": args.gradient_checkpointing, "train_minutes": train_minutes,
        "final_loss": None if final_loss is None else round(final_loss, 4), "judge": run.judge_name,
        "scores": {"history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
                               for h in run.history],
                   "final": None if final is None else {"score": round(final.mean, 4), "rows": final.rows,
                                                        "engine": final.engine, "examples": final.examples}},
    }


def print_summary(record: dict, out: Path) -> None:
    """The final summary on stdout."""
    final = record["scores"]["final"]
    print("\n== training summary ==")
    rows = [("checkpoint", out), ("steps", record["steps"]), ("examples seen", record["examples_seen"]),
            ("train minutes", record["train_minutes"]), ("final loss", record["final_loss"]),
            ("held-out score", "-" if final is None else f"{final['score']:.4f} ({record['judge']}, "
                                                         f"{final['rows']} rows, {final['engine']} engine)")]
    for key, value in rows:
        print(f"{key:>16}: {value}")
    for ref, gen in (final or {}).get("examples", [])[:3]:
        print(f"  ref: {ref}\n  gen: {gen}")
    print(f"serve it: make serve CHECKPOINT={out}")
