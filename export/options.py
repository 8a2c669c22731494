"""The export's options, defined once: the dataclass, its checks and its command line.

`python -m export` and `server.py` build their flags from `ExportOptions` with
`add_arguments`; server.py hands the ones it was given to the export with `to_argv`.
Each field's help text lives in its metadata, so a new option is one new field.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from embcap.checkpoint import MAX_CANDIDATES
from embcap.deadlines import request_timeout_s
from embcap.contract import ATTENTION_BACKENDS, DEFAULT_ENGINE, ENGINES, FP8_MODES, QUEUE_DELAY_US
from export.templates import TemplateError

DEVICES = ("auto", "cpu", "cuda")
ACCELERATORS = ("auto", "cpu", "cuda", "tensorrt")
DTYPES = ("float32", "float16", "bfloat16")


class OptionError(TemplateError):
    """Export options out of range (caught where template errors are: at export time)."""


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None, parse=None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


def parse_gpus(text: str) -> tuple[int, ...]:
    """"0,1,3" -> (0, 1, 3); each GPU at most once."""
    try:
        gpus = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes comma-separated GPU indices, not {text!r}") from None
    if not gpus:
        raise argparse.ArgumentTypeError("--gpus needs at least one GPU index")
    return gpus


@dataclass(frozen=True)
class ExportOptions:
    """Serving knobs written into the generated configs (see model_repository/VARIABLES.md)."""

    max_batch_size: int = _option(64, "rows per Triton batch; also the rows the continuous engine decodes at once")
    engine: str = _option(DEFAULT_ENGINE, "decoding engine: continuous batching or Hugging Face generate()",
                          choices=ENGINES)
    candidates: int | None = _option(None, "captions decoded per row, the best answered by the reranker (default: "
                                           "the checkpoint's rerank.candidates; 1: no reranking)")
    queue_delay_us: int | None = _option(None, "Triton dynamic-batching delay (default: the engine's, "
                                               + ", ".join(f"{k} {v}" for k, v in QUEUE_DELAY_US.items()) + ")")
    dynamic_batching: bool = _option(True, "Triton dynamic batching in front of the projector and decoder")
    projector_instances: int = _option(1, "projector instances (on a GPU: per GPU)")
    decoder_instances: int = _option(1, "decoder instances, one engine each (on a GPU: per GPU)")
    gpus: tuple[int, ...] | None = _option(None, "GPUs to place the instances on, e.g. 0,1 (default: Triton's "
                                                 "choice, every visible GPU)", parse=parse_gpus)
    device: str = _option("auto", "where the models run", choices=DEVICES)
    dtype: str = _option("bfloat16", "decoder dtype on CUDA", choices=DTYPES)
    accelerator: str = _option("auto", "projector runtime on a GPU", choices=ACCELERATORS)
    decoder_threads: int = _option(2, "torch threads of the decoder on the CPU")
    projector_threads: int = _option(1, "ONNX Runtime threads of the projector on the CPU")
    reranker_threads: int = _option(1, "threads of the reranker's text encoder on the CPU")
    engine_cache_dir: str = _option("/tmp/embcap-trt-engines", "writable folder for TensorRT engines")
    request_timeout_s: float | None = _option(None, "seconds a request may decode before the continuous engine drops "
                                                    "its rows (default: $EMBCAP_REQUEST_TIMEOUT_S, else 55; the "
                                                    "gateway's Triton deadline is the same setting)")
    max_queued_rows: int | None = _option(None, "rows the continuous engine queues before it refuses requests at "
                                                "once (default: 32 x max_batch_size); it also refuses those its "
                                                "measured rate cannot answer before the deadline")
    attention_backend: str = _option("auto", "the continuous engine's attention kernels on a GPU",
                                     choices=ATTENTION_BACKENDS)
    fp8: str = _option("off", "FP8 (e4m3) weights for the continuous engine's projections on a GPU of compute "
                              "capability >= 8.9, input scales 'static' (calibrated at export from the "
                              "checkpoint's held-out inputs) or 'dynamic' (per token)", choices=FP8_MODES)

    def validate(self) -> None:
        """Raise OptionError naming every out-of-range option."""
        checks = [
            (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}"),
            (self.queue_delay_us is None or self.queue_delay_us >= 0, "queue_delay_us must be >= 0"),
            (self.projector_instances >= 1, "projector_instances must be >= 1"),
            (self.decoder_instances >= 1, "decoder_instances must be >= 1"),
            (self.gpus is None or (len(self.gpus) > 0 and min(self.gpus) >= 0
                                   and len(set(self.gpus)) == len(self.gpus)),
             "gpus must be distinct GPU indices >= 0"),
            (self.gpus is None or self.device != "cpu", "gpus needs a GPU: not with device cpu"),
            (self.candidates is None or 1 <= self.candidates <= MAX_CANDIDATES,
             f"candidates must be between 1 and {MAX_CANDIDATES}"),
            (min(self.decoder_threads, self.projector_threads, self.reranker_threads) >= 1,
             "thread counts must be >= 1"),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (self.accelerator in ACCELERATORS, f"accelerator must be one of {ACCELERATORS}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}"),
            (self.request_timeout_s is None or self.request_timeout_s > 0, "request_timeout_s must be > 0"),
            (self.max_queued_rows is None or self.max_queued_rows >= 1, "max_queued_rows must be >= 1"),
            (self.attention_backend in ATTENTION_BACKENDS, f"attention_backend must be one of {ATTENTION_BACKENDS}"),
            (self.fp8 in FP8_MODES, f"fp8 must be one of {FP8_MODES}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise OptionError("invalid export options: " + "; ".join(problems))

    @property
    def effective_request_timeout_s(self) -> float:
        """The decode deadline: the one asked for, else the gateway's ($EMBCAP_REQUEST_TIMEOUT_S or its default)."""
        return request_timeout_s() if self.request_timeout_s is None else self.request_timeout_s

    @property
    def effective_max_queued_rows(self) -> int:
        return 32 * self.max_batch_size if self.max_queued_rows is None else self.max_queued_rows

    @property
    def effective_queue_delay_us(self) -> int:
        """The dynamic-batching queue delay: the one asked for, else the engine's."""
        return QUEUE_DELAY_US[self.engine] if self.queue_delay_us is None else self.queue_delay_us

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (export.json, benchmark reports)."""
        return asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One flag per ExportOptions field; a flag not given leaves the field's default (see `from_arguments`)."""
    for option in fields(ExportOptions):
        meta, default = option.metadata, option.default
        help_text = meta["help"] if default is None else f"{meta['help']} (default: {default})"
        kwargs: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS, "help": help_text}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["parse"] is not None:
            kwargs["type"] = meta["parse"]
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["type"] = {"int": int, "int | None": int, "float | None": float}.get(option.type, str)
        parser.add_argument(_flag(option.name), **kwargs)


def from_arguments(args: argparse.Namespace, **overrides: Any) -> ExportOptions:
    """The options given on the command line (parsed by a parser `add_arguments` filled), then `overrides`."""
    given = {option.name: getattr(args, option.name) for option in fields(ExportOptions)
             if hasattr(args, option.name)}
    return ExportOptions(**{**given, **overrides})


def to_argv(options: ExportOptions) -> list[str]:
    """The flags that give `options` to `python -m export` (only those that differ from the defaults)."""
    argv = []
    for option in fields(ExportOptions):
        value = getattr(options, option.name)
        if option.default is not MISSING and value == option.default:
            continue
        if isinstance(value, bool):
            argv.append(_flag(option.name) if value else "--no-" + option.name.replace("_", "-"))
        elif isinstance(value, tuple):
            argv.append(f"{_flag(option.name)}={','.join(map(str, value))}")
        else:
            argv.append(f"{_flag(option.name)}={value}")
    return argv
