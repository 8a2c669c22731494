"""Continuing a trained checkpoint (`--init-from`): its settings become the run's, its weights the start.

The checkpoint's decoder, prefix length, prompt, input normalisation and generation limit are taken as they
are (an option given with another value is refused), its `caption_model.json` is the written one's (the
name and, with a LoRA adapter merged, the decoder aside), its reranking encoder scores the reward, and with
the WordNet corpus its `heldout.txt` stays the held-out split, so the scores before and after are on the
same rows and no held-out caption is trained on.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from embcap.candidate_encoders import TextEncoder, encoder_files, load_text_encoder
from embcap.checkpoint import CaptionModelSpec, Checkpoint, DecoderSource, load_checkpoint
from training.data import WORDNET, DataSet, expand, is_parquet
from training.record import RECORD_FILE
from training.reward import AUTO_TARGET, DESCRIPTION_EMBED, SAME_SPACE_COSINE, TEXT_TARGET

HELDOUT_FILE = "heldout.txt"  # a WordNet-trained checkpoint's held-out split (evaluate's built-in one)
# options that a checkpoint fixes: (argparse dest, its value in the checkpoint)
FIXED = {
    "decoder": lambda c: decoder_option(c),
    "prefix_length": lambda c: c.spec.prefix_length,
    "template": lambda c: c.spec.prompt.template,
    "input_norm": lambda c: c.spec.input_norm,
    "max_new_tokens": lambda c: c.spec.generation.max_new_tokens,
}


def decoder_option(checkpoint: Checkpoint) -> str:
    """The checkpoint's decoder as a --decoder value."""
    source = checkpoint.spec.decoder
    if source.path is None:
        return f"gguf:{source.gguf_package}:{source.gguf_file}"
    return str(checkpoint.local_decoder_path())


def apply_init(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Checkpoint | None:
    """Load --init-from and take its settings into `args`; parser.error on a contradiction."""
    if args.init_from is None:
        return None
    try:
        checkpoint = load_checkpoint(args.init_from)
    except ValueError as exc:
        parser.error(f"--init-from: {exc}")
    for dest, value_of in FIXED.items():
        value, given = value_of(checkpoint), getattr(args, dest)
        if given != parser.get_default(dest) and given != value:
            parser.error(f"--{dest.replace('_', '-')} {given} contradicts --init-from {args.init_from} ({value})")
        setattr(args, dest, value)
    if args.candidates != "auto" or args.rerank_encoder is not None:
        parser.error("--candidates and --rerank-encoder come from --init-from's rerank settings")
    held = checkpoint.root / HELDOUT_FILE
    if args.data == WORDNET and args.heldout is None and held.is_file():
        args.heldout = str(held)
        seed = recorded_seed(checkpoint)
        if seed is not None and seed != args.seed:
            # the corpus holds out whole synsets per seed: another seed trains on the checkpoint's held-out ones
            parser.error(f"--seed {args.seed}: --init-from {args.init_from} was trained on the WordNet corpus of seed "
                         f"{seed}, whose held-out split another seed would partly train on; use --seed {seed}")
    args.name = args.name or f"{checkpoint.spec.name}-{args.objective}"
    return checkpoint


def recorded_seed(checkpoint: Checkpoint) -> int | None:
    """The seed in the checkpoint's training record, if it has one."""
    import json

    path = checkpoint.root / RECORD_FILE
    return json.loads(path.read_text()).get("seed") if path.is_file() else None


def run_spec(checkpoint: Checkpoint, name: str) -> CaptionModelSpec:
    """The written checkpoint's spec: the one continued, renamed."""
    return checkpoint.spec.model_copy(update={"name": name})


def written_spec(spec: CaptionModelSpec, decoder: DecoderSource | None) -> CaptionModelSpec:
    """`spec` with the decoder it is written with (a merged decoder inside the new folder), if that changed."""
    return spec if decoder is None else spec.model_copy(update={"decoder": decoder})


def copy_encoder(checkpoint: Checkpoint, out: Path) -> None:
    """Copy the reranking encoder's files that live inside `checkpoint` to the same place under `out`."""
    for path in encoder_files(checkpoint):
        try:
            relative = path.resolve().relative_to(checkpoint.root)
        except ValueError:  # an installed package or an absolute path: referenced, not copied
            continue
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)


def reward_encoder(checkpoint: Checkpoint) -> TextEncoder:
    """The checkpoint's reranking encoder, which scores the reward."""
    if checkpoint.spec.rerank.encoder is None:
        raise SystemExit(f"--init-from {checkpoint.root} has no rerank.encoder: the reward objectives score "
                         "captions with it")
    return load_text_encoder(checkpoint)


def target_column(args: argparse.Namespace) -> str | None:
    """The data column to read as reward targets: a named column, or with auto description_embed when every
    parquet file has it; None for the encoded reference text."""
    if args.objective == "ce" or args.reward_target == TEXT_TARGET:
        return None
    if args.reward_target != AUTO_TARGET:
        return args.reward_target
    if not is_parquet(args.data):
        return None
    import pyarrow.parquet as pq

    files = expand(args.data) + (expand(args.heldout) if args.heldout else [])
    return DESCRIPTION_EMBED if all(DESCRIPTION_EMBED in pq.read_schema(f).names for f in files) else None


def resolve_target(requested: str, data: DataSet, encoder: TextEncoder, rows: int = 16) -> tuple[str, float | None]:
    """(the target used, the mean cosine between the encoded references and the column on the first `rows`
    training rows). `auto` keeps the column only when the encoder reproduces it (cosine >= SAME_SPACE_COSINE):
    then the column is the encoder's own space and the reward is the metric that made it."""
    targets = data.train.targets
    if targets is None:
        return TEXT_TARGET, None
    column = DESCRIPTION_EMBED if requested == AUTO_TARGET else requested
    sample = list(range(min(rows, len(data.train))))
    encoded = encoder.encode([data.train.texts[i] for i in sample])
    vectors = targets[sample] / np.maximum(np.linalg.norm(targets[sample], axis=1, keepdims=True), 1e-12)
    agreement = float(np.mean(np.sum(encoded * vectors, axis=1)))
    if requested == AUTO_TARGET and agreement < SAME_SPACE_COSINE:
        print(f"reward target: the encoded reference text ({column} is not the reward encoder's space: mean cosine "
              f"{agreement:.3f} on {len(sample)} rows)")
        return TEXT_TARGET, agreement
    print(f"reward target: the data's {column} (mean cosine {agreement:.3f} to the encoded reference on "
          f"{len(sample)} rows)")
    return column, agreement


def unit_targets(data_targets: np.ndarray | None, target: str, rows: list[int], texts: list[str],
                 encoder: TextEncoder) -> np.ndarray:
    """[len(rows), D] unit reward targets of training rows."""
    if target == TEXT_TARGET:
        return encoder.encode(texts)
    vectors = np.asarray(data_targets[rows], dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


__all__ = ["HELDOUT_FILE", "apply_init", "copy_encoder", "decoder_option", "resolve_target", "reward_encoder",
           "run_spec", "target_column", "unit_targets", "written_spec"]
