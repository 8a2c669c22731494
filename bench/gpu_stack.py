"""The whole stack on a bare CUDA host: tritonserver, the stubs, the engine on the GPU, the gateway, timed end to end.

A bare host has Python 3.12, torch and transformers, and no package index. Two parts are
prepared here, each one archive small enough to travel to such a host:

    python -m bench.gpu_stack bundle --part triton --out build/gpu_stack   # ~27 MB: trimmed tritonserver
    python -m bench.gpu_stack bundle --part wheels --out build/gpu_stack   # ~30 MB: the gateway's wheels (cp312)

and on the host, from the repository root (the parts unpacked there on first use):

    python3 bench/gpu_stack.py run --bundle build/gpu_stack --shape llama3-8b --out build/gpu_stack/results

`run` writes a random-weight checkpoint of the shape to disk (bf16 on CUDA; SmolLM2's tokenizer;
a tiny ONNX text tower so the reranker stage runs too), starts server.py on the device with
Triton metrics on, waits for health the evaluator's way (o1 rules), sends `--requests` requests
of 4 evaluator-shaped rows one after another, and reports the start-up, each request's time, ms
per decode step inside Triton (the engine's step histogram) beside the bare benchmark's figure
when given, GPU memory, and where each model ran. On this machine, `run --shape tiny --device
cpu` (no bundle: the local tritonserver) is its smoke test.

Longer than 250 lines on purpose: it is carried alone to a bare host, so bundling, the host's
environment and the measurement stay in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file on the host: the project is importable from its root
    sys.path.insert(0, str(ROOT))

PYTHON = "3.12"  # the bare host's interpreter
TRITON_ARCHIVE = "tritonserver.tar.xz"
WHEELS_ARCHIVE = "wheels.tar"
# What the gateway, server.py and the stubs need that such a host lacks (pins from requirements.txt).
# numpy: the Python-backend stub garbles tensors with numpy 2, the host's likely version.
WHEEL_PACKAGES = ("numpy", "fastapi", "starlette", "uvicorn", "httptools", "pydantic", "orjson", "tritonclient",
                  "httpx", "ftfy", "wcwidth")
# Already on the host (torch's and transformers' own dependencies, or listed for it): not carried.
HOST_PACKAGES = {"grpcio", "protobuf", "packaging", "typing_extensions", "certifi", "urllib3", "idna", "psutil",
                 "prometheus_client"}
STEP_SUM = re.compile(r'^embcap_engine_step_seconds_sum\{[^}]*\} ([0-9.e+-]+)$', re.M)
STEP_COUNT = re.compile(r'^embcap_engine_step_seconds_count\{[^}]*\} ([0-9.e+-]+)$', re.M)
PLACEMENT = re.compile(r"(projector: running on .*|decoder: .* on \S+/\S+, engine .*|reranker: \S+ on \S+)")


# ------------------------------------------------------------------------------------------- bundle
def requirement_pins(names: tuple[str, ...]) -> list[str]:
    """`name==version` for each of `names`, as requirements.txt pins it (extras kept)."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name = re.split(r"[\[=]", line)[0].lower().replace("-", "_")
            pins[name] = line
    missing = [name for name in names if name not in pins]
    if missing:
        raise SystemExit(f"requirements.txt pins none of {missing}")
    return [pins[name] for name in names]


def bundle_triton(out: Path) -> Path:
    """tritonserver, its libraries, the Python backend and the 3.12 stub from the nvidia-pytriton wheel."""
    import pytriton

    site = Path(pytriton.__file__).resolve().parent.parent
    server = site / "pytriton" / "tritonserver"
    archive = out / TRITON_ARCHIVE
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(server / "bin" / "tritonserver", "tritonserver/bin/tritonserver")
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            tar.add(server / "backends" / "python" / name, f"tritonserver/backends/python/{name}")
        tar.add(server / "python_backend_stubs" / PYTHON / "triton_python_backend_stub",
                "tritonserver/backends/python/triton_python_backend_stub")
        for library in sorted((site / "nvidia_pytriton.libs").iterdir()):
            if not library.name.startswith("libpython3"):  # the stub links the host's own libpython
                tar.add(library, f"tritonserver/lib/{library.name}")
    return archive


def bundle_wheels(out: Path) -> Path:
    """The gateway's wheels for CPython 3.12 on x86-64 Linux (with their dependencies the host lacks)."""
    download = out / "wheels"
    shutil.rmtree(download, ignore_errors=True)
    platforms = [arg for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
                 for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--python-version", PYTHON, "--only-binary=:all:", *platforms, "-d", str(download),
                    *requirement_pins(WHEEL_PACKAGES)], check=True)
    archive = out / WHEELS_ARCHIVE
    with tarfile.open(archive, "w") as tar:
        for wheel in sorted(download.glob("*.whl")):
            if wheel.name.split("-")[0].lower() not in HOST_PACKAGES:
                tar.add(wheel, f"wheels/{wheel.name}")
    shutil.rmtree(download)
    return archive


