"""Static FP8 input scales, measured offline from a checkpoint's own held-out inputs.

- `heldout_rows(checkpoint, start, count)`: the checkpoint's held-out inputs and their reference
  captions: `heldout.parquet` in the evaluator's layout (`video_embed`, `description`), else
  `heldout.txt` (`source<TAB>caption` lines, the split training writes) with each caption mapped into
  the input space by the checkpoint's own `rerank.encoder` and spread into an evaluator-shaped
  embedding (embcap.inputs.realistic_around: the mean of 15 clips, norm below 1). The first
  `CALIBRATION_ROWS` rows calibrate; measurements of quality start after them.
- `calibrate(generator, prefix, candidates)`: decodes the rows as the server would (the continuous
  engine's own forward, unquantised, each row's candidates included) and records the largest |input|
  of every layer's four projections over every prompt and generated position. A scale is that
  largest value times `HEADROOM`, over 448: e4m3's precision is relative, so headroom only moves the
  smallest inputs towards the subnormals, while an input beyond the calibrated range is clipped.
- `calibrate_checkpoint(resolved, device, dtype, candidates)`: all of it for a checkpoint (what the
  export runs, on the GPU that will serve), kept in the embcap cache under a key of everything the
  result depends on, so that a server restarting with the same files does not load the decoder twice.
- `format_scales` / `parse_scales`: the scales as the exported decoder config holds them (a JSON
  list of [qkv, o, gate_up, down] per layer).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from embcap.checkpoint import Checkpoint, CheckpointError
from embcap.fp8 import AMAX_FLOOR, E4M3_MAX
from embcap.lean_llama import LeanLayer, ProjectionScales

if TYPE_CHECKING:
    from embcap.loading import ResolvedCheckpoint

HELDOUT_PARQUET = "heldout.parquet"
HELDOUT_CAPTIONS = "heldout.txt"
CALIBRATION_ROWS = 64
HEADROOM = 2.0  # bench/RESULTS.md, "FP8 weights": 1, 2 and 4 measured on the default model


@dataclass(frozen=True)
class HeldOut:
    """Held-out rows: input embeddings [N, E], their reference captions, and where they came from."""

    embeddings: np.ndarray
    references: list[str]
    source: str


def heldout_problem(checkpoint: Checkpoint) -> str | None:
    """Why the checkpoint has no held-out inputs to calibrate with, or None (a cheap check, nothing loaded)."""
    root = checkpoint.root
    if (root / HELDOUT_PARQUET).is_file():
        return None
    if not (root / HELDOUT_CAPTIONS).is_file():
        return (f"{root} has neither {HELDOUT_PARQUET} (video_embed, description) nor {HELDOUT_CAPTIONS} "
                "(source<TAB>caption lines) to calibrate static FP8 scales from")
    if checkpoint.spec.rerank.encoder is None:
        return (f"{root / HELDOUT_CAPTIONS} holds captions, and the checkpoint names no rerank.encoder to map them "
                "into its input space")
    return None


def heldout_rows(checkpoint: Checkpoint, start: int, count: int, seed: int = 0) -> HeldOut:
    """Rows start..start+count of the checkpoint's held-out split (fewer when it ends sooner)."""
    problem = heldout_problem(checkpoint)
    if problem:
        raise CheckpointError(problem)
    parquet = checkpoint.root / HELDOUT_PARQUET
    if parquet.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(parquet, columns=["video_embed", "description"]).slice(start, count)
        embeddings = np.asarray(table.column("video_embed").to_pylist(), dtype=np.float32)
        return HeldOut(embeddings.reshape(len(table), -1), [str(t) for t in table.column("description").to_pylist()],
                       str(parquet))
    from embcap.candidate_encoders import load_text_encoder
    from embcap.captions_file import read_caption_lines
    from embcap.inputs import realistic_around

    path = checkpoint.root / HELDOUT_CAPTIONS
    captions = read_caption_lines(path)[0][start:start + count]
    if not captions:
        raise CheckpointError(f"{path} has no rows from row {start} on")
    directions = load_text_encoder(checkpoint).encode(captions)
    return HeldOut(realistic_around(directions, seed), captions, f"{path} (rerank.encoder, evaluator-shaped norms)")


class AmaxObserver:
    """The largest |input| of each (layer, projection), for `SlotKVDecoder.observe`."""

    def __init__(self, layers: list[LeanLayer]) -> None:
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.amax = torch.zeros(len(layers), len(ProjectionScales._fields), dtype=torch.float32)
        self.column = {name: i for i, name in enumerate(ProjectionScales._fields)}

    def __call__(self, layer: LeanLayer, name: str, x: torch.Tensor) -> None:
        row, column = self.index[id(layer)], self.column[name]
        self.amax[row, column] = max(self.amax[row, column].item(), x.detach().abs().max().float().item())

    def scales(self, headroom: float = HEADROOM) -> list[ProjectionScales]:
        """Per layer: the largest input seen times `headroom`, over e4m3's largest value."""
        values = (self.amax.clamp(min=AMAX_FLOOR) * headroom / E4M3_MAX).tolist()
        return [ProjectionScales(*row) for row in values]


