"""Start-up against decoder size: process start to healthy for random-weight Llama decoders of real shapes.

    python -m bench.startup --shapes smollm2-135m,llama-0.5b,llama-1b --out DIR

For each shape a checkpoint is written (random weights of that shape in the serving dtype's
safetensors, SmolLM2's tokenizer, a seeded projector), then `server.py` is started as the
container runs it and timed until health says healthy; the decoder's own log lines give the
time its weights took to reach the device (embcap.lean_llama reads them straight from the
safetensors files). The last line extrapolates to an 8B decoder from the measured load rate,
which is this machine's: a GPU host's disk, page cache and PCIe decide the real figure.
Writes startup.json, startup.md and startup.png.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from runtime.local import ROOT, free_port, spawn
from tooling.builders import SHAPES, make_random_checkpoint

LOAD_LINE = re.compile(r"decoder weights: (\d+)/(\d+) layers on \S+ \(([\d.]+) GB with the embeddings, ([\d.]+) s\)")
LLAMA3_8B_BF16_GB = 16.06  # Llama-3-8B's weights in bfloat16


def measure(shape: str, work: Path, timeout_s: float) -> dict:
    """Write the checkpoint, start server.py on it, time process start to healthy."""
    from embcap.decoder_source import smollm2_decoder_dir

    checkpoint, params = make_random_checkpoint(work / shape / "checkpoint", shape, smollm2_decoder_dir())
    port = free_port()
    command = [sys.executable, "server.py", "--checkpoint", str(checkpoint), "--model-repository",
               str(work / shape / "repo"), "--bind", "127.0.0.1", "--port", str(port), "--grpc-port", str(free_port()),
               "--candidates=1", "--fresh-export"]
    child = spawn("server.py", command, work / shape / "server.log", f"http://127.0.0.1:{port}")
    try:
        healthy_s = child.wait_healthy(timeout_s)
    finally:
        child.stop()
        shutil.rmtree(checkpoint, ignore_errors=True)  # a 1B checkpoint is 4 GB in float32
    loads = LOAD_LINE.findall((work / shape / "server.log").read_text(errors="replace"))
    done = [entry for entry in loads if entry[0] == entry[1]]
    weights_gb, load_s = (float(done[-1][2]), float(done[-1][3])) if done else (None, None)
    return {"shape": shape, "params": params, "weights_gb": weights_gb, "weights_load_s": load_s,
            "healthy_s": healthy_s}


def render(rows: list[dict]) -> str:
    lines = ["| decoder | parameters | weights (GB) | weights onto the device (s) | GB/s "
             "| process start to healthy (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        rate = row["weights_gb"] / row["weights_load_s"] if row["weights_load_s"] else None
        lines.append(f"| {row['shape']} | {row['params'] / 1e6:.0f} M | {row['weights_gb'] or 0:.2f} | "
                     f"{row['weights_load_s'] or 0:.1f} | {rate or 0:.2f} | {row['healthy_s']:.1f} |")
    measured = [row for row in rows if row["weights_load_s"] and row["weights_gb"]]
    if measured:
        biggest = max(measured, key=lambda row: row["weights_gb"])
        rate = biggest["weights_gb"] / biggest["weights_load_s"]
        fixed = biggest["healthy_s"] - biggest["weights_load_s"]
        lines += ["", f"Extrapolation to Llama-3-8B in bfloat16 ({LLAMA3_8B_BF16_GB:.1f} GB) at this machine's rate "
                      f"({rate:.2f} GB/s for {biggest['shape']}) plus its other start-up ({fixed:.0f} s): "
                      f"{fixed + LLAMA3_8B_BF16_GB / rate:.0f} s. A GPU host reads the files from its disk or page "
                      "cache and copies them over PCIe (tens of GB/s): its own figure is measured there."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    sizes = [row["params"] / 1e9 for row in rows]
    axis.plot(sizes, [row["healthy_s"] for row in rows], marker="o", label="process start to healthy")
    axis.plot(sizes, [row["weights_load_s"] or 0 for row in rows], marker="s", label="weights onto the device")
    axis.set_xlabel("decoder parameters (billions)")
    axis.set_ylabel("seconds")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m,llama-0.5b,llama-1b",
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / time.strftime("startup-%Y%m%d-%H%M%S"))
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per server, process start to healthy")
    args = parser.parse_args(argv)
    shapes = [shape for shape in args.shapes.split(",") if shape]
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}: choose from {', '.join(SHAPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in shapes:
        print(f"[startup] {shape}: writing the checkpoint and starting server.py", flush=True)
        rows.append(measure(shape, args.out / "work", args.timeout_s))
        print(f"[startup] {shape}: healthy after {rows[-1]['healthy_s']:.1f} s "
              f"(weights {rows[-1]['weights_load_s']} s)", flush=True)
    (args.out / "startup.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = render(rows)
    (args.out / "startup.md").write_text("# Start-up against decoder size\n\n" + text)
    plot(rows, args.out / "startup.png")
    print(text)
    print(f"wrote {args.out}/startup.json, startup.md, startup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
