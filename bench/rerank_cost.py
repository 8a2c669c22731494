"""`python -m bench.rerank_cost`: what reranking with ImageBind's text tower costs per 4-row request.

A tower of imagebind_huge's text shape (width 1024, 24 blocks, 16 heads, 49,408 tokens, 77 positions ->
1024; ~354M parameters, 1.4 GB in fp32) gets random weights and is written as a tower folder (cached under
$EMBCAP_CACHE_DIR/bench/towers). The reranker's own code (embcap.rerank.Reranker over
embcap.imagebind_encoder, as the Triton reranker runs it) then picks among N = 2, 4, 8, 16 distinct
candidates for each row of 4-row requests (held-out captions of the default model), at each thread count;
the default model's encoder (MiniLM lifted to 1024-d) is timed on the same requests as the baseline.
Random weights cost what trained ones cost: the work depends on the shapes and the caption lengths only.

Prints a table and an H100 estimate (not a measurement: FLOPs at a stated efficiency, weight reads at the
memory bandwidth, kernel launches), and writes results.json, results.md and plot.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, pyplot, save, table
from embcap.clip_bpe import installed_bpe_file
from embcap.imagebind_encoder import PIECES_PER_BATCH, ImageBindTextEncoder
from embcap.imagebind_tower import TextTower, save_tower
from embcap.inputs import realistic_embeddings
from embcap.rerank import Reranker
from embcap.tower_folder import BPE_FILE, TowerConfig, is_tower_folder
from runtime.local import ROOT
from tooling.stats import t95

SHAPES = {"huge": dict(width=1024, layers=24, heads=16, mlp_width=4096),  # imagebind_huge's text tower
          "tiny": dict(width=64, layers=2, heads=2, mlp_width=256)}
ROWS = 4  # the evaluator's rows per request
H100 = {"fp32_tflops": 67.0, "efficiency": 0.5, "bandwidth_tbs": 3.35, "launch_us": 5.0, "kernels_per_block": 14}


def tower_folder(shape: str, cache: Path) -> Path:
    """A random-weight tower folder of `shape` (built once, then reused)."""
    folder = cache / "bench" / "towers" / shape
    if is_tower_folder(folder):
        return folder
    bpe = installed_bpe_file()
    if bpe is None:
        raise SystemExit(f"{BPE_FILE} not found: install the test extras (make setup) or an ImageBind package")
    dims = SHAPES[shape]
    with torch.device("meta"):  # counts the parameters without allocating them
        probe = TextTower(TowerConfig(**dims, vocab_size=49408, output_dim=1024, parameters=1))
    config = TowerConfig(**dims, vocab_size=49408, output_dim=1024,
                         parameters=sum(p.numel() for p in probe.parameters()))
    tower = TextTower(config)
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.normal_(0, 0.02)
    save_tower(tower, folder)
    (folder / BPE_FILE).write_bytes(bpe.read_bytes())
    return folder


def requests(captions: list[str], count: int, repeats: int) -> list[list[list[str]]]:
    """`repeats` requests of ROWS rows, each row `count` distinct captions (no two requests share one)."""
    need = repeats * ROWS * count
    pool = (captions * (need // len(captions) + 1))[:need]
    return [[pool[(r * ROWS + row) * count:(r * ROWS + row + 1) * count] for row in range(ROWS)]
            for r in range(repeats)]


def tokens_run(encoder: ImageBindTextEncoder, request: list[list[str]]) -> int:
    """Token positions the tower runs for one request (its length-sorted batches, each to its longest piece)."""
    pieces = [piece for row in request for text in sorted(set(row)) for piece in encoder.pieces(text)]
    lengths = np.sort(encoder.bpe.batch(pieces).argmax(axis=1) + 1)
    return int(sum(len(chunk) * chunk.max() for chunk in np.array_split(
        lengths, max(1, -(-len(lengths) // PIECES_PER_BATCH)))))


def time_requests(reranker: Reranker, batch: list[list[list[str]]], seed: int) -> list[float]:
    embeddings = realistic_embeddings(ROWS, seed=seed)
    reranker.choose(embeddings, batch[0])  # warm-up: first-call allocations
    seconds = []
    for request in batch[1:]:
        started = time.perf_counter()
        reranker.choose(embeddings, request)
        seconds.append(time.perf_counter() - started)
    return seconds


def summary(seconds: list[float]) -> dict:
    mean = statistics.fmean(seconds)
    half = t95(len(seconds) - 1) * statistics.stdev(seconds) / len(seconds) ** 0.5 if len(seconds) > 1 else None
    return {"mean_ms": 1e3 * mean, "ci_ms": None if half is None else 1e3 * half,
            "median_ms": 1e3 * statistics.median(seconds), "n": len(seconds)}


def h100_estimate_ms(config: TowerConfig, tokens: int, forwards: int) -> float:
    """FLOPs at H100's fp32 rate and stated efficiency, plus weight reads and kernel launches per forward."""
    block_params = config.layers * (4 * config.width ** 2 + 2 * config.width * config.mlp_width)
    flops = 2 * block_params * tokens
    compute = flops / (H100["fp32_tflops"] * 1e12 * H100["efficiency"])
    reads = forwards * 4 * block_params / (H100["bandwidth_tbs"] * 1e12)
    launches = forwards * config.layers * H100["kernels_per_block"] * H100["launch_us"] * 1e-6
    return 1e3 * (max(compute, reads) + launches)


