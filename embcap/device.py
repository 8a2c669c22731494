"""Where the decoder runs: is there an NVIDIA GPU here, can torch use it, and what the policy says when not.

A GPU counts as visible when the container shows NVIDIA device files (/dev/nvidia0 ...),
a driver (nvidia-smi, /proc/driver/nvidia/version) or CUDA_VISIBLE_DEVICES naming a
device. When one is visible but a runtime cannot use it, `ProbeReport.problem()` is one
line naming the driver and the CUDA version each build needs. The decoder's policy
(`on_unusable_gpu`) then says whether it serves on the CPU or refuses:

- serve-cpu: serve on the CPU, the line stays in the health answer's error field;
- refuse: do not serve (health stays 503 with the line);
- auto: serve on the CPU when the decoder answers a request within CPU_ANSWER_BUDGET_S
  there (estimated from its size), refuse otherwise.

The export and the decoder's stub call `resolve_decoder_device`; the deployment diagnostics
(ONNX Runtime's and TensorRT's probes, the command line) are runtime.gpu_probe. Where the probe
looks is injectable (`Surroundings`): tests fake a GPU with a folder tree and an nvidia-smi
script on a CPU-only machine, with the real torch.

Longer than 250 lines: detection (device files, driver, CUDA builds), the report and the policy
decision form one unit; each part is small and tested through it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from embcap.checkpoint import DEFAULT_UNUSABLE_GPU_POLICY, POLICIES
from embcap.cuda_builds import driver_runs, min_driver

HIDDEN = {"", "-1", "none", "void", "nodevfiles"}  # CUDA_VISIBLE_DEVICES values that hide every GPU
NVIDIA_SMI_QUERY = ["--query-gpu=driver_version,name", "--format=csv,noheader"]
DRIVER_IN_PROC = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)")

# The evaluator gives up on a request after 60 s (30 s in its earliest version): a decoder
# must answer a 4-row request on the CPU well within that to be worth serving there.
CPU_ANSWER_BUDGET_S = 30.0
# Bytes of fp32 decoder weights read per second per decode step on a CPU, measured with the
# default SmolLM2-135M (0.54 GB fp32): 3.1 s for a 4-row, 32-token request on 2 vCPUs
# (bench/RESULTS.md), 97 ms per step. Batch 4 reads the weights once per step.
CPU_WEIGHT_BYTES_PER_S = 5.5e9
FP32_BYTES = 4


@dataclass(frozen=True)
class Surroundings:
    """Where the probe looks: the root holding dev/ and proc/, the PATH for nvidia-smi, the environment."""

    root: Path = Path("/")
    path: str | None = None  # None: $PATH of `environ`
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(frozen=True)
class GpuSignals:
    """What the container shows of an NVIDIA GPU."""

    device_files: tuple[str, ...] = ()
    cuda_visible_devices: str | None = None
    driver: str | None = None  # driver version, e.g. "535.104.05"
    driver_source: str | None = None  # "nvidia-smi" or "/proc/driver/nvidia/version"
    gpu_names: tuple[str, ...] = ()
    nvidia_smi_error: str | None = None

    @property
    def assigned(self) -> bool:
        """CUDA_VISIBLE_DEVICES names a device (the evaluator sets it to 0)."""
        value = self.cuda_visible_devices
        return value is not None and value.strip().lower() not in HIDDEN

    @property
    def visible(self) -> bool:
        if self.cuda_visible_devices is not None and not self.assigned:
            return False  # explicitly hidden
        return bool(self.device_files or self.driver or self.assigned)

    def evidence(self) -> str:
        """'/dev/nvidia0, nvidia-smi: NVIDIA H100, CUDA_VISIBLE_DEVICES=0'."""
        parts = list(self.device_files[:2]) + (["..."] if len(self.device_files) > 2 else [])
        if self.driver_source:
            parts.append(self.driver_source + (f": {', '.join(self.gpu_names)}" if self.gpu_names else ""))
        if self.cuda_visible_devices is not None:
            parts.append(f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices}")
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class RuntimeStatus:
    """Whether one runtime (torch, ONNX Runtime, TensorRT) can use the GPU, and why not."""

    name: str  # package name: torch, onnxruntime-gpu, onnxruntime, tensorrt
    version: str | None  # None: not installed
    cuda: str | None  # CUDA version the build needs; None: CPU-only build (or not installed)
    usable: bool
    reason: str  # why not usable, or what it uses

    @property
    def installed(self) -> bool:
        return self.version is not None

    def describe(self) -> str:
        if not self.installed:
            return f"{self.name} not installed"
        build = f"CUDA {self.cuda} build" if self.cuda else "CPU-only build"
        return f"{self.name} {self.version} ({build}): {self.reason}"


def judge(name: str, version: str | None, cuda: str | None, signals: GpuSignals,
          works: bool | None = None, error: str | None = None) -> RuntimeStatus:
    """Decide what a runtime build can do with the GPU the signals show.

    `works` is the runtime's own answer (None: not asked, e.g. the driver is already too old)."""
    if version is None:
        return RuntimeStatus(name, None, None, False, "not installed")
    if cuda is None:
        return RuntimeStatus(name, version, None, False, "no CUDA in this build")
    needed = min_driver(cuda) if cuda[:1].isdigit() else None
    need = f"needs NVIDIA driver >= {needed}" if needed else f"needs a driver for CUDA {cuda}"
    if not signals.visible:
        return RuntimeStatus(name, version, cuda, False, f"no GPU visible ({need})")
    if signals.driver is None:
        return RuntimeStatus(name, version, cuda, False, f"no NVIDIA driver visible in the container ({need})")
    if needed is None or not driver_runs(signals.driver, cuda):
        return RuntimeStatus(name, version, cuda, False, f"{need}, found {signals.driver}")
    if works is False:
        return RuntimeStatus(name, version, cuda, False, f"cannot use the GPU: {error or 'unknown error'}")
    return RuntimeStatus(name, version, cuda, True, "uses the GPU" if works else "driver new enough")


