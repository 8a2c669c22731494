"""Train the projector in front of a frozen SmolLM2 decoder on caption text embeddings (CapDec-style).

Each step: encode a batch of training captions with `embcap.text_encoder`, add
Gaussian noise, project to prefix vectors, build the same prompt that serving
builds (`CaptionGenerator.prompt_embeddings`), append the caption's token
embeddings plus the end token, and minimise cross-entropy on the caption tokens
only. The decoder is frozen; only the projector learns.

Seeded and resumable: the data order and the noise of step ``i`` depend only on
``(seed, i)``, and ``state.pt`` in the run folder holds projector, optimiser and
step. Run ``python -m training --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from embcap.builders import SMOLLM2, smollm2_decoder_dir
from embcap.checkpoint import CaptionModelSpec, GenerationSettings, PromptTemplate, save_spec
from embcap.generation import CaptionGenerator
from embcap.projector import Projector, save_projector, seeded_projector
from embcap.text_encoder import encode_captions, encode_minilm
from training.corpus import Caption, build_corpus, read_captions, write_captions

DEFAULT_TEMPLATE = "Video:\n{prefix}\nCaption:"
END_TOKEN = "<|im_end|>"


def make_spec(prefix_length: int, max_new_tokens: int, template: str = DEFAULT_TEMPLATE) -> CaptionModelSpec:
    """The caption_model.json of the trained model (greedy, deterministic decoding)."""
    return CaptionModelSpec(
        name="smollm2-135m-capdec-minilm",
        prefix_length=prefix_length,
        decoder=SMOLLM2,
        prompt=PromptTemplate(template=template),
        generation=GenerationSettings(max_new_tokens=max_new_tokens, min_new_tokens=1, stop_tokens=(END_TOKEN,)),
    )


def caption_ids(tokenizer, captions: list[str], end_id: int, max_tokens: int) -> list[list[int]]:
    """Token ids of " caption" (leading space, as it follows "Caption:") plus the end token."""
    encoded = tokenizer([" " + c for c in captions], add_special_tokens=False)["input_ids"]
    return [ids[: max_tokens - 1] + [end_id] for ids in encoded]


def batch_loss(
    generator: CaptionGenerator, projector: Projector, embeddings: torch.Tensor, targets: list[list[int]]
) -> torch.Tensor:
    """Teacher-forced cross-entropy over caption tokens given the conditioning embeddings."""
    prompt = generator.prompt_embeddings(projector(embeddings))
    batch, prompt_len = prompt.shape[:2]
    width = max(len(t) for t in targets)
    ids = torch.full((batch, width), generator.pad_id, dtype=torch.long)
    labels = torch.full((batch, prompt_len + width), -100, dtype=torch.long)
    mask = torch.zeros((batch, prompt_len + width), dtype=torch.long)
    for row, target in enumerate(targets):
        ids[row, : len(target)] = torch.tensor(target)
        labels[row, prompt_len : prompt_len + len(target)] = torch.tensor(target)
        mask[row, : prompt_len + len(target)] = 1
    token_embeds = generator.model.get_input_embeddings()(ids)
    out = generator.model(inputs_embeds=torch.cat([prompt, token_embeds], dim=1), attention_mask=mask, labels=labels)
    return out.loss


def noisy(embeddings: np.ndarray, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, std^2) per dimension (CapDec noise) to the conditioning embeddings."""
    tensor = torch.from_numpy(embeddings)
    if std > 0:
        tensor = tensor + std * torch.randn(tensor.shape, generator=generator)
    return tensor


@torch.no_grad()
def heldout_score(
    generator: CaptionGenerator, projector: Projector, captions: list[str], batch_size: int = 16
) -> tuple[float, list[tuple[str, str]]]:
    """Mean MiniLM cosine between generated and reference captions (serving's own generate())."""
    projector.eval()
    generated: list[str] = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        prefix = projector(torch.from_numpy(encode_captions(chunk)))
        generated.extend(generator.generate(prefix))
    projector.train()
    ref, gen = encode_minilm(captions), encode_minilm(generated)
    return float(np.mean(np.sum(ref * gen, axis=1))), list(zip(captions, generated))


