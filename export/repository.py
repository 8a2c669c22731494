"""Build a Triton model repository (projector, decoder, the reranker with best-of-N, captioner) from a checkpoint."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from embcap.candidate_encoders import check_text_encoder, encoder_files
from embcap.contract import CANDIDATES, CAPTION, DECODER, ENSEMBLE, PROJECTOR, RERANKER, served_models
from embcap.decoder_source import gguf_path
from embcap.device import resolve_decoder_device
from embcap.loading import ResolvedCheckpoint, resolve_checkpoint
from embcap.lean_llama import fp8_unsupported, unsupported
from embcap.staged_folder import staged_folder
from export.cache import EXPORT_RECORD, inputs_record
from export.onnx_projector import PARITY_TOLERANCE, export_projector_onnx, onnx_parity_error
from export.options import ExportOptions
from export.templates import TemplateError, render_config, render_snippet

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
# The projector's ONNX file, relative to its model folder: the repository names no path of its own, so a copy
# serves from anywhere (export.cache).
ONNX_IN_MODEL = Path("1") / "projector.onnx"
ONNX_FILE = Path(PROJECTOR) / ONNX_IN_MODEL  # inside the repository
RERANK_STEP = TEMPLATES / ENSEMBLE / "rerank_step.pbtxt.tmpl"  # the ensemble's step after the decoder
CANDIDATES_VALUE = "candidates"  # the ensemble's name for the decoder's candidates


def _resolve_device(device: str) -> str:
    """"auto" becomes cuda or cpu as the decoder would decide (the policy itself is enforced at serve time)."""
    return resolve_decoder_device(device, "serve-cpu").device


def candidates_per_row(resolved: ResolvedCheckpoint, options: ExportOptions) -> int:
    """The export's --candidates, else the checkpoint's; more than one needs the checkpoint's encoder."""
    count = options.candidates or resolved.spec.rerank.candidates
    if count > 1 and resolved.spec.rerank.encoder is None:
        raise TemplateError(f"{count} candidates per row need a text encoder to choose between them: "
                            f"{resolved.checkpoint.root} names no rerank.encoder in its caption_model.json")
    return count


def fp8_problems(resolved: ResolvedCheckpoint, options: ExportOptions, device: str) -> list[str]:
    """Every reason the decoder cannot serve `--fp8` as asked on `device` ("cpu"/"cuda"); empty when it can."""
    from transformers import AutoConfig

    from embcap.fp8 import serving_problem
    from embcap.fp8_calibration import heldout_problem

    problems = []
    if options.engine != "continuous":
        problems.append(f"FP8 weights are the continuous engine's (--engine {options.engine} runs Hugging Face's "
                        "modules in --dtype)")
    if options.dtype != "bfloat16":
        problems.append(f"FP8 weights run with bfloat16 activations (--dtype bfloat16, not {options.dtype})")
    problems += [f"{problem} ({resolved.decoder_dir / 'config.json'})"
                 for problem in fp8_unsupported(AutoConfig.from_pretrained(resolved.decoder_dir))]
    if options.fp8 == "static":
        problem = heldout_problem(resolved.checkpoint)
        if problem:
            problems.append(f"{problem}; or export with --fp8 dynamic (per-token scales, no calibration)")
    if device != "cuda":
        problems.append(serving_problem(device))
    else:
        import torch

        gpus = options.gpus if options.gpus is not None else range(torch.cuda.device_count())
        problems += [problem for problem in (serving_problem(f"cuda:{gpu}") for gpu in gpus) if problem]
    return problems


def calibrated_scales(resolved: ResolvedCheckpoint, options: ExportOptions,
                      log: Callable[[str], None]) -> tuple[str, dict | None]:
    """The decoder config's FP8 input scales (calibrated on the first GPU it serves on when static) and what
    export.json records about them; ("", None) when there are none to give."""
    if options.fp8 != "static":
        return "", None
    import torch

    from embcap.fp8_calibration import calibrate_checkpoint, format_scales

    device = f"cuda:{options.gpus[0]}" if options.gpus else "cuda"
    calibration = calibrate_checkpoint(resolved, device, torch.bfloat16, candidates_per_row(resolved, options), log)
    return format_scales(calibration.scales), calibration.record


def input_paths(resolved: ResolvedCheckpoint) -> list[Path]:
    """What an export reads: the checkpoint folder, the decoder folder, the GGUF it was de-quantised from and
    the reranking encoder's files."""
    source = resolved.spec.decoder
    gguf = [gguf_path(source.gguf_package, source.gguf_file)] if resolved.checkpoint.local_decoder_path() is None \
        else []
    return [resolved.checkpoint.root, resolved.decoder_dir, *gguf, *encoder_files(resolved.checkpoint)]


