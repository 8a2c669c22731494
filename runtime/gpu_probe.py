"""Deployment diagnostics: can torch, ONNX Runtime and TensorRT use the GPU here, and what the policy decides.

`python -m runtime.gpu_probe [--json] [--checkpoint DIR --policy P]` prints the report;
server.py runs it at start-up in a child process (torch and CUDA stay out of the server).
The detection and the policy are embcap.device's (the decoder decides its own device with them).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

from embcap.checkpoint import DEFAULT_UNUSABLE_GPU_POLICY, POLICIES, load_checkpoint
from embcap.cuda_builds import driver_runs, onnxruntime_cuda, version_tuple
from embcap.decoder_source import resolve_decoder
from embcap.device import (Decision, GpuSignals, ProbeReport, RuntimeStatus, Surroundings, cpu_request_seconds,
                           decide, decoder_parameters, detect_gpu, judge, probe_torch)


def _onnx_identity_model() -> bytes:
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [tensor], [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def probe_onnxruntime(signals: GpuSignals) -> RuntimeStatus:
    """ONNX Runtime's package (CPU or GPU build) and whether its CUDA provider starts a session."""
    try:
        import onnxruntime as ort
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return judge("onnxruntime", None, None, signals)
    package = getattr(info, "package_name", "onnxruntime")
    try:
        cuda = getattr(info, "cuda_version", None) or onnxruntime_cuda(package, ort.__version__)
    except KeyError:
        cuda = "unknown"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cuda = None
    works, error = None, None
    if cuda and cuda != "unknown" and signals.visible and signals.driver and driver_runs(signals.driver, cuda):
        try:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            session = ort.InferenceSession(_onnx_identity_model(), providers=["CUDAExecutionProvider"])
            works = "CUDAExecutionProvider" in session.get_providers()
            error = None if works else "the CUDA provider did not load (CUDA or cuDNN libraries missing?)"
        except Exception as exc:
            works, error = False, str(exc).strip().splitlines()[0]
    return judge(package, ort.__version__, cuda, signals, works, error)


def _tensorrt_version() -> str | None:
    """TensorRT's library version (libnvinfer), or None when it is not installed."""
    import ctypes
    import ctypes.util

    for name in filter(None, ("libnvinfer.so.10", ctypes.util.find_library("nvinfer"))):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        number = library.getInferLibVersion()  # TensorRT >= 10: major * 10000 + minor * 100 + patch
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return None


def probe_tensorrt(signals: GpuSignals, environ: Mapping[str, str]) -> RuntimeStatus:
    """TensorRT from the base image; it needs the image's CUDA ($CUDA_VERSION in NVIDIA's images)."""
    version = _tensorrt_version()
    cuda = environ.get("CUDA_VERSION") or None
    if cuda:
        cuda = ".".join(str(n) for n in version_tuple(cuda)[:2])
    return judge("tensorrt", version, cuda if version else None, signals)


def probe(surroundings: Surroundings = Surroundings()) -> ProbeReport:
    """Look for a GPU and ask torch, ONNX Runtime and TensorRT whether they can use it."""
    signals = detect_gpu(surroundings)
    return ProbeReport(signals, (probe_torch(signals), probe_onnxruntime(signals),
                                 probe_tensorrt(signals, surroundings.environ)))


def checkpoint_decision(report: ProbeReport, checkpoint_dir: str | Path, policy: str | None) -> Decision:
    """The decision for a checkpoint: `policy`, else the checkpoint's `on_unusable_gpu`."""
    checkpoint = load_checkpoint(checkpoint_dir)
    policy = policy or checkpoint.spec.on_unusable_gpu
    seconds = None
    if policy == "auto" and report.problem() and not report.usable("torch"):
        decoder_dir = resolve_decoder(checkpoint, log=lambda message: print(message, file=sys.stderr))
        seconds = cpu_request_seconds(decoder_parameters(decoder_dir), checkpoint.spec.generation.max_new_tokens)
    return decide(report, policy, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m runtime.gpu_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report and decision as JSON")
    parser.add_argument("--checkpoint", help="decide for this checkpoint (its on_unusable_gpu, its decoder size)")
    parser.add_argument("--policy", choices=POLICIES, help="overrides the checkpoint's on_unusable_gpu")
    parser.add_argument("--root", type=Path, default=Path("/"), help="where dev/ and proc/ are (tests)")
    args = parser.parse_args(argv)
    report = probe(Surroundings(root=args.root))
    if args.checkpoint:
        decision = checkpoint_decision(report, args.checkpoint, args.policy)
    else:
        decision = decide(report, args.policy or DEFAULT_UNUSABLE_GPU_POLICY)
    if args.json:
        print(json.dumps({"report": report.to_dict(), "summary": report.summary(), "problem": report.problem(),
                          "decision": asdict(decision)}))
    else:
        print(decision.line or report.summary())
        for status in report.runtimes:
            print(f"  {status.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