def learning_rate(step: int, total: int, peak: float, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up then cosine decay to 10% of the peak.

    The decay follows whichever is further along: steps out of `total`, or `time_fraction` of the
    wall-time budget, so that a run cut short by --max-minutes still ends annealed.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def export_checkpoint(run: Path, out: Path, spec: CaptionModelSpec, projector: Projector) -> None:
    """Write caption_model.json + projector.safetensors into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_projector(projector, out / spec.projector)
    save_spec(out, spec)


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
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path(".cache/train_run"), help="state, logs, corpus")
    parser.add_argument("--export", type=Path, default=None, help="write the final checkpoint here too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--noise-std", type=float, default=0.01, help="per-dimension std of N(0, s^2) noise")
    parser.add_argument("--prefix-length", type=int, default=4)
    parser.add_argument("--max-caption-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation limit in caption_model.json")
    parser.add_argument("--max-train", type=int, default=80000, help="training captions in the corpus")
    parser.add_argument("--heldout-size", type=int, default=1000)
    parser.add_argument("--stop-at", type=int, default=None, help="stop at this step (schedule still spans --steps)")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (and export) once the run's total wall time, resumes included, passes this")
    parser.add_argument("--threads", default="auto",
                        help="torch threads, or 'auto': all cores when the machine is idle, 1 when it is busy")
    return parser.parse_args(argv)


def load_or_build_corpus(args: argparse.Namespace) -> tuple[list[Caption], list[Caption]]:
    """The run's corpus files (built once, deterministic for the seed)."""
    train_path, held_path = args.run_dir / "train.txt", args.run_dir / "heldout.txt"
    if not (train_path.is_file() and held_path.is_file()):
        corpus = build_corpus(seed=args.seed, heldout_size=args.heldout_size, max_train=args.max_train)
        write_captions(corpus.train, train_path)
        write_captions(corpus.heldout, held_path)
    return read_captions(train_path), read_captions(held_path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    train, heldout = load_or_build_corpus(args)
    spec = make_spec(args.prefix_length, args.max_new_tokens)
    generator = CaptionGenerator.load(spec, smollm2_decoder_dir())
    for parameter in generator.model.parameters():
        parameter.requires_grad_(False)
    end_id = generator.tokenizer.convert_tokens_to_ids(END_TOKEN)
    projector = seeded_projector(spec.embedding_dim, generator.hidden_size, spec.prefix_length, args.seed)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.01)
    state_path, log_path = args.run_dir / "state.pt", args.run_dir / "log.jsonl"
    step, elapsed_before, history = 0, 0.0, []
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before, history = state["step"], state["elapsed"], state["history"]
        print(f"resumed from {state_path} at step {step}")
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    eval_refs = [c.text for c in heldout[: args.eval_samples]]
    projector.train()

    def save() -> None:
        elapsed = elapsed_before + time.monotonic() - started
        torch.save({"projector": projector.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "elapsed": elapsed, "history": history, "args": vars(args) | {"run_dir": str(args.run_dir),
                    "export": str(args.export)}}, state_path.with_suffix(".tmp"))
        os.replace(state_path.with_suffix(".tmp"), state_path)

    smoothed = None
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    with log_path.open("a") as log:
        while step < min(args.steps, args.stop_at or args.steps):
            if args.max_minutes and elapsed_before + time.monotonic() - started > args.max_minutes * 60 - 90:
                print(f"time budget of {args.max_minutes} min reached at step {step}")
                break
            if step % 10 == 0:
                set_threads(args.threads)
            start = (step * args.batch_size) % len(order)
            indices = [order[(start + i) % len(order)] for i in range(args.batch_size)]
            texts = [train[i].text for i in indices]
            noise_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            embeddings = noisy(encode_captions(texts), args.noise_std, noise_rng)
            targets = caption_ids(generator.tokenizer, texts, end_id, args.max_caption_tokens)
            elapsed = elapsed_before + time.monotonic() - started
            time_fraction = elapsed / (args.max_minutes * 60) if args.max_minutes else 0.0
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup, time_fraction)
            loss = batch_loss(generator, projector, embeddings, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
            optimizer.step()
            step += 1
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.3f}")
            record = {"step": step, "loss": round(loss.item(), 4), "lr": optimizer.param_groups[0]["lr"],
                      "threads": torch.get_num_threads(),
                      "elapsed_s": round(elapsed_before + time.monotonic() - started, 1)}
            if step % args.eval_every == 0:
                score, pairs = heldout_score(generator, projector, eval_refs)
                record["heldout_cosine"] = round(score, 4)
                history.append({"step": step, "heldout_cosine": score, "loss": smoothed})
                tqdm.write(f"step {step}: loss {smoothed:.3f}, held-out MiniLM cosine {score:.3f} "
                           f"(n={len(eval_refs)}); e.g. {pairs[0][0]!r} -> {pairs[0][1]!r}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % args.save_every == 0:
                save()
    bar.close()
    save()
    score, pairs = heldout_score(generator, projector, eval_refs)
    elapsed = elapsed_before + time.monotonic() - started
    report = {
        "steps": step, "batch_size": args.batch_size, "examples_seen": step * args.batch_size,
        "train_captions": len(train), "heldout_captions": len(heldout), "noise_std": args.noise_std,
        "lr": args.lr, "prefix_length": args.prefix_length, "seed": args.seed,
        "train_minutes": round(elapsed / 60, 1), "final_loss": smoothed,
        "heldout_cosine_sample": score, "eval_samples": len(eval_refs), "history": history,
        "examples": pairs[:5],
    }
    save_projector(projector, args.run_dir / "projector.safetensors")
    save_spec(args.run_dir, spec)
    if args.export:
        export_checkpoint(args.run_dir, args.export, spec, projector)
        write_captions(heldout, args.export / "heldout.txt")
    (args.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n== training report ==")
    for key in ("steps", "examples_seen", "train_minutes", "final_loss", "heldout_cosine_sample"):
        print(f"{key:>24}: {report[key]}")
    for ref, gen in report["examples"]:
        print(f"  ref: {ref}\n  gen: {gen}")
    return report