def render_configs(resolved: ResolvedCheckpoint, options: ExportOptions, device: str,
                   fp8_input_scales: str = "") -> dict[str, str]:
    """Model name -> its config.pbtxt text, each checked with Triton's schema, for `device` ("cpu"/"cuda");
    `fp8_input_scales` is `calibrated_scales`' text with --fp8 static."""
    options.validate()
    candidates = candidates_per_row(resolved, options)
    if options.gpus is not None and device != "cuda":
        raise TemplateError(f"--gpus {','.join(map(str, options.gpus))} needs the models on a GPU; the device "
                            f"resolved to {device} (no usable GPU here, or --device cpu)")
    spec = resolved.spec
    common = {"max_batch_size": options.max_batch_size, "embedding_dim": spec.embedding_dim}
    shape = {"prefix_length": spec.prefix_length, "hidden_size": resolved.hidden_size}
    batching = {"dynamic_batching": (
        f"dynamic_batching {{ max_queue_delay_microseconds: {options.effective_queue_delay_us} }}"
        if options.dynamic_batching else "")}
    placement = {"instance_kind": "KIND_GPU" if device == "cuda" else "KIND_CPU",
                 "instance_gpus": f" gpus: [ {', '.join(map(str, options.gpus))} ]" if options.gpus else ""}
    values = {
        PROJECTOR: {
            **common, **shape, **batching, **placement,
            "instance_count": options.projector_instances,
            "onnx_path": ONNX_IN_MODEL, "accelerator": options.accelerator if device == "cuda" else "cpu",
            "engine_cache_dir": options.engine_cache_dir, "threads": options.projector_threads,
        },
        DECODER: {
            "max_batch_size": options.max_batch_size, **shape, **batching, **placement,
            "instance_count": options.decoder_instances,
            "checkpoint_dir": resolved.checkpoint.root, "decoder_dir": resolved.decoder_dir,
            "device": device, "dtype": options.dtype, "threads": options.decoder_threads,
            "engine": options.engine, "candidates": candidates,
            "decoder_output": CANDIDATES if candidates > 1 else CAPTION,
            "request_timeout_s": options.effective_request_timeout_s,
            "max_queued_rows": options.effective_max_queued_rows, "attention_backend": options.attention_backend,
            "fp8": options.fp8, "fp8_input_scales": fp8_input_scales,
        },
        RERANKER: {
            **common, **placement, "candidates": candidates, "instance_count": 1,
            # No dynamic batching: requests reach the reranker one by one as the decoder finishes each, and
            # Triton's batch scheduler would cost a thread (the evaluator's pids limit counts them).
            "dynamic_batching": "",
            "checkpoint_dir": resolved.checkpoint.root, "threads": options.reranker_threads,
        },
        ENSEMBLE: {
            **common, "decoder_output": CANDIDATES if candidates > 1 else CAPTION,
            "decoder_output_target": CANDIDATES_VALUE if candidates > 1 else CAPTION,
            "rerank_step": render_snippet(RERANK_STEP, {}) if candidates > 1 else "",
        },
    }
    return {name: render_config(TEMPLATES / name / "config.pbtxt.tmpl", values[name])[0]
            for name in served_models(candidates)}


def export_repository(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    log: Callable[[str], None] = print,
) -> Path:
    """Export `checkpoint_dir` into the model repository `out_dir` (replaced atomically)."""
    started = time.perf_counter()
    options.validate()
    resolved = resolve_checkpoint(checkpoint_dir, log=log)
    inputs = inputs_record(input_paths(resolved))  # before reading them: a change meanwhile shows next time
    log(f"[1/4] checkpoint {resolved.checkpoint.root} ({resolved.spec.name})")
    if options.engine == "continuous":
        from transformers import AutoConfig, AutoTokenizer

        from embcap.generation import prompt_ids

        ids = prompt_ids(AutoTokenizer.from_pretrained(resolved.decoder_dir), resolved.spec)
        max_length = len(ids.before) + resolved.spec.prefix_length + len(ids.after) + \
            resolved.spec.generation.max_new_tokens
        problems = unsupported(AutoConfig.from_pretrained(resolved.decoder_dir), max_length)
        if problems:
            raise TemplateError(f"the continuous engine does not implement what {resolved.decoder_dir / 'config.json'} "
                                f"asks for: {'; '.join(problems)}; export with --engine hf")
    log(f"[2/4] decoder {resolved.decoder_dir} (hidden size {resolved.hidden_size})")
    projector = resolved.load_projector()
    device = _resolve_device(options.device)
    fp8_scales, fp8_record = "", None
    if options.fp8 != "off":
        problems = fp8_problems(resolved, options, device)
        if problems:
            raise TemplateError(f"--fp8 {options.fp8} cannot be served: " + "; ".join(problems))
        fp8_scales, fp8_record = calibrated_scales(resolved, options, log)
        log(f"      decoder projections in FP8 ({options.fp8} input scales)")
    out_dir = Path(out_dir).resolve()
    # A bad config fails before anything is written.
    configs = render_configs(resolved, options, device, fp8_scales)
    candidates = candidates_per_row(resolved, options)
    if candidates > 1:  # a missing or broken encoder fails here, naming its file, not at request time
        log(f"      reranker: {candidates} candidates per row, {check_text_encoder(resolved.checkpoint)}")
    with staged_folder(out_dir) as staging:
        onnx_path = staging / ONNX_FILE
        onnx_path.parent.mkdir(parents=True)
        export_projector_onnx(projector, onnx_path)
        error = onnx_parity_error(projector, onnx_path)
        log(f"[3/4] projector -> ONNX, max abs error vs torch {error:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
        if error > PARITY_TOLERANCE:
            raise TemplateError(f"ONNX projector differs from torch by {error:.2e} > {PARITY_TOLERANCE:.0e}")
        for name, text in configs.items():
            (staging / name / "1").mkdir(parents=True, exist_ok=True)
            (staging / name / "config.pbtxt").write_text(text)
            model_py = TEMPLATES / name / "1" / "model.py"
            if model_py.exists():
                shutil.copy2(model_py, staging / name / "1" / "model.py")
        (staging / EXPORT_RECORD).write_text(json.dumps({
            "checkpoint": str(resolved.checkpoint.root), "decoder": str(resolved.decoder_dir), "device": device,
            "candidates": candidates, "options": options.to_dict(), "fp8_calibration": fp8_record,
            "inputs": inputs},
            indent=2) + "\n")
    log(f"[4/4] wrote {', '.join(configs)} to {out_dir} in {time.perf_counter() - started:.1f} s "
        f"(device {device}, engine {options.engine}, max batch {options.max_batch_size}, "
        f"{candidates} candidate(s) per row)")
    return out_dir
