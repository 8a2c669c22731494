"""`python -m export CHECKPOINT --out DIR`: build a Triton model repository."""

from __future__ import annotations

import argparse
import sys

from embcap.checkpoint import CheckpointError
from embcap.engines import ENGINES
from export.repository import ACCELERATORS, DEVICES, DTYPES, ExportOptions, export_repository
from export.templates import TemplateError


def main(argv: list[str] | None = None) -> int:
    defaults = ExportOptions()
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint folder holding caption_model.json")
    parser.add_argument("--out", default="build/model_repository", help="model repository to write (replaced)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--engine", choices=ENGINES, default=defaults.engine,
                        help="decoding engine: continuous batching (default) or Hugging Face generate()")
    parser.add_argument("--queue-delay-us", type=int, default=defaults.queue_delay_us,
                        help="Triton dynamic-batching delay (default: 0 for continuous, 20000 for hf)")
    parser.add_argument("--no-dynamic-batching", action="store_true")
    parser.add_argument("--projector-instances", type=int, default=defaults.projector_instances)
    parser.add_argument("--decoder-instances", type=int, default=defaults.decoder_instances)
    parser.add_argument("--device", choices=DEVICES, default=defaults.device)
    parser.add_argument("--dtype", choices=DTYPES, default=defaults.dtype, help="decoder dtype on CUDA")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default=defaults.accelerator,
                        help="projector runtime on a GPU")
    parser.add_argument("--decoder-threads", type=int, default=defaults.decoder_threads)
    parser.add_argument("--projector-threads", type=int, default=defaults.projector_threads)
    parser.add_argument("--engine-cache-dir", default=defaults.engine_cache_dir)
    args = parser.parse_args(argv)
    options = ExportOptions(
        max_batch_size=args.max_batch_size, engine=args.engine, queue_delay_us=args.queue_delay_us,
        dynamic_batching=not args.no_dynamic_batching, projector_instances=args.projector_instances,
        decoder_instances=args.decoder_instances, device=args.device, dtype=args.dtype,
        accelerator=args.accelerator, decoder_threads=args.decoder_threads,
        projector_threads=args.projector_threads, engine_cache_dir=args.engine_cache_dir,
    )
    try:
        export_repository(args.checkpoint, args.out, options)
    except (CheckpointError, TemplateError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
