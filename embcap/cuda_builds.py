"""Which NVIDIA driver a CUDA build needs, and which CUDA the builds this project names carry.

The one place for these facts (the GPU probe, doctor and the table in docs/gpu-builds.md read them).

- Minimum Linux x86-64 driver per CUDA major version: NVIDIA's CUDA Compatibility
  guide (minor-version compatibility: any 12.x build runs on the first R525 driver
  that shipped with CUDA 12.0, any 13.x build on the first R580 driver of CUDA 13.0;
  features that JIT-compile newer PTX need the toolkit's own driver).
- CUDA of the PyPI wheels (Linux x86-64): read from each wheel's metadata with
  `pip install --dry-run --report` (torch 2.9.1 and 2.10.0 depend on
  nvidia-cuda-runtime-cu12==12.8.90; 2.11.0 to 2.14.1 on cuda-toolkit==13.0.x;
  onnxruntime-gpu up to 1.26.0 on the -cu12 runtime, from 1.27.0 on CUDA 13).
- CUDA of NVIDIA's Triton container releases: the Triton release notes.
"""

from __future__ import annotations

import re

# CUDA major -> the oldest Linux driver that runs builds of it (minor-version compatibility).
MIN_DRIVER: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

# torch release (major.minor) -> CUDA of its default PyPI wheel for Linux x86-64.
TORCH_PYPI_CUDA: dict[str, str] = {
    "2.9": "12.8", "2.10": "12.8",
    "2.11": "13.0", "2.12": "13.0", "2.13": "13.0", "2.14": "13.0",
}

# onnxruntime-gpu release (major.minor) -> CUDA major of its PyPI wheel.
ONNXRUNTIME_GPU_CUDA: dict[str, str] = {
    **{f"1.{minor}": "12" for minor in range(19, 27)},
    **{f"1.{minor}": "13" for minor in range(27, 32)},
}

# nvcr.io/nvidia/tritonserver:<release>-py3 -> its CUDA (TensorRT and Triton's own GPU code use it).
# Earlier releases are Ubuntu 22.04 with Python 3.10, too old for requirements.txt.
TRITON_CUDA: dict[str, str] = {"25.01": "12.8.0", "25.03": "12.8.1", "25.08": "13.0.0"}


# The image's build arguments per CUDA major (Dockerfile ARGs; docs/gpu-builds.md).
# 12 is the Dockerfile's default: it runs on the widest range of drivers.
IMAGE_BUILDS: dict[int, dict[str, str]] = {
    12: {"TRITON_RELEASE": "25.01", "TORCH": "torch==2.10.0", "ONNXRUNTIME": "onnxruntime-gpu==1.26.0"},
    13: {"TRITON_RELEASE": "25.08", "TORCH": "torch==2.13.0", "ONNXRUNTIME": "onnxruntime-gpu==1.31.1"},
}
DEFAULT_IMAGE_BUILD = 12


def version_tuple(version: str) -> tuple[int, ...]:
    """'525.60.13' -> (525, 60, 13); leading numeric parts only ('12.8.0.038' -> (12, 8, 0, 38))."""
    parts = []
    for part in version.strip().split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        parts.append(int(match.group()))
    if not parts:
        raise ValueError(f"not a version number: {version!r}")
    return tuple(parts)


def cuda_major(cuda: str) -> int:
    """'12.8' -> 12."""
    return version_tuple(cuda)[0]


def min_driver(cuda: str) -> str | None:
    """The oldest driver that runs a build for `cuda` (None for a CUDA major not in the table)."""
    return MIN_DRIVER.get(cuda_major(cuda))


def driver_runs(driver: str, cuda: str) -> bool:
    """Whether driver version `driver` runs a build for CUDA `cuda`."""
    needed = min_driver(cuda)
    return needed is not None and version_tuple(driver) >= version_tuple(needed)


def newest_cuda_major(driver: str) -> int | None:
    """The newest CUDA major the driver runs (None: older than every entry of the table)."""
    majors = [major for major, needed in MIN_DRIVER.items() if version_tuple(driver) >= version_tuple(needed)]
    return max(majors) if majors else None


def torch_cuda(version: str) -> str | None:
    """CUDA of a torch build named by its version: '+cu128' -> '12.8', '+cpu' -> None, else the PyPI table.

    Raises KeyError for a release whose PyPI build is not in the table."""
    local = version.partition("+")[2]
    if local == "cpu":
        return None
    match = re.fullmatch(r"cu(\d+)(\d)", local)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    release = ".".join(str(n) for n in version_tuple(version)[:2])
    return TORCH_PYPI_CUDA[release]


def onnxruntime_cuda(package: str, version: str) -> str | None:
    """CUDA major of an ONNX Runtime package ('onnxruntime' is the CPU build: None). KeyError if unknown."""
    if package.replace("_", "-").lower() == "onnxruntime":
        return None
    release = ".".join(str(n) for n in version_tuple(version)[:2])
    return ONNXRUNTIME_GPU_CUDA[release]