@dataclass(frozen=True)
class ProbeReport:
    signals: GpuSignals
    runtimes: tuple[RuntimeStatus, ...]

    def runtime(self, name: str) -> RuntimeStatus | None:
        """The status of `torch`, `onnxruntime` (either package) or `tensorrt`."""
        for status in self.runtimes:
            if status.name == name or status.name.startswith(name + "-"):
                return status
        return None

    def usable(self, name: str) -> bool:
        status = self.runtime(name)
        return status is not None and status.usable

    def problem(self) -> str | None:
        """One line when a GPU is visible but an installed runtime cannot use it; else None."""
        if not self.signals.visible:
            return None
        failing = [s for s in self.runtimes if s.installed and not s.usable]
        if not failing:
            return None
        if self.signals.driver:
            seen = f"GPU visible ({self.signals.evidence()}), NVIDIA driver {self.signals.driver},"
        else:
            seen = (f"GPU assigned ({self.signals.evidence()}) but no NVIDIA driver visible in the container "
                    "(no /dev/nvidia*, nvidia-smi or /proc/driver/nvidia/version), and")
        return f"{seen} not usable by " + "; ".join(s.describe() for s in failing)

    def summary(self) -> str:
        """One line for the log when nothing is wrong."""
        if not self.signals.visible:
            return "no NVIDIA GPU visible: serving on the CPU"
        usable = ", ".join(f"{s.name} {s.version}" for s in self.runtimes if s.usable) or "nothing"
        return f"GPU visible ({self.signals.evidence()}; NVIDIA driver {self.signals.driver}); on the GPU: {usable}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeReport":
        signals = data["signals"]
        return cls(
            GpuSignals(**{**signals, "device_files": tuple(signals["device_files"]),
                          "gpu_names": tuple(signals["gpu_names"])}),
            tuple(RuntimeStatus(**status) for status in data["runtimes"]),
        )


# --- looking -------------------------------------------------------------------------------

