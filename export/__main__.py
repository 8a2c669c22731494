"""`python -m export CHECKPOINT --out DIR`: build a Triton model repository."""

from __future__ import annotations

import argparse
import sys

from embcap.checkpoint import CheckpointError
from embcap.completeness import checkpoint_problems
from embcap.loading import resolve_checkpoint
from export import EXPORT_FAILED
from export.options import add_arguments, from_arguments
from export.repository import export_repository
from export.templates import TemplateError


def check_complete(checkpoint: str) -> None:
    """Refuse a checkpoint whose projector, decoder config, weights or tokenizer would not load, naming the file."""
    resolved = resolve_checkpoint(checkpoint, log=print)
    problems = checkpoint_problems(resolved.checkpoint, resolved.decoder_dir, load=True)
    if problems:
        raise CheckpointError(f"checkpoint {resolved.checkpoint.root} is incomplete: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m export", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint folder holding caption_model.json")
    parser.add_argument("--out", default="build/model_repository", help="model repository to write (replaced)")
    add_arguments(parser.add_argument_group("export options"))
    args = parser.parse_args(argv)
    try:
        check_complete(args.checkpoint)
        export_repository(args.checkpoint, args.out, from_arguments(args))
    except (CheckpointError, TemplateError) as exc:
        print(f"{EXPORT_FAILED}{exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