def run(shape: str, counts: list[int], threads: list[int], repeats: int, out: Path, cache: Path) -> dict:
    from embcap.candidate_encoders import SentenceTransformerTextEncoder, package_model_folder
    from embcap.text_encoder import LIFT_SEED, MINILM_PACKAGE

    captions = [line for line in (ROOT / "models" / "default" / "heldout.txt").read_text().splitlines() if line]
    folder = tower_folder(shape, cache)
    tower = ImageBindTextEncoder(folder)
    minilm = SentenceTransformerTextEncoder(package_model_folder(MINILM_PACKAGE), 1024, LIFT_SEED)
    rows = []
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        for count in counts:
            batch = requests(captions, count, repeats + 1)
            row = {"threads": thread_count, "candidates": count, "texts": ROWS * count,
                   "tower": summary(time_requests(Reranker(tower), batch, count)),
                   "minilm": summary(time_requests(Reranker(minilm), batch, count))}
            tokens = statistics.fmean(tokens_run(tower, request) for request in batch)
            forwards = -(-ROWS * count // PIECES_PER_BATCH)
            row.update(tokens=tokens, h100_ms=h100_estimate_ms(tower.tower.config, tokens, forwards))
            rows.append(row)
            print(f"threads {thread_count}, N={count:>2}: tower {row['tower']['mean_ms']:8.1f} ms, "
                  f"MiniLM {row['minilm']['mean_ms']:6.1f} ms per {ROWS}-row request", flush=True)
    results = {"shape": shape, "config": tower.tower.config.model_dump(exclude={"source"}), "rows": rows,
               "h100_assumptions": H100, "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "plot.png")
    return results


def markdown(results: dict) -> str:
    config = results["config"]
    lines = [f"# Reranking cost: ImageBind text tower ({results['shape']}: width {config['width']}, "
             f"{config['layers']} blocks, {config['parameters'] / 1e6:.0f}M parameters) vs MiniLM", "",
             f"Per {ROWS}-row request, the reranker's own code on this CPU (mean [95% CI] of the timed requests); "
             "H100: an estimate, not a measurement.", "",
             *table("threads", "N", "captions", "tower ms", "MiniLM ms", "tower / MiniLM", "tokens run",
                    "H100 est. ms")]
    for row in results["rows"]:
        tower, minilm = row["tower"], row["minilm"]
        ci = f" [±{tower['ci_ms']:.0f}]" if tower["ci_ms"] is not None else ""
        lines.append(f"| {row['threads']} | {row['candidates']} | {row['texts']} | {tower['mean_ms']:.0f}{ci} | "
                     f"{minilm['mean_ms']:.1f} | {tower['mean_ms'] / minilm['mean_ms']:.1f}x | {row['tokens']:.0f} | "
                     f"{row['h100_ms']:.1f} |")
    h100 = results["h100_assumptions"]
    lines += ["", f"H100 estimate: max(FLOPs / ({h100['fp32_tflops']} TFLOPS fp32 x {h100['efficiency']}), weight "
                  f"reads / {h100['bandwidth_tbs']} TB/s) + {h100['kernels_per_block']} kernels per block x "
                  f"{h100['launch_us']} us, per forward of at most {PIECES_PER_BATCH} pieces.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for thread_count in sorted({row["threads"] for row in results["rows"]}):
        rows = [row for row in results["rows"] if row["threads"] == thread_count]
        counts = [row["candidates"] for row in rows]
        axis.plot(counts, [row["tower"]["mean_ms"] for row in rows], "o-", label=f"tower, {thread_count} thread(s)")
        axis.plot(counts, [row["minilm"]["mean_ms"] for row in rows], "s--", label=f"MiniLM, {thread_count} thread(s)")
    axis.set(xlabel="candidates per row (N)", ylabel=f"ms per {ROWS}-row request", yscale="log", xscale="log",
             title=f"reranking cost, {results['shape']} tower on the CPU")
    axis.legend(fontsize=8)
    save(figure, path)


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.rerank_cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="huge")
    parser.add_argument("--counts", default="2,4,8,16", help="candidates per row, comma-separated")
    parser.add_argument("--threads", default="1,2", help="torch threads, comma-separated (the reranker's default: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per point (after one warm-up)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<time>-rerank-cost")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-rerank-cost"
    cache = Path(os.environ.get("EMBCAP_CACHE_DIR", ROOT / ".cache"))
    results = run(args.shape, [int(c) for c in args.counts.split(",")], [int(t) for t in args.threads.split(",")],
                  args.repeats, out, cache)
    print(markdown(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
