"""Decoder engines side by side on one device: ms per decode step against the weight-read floor.

    python -m bench.gpu_decoder --shape llama3-8b --out DIR        # a CUDA host, bf16
    python -m bench.gpu_decoder --shape tiny --device cpu --out DIR  # the CPU smoke test

Needs only torch, transformers, tokenizers, safetensors and pydantic: no tritonserver
and no checkpoint. The decoder is built from a config with random weights of a real
shape on the device itself; the prompt comes from a tokenizer folder (SmolLM2's by
default, whose 49,152-token vocabulary every shape uses). Random weights rarely emit
a stop token, so every caption is forced to `--new-tokens` and each engine does the
same work. Each batch size is warmed once before it is timed.

For each engine and batch size it reports: ms per decode step (continuous: the
decode step alone, replayed from its CUDA graph on a GPU; hf: a `generate()` call
divided by its tokens), the time of one request of that many rows, captions/s, and
the engine's start-up (prompt KV + graph capture). With `--candidates 8,16` it adds
best-of-N: a request of `--candidate-rows` rows, each decoded as N sampled candidates
sharing its prefill (continuous engine), with its ms per step and request time
(target for 4 rows x 8 candidates x 32 tokens on the 8B shape: at most 0.30 s; the
reranker's text encoder comes on top and is not part of this benchmark). The floor is the decoder's
weight bytes divided by the card's memory bandwidth. Writes results.json and
results.md (and results.png where matplotlib is installed) into `--out`.

Longer than 250 lines on purpose: it is carried alone to a bare CUDA host (torch and
transformers only), so the model builder, both engines' timing and the report stay in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, tie embeddings)
    "tiny": (64, 128, 2, 4, 2, False),
    "smollm2-135m": (576, 1536, 30, 9, 3, True),
    "llama-0.5b": (1024, 4096, 24, 16, 4, False),
    "llama-1b": (2048, 8192, 16, 32, 8, True),  # Llama-3.2-1B's layers
    "llama3-8b": (4096, 14336, 32, 32, 8, False),
}
BANDWIDTH_TB_S = {"H100": 3.35, "H200": 4.8, "A100": 2.0}  # HBM, per card name


def build_model(shape: str, vocab: int, device: str, dtype):
    """A Llama-family decoder of `shape` with random weights, built on `device` in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, tie = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rope_theta=500_000.0, tie_word_embeddings=tie)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes read per decode step: every weight except the input embedding table (only gathered)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    return total if tied else total - embedding.numel() * embedding.element_size()


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()


def bandwidth(name: str) -> float | None:
    """Bytes/s of the card's memory, where its name is known."""
    for key, tb_s in BANDWIDTH_TB_S.items():
        if key in name:
            return tb_s * 1e12
    return None


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure_engine(name: str, generator, batches: list[int], new_tokens: int, device: str, repeats: int,
                   profile: bool = False, attention_backend: str = "auto") -> dict:
    """Start-up, then per batch size: ms/step, request seconds and captions/s (best of `repeats`)."""
    import numpy as np
    import torch

    from embcap.engines import create_engine

    started = time.perf_counter()
    settings = {"attention_backend": attention_backend} if name == "continuous" else {}
    engine = create_engine(name, generator, slots=max(batches), **settings)
    sync(device)
    result = {"engine": name, "startup_s": time.perf_counter() - started,
              "capture_s": getattr(engine, "capture_seconds", 0.0), "batches": {}}
    rng = np.random.default_rng(0)
    try:
        for batch in batches:
            prefix = rng.standard_normal((batch, generator.spec.prefix_length, generator.hidden_size))
            prefix = (prefix * 0.02).astype(np.float32)
            request_s = best_request_seconds(engine, prefix, batch, device, repeats)
            entry = {"request_s": request_s, "captions_per_s": batch / request_s,
                     "ms_per_step": 1000 * request_s / new_tokens}
            if name == "continuous":
                entry["ms_per_step"] = 1000 * decode_step_seconds(engine, batch, device, steps=new_tokens)
            result["batches"][str(batch)] = entry
            print(f"  {name:>10} batch {batch:>3}: {entry['ms_per_step']:7.2f} ms/step, "
                  f"request {request_s:6.3f} s, {entry['captions_per_s']:8.1f} captions/s", flush=True)
        if profile and name == "continuous":
            result["profile"] = [profile_step(engine, b, device) for b in (min(batches), max(batches))]
            for entry in result["profile"]:
                print(f"  profile batch {entry['batch']}: {entry['kernels']} kernels, {entry['kernel_ms']:.2f} ms "
                      "of kernel time (eager step)")
                for kernel in entry["top"]:
                    print(f"    {kernel['ms']:7.3f} ms {kernel['count']:4d}x {kernel['name']}")
    finally:
        engine.close()
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def best_request_seconds(engine, prefix, captions: int, device: str, repeats: int) -> float:
    """One request of `prefix`'s rows, warmed once at this shape, then timed `repeats` times: the best."""
    from embcap.engines import generate_blocking

    texts = generate_blocking(engine, prefix)
    assert len(texts) == captions and all(t.strip() for t in texts)
    times = []
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        generate_blocking(engine, prefix)
        sync(device)
        times.append(time.perf_counter() - began)
    return min(times)


