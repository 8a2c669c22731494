"""`python -m doctor --driver 550.54`: what of the image would run on the GPU with that NVIDIA driver.

Reads the Dockerfile's build arguments (base image release, torch and ONNX Runtime
builds), looks up the CUDA version each carries and the driver that CUDA needs
(embcap.cuda_builds, the one table), and says per model what would run on the GPU.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from doctor import dockerfile
from doctor.checks import FAIL, PASS, WARN, Result
from embcap.cuda_builds import (DEFAULT_IMAGE_BUILD, IMAGE_BUILDS, TRITON_CUDA, min_driver, newest_cuda_major,
                                onnxruntime_cuda, torch_cuda, version_tuple)


@dataclass(frozen=True)
class Build:
    """One CUDA-carrying part of the image."""

    check: str  # result name
    what: str  # e.g. "torch 2.10.0"
    cuda: str | None  # None: CPU-only build
    known: bool  # False: the CUDA of this version is not in the table
    runs: str  # what runs on it, e.g. "the decoder"
    fallback: str  # what happens without the GPU


def build_args(text: str) -> dict[str, str]:
    """Default values of the Dockerfile's ARG instructions (any stage)."""
    values = {}
    for instruction in dockerfile.parse(text):
        if instruction.keyword != "ARG":
            continue
        for word in shlex.split(instruction.arguments):
            name, _, value = word.partition("=")
            values.setdefault(name, value)
    return values


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def _pin(requirement: str) -> tuple[str, str]:
    """'torch==2.10.0' -> ('torch', '2.10.0')."""
    name, _, version = requirement.partition("==")
    if not version:
        raise ValueError(f"{requirement!r} is not pinned with ==")
    return name.strip(), version.strip()


def image_builds(repo: Path) -> list[Build]:
    """The base image, torch and ONNX Runtime the Dockerfile installs by default."""
    text = (repo / "Dockerfile").read_text()
    values = build_args(text)
    builds = []
    base = [ins for ins in dockerfile.parse(text) if ins.keyword == "FROM"][-1].arguments.split()[0]
    base = _expand(base, values)
    release = re.search(r"tritonserver:(\d+\.\d+)", base)
    cuda = TRITON_CUDA.get(release.group(1)) if release else None
    builds.append(Build("gpu-tensorrt", base, cuda, cuda is not None,
                        "TensorRT (the projector's engine) and Triton's GPU instances", "no TensorRT engine"))
    torch_pin = values.get("TORCH") or next(line.strip() for line in (repo / "requirements.txt").read_text()
                                            .splitlines() if line.startswith("torch=="))
    name, version = _pin(torch_pin)
    try:
        builds.append(Build("gpu-decoder", f"{name} {version}", torch_cuda(version), True, "the decoder",
                            "the decoder runs on the CPU or the server refuses (on_unusable_gpu)"))
    except KeyError:
        builds.append(Build("gpu-decoder", f"{name} {version}", None, False, "the decoder", ""))
    name, version = _pin(values.get("ONNXRUNTIME") or "onnxruntime==")
    try:
        builds.append(Build("gpu-projector", f"{name} {version}", onnxruntime_cuda(name, version), True,
                            "the projector (ONNX Runtime CUDA/TensorRT providers)", "the projector runs on the CPU"))
    except KeyError:
        builds.append(Build("gpu-projector", f"{name} {version}", None, False, "the projector", ""))
    return builds


def _advice(driver: str) -> str:
    major = newest_cuda_major(driver)
    fitting = [k for k in IMAGE_BUILDS if major is not None and k <= major]
    if not fitting:
        oldest = min(IMAGE_BUILDS)
        return (f"no image build in the table of docs/gpu-builds.md runs on driver {driver} (the oldest, "
                f"CUDA {oldest}.x, needs >= {min_driver(str(oldest))}): update the driver, or the stack serves on "
                "the CPU")
    return f"for driver {driver} build with " + " ".join(
        f"--build-arg {k}={v}" for k, v in IMAGE_BUILDS[max(fitting)].items())


def check_driver(repo: Path, driver: str) -> list[Result]:
    """One result per CUDA-carrying part of the image for NVIDIA driver `driver`."""
    try:
        version_tuple(driver)
    except ValueError:
        return [Result("driver", FAIL, f"{driver!r} is not a driver version (e.g. 550.54.15)")]
    major = newest_cuda_major(driver)
    supported = major is not None and major >= min(IMAGE_BUILDS)
    results = [Result("driver", PASS if supported else WARN,
                      f"NVIDIA driver {driver} runs CUDA builds up to {major}.x" if major else
                      f"NVIDIA driver {driver} is older than every CUDA major in embcap/cuda_builds.py")]
    failed = False
    for build in image_builds(repo):
        if not build.known:
            results.append(Result(build.check, WARN, f"{build.what}: its CUDA version is not in "
                                                      "embcap/cuda_builds.py; check the wheel's nvidia-* dependencies"))
        elif build.cuda is None:
            results.append(Result(build.check, WARN,
                                  f"{build.what} is a CPU-only build: {build.fallback} on any driver"))
        elif version_tuple(driver) >= version_tuple(min_driver(build.cuda) or "999999"):
            results.append(Result(build.check, PASS, f"{build.what} (CUDA {build.cuda}, needs >= "
                                                      f"{min_driver(build.cuda)}): {build.runs} on the GPU"))
        else:
            failed = True
            results.append(Result(build.check, FAIL, f"{build.what} (CUDA {build.cuda}) needs driver >= "
                                                      f"{min_driver(build.cuda)}, not {driver}: {build.fallback}"))
    if failed:
        results.append(Result("driver-advice", WARN, _advice(driver)))
    return results


def report(results: list[Result], driver: str) -> str:
    """The driver results as rows (same layout as the main table) and a one-line verdict."""
    width = max(len(r.check) for r in results)
    lines = [f"NVIDIA driver {driver}: what of the image would use the GPU"]
    lines += [f"{r.check:<{width}}  {r.status:<6}  {r.reason}" for r in results]
    off = [r.check for r in results if r.status == FAIL]
    lines.append(f"not on the GPU with driver {driver}: {', '.join(off)}" if off
                 else f"every GPU part of the image would use the GPU with driver {driver}")
    return "\n".join(lines)


def default_build_matches(repo: Path) -> bool:
    """Whether the Dockerfile's defaults are the table's default build (IMAGE_BUILDS[DEFAULT_IMAGE_BUILD])."""
    values = build_args((repo / "Dockerfile").read_text())
    return all(values.get(k) == v for k, v in IMAGE_BUILDS[DEFAULT_IMAGE_BUILD].items())
