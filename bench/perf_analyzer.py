"""perf_analyzer against Triton's captioner over gRPC, bypassing the gateway.

PyPI's `perf-analyzer` needs glibc 2.38. The tritonclient 2.48.0 wheel carries a
perf_analyzer binary that runs on glibc 2.36 once `libb64.so.0d` and
`libcudart.so.12` resolve; both ship in the nvidia-pytriton wheel under hashed
names. `ensure_binary()` downloads that wheel (no dependencies, not installed: the
venv keeps tritonclient 2.73) into $EMBCAP_CACHE_DIR/perf_analyzer, extracts the
binary and links the two libraries into a private folder.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from embcap.contract import EMBEDDING, ENSEMBLE, OVERLOAD_MARK
from embcap.staged_folder import staged_file

WHEEL_VERSION = "2.48.0"
WHEEL_MEMBER = f"tritonclient-{WHEEL_VERSION}.data/data/bin/perf_analyzer"
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class Refused(RuntimeError):
    """The server refused requests of the level as over capacity (the engine's admission): perf_analyzer stops
    at the first failed request, so the level has no figures, only that answer."""


def cache_root() -> Path:
    from embcap.decoder_source import cache_dir

    return cache_dir() / "perf_analyzer"


def pytriton_libs() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"


def ensure_binary(root: Path | None = None, log=print) -> tuple[Path, dict[str, str]]:
    """The perf_analyzer path and the environment it runs in; downloads the wheel once."""
    root = root or cache_root()
    binary = root / "bin" / "perf_analyzer"
    lib_dir = root / "lib"
    if not binary.is_file():
        wheel_dir = root / "wheel"
        wheels = sorted(wheel_dir.glob(f"tritonclient-{WHEEL_VERSION}-*.whl"))
        if not wheels:
            log(f"downloading tritonclient=={WHEEL_VERSION} (for its perf_analyzer binary) into {wheel_dir}")
            subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                            "--only-binary=:all:", "--platform", "manylinux1_x86_64",
                            f"tritonclient=={WHEEL_VERSION}", "-d", str(wheel_dir)], check=True)
            wheels = sorted(wheel_dir.glob(f"tritonclient-{WHEEL_VERSION}-*.whl"))
        with zipfile.ZipFile(wheels[0]) as archive, archive.open(WHEEL_MEMBER) as source, \
                staged_file(binary, mode=0o755) as staging:  # two runs at once: each writes its own copy
            staging.write(source.read())
    lib_dir.mkdir(parents=True, exist_ok=True)
    source_dir = pytriton_libs()
    for name, pattern in LIBRARIES.items():
        matches = sorted(glob.glob(str(source_dir / pattern)))
        if not matches:
            raise FileNotFoundError(f"{pattern} not found in {source_dir} (nvidia-pytriton wheel)")
        link = lib_dir / name
        if (link.is_symlink() or link.exists()) and os.path.realpath(link) == os.path.realpath(matches[0]):
            continue
        staging = lib_dir / f".{name}.{os.getpid()}"  # replaced in one step: another run may be reading it
        staging.unlink(missing_ok=True)
        staging.symlink_to(matches[0])
        os.replace(staging, link)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return binary, env


def write_input_data(pool: np.ndarray, path: Path, input_name: str = EMBEDDING) -> Path:
    """perf_analyzer's JSON input: one entry per embedding row (the model batches; `-b rows`
    makes each request carry `rows` of them, as the gateway's requests do)."""
    dim = pool.shape[-1]
    entries = [{input_name: {"content": row.tolist(), "shape": [dim]}} for row in pool.reshape(-1, dim)]
    path.write_text(json.dumps({"data": entries}))
    return path


def profile_rate(path: Path, rows_per_request: int) -> float | None:
    """Captions per second from perf_analyzer's --profile-export-file timestamps (ns)."""
    try:
        # captions come back as raw BYTES tensors (length prefixes included): not always valid UTF-8
        requests = json.loads(path.read_bytes().decode("utf-8", "replace"))["experiments"][0]["requests"]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    done = [r for r in requests if r.get("response_timestamps")]
    if not done:
        return None
    first = min(r["timestamp"] for r in done)
    last = max(r["response_timestamps"][-1] for r in done)
    return len(done) * rows_per_request / ((last - first) / 1e9) if last > first else None


def run(grpc_url: str, concurrency: int, requests: int, rows_per_request: int, input_data: Path | None,
        out_dir: Path, model: str = ENSEMBLE, timeout_s: float = 600.0, log=print) -> dict:
    """One perf_analyzer run at a fixed request count; returns its CSV row as numbers (ms, /s)."""
    binary, env = ensure_binary(log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"perf_analyzer_c{concurrency}.csv"
    profile_path = out_dir / f"perf_analyzer_c{concurrency}.profile.json"
    command = [
        str(binary), "-m", model, "-u", grpc_url, "-i", "grpc", "-b", str(rows_per_request),
        f"--concurrency-range={concurrency}:{concurrency}", f"--request-count={requests}",
        "--percentile=95", "-f", str(csv_path), "--profile-export-file", str(profile_path),
    ]
    if input_data is not None:
        command += ["--input-data", str(input_data)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    (out_dir / f"perf_analyzer_c{concurrency}.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0 and OVERLOAD_MARK in completed.stdout + completed.stderr:
        detail = next(line for line in (completed.stdout + completed.stderr).splitlines() if OVERLOAD_MARK in line)
        raise Refused(detail.strip()[:300])
    if completed.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({completed.returncode}):\n{completed.stdout[-2000:]}"
                           f"\n{completed.stderr[-2000:]}")
    with open(csv_path) as handle:
        row = next(csv.DictReader(handle))
    def ms(key: str) -> float:
        return float(row[key]) / 1000.0
    # With --request-count perf_analyzer's own "Inferences/Second" divides by a padded window;
    # the per-request timestamps give the real rate: completed rows / (last answer - first send).
    captions_per_s = profile_rate(profile_path, rows_per_request) or float(row["Inferences/Second"])  # captions
    return {
        "concurrency": concurrency, "requests": requests, "rows_per_request": rows_per_request,
        "requests_per_s": captions_per_s / rows_per_request, "captions_per_s": captions_per_s,
        "p50_ms": ms("p50 latency"), "p95_ms": ms("p95 latency"), "p99_ms": ms("p99 latency"),
        "client_send_ms": ms("Client Send"), "network_ms": ms("Network+Server Send/Recv"),
        "server_queue_ms": ms("Server Queue"), "server_compute_ms": ms("Server Compute Input")
        + ms("Server Compute Infer") + ms("Server Compute Output"), "client_recv_ms": ms("Client Recv"),
        "command": " ".join(command),
    }
