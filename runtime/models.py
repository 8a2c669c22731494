"""What runs where: the Python-backend stub of each model, and each model's device."""

from __future__ import annotations

from pathlib import Path

import psutil

from embcap.contract import DECODER, PROJECTOR, RERANKER
from embcap.device import ProbeReport
from export.templates import parse_model_config
from runtime.lifetime import STUB_PROCESS

# Which runtime puts each model on a GPU (the reranker: torch for a sentence-transformers encoder, the usual
# kind; an ONNX text tower runs in ONNX Runtime's CUDA provider where the image has it).
MODEL_RUNTIMES = {DECODER: "torch", PROJECTOR: "onnxruntime", RERANKER: "torch"}


def python_stubs(triton_pid: int) -> dict[int, str]:
    """Python-backend stub processes of a tritonserver: pid -> model name."""
    stubs = {}
    for child in psutil.Process(triton_pid).children():
        try:
            if child.name() == STUB_PROCESS:
                stubs[child.pid] = Path(child.cmdline()[1]).parent.parent.name
        except (psutil.NoSuchProcess, IndexError):
            continue
    return stubs


def model_devices(repository: Path, report: ProbeReport) -> dict[str, str]:
    """Model -> "cuda" or "cpu": GPU instances whose runtime the probe found usable run on cuda."""
    devices = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = parse_model_config(path.read_text(), str(path))
        if not config.instance_group:
            continue  # an ensemble runs nowhere itself
        gpu = any(group.kind == group.KIND_GPU for group in config.instance_group)
        runtime = MODEL_RUNTIMES.get(config.name)
        devices[config.name] = "cuda" if gpu and (runtime is None or report.usable(runtime)) else "cpu"
    return devices


def running(pid: int) -> bool:
    """Whether process `pid` lives (not a zombie). Raises OSError when that cannot be told (no free file
    descriptor to read /proc): never guessed."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