CANDIDATES_TARGET_S = 0.30  # 4 rows x 8 candidates x 32 tokens, 8B shape on one H100-class GPU


def measure_candidates(generator, counts: list[int], rows: int, new_tokens: int, device: str,
                       repeats: int) -> list[dict]:
    """Per N: one request of `rows` rows x N candidates through the continuous engine (best of `repeats`)."""
    import numpy as np

    from embcap.engines import create_engine

    prefix = (np.random.default_rng(2).standard_normal((rows, generator.spec.prefix_length, generator.hidden_size))
              * 0.02).astype(np.float32)
    results = []
    for count in counts:
        engine = create_engine("continuous", generator, slots=rows, candidates=count)
        try:
            entry = {"candidates": count, "rows": rows, "slots": rows * count,
                     "request_s": best_request_seconds(engine, prefix, rows * count, device, repeats),
                     "ms_per_step": 1000 * decode_step_seconds(engine, rows * count, device, steps=new_tokens)}
        finally:
            engine.close()
        results.append(entry)
        print(f"  candidates {count:>3} x {rows} rows: {entry['ms_per_step']:7.2f} ms/step, "
              f"request {entry['request_s']:6.3f} s", flush=True)
    return results


def decode_step_seconds(engine, batch: int, device: str, steps: int) -> float:
    """The decode step alone over `batch` slots (the captured graph on a GPU), averaged over `steps`."""
    decoder = engine.batch.decoder
    bucket = next(b for b in engine.batch.buckets if b >= batch)
    decoder.decode(bucket)
    sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        decoder.decode(bucket)
    sync(device)
    decoder.positions.zero_()
    return (time.perf_counter() - began) / steps


def profile_step(engine, batch: int, device: str, top: int = 12) -> dict:
    """Kernels of one eager decode step over `batch` slots: count, summed device time, the costliest."""
    from torch.profiler import ProfilerActivity, profile

    decoder = engine.batch.decoder
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    decoder.decode(batch)
    sync(device)
    with profile(activities=activities) as prof:
        decoder._decode(batch)  # eager on purpose: one event per kernel
        sync(device)
    decoder.positions.zero_()
    kernels = [e for e in prof.events() if (e.device_type.name == "CUDA") == (device == "cuda")]
    if device != "cuda":
        kernels = [e for e in kernels if e.name.startswith("aten::") and not e.cpu_children]
    totals: dict[str, list[float]] = {}
    for event in kernels:
        time_us = event.device_time if device == "cuda" else event.cpu_time
        totals.setdefault(event.name[:90], []).append(time_us)
    ranked = sorted(totals.items(), key=lambda item: -sum(item[1]))[:top]
    return {"batch": batch, "kernels": len(kernels), "kernel_ms": sum(sum(v) for v in totals.values()) / 1000,
            "top": [{"name": name, "count": len(v), "ms": sum(v) / 1000} for name, v in ranked]}


def agreement(generator, new_tokens: int, device: str) -> float:
    """Share of 8 rows whose greedy caption is the same from both engines (1.0 expected in fp32)."""
    import numpy as np

    from embcap.engines import create_engine, generate_blocking

    prefix = (np.random.default_rng(1).standard_normal((8, generator.spec.prefix_length, generator.hidden_size))
              * 0.02).astype(np.float32)
    engines = [create_engine(name, generator, slots=8) for name in ("hf", "continuous")]
    try:
        hf, continuous = (generate_blocking(engine, prefix) for engine in engines)
    finally:
        for engine in engines:
            engine.close()
    return sum(a == b for a, b in zip(hf, continuous)) / len(hf)