def _nvidia_smi(surroundings: Surroundings) -> tuple[str | None, tuple[str, ...], str | None]:
    """(driver, GPU names, error) from nvidia-smi on the configured PATH."""
    search = surroundings.path if surroundings.path is not None else surroundings.environ.get("PATH", os.defpath)
    tool = shutil.which("nvidia-smi", path=search)
    if tool is None:
        return None, (), None
    try:
        run = subprocess.run([tool, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=20,
                             env={**surroundings.environ, "PATH": search})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, (), f"nvidia-smi failed: {exc}"
    if run.returncode != 0:
        message = (run.stdout + run.stderr).strip().splitlines()
        return None, (), f"nvidia-smi exit {run.returncode}: {message[0] if message else ''}"
    rows = [[cell.strip() for cell in line.split(",", 1)] for line in run.stdout.strip().splitlines() if line.strip()]
    drivers = [row[0] for row in rows if row and re.fullmatch(r"\d+\.\d+(\.\d+)?", row[0])]
    names = tuple(row[1] for row in rows if len(row) > 1)
    return (drivers[0] if drivers else None), names, None


def detect_gpu(surroundings: Surroundings = Surroundings()) -> GpuSignals:
    """Device files, CUDA_VISIBLE_DEVICES and the driver version (nvidia-smi, else /proc)."""
    dev = surroundings.root / "dev"
    device_files = tuple(sorted(str(Path("/dev") / p.name) for p in dev.glob("nvidia*")
                                if re.fullmatch(r"nvidia\d+", p.name))) if dev.is_dir() else ()
    driver, names, error = _nvidia_smi(surroundings)
    source = "nvidia-smi" if driver else None
    proc = surroundings.root / "proc" / "driver" / "nvidia" / "version"
    if driver is None and proc.is_file():
        match = DRIVER_IN_PROC.search(proc.read_text(errors="replace"))
        if match:
            driver, source = match.group(1), "/proc/driver/nvidia/version"
    return GpuSignals(device_files, surroundings.environ.get("CUDA_VISIBLE_DEVICES"), driver, source, names, error)


def torch_build() -> tuple[str, str | None] | None:
    """torch's version and CUDA build as its generated torch/version.py states them, read without importing torch;
    None when torch is not installed or the file is not as torch writes it."""
    spec = importlib.util.find_spec("torch")  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    values = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None
        if isinstance(target, ast.Name):
            try:
                values[target.id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    version, cuda = values.get("__version__"), values.get("cuda", ())
    if not isinstance(version, str) or not (cuda is None or isinstance(cuda, str)):
        return None
    return version, cuda


def probe_torch(signals: GpuSignals) -> RuntimeStatus:
    """torch's build and whether it can use the GPU (asks CUDA only when a GPU is visible)."""
    if not signals.visible:  # nothing to ask CUDA: the build decides, and importing torch would cost ~1.5 s
        build = torch_build()
        if build is not None:
            return judge("torch", *build, signals)
    try:
        import torch
    except ImportError:
        return judge("torch", None, None, signals)
    cuda = torch.version.cuda
    works, error = None, None
    if cuda and signals.visible and signals.driver:
        works = torch.cuda.is_available()
        if not works:
            try:
                torch.cuda.init()
            except Exception as exc:  # torch's own words: "driver too old", "no CUDA GPUs are available", ...
                error = str(exc).strip().splitlines()[0]
    return judge("torch", torch.__version__, cuda, signals, works, error)


# --- the decoder's device and the policy -----------------------------------------------------

@dataclass(frozen=True)
class Decision:
    serve: bool  # False: refuse to serve
    device: str  # where the decoder runs: "cuda" or "cpu"
    line: str | None  # what to log and to carry in health; None when nothing is wrong
    policy: str


def decoder_parameters(decoder_dir: str | Path) -> int:
    """Parameter count of a Hugging Face decoder folder, from its safetensors headers (no weights read).

    Without safetensors files, the weight files' bytes / 2 (16-bit storage)."""
    from safetensors import safe_open

    folder = Path(decoder_dir)
    count = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as weights:
            for key in weights.keys():
                numel = 1
                for size in weights.get_slice(key).get_shape():
                    numel *= size
                count += numel
    if count == 0:
        count = sum(p.stat().st_size for p in folder.glob("*.bin")) // 2
    return count


def cpu_request_seconds(parameters: int, max_new_tokens: int) -> float:
    """Estimated seconds for one request on the CPU: every decode step reads the fp32 weights."""
    return max_new_tokens * parameters * FP32_BYTES / CPU_WEIGHT_BYTES_PER_S


def decide(report: ProbeReport, policy: str, cpu_seconds: float | None = None, requested: str = "auto") -> Decision:
    """Where the decoder runs and whether to serve, given the report and the policy.

    `cpu_seconds` (the estimate for one request on the CPU) is needed by policy auto only."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    if requested == "cpu":
        return Decision(True, "cpu", report.problem(), policy)
    if report.usable("torch"):
        return Decision(True, "cuda", report.problem(), policy)
    problem = report.problem()
    if problem is None and requested == "cuda":
        torch_status = report.runtime("torch")
        problem = "CUDA requested for the decoder but " + (torch_status.describe() if torch_status
                                                           else "torch is unknown")
    if problem is None:
        return Decision(True, "cpu", None, policy)  # no GPU here: the CPU is the plan, not a fallback
    if policy == "serve-cpu":
        return Decision(True, "cpu", f"{problem}. Decoder on the CPU (policy serve-cpu)", policy)
    if policy == "refuse":
        return Decision(False, "cpu", f"{problem}. Refusing to serve on the CPU (policy refuse)", policy)
    if cpu_seconds is None:  # the decoder's size is unknown: never refuse blind
        return Decision(True, "cpu", f"{problem}. Decoder on the CPU (policy auto, decoder size unknown)", policy)
    estimate = f"~{cpu_seconds:.0f} s per request estimated on the CPU, budget {CPU_ANSWER_BUDGET_S:.0f} s"
    if cpu_seconds <= CPU_ANSWER_BUDGET_S:
        return Decision(True, "cpu", f"{problem}. Decoder on the CPU (policy auto: {estimate})", policy)
    return Decision(False, "cpu", f"{problem}. Refusing to serve (policy auto: {estimate})", policy)


def resolve_decoder_device(requested: str, policy: str = DEFAULT_UNUSABLE_GPU_POLICY, *,
                           decoder_dir: str | Path | None = None, max_new_tokens: int = 32,
                           report: ProbeReport | None = None) -> Decision:
    """The decoder's device for `requested` ("auto", "cuda" or "cpu") under `policy`.

    Probes only when torch cannot use CUDA (a CUDA-capable torch answers at once). Policy auto
    reads the decoder's size from `decoder_dir`. The caller logs `line` when it is set and must
    not serve when `serve` is False."""
    if requested == "cpu":
        return Decision(True, "cpu", None, policy)
    if report is None:
        import torch

        if torch.cuda.is_available():
            return Decision(True, "cuda", None, policy)
        signals = detect_gpu()
        report = ProbeReport(signals, (probe_torch(signals),))
    seconds = None
    if policy == "auto" and not report.usable("torch") and decoder_dir is not None:
        seconds = cpu_request_seconds(decoder_parameters(decoder_dir), max_new_tokens)
    return decide(report, policy, seconds, requested)
