"""Training throughput of a decoder shape with random weights: LoRA against the frozen-decoder baseline.

    python -m training.gpu_bench --shape llama3-8b --batch 16 --steps 20 --tokenizer DIR --out DIR  # CUDA, bf16
    python -m training.gpu_bench --shape tiny --device cpu --batch 4 --steps 2 --tokenizer DIR --out DIR  # smoke

Needs only torch, transformers, tokenizers, safetensors, numpy and peft (no pydantic, no
pyarrow, no checkpoint). The decoder is built from its config with random weights on the
device itself (`tooling.builders.build_model`), in bfloat16 on CUDA and float32 on the CPU.
Each training step is what `python -m training` does: random 1024-d embeddings through the
projector to P prefix vectors inside the prompt (tokenised from the trainer's template),
then `--caption-tokens` random target tokens, cross-entropy on the targets, backward,
gradient clipping and an AdamW step over the projector (and the adapter). Each mode is
warmed for `--warmup` steps, then `--steps` are timed. The frozen decoder (projector only)
is the baseline measured in the same run; the LoRA row reports its ratio to it.
Writes results.json and results.md into `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from embcap.contract import EMBEDDING_DIM
from embcap.projector import Projector
from tooling.builders import SHAPES, build_model
from training.lora import DEFAULT_LORA_MODULES, LoraSettings, add_lora, set_checkpointing

TEMPLATE = ("Video:\n", "\nCaption:")  # the trainer's default prompt around the prefix
LLAMA3_VOCAB = 128_256
MODES = ("frozen", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m training.gpu_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer folder (for the prompt)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="decoder vocabulary (default: 128256 for llama3-8b, else the tokenizer's)")
    parser.add_argument("--modes", default=",".join(MODES), help="frozen (the baseline) and/or lora")
    parser.add_argument("--lora", action="store_true", help="same as the default --modes frozen,lora")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-modules", default=",".join(DEFAULT_LORA_MODULES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prefix-length", type=int, default=2)
    parser.add_argument("--caption-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        parser.error(f"--modes takes {', '.join(MODES)}")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, mode: str, prompt: tuple[list[int], list[int]], vocab: int) -> dict:
    """Build the decoder, train `warmup + steps` steps of `mode`, return the timings."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    model = build_model(args.shape, vocab, str(device), dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if mode == "lora":
        model = add_lora(model, LoraSettings(rank=args.lora_rank, alpha=2 * args.lora_rank,
                                             modules=tuple(args.lora_modules.split(","))), args.seed)
    if args.gradient_checkpointing:
        set_checkpointing(model, True)
    model.config.use_cache = False
    model.train()
    hidden = int(model.config.hidden_size)
    projector = Projector(EMBEDDING_DIM, hidden, args.prefix_length).to(device)
    adapter = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": list(projector.parameters()), "lr": 1e-3}]
    if adapter:
        groups.append({"params": adapter, "lr": 2e-4})
    optimizer = torch.optim.AdamW(groups)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        before = embed(torch.tensor([prompt[0]], device=device)).expand(args.batch, -1, -1)
        after = embed(torch.tensor([prompt[1]], device=device)).expand(args.batch, -1, -1)
    prompt_len = before.shape[1] + args.prefix_length + after.shape[1]
    rng = torch.Generator(device="cpu").manual_seed(args.seed)

    def step() -> float:
        embeddings = torch.randn(args.batch, EMBEDDING_DIM, generator=rng).to(device)
        embeddings = embeddings / embeddings.norm(dim=1, keepdim=True) * 0.7
        targets = torch.randint(0, vocab, (args.batch, args.caption_tokens), generator=rng).to(device)
        prefix = projector(embeddings).to(dtype)
        inputs = torch.cat([before, prefix, after, embed(targets)], dim=1)
        labels = torch.cat([torch.full((args.batch, prompt_len), -100, device=device), targets], dim=1)
        loss = model(inputs_embeds=inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        return loss.item()  # a host sync per step, as the trainer's logging has

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {
        "mode": mode, "steps": args.steps, "seconds": round(seconds, 4),
        "steps_per_s": round(args.steps / seconds, 4),
        "samples_per_s": round(args.steps * args.batch / seconds, 2),
        "tokens_per_s": round(args.steps * args.batch * (prompt_len + args.caption_tokens) / seconds, 1),
        "sequence_length": prompt_len + args.caption_tokens,
        "trainable_params": sum(p.numel() for g in groups for p in g["params"]),
        "decoder_params": sum(p.numel() for p in model.parameters()),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
    }
    model = optimizer = projector = None  # the closure holds them: rebinding frees the memory before empty_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(report: dict) -> str:
    """The results as a table, with each mode's ratio to the frozen baseline."""
    lines = [f"## Training throughput: {report['shape']}, batch {report['batch']}, {report['dtype']}, "
             f"{report['device_name']}", "",
             "| mode | steps/s | samples/s | tokens/s | vs frozen | trainable params | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        ratio = row.get("ratio_to_frozen")
        lines.append(f"| {row['mode']} | {row['steps_per_s']:.3f} | {row['samples_per_s']:.1f} | "
                     f"{row['tokens_per_s']:.0f} | {'n/a' if ratio is None else f'{ratio:.3f}'} | "
                     f"{row['trainable_params']:,} | "
                     f"{row['peak_memory_gib'] if row['peak_memory_gib'] is not None else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = args.vocab or (LLAMA3_VOCAB if args.shape == "llama3-8b" else len(tokenizer))
    vocab = max(vocab, len(tokenizer))
    prompt = tuple(tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEMPLATE)
    device = torch.device(args.device)
    results = [measure(args, mode, prompt, vocab) for mode in args.modes]
    baseline = next((r for r in results if r["mode"] == "frozen"), None)
    for row in results:
        row["ratio_to_frozen"] = round(row["steps_per_s"] / baseline["steps_per_s"], 4) if baseline else None
    report = {
        "shape": args.shape, "batch": args.batch, "prefix_length": args.prefix_length,
        "caption_tokens": args.caption_tokens, "vocab": vocab, "lora_rank": args.lora_rank,
        "lora_modules": args.lora_modules, "gradient_checkpointing": args.gradient_checkpointing,
        "device": str(device), "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__, "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
