"""Decoder engines side by side on one device: ms per decode step against the weight-read floor.

    python -m bench.gpu_decoder --shape llama3-8b --out DIR        # a CUDA host, bf16 and FP8
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
the engine's start-up (prompt KV + graph capture). With `--fp8 static,dynamic` (the default) the
continuous engine runs again over the same weights with FP8 projections (embcap.fp8), each against
its own weight-read floor and as a ratio to the unquantised step of the same run; static scales are
calibrated from other rows of the benchmark's own inputs (random weights have no held-out split), and
the time to calibrate and quantise is reported beside the start-up. On the CPU the FP8 GEMMs run
through torch's CPU `_scaled_mm` (numerics only: serving FP8 there is refused at export). Agreement
of FP8 with the unquantised decoder is measured on real weights too: the default checkpoint's
SmolLM2 and projector on its held-out rows (`--agreement-checkpoint`; tooling.fp8_agreement), where its
decoder folder is on disk. With `--candidates 8,16` it adds
best-of-N: a request of `--candidate-rows` rows, each decoded as N sampled candidates
sharing its prefill (continuous engine), with its ms per step and request time
(target for 4 rows x 8 candidates x 32 tokens on the 8B shape: at most 0.30 s; the
reranker's text encoder comes on top and is not part of this benchmark). The floor is the decoder's
weight bytes divided by the card's memory bandwidth (for FP8: its e4m3 projections, bf16 norms and
head). Targets for FP8 on the 8B shape: at most 3.3 ms per step at batch <= 16 and 4.0 ms at 64.
Writes results.json and
results.md (and results.png where matplotlib is installed) into `--out`.

Longer than 250 lines on purpose: it is the one command run on a bare CUDA host (torch and
transformers beside the repository), so both engines' timing, FP8, best-of-N and the report stay in one file;
the model builder is tooling.builders'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from tooling.builders import SHAPES, build_model

BANDWIDTH_TB_S = {"H100": 3.35, "H200": 4.8, "A100": 2.0}  # HBM, per card name
FP8_TARGET_MS = ((16, 3.3), (64, 4.0))  # 8B shape: ms per step at batch <= 16 and at batch 64
ROOT = Path(__file__).resolve().parent.parent


def fp8_generator(generator, mode: str, device: str, rows: int = 16):
    """The same weights with FP8 projections (`mode` static or dynamic): a second lean copy of the model,
    quantised in place; static scales calibrated on `rows` rows of the benchmark's inputs. Returns the
    generator and the seconds calibration and quantisation took."""
    from embcap.fp8_calibration import calibrate
    from embcap.generation import CaptionGenerator
    from embcap.lean_llama import LeanLlama

    sync(device)
    started = time.perf_counter()
    scales = calibrate(generator, random_prefix(generator, rows, seed=7)) if mode == "static" else None
    lean = LeanLlama.from_hf(generator.model).quantise_fp8(scales)
    sync(device)
    return CaptionGenerator(generator.spec, lean, generator.tokenizer), time.perf_counter() - started


def random_prefix(generator, rows: int, seed: int):
    """[rows, P, H] prefix vectors of the benchmark's inputs (standard normal x 0.02)."""
    import numpy as np

    shape = (rows, generator.spec.prefix_length, generator.hidden_size)
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)


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
                   profile: bool = False, attention_backend: str = "auto", label: str | None = None,
                   bandwidth_b_s: float | None = None, inputs=random_prefix) -> dict:
    """Start-up, then per batch size: ms/step, request seconds and captions/s (best of `repeats`), mean caption
    tokens; the weight bytes a step reads and their floor at `bandwidth_b_s`. `inputs(generator, rows, seed)`
    gives each batch's prefix vectors."""
    import torch

    from embcap.engines import create_engine

    started = time.perf_counter()
    settings = {"attention_backend": attention_backend} if name == "continuous" else {}
    engine = create_engine(name, generator, slots=max(batches), **settings)
    sync(device)
    read_bytes = generator.lean.weight_bytes()
    label = label or name
    result = {"engine": label, "startup_s": time.perf_counter() - started,
              "capture_s": getattr(engine, "capture_seconds", 0.0), "weight_gb": read_bytes / 1e9,
              "floor_ms": 1000 * read_bytes / bandwidth_b_s if bandwidth_b_s else None, "batches": {}}
    try:
        for index, batch in enumerate(batches):
            request_s, texts = best_request_seconds(engine, inputs(generator, batch, 100 + index), batch, device,
                                                    repeats)
            tokens = [len(generator.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
            entry = {"request_s": request_s, "captions_per_s": batch / request_s, "repeats": repeats,
                     "ms_per_step": 1000 * request_s / new_tokens, "mean_caption_tokens": sum(tokens) / batch}
            if name == "continuous":
                entry["ms_per_step"] = 1000 * decode_step_seconds(engine, batch, device, steps=new_tokens)
            result["batches"][str(batch)] = entry
            print(f"  {label:>24} batch {batch:>3}: {entry['ms_per_step']:7.2f} ms/step, "
                  f"request {request_s:6.3f} s, {entry['captions_per_s']:8.1f} captions/s", flush=True)
        if name == "continuous":
            result["ops_per_step"] = step_ops(engine, max(batches))
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


def best_request_seconds(engine, prefix, captions: int, device: str, repeats: int) -> tuple[float, list[str]]:
    """One request of `prefix`'s rows, warmed once at this shape, then timed `repeats` times: the best, and the
    warm-up's captions."""
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
    return min(times), texts


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
                     "request_s": best_request_seconds(engine, prefix, rows * count, device, repeats)[0],
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


def step_ops(engine, batch: int) -> int:
    """Operations one eager decode step over `batch` slots issues that compute something (views and
    allocations not counted): on a GPU about one kernel each, whatever device counts them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns
            view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
            if not view and func.__name__.split(".")[0] not in ("empty", "empty_strided", "empty_like"):
                self.ops += 1
            return func(*args, **(kwargs or {}))

    decoder = engine.batch.decoder
    with Count() as count:
        decoder._decode(batch)  # eager on purpose: each operation once
    decoder.positions.zero_()
    return count.ops


def agreement(generator, fp8_generators: dict, device: str) -> tuple[float, dict[str, float]]:
    """Shares of 8 rows whose greedy caption is the same: hf vs continuous (1.0 expected in fp32), and each
    FP8 variant's continuous engine vs the unquantised one."""
    from embcap.engines import create_engine, generate_blocking

    prefix = random_prefix(generator, 8, seed=1)

    def captions(name: str, over) -> list[str]:
        engine = create_engine(name, over, slots=8)
        try:
            return generate_blocking(engine, prefix)
        finally:
            engine.close()

    continuous = captions("continuous", generator)

    def share(texts: list[str]) -> float:
        return sum(a == b for a, b in zip(texts, continuous)) / len(continuous)

    return share(captions("hf", generator)), {mode: share(captions("continuous", g))
                                              for mode, g in fp8_generators.items()}


def real_weights_agreement(folder: str, device: str, dtype, modes: list[str], rows: int) -> dict:
    """FP8 against the unquantised decoder on a checkpoint's real weights and held-out rows (tooling.fp8_agreement),
    or why it was not measured."""
    if folder == "none" or not modes:
        return {"skipped": "not asked for"}
    from embcap.checkpoint import CheckpointError
    from embcap.loading import resolve_checkpoint

    from tooling.fp8_agreement import greedy_agreement

    try:
        resolved = resolve_checkpoint(folder)
    except (CheckpointError, OSError, ImportError) as exc:  # no decoder on this host (a bare GPU box)
        return {"skipped": f"{folder}: {exc}"}
    result = greedy_agreement(resolved, device, dtype, modes, rows)
    for mode in modes:
        print(f"  real weights ({resolved.spec.name}), FP8 {mode}: identical greedy captions "
              f"{result[mode]['identical_captions']:.2f}, teacher-forced top-1 {result[mode]['top1_agreement']:.3f}, "
              f"KL {result[mode]['kl']:.4f}", flush=True)
    return result


def render_markdown(report: dict) -> str:
    floor = report["floor_ms"]
    lines = [f"# Decoder engines: {report['shape']} on {report['device_name']} ({report['dtype']})", "",
             f"{report['weight_gb']:.2f} GB of weights read per step; floor "
             f"{'%.2f ms' % floor if floor else 'n/a (unknown bandwidth)'}; {report['new_tokens']} new tokens "
             + ("at most (the checkpoint's own weights)" if report.get("checkpoint") else "forced")
             + f"; prompt {report['prompt_length']} positions"
             + ("" if report["agreement"] is None else f"; greedy agreement hf vs continuous {report['agreement']:.2f}"
                + "".join(f", FP8 {mode} vs continuous {share:.2f}" for mode, share in report["fp8_agreement"].items())
                + " (random weights: near-uniform logits flip on any rounding)") + "."]
    if report["device"] == "cpu" and report.get("fp8"):
        lines += ["", "On the CPU the FP8 GEMMs run through torch's CPU `_scaled_mm` (numerics, not speed)."]
    baseline = next((e for e in report["engines"] if e["engine"] == "continuous"), None)
    lines += ["", "| engine | batch | ms/step | floor ms | x floor | x continuous | request s | captions/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for engine in report["engines"]:
        own = engine.get("floor_ms")
        for batch, entry in engine["batches"].items():
            ratio = f"{entry['ms_per_step'] / own:.2f}" if own else "n/a"
            versus = (f"{entry['ms_per_step'] / baseline['batches'][batch]['ms_per_step']:.2f}"
                      if baseline and batch in baseline["batches"] else "n/a")
            lines.append(f"| {engine['engine']} | {batch} | {entry['ms_per_step']:.2f} | "
                         f"{'%.2f' % own if own else 'n/a'} | {ratio} | {versus} | {entry['request_s']:.3f} | "
                         f"{entry['captions_per_s']:.1f} |")
    lines += ["", "| engine | weights GB per step | ops per step | FP8 calibration + quantisation s | start-up s | "
                  "graph capture s |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {e['engine']} | {e['weight_gb']:.2f} | {e.get('ops_per_step', '-')} | "
              f"{'%.2f' % e['prepare_s'] if 'prepare_s' in e else '-'} | {e['startup_s']:.2f} | {e['capture_s']:.2f} |"
              for e in report["engines"]]
    if report["shape"] == "llama3-8b" and report["device"] == "cuda":
        verdicts = []
        for engine in (e for e in report["engines"] if "fp8" in e["engine"]):
            for batch, entry in engine["batches"].items():
                target = next((ms for limit, ms in FP8_TARGET_MS if int(batch) <= limit), None)
                if target is not None:
                    met = "MET" if entry["ms_per_step"] <= target else "MISSED"
                    verdicts.append(f"- FP8 target, {engine['engine']} batch {batch}: {entry['ms_per_step']:.2f} ms "
                                    f"(<= {target} ms): {met}")
        lines += ["", *verdicts] if verdicts else []
    real = report.get("real_weights_agreement")
    if real and "skipped" in real:
        lines += ["", f"FP8 agreement on real weights: not measured ({real['skipped']})."]
    elif real:
        lines += ["", f"FP8 against the unquantised decoder on real weights ({real['checkpoint']}, {real['rows']} "
                      "held-out rows, greedy):", "",
                  "| FP8 input scales | identical captions | teacher-forced top-1 | KL |", "|---|---:|---:|---:|"]
        lines += [f"| {mode} | {real[mode]['identical_captions']:.2f} | {real[mode]['top1_agreement']:.3f} | "
                  f"{real[mode]['kl']:.4f} |" for mode in report.get("fp8", []) if mode in real]
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
    """ms/step per batch size for each engine, with each weight format's floor; False without matplotlib."""
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
    floors = sorted({round(e["floor_ms"], 3) for e in report["engines"] if e.get("floor_ms")}, reverse=True)
    for floor, style in zip(floors, ("--", "-.", ":")):
        axis.axhline(floor, color="grey", linestyle=style, label=f"weight-read floor {floor:.2f} ms")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch (rows decoding together)")
    axis.set_ylabel("ms per decode step")
    axis.set_title(f"{report['shape']} on {report['device_name']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    def names(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    def numbers(text: str) -> list[int]:
        return [int(part) for part in names(text)]

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.gpu_decoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--checkpoint", type=Path, help="time this checkpoint's decoder instead, on its projector's "
                        "prefixes of standard-normal rows (`python -m bench run`'s offline limit)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the de-quantised SmolLM2)")
    parser.add_argument("--engines", type=names, default="hf,continuous")
    parser.add_argument("--fp8", type=names, default="static,dynamic",
                        help="FP8 input scalings to run the continuous engine with beside the unquantised one "
                             "(export --fp8 values); empty: none")
    parser.add_argument("--agreement-checkpoint", default=str(ROOT / "models" / "default"),
                        help="checkpoint whose real decoder and held-out rows measure FP8's agreement with the "
                             "unquantised decoder (skipped where its decoder is not on disk); none: skip")
    parser.add_argument("--agreement-rows", type=int, default=32)
    parser.add_argument("--batches", type=numbers, default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=32, help="forced caption length (random weights)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also list the kernels of one decode step")
    parser.add_argument("--candidates", type=numbers, default="8,16",
                        help="best-of-N counts to measure (continuous engine); empty: none")
    parser.add_argument("--candidate-rows", type=int, default=4, help="rows of the best-of-N request")
    parser.add_argument("--attention", type=names, default="auto",
                        help="continuous engine's attention kernels to compare (export --attention-backend values), "
                             "e.g. auto,efficient,math")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from embcap.contract import FP8_MODES

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here", file=sys.stderr)
        return 2
    modes = args.fp8
    if set(modes) - set(FP8_MODES[1:]):
        parser.error(f"--fp8 takes {','.join(FP8_MODES[1:])}, not {','.join(modes)!r}")
    if modes and args.device == "cuda":
        from embcap.fp8 import serving_problem

        problem = serving_problem("cuda")
        if problem:
            print(f"FP8 not measured: {problem}", file=sys.stderr)
            modes = []
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    inputs = random_prefix
    if args.checkpoint:
        from embcap.loading import resolve_checkpoint
        from tooling.fp8_agreement import prefix_of

        resolved = resolve_checkpoint(args.checkpoint)
        torch.manual_seed(resolved.spec.generation.seed)
        generator = resolved.load_generator(args.device, dtype)
        shape, spec, new_tokens = resolved.spec.name, resolved.spec, resolved.spec.generation.max_new_tokens

        def inputs(_, rows: int, seed: int):
            embeddings = np.random.default_rng(seed).standard_normal((rows, spec.embedding_dim), dtype=np.float32)
            return prefix_of(resolved, embeddings)
    else:
        from transformers import AutoTokenizer

        from embcap.checkpoint import CaptionModelSpec, DecoderSource, GenerationSettings
        from embcap.decoder_source import smollm2_decoder_dir
        from embcap.generation import CaptionGenerator

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or smollm2_decoder_dir())
        shape, new_tokens = args.shape, args.new_tokens
        spec = CaptionModelSpec(
            name=f"random-{shape}", prefix_length=4, decoder=DecoderSource(path="random"),
            prompt={"template": "Video:\n{prefix}\nCaption:"},
            generation=GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
        )
        generator = CaptionGenerator(spec, build_model(shape, len(tokenizer), args.device, dtype), tokenizer)
    sync(args.device)
    name = device_name(args.device)
    read_bytes = generator.lean.weight_bytes()
    speed = bandwidth(name) if args.device == "cuda" else None
    print(f"{shape}: {read_bytes / 1e9:.2f} GB of weights on {name} ({dtype}), built in "
          f"{time.perf_counter() - started:.1f} s; prompt {generator.prompt_length} positions", flush=True)
    fp8_generators, prepare_s = {}, {}
    for mode in modes:
        fp8_generators[mode], prepare_s[mode] = fp8_generator(generator, mode, args.device)
        print(f"FP8 {mode}: {fp8_generators[mode].lean.weight_bytes() / 1e9:.2f} GB of weights, calibrated and "
              f"quantised in {prepare_s[mode]:.1f} s", flush=True)
    engines, batches, backends = args.engines, args.batches, args.attention
    hf_agreement, fp8_agreement = (agreement(generator, fp8_generators, args.device)
                                   if {"hf", "continuous"} <= set(engines) else (None, {}))
    report = {
        "shape": shape, "checkpoint": args.checkpoint and str(args.checkpoint), "device": args.device,
        "device_name": name, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "new_tokens": new_tokens, "generation": spec.generation.model_dump(mode="json"),
        "prompt_length": generator.prompt_length, "weight_gb": read_bytes / 1e9,
        "floor_ms": 1000 * read_bytes / speed if speed else None, "agreement": hf_agreement, "fp8": modes,
        "fp8_agreement": fp8_agreement, "engines": [],
    }
    for engine in engines:
        for backend in backends if engine == "continuous" else ["auto"]:
            label = f"continuous[{backend}]" if engine == "continuous" and len(backends) > 1 else engine
            report["engines"].append(measure_engine(engine, generator, batches, new_tokens, args.device,
                                                    args.repeats, args.profile and backend == backends[0], backend,
                                                    label, speed, inputs))
        if engine == "continuous":
            for mode, fp8_model in fp8_generators.items():
                result = measure_engine(engine, fp8_model, batches, new_tokens, args.device, args.repeats,
                                        args.profile, backends[0], f"continuous fp8 {mode}", speed, inputs)
                report["engines"].append({**result, "prepare_s": prepare_s[mode]})
    if args.candidates:
        report["candidates"] = measure_candidates(generator, args.candidates, args.candidate_rows, new_tokens,
                                                  args.device, args.repeats)
    del fp8_generators
    report["real_weights_agreement"] = real_weights_agreement(args.agreement_checkpoint, args.device, dtype, modes,
                                                              args.agreement_rows)
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