def render_markdown(report: dict) -> str:
    floor = report["floor_ms"]
    lines = [f"# Decoder engines: {report['shape']} on {report['device_name']} ({report['dtype']})", "",
             f"{report['weight_gb']:.2f} GB of weights read per step; floor "
             f"{'%.2f ms' % floor if floor else 'n/a (unknown bandwidth)'}; {report['new_tokens']} new tokens "
             f"forced; prompt {report['prompt_length']} positions; greedy agreement hf vs continuous "
             f"{report['agreement']:.2f}.", "",
             "| engine | batch | ms/step | x floor | request s | captions/s |", "|---|---:|---:|---:|---:|---:|"]
    for engine in report["engines"]:
        for batch, entry in engine["batches"].items():
            ratio = f"{entry['ms_per_step'] / floor:.2f}" if floor else "n/a"
            lines.append(f"| {engine['engine']} | {batch} | {entry['ms_per_step']:.2f} | {ratio} | "
                         f"{entry['request_s']:.3f} | {entry['captions_per_s']:.1f} |")
    lines += ["", "| engine | start-up s | graph capture s |", "|---|---:|---:|"]
    lines += [f"| {e['engine']} | {e['startup_s']:.2f} | {e['capture_s']:.2f} |" for e in report["engines"]]
    if report.get("candidates"):
        lines += ["", "Best-of-N, continuous engine (each row's candidates share its prefill; the reranker's text "
                      "encoder is not included):", "",
                  "| rows x candidates | slots | ms/step | request s |", "|---|---:|---:|---:|"]
        for entry in report["candidates"]:
            lines.append(f"| {entry['rows']} x {entry['candidates']} | {entry['slots']} | "
                         f"{entry['ms_per_step']:.2f} | {entry['request_s']:.3f} |")
        target = next((e for e in report["candidates"] if e["rows"] == 4 and e["candidates"] == 8), None)
        if target and report["shape"] == "llama3-8b" and report["device"] == "cuda":
            met = "MET" if target["request_s"] <= CANDIDATES_TARGET_S else "MISSED"
            lines += ["", f"4 rows x 8 candidates x {report['new_tokens']} tokens: {target['request_s']:.3f} s "
                          f"(target <= {CANDIDATES_TARGET_S:.2f} s): {met}"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """ms/step per batch size for each engine, with the floor; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for engine in report["engines"]:
        batches = [int(b) for b in engine["batches"]]
        axis.plot(batches, [e["ms_per_step"] for e in engine["batches"].values()], marker="o", label=engine["engine"])
    if report["floor_ms"]:
        axis.axhline(report["floor_ms"], color="grey", linestyle="--", label="weight-read floor")
        axis.axhline(2 * report["floor_ms"], color="grey", linestyle=":", label="2x floor (target)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch (rows decoding together)")
    axis.set_ylabel("ms per decode step")
    axis.set_title(f"{report['shape']} on {report['device_name']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_decoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the de-quantised SmolLM2)")
    parser.add_argument("--engines", default="hf,continuous")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also list the kernels of one decode step")
    parser.add_argument("--candidates", default="8,16",
                        help="best-of-N counts to measure (continuous engine); empty: none")
    parser.add_argument("--candidate-rows", type=int, default=4, help="rows of the best-of-N request")
    parser.add_argument("--attention", default="auto",
                        help="continuous engine's attention kernels to compare (export --attention-backend values), "
                             "e.g. auto,efficient,math")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from embcap.checkpoint import CaptionModelSpec, DecoderSource, GenerationSettings
    from embcap.generation import CaptionGenerator

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        from embcap.decoder_source import smollm2_decoder_dir

        tokenizer_dir = smollm2_decoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = CaptionModelSpec(
        name=f"random-{args.shape}", prefix_length=4, decoder=DecoderSource(path="random"),
        prompt={"template": "Video:\n{prefix}\nCaption:"},
        generation=GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens),
    )
    started = time.perf_counter()
    model = build_model(args.shape, len(tokenizer), args.device, dtype)
    generator = CaptionGenerator(spec, model, tokenizer)
    sync(args.device)
    name = device_name(args.device)
    read_bytes = weight_bytes(model)
    speed = bandwidth(name) if args.device == "cuda" else None
    print(f"{args.shape}: {read_bytes / 1e9:.2f} GB of weights on {name} ({dtype}), built in "
          f"{time.perf_counter() - started:.1f} s; prompt {generator.prompt_length} positions", flush=True)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    report = {
        "shape": args.shape, "device": args.device, "device_name": name, "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "new_tokens": args.new_tokens, "prompt_length": generator.prompt_length,
        "weight_gb": read_bytes / 1e9, "floor_ms": 1000 * read_bytes / speed if speed else None,
        "agreement": agreement(generator, args.new_tokens, args.device),
        "engines": [],
    }
    backends = [b.strip() for b in args.attention.split(",") if b.strip()]
    for engine in engines:
        for backend in backends if engine == "continuous" else ["auto"]:
            result = measure_engine(engine, generator, batches, args.new_tokens, args.device, args.repeats,
                                    args.profile and backend == backends[0], backend)
            if engine == "continuous" and len(backends) > 1:
                result["engine"] = f"continuous[{backend}]"
            report["engines"].append(result)
    counts = [int(c) for c in args.candidates.split(",") if c.strip()]
    if counts:
        report["candidates"] = measure_candidates(generator, counts, args.candidate_rows, args.new_tokens,
                                                  args.device, args.repeats)
    if args.device == "cuda":
        report["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "results.md").write_text(markdown)
    plotted = plot(report, args.out / "results.png")
    print("\n" + markdown)
    print(f"wrote {args.out}/results.json, results.md{', results.png' if plotted else ''}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