@torch.inference_mode()
def observe_amax(generator, prefix: np.ndarray, candidates: int = 1) -> AmaxObserver:
    """Decode [N, P, H] prefix rows (each as `candidates` candidates, as served) through the continuous engine's
    unquantised forward, watching every projection's input."""
    from embcap.candidates import candidate_plan
    from embcap.engines.continuous.running_batch import RunningBatch

    lean = generator.lean
    if lean.fp8_mode != "off":
        raise ValueError("calibration watches the unquantised projections: this decoder is already FP8")
    plan = candidate_plan(generator.spec, candidates)
    rows = len(prefix)
    batch = RunningBatch(generator, rows * plan.count, use_graphs=False, plan=plan)
    observer = AmaxObserver(list(lean.layers))
    batch.decoder.observe = observer
    try:
        start = generator.prompt_start
        if start.shape[1]:  # the batch computed the shared prompt start unobserved: once more, watched
            batch.decoder.prompt_start(start)
        batch.add(prefix, list(range(rows * plan.count)))
        while batch.active:
            batch.step()
            batch.take_finished()
    finally:
        batch.decoder.observe = None
    return observer


def calibrate(generator, prefix: np.ndarray, candidates: int = 1,
              headroom: float = HEADROOM) -> list[ProjectionScales]:
    """Static FP8 input scales of every layer from decoding `prefix`'s rows (see `observe_amax`)."""
    return observe_amax(generator, prefix, candidates).scales(headroom)


@dataclass(frozen=True)
class Calibration:
    """A checkpoint's static FP8 input scales and what export.json records about them."""

    scales: list[ProjectionScales]
    record: dict


def _cache_key(resolved: "ResolvedCheckpoint", dtype: torch.dtype, candidates: int, device_name: str) -> str:
    """Everything a calibration depends on: the files (by size and time), the settings, the software."""
    root, parts = resolved.checkpoint.root, []
    files = [resolved.decoder_dir / "config.json", *sorted(resolved.decoder_dir.glob("*.safetensors")),
             resolved.checkpoint.projector_path, root / "caption_model.json", root / HELDOUT_PARQUET,
             root / HELDOUT_CAPTIONS]
    for path in files:
        stat = path.stat() if path.is_file() else None
        parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{path}:-")
    parts += [str(dtype), str(candidates), device_name, torch.__version__, str(CALIBRATION_ROWS), str(HEADROOM)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def calibrate_checkpoint(resolved: "ResolvedCheckpoint", device: str, dtype: torch.dtype, candidates: int,
                         log: Callable[[str], None] = lambda _: None) -> Calibration:
    """The static FP8 input scales of a resolved checkpoint (embcap.loading) served on `device` in `dtype` with
    `candidates` per row: from the cache when its files and settings are unchanged, else measured there."""
    from embcap.decoder_source import cache_dir
    from embcap.staged_folder import staged_file

    device_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    path = cache_dir() / "fp8-scales" / f"{_cache_key(resolved, dtype, candidates, device_name)}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        log(f"FP8 input scales from {path} (calibrated before with these files)")
        return Calibration(parse_scales(json.dumps(cached["scales"])), cached["record"])
    heldout = heldout_rows(resolved.checkpoint, 0, CALIBRATION_ROWS)
    with torch.inference_mode():
        prefix = resolved.load_projector()(torch.from_numpy(heldout.embeddings)).numpy()
    generator = resolved.load_generator(device, dtype, lean=True, log=log)
    scales = calibrate(generator, prefix, candidates)
    del generator
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    record = calibration_record(scales, heldout.source, len(heldout.references))
    log(f"FP8 input scales calibrated on {device_name} from {len(heldout.references)} held-out rows x "
        f"{candidates} candidate(s) of {heldout.source}")
    try:
        with staged_file(path) as file:  # another export may read or fill the same entry at once
            file.write((json.dumps({"scales": [list(layer) for layer in scales], "record": record}) + "\n").encode())
    except OSError as exc:  # a read-only cache costs the next export a calibration, nothing else
        log(f"FP8 input scales not cached ({exc})")
    return Calibration(scales, record)


def format_scales(scales: list[ProjectionScales]) -> str:
    """The scales as the decoder config's parameter value: [[qkv, o, gate_up, down], ...] (no quotes)."""
    return json.dumps([[float(f"{value:.6g}") for value in layer] for layer in scales], separators=(",", ":"))


def parse_scales(text: str, layers: int | None = None) -> list[ProjectionScales]:
    """`format_scales`' text back, checked: `layers` rows (when given) of 4 positive finite numbers."""
    try:
        rows = json.loads(text)
        scales = [ProjectionScales(*(float(v) for v in row)) for row in rows]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"FP8 input scales must be a JSON list of [qkv, o, gate_up, down] per layer: {exc}") from None
    if layers is not None and len(scales) != layers:
        raise ValueError(f"{len(scales)} layers of FP8 input scales for a decoder of {layers} layers")
    if not all(np.isfinite(v) and v > 0 for layer in scales for v in layer):
        raise ValueError("FP8 input scales must be positive and finite")
    return scales


def calibration_record(scales: list[ProjectionScales], source: str, rows: int) -> dict:
    """What export.json records about a calibration."""
    values = np.asarray(scales)
    return {"source": source, "rows": rows, "headroom": HEADROOM,
            "largest_input": {name: float(values[:, i].max() * E4M3_MAX / HEADROOM)
                              for i, name in enumerate(ProjectionScales._fields)}}