# --------------------------------------------------------------------------------------------- host
def host_python(bundle: Path) -> Path:
    """A venv over the host's own packages, with the carried wheels and this repository in it."""
    venv = bundle / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                       check=True)
        site = next(venv.glob("lib/python3*/site-packages"))
        with tarfile.open(bundle / WHEELS_ARCHIVE) as tar:
            tar.extractall(bundle, filter="data")
        for wheel in sorted((bundle / "wheels").glob("*.whl")):  # a wheel is a zip laid out as site-packages
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        (site / "embcap-repository.pth").write_text(str(ROOT) + "\n")
    return python


def unpack_triton(bundle: Path) -> Path:
    home = bundle / "tritonserver"
    if not (home / "bin" / "tritonserver").exists():
        with tarfile.open(bundle / TRITON_ARCHIVE) as tar:
            tar.extractall(bundle, filter="data")
    return home


# ---------------------------------------------------------------------------------------------- run
def write_checkpoint(shape: str, device: str, out: Path, candidates: int) -> Path:
    """Random weights of `shape` (bf16 on CUDA), SmolLM2's tokenizer, a seeded projector, and with N > 1 a tiny
    ONNX text tower as the reranker's encoder."""
    from embcap.decoder_source import smollm2_decoder_dir
    from tooling.builders import make_random_checkpoint

    started = time.perf_counter()
    make_random_checkpoint(out, shape, os.environ.get("EMBCAP_TOKENIZER_DIR") or smollm2_decoder_dir(), device,
                           prefix_length=4, new_tokens=32, candidates=candidates,
                           prompt={"template": "Video:\n{prefix}\nCaption:"})
    print(f"[gpu-stack] checkpoint {shape} written in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def gpu_memory_mib() -> list[int] | None:
    """Memory used per GPU (nvidia-smi), None where it is not available."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True)
    return [int(line) for line in done.stdout.split()] if done.returncode == 0 else None


def step_ms(metrics: str) -> float | None:
    """Mean decode step inside Triton, from the engine's histogram on the gateway's /metrics."""
    total = sum(float(v) for v in STEP_SUM.findall(metrics))
    count = sum(float(v) for v in STEP_COUNT.findall(metrics))
    return 1000 * total / count if count else None


def run(args: argparse.Namespace) -> dict:
    import httpx

    from embcap.inputs import realistic_embeddings
    from tooling.evaluator import run_requests, wait_ready
    from runtime.local import free_port, spawn

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint(args.shape, args.device, out / "checkpoint", args.candidates)
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "server.py", "--checkpoint", str(checkpoint), "--model-repository",
               str(out / "repo"), "--bind", "127.0.0.1", "--port", str(port), "--grpc-port", str(free_port()),
               "--metrics-port", str(metrics_port), "--device", args.device, f"--candidates={args.candidates}",
               "--fresh-export"]  # a cold start exports
    base = f"http://127.0.0.1:{port}"
    server = spawn("server.py", command, out / "server.log", base)
    report: dict = {"shape": args.shape, "device": args.device, "candidates": args.candidates}
    try:
        wait_ready(base, "o1", args.ready_timeout_s, log=lambda _: None)
        report["healthy_s"] = time.perf_counter() - server.started_at
        report["gpu_memory_mib"] = gpu_memory_mib()
        rows = realistic_embeddings(4 * args.requests, seed=1)
        result = run_requests(base, rows, batch_size=4, timeout_s=60.0, progress=False)
        report["request_s"] = [round(batch.latency_s, 4) for batch in result.batches]
        report["lost"] = [batch.loss_reason for batch in result.batches if batch.loss_reason]
        deadline = time.monotonic() + 5  # the engine reports its metrics once a second
        while (report.get("step_ms_in_triton") is None) and time.monotonic() < deadline:
            report["step_ms_in_triton"] = step_ms(httpx.get(base + "/metrics", timeout=10).text)
            time.sleep(0.2)
        report["health"] = httpx.get(base + "/api/v1/health", timeout=10).json()
    finally:
        report["exit_code"] = server.stop()
    report["placement"] = sorted({line.rstrip('",') for line in
                                  PLACEMENT.findall((out / "server.log").read_text(errors="replace"))})
    report["bare_step_ms"] = args.bare_step_ms
    (out / "gpu_stack.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_stack.md").write_text(render(report))
    print(render(report), flush=True)
    return report


def render(report: dict) -> str:
    times = report.get("request_s") or [float("nan")]
    ordered = sorted(times)
    lines = [f"# The stack on {report['device']}: {report['shape']}, {report['candidates']} candidate(s) per row", "",
             f"- process start to healthy (o1 health rules): {report.get('healthy_s', float('nan')):.1f} s",
             f"- {len(times)} requests of 4 rows, one at a time: p50 {ordered[len(ordered) // 2]:.3f} s, "
             f"max {ordered[-1]:.3f} s; lost: {report.get('lost') or 'none'}",
             f"- decode step inside Triton: {report.get('step_ms_in_triton') or float('nan'):.2f} ms (mean)"
             + (f", bare benchmark {report['bare_step_ms']:.2f} ms" if report.get("bare_step_ms") else ""),
             f"- GPU memory used: {report.get('gpu_memory_mib')} MiB",
             f"- health: {report.get('health')}", "- where each model ran:"]
    lines += [f"  - {line}" for line in report.get("placement", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="bench/gpu_stack.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    bundle = commands.add_parser("bundle", allow_abbrev=False, help="prepare a part to carry to a bare CUDA host")
    bundle.add_argument("--part", choices=("triton", "wheels"), required=True)
    bundle.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_stack")
    go = commands.add_parser("run", allow_abbrev=False, help="start the stack and measure it")
    go.add_argument("--bundle", type=Path, help="the unpacked parts' folder (a bare host); none: this machine's")
    go.add_argument("--shape", default="llama3-8b")
    go.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    go.add_argument("--candidates", type=int, default=8)
    go.add_argument("--requests", type=int, default=16, help="4-row requests, as the evaluator sends 16")
    go.add_argument("--ready-timeout-s", type=float, default=300.0, help="the evaluator gives up at 180-300 s")
    go.add_argument("--bare-step-ms", type=float, help="the bare benchmark's ms per step at batch 4, to compare")
    go.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_stack" / "results")
    args = parser.parse_args(argv)
    if args.command == "bundle":
        args.out.mkdir(parents=True, exist_ok=True)
        archive = (bundle_triton if args.part == "triton" else bundle_wheels)(args.out)
        print(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB")
        return 0
    if args.bundle is not None and os.environ.get("EMBCAP_GPU_STACK_VENV") != "1":
        bundle_dir = args.bundle.resolve()
        env = {**os.environ, "EMBCAP_GPU_STACK_VENV": "1", "TRITONSERVER_HOME": str(unpack_triton(bundle_dir)),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        python = host_python(bundle_dir)
        return subprocess.run([str(python), str(Path(__file__).resolve()), *(argv or sys.argv[1:])], env=env,
                              cwd=ROOT).returncode
    report = run(args)
    return 0 if report.get("exit_code") == 0 and not report.get("lost") else 1


if __name__ == "__main__":
    sys.exit(main())
