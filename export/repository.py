"""Build a Triton model repository (projector, decoder, captioner) from a checkpoint."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from embcap.checkpoint import load_checkpoint
from embcap.decoder_source import resolve_decoder
from embcap.engines import DEFAULT_ENGINE, ENGINES, QUEUE_DELAY_US
from embcap.gpu_probe import resolve_decoder_device
from embcap.projector import load_projector
from embcap.slot_decoder import SUPPORTED_MODEL_TYPES
from export.onnx_projector import PARITY_TOLERANCE, export_projector_onnx, onnx_parity_error
from export.templates import TemplateError, render_config

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
MODELS = ("projector", "decoder", "captioner")
DEVICES = ("auto", "cpu", "cuda")
ACCELERATORS = ("auto", "cpu", "cuda", "tensorrt")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ExportOptions:
    """Serving knobs written into the generated configs (see model_repository/VARIABLES.md)."""

    max_batch_size: int = 64  # also the rows the continuous engine decodes at once
    engine: str = DEFAULT_ENGINE
    queue_delay_us: int | None = None  # None: the engine's own (embcap.engines.QUEUE_DELAY_US)
    dynamic_batching: bool = True
    projector_instances: int = 1
    decoder_instances: int = 1
    device: str = "auto"
    dtype: str = "bfloat16"
    accelerator: str = "auto"
    decoder_threads: int = 2
    projector_threads: int = 1
    engine_cache_dir: str = "/tmp/embcap-trt-engines"

    def validate(self) -> None:
        """Raise TemplateError for out-of-range options."""
        checks = [
            (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}"),
            (self.queue_delay_us is None or self.queue_delay_us >= 0, "queue_delay_us must be >= 0"),
            (self.projector_instances >= 1, "projector_instances must be >= 1"),
            (self.decoder_instances >= 1, "decoder_instances must be >= 1"),
            (self.decoder_threads >= 1 and self.projector_threads >= 1, "thread counts must be >= 1"),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (self.accelerator in ACCELERATORS, f"accelerator must be one of {ACCELERATORS}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise TemplateError("invalid export options: " + "; ".join(problems))

    @property
    def effective_queue_delay_us(self) -> int:
        """The dynamic-batching queue delay: the one asked for, else the engine's."""
        return QUEUE_DELAY_US[self.engine] if self.queue_delay_us is None else self.queue_delay_us


def _resolve_device(device: str) -> str:
    """"auto" becomes cuda or cpu as the decoder would decide (the policy itself is enforced at serve time)."""
    return resolve_decoder_device(device, "serve-cpu").device


def export_repository(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    log: Callable[[str], None] = print,
) -> Path:
    """Export `checkpoint_dir` into the model repository `out_dir` (replaced atomically)."""
    started = time.perf_counter()
    options.validate()
    checkpoint = load_checkpoint(checkpoint_dir)
    spec = checkpoint.spec
    log(f"[1/4] checkpoint {checkpoint.root} ({spec.name})")
    decoder_dir = resolve_decoder(checkpoint, log=log)
    decoder_config = json.loads((decoder_dir / "config.json").read_text())
    hidden_size = int(decoder_config["hidden_size"])
    if options.engine == "continuous" and decoder_config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise TemplateError(f"the continuous engine runs {', '.join(SUPPORTED_MODEL_TYPES)} decoders; this one is "
                            f"{decoder_config.get('model_type')!r}: export with --engine hf")
    log(f"[2/4] decoder {decoder_dir} (hidden size {hidden_size})")
    projector = load_projector(checkpoint.projector_path, spec.embedding_dim, hidden_size, spec.prefix_length)

    device = _resolve_device(options.device)
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        onnx_path = staging / "projector" / "1" / "projector.onnx"
        onnx_path.parent.mkdir(parents=True)
        export_projector_onnx(projector, onnx_path)
        error = onnx_parity_error(projector, onnx_path)
        log(f"[3/4] projector -> ONNX, max abs error vs torch {error:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
        if error > PARITY_TOLERANCE:
            raise TemplateError(f"ONNX projector differs from torch by {error:.2e} > {PARITY_TOLERANCE:.0e}")

        final_onnx = out_dir / "projector" / "1" / "projector.onnx"
        common = {"max_batch_size": options.max_batch_size, "embedding_dim": spec.embedding_dim}
        shape = {"prefix_length": spec.prefix_length, "hidden_size": hidden_size}
        batching = {"dynamic_batching": (
            f"dynamic_batching {{ max_queue_delay_microseconds: {options.effective_queue_delay_us} }}"
            if options.dynamic_batching else "")}
        values = {
            "projector": {
                **common, **shape, **batching,
                "instance_count": options.projector_instances, "instance_kind": kind,
                "onnx_path": final_onnx, "accelerator": options.accelerator if device == "cuda" else "cpu",
                "engine_cache_dir": options.engine_cache_dir, "threads": options.projector_threads,
            },
            "decoder": {
                "max_batch_size": options.max_batch_size, **shape, **batching,
                "instance_count": options.decoder_instances, "instance_kind": kind,
                "checkpoint_dir": checkpoint.root, "decoder_dir": decoder_dir,
                "device": device, "dtype": options.dtype, "threads": options.decoder_threads,
                "engine": options.engine,
            },
            "captioner": common,
        }
        for name in MODELS:
            text, _ = render_config(TEMPLATES / name / "config.pbtxt.tmpl", values[name])
            (staging / name / "1").mkdir(parents=True, exist_ok=True)
            (staging / name / "config.pbtxt").write_text(text)
            model_py = TEMPLATES / name / "1" / "model.py"
            if model_py.exists():
                shutil.copy2(model_py, staging / name / "1" / "model.py")
        (staging / "export.json").write_text(
            json.dumps({"checkpoint": str(checkpoint.root), "decoder": str(decoder_dir), "device": device,
                        "options": asdict(options)}, indent=2) + "\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"[4/4] wrote {', '.join(MODELS)} to {out_dir} in {time.perf_counter() - started:.1f} s "
        f"(device {device}, engine {options.engine}, max batch {options.max_batch_size})")
    return out_dir
