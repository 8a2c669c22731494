"""`python -m embcap`: set-up helpers (de-quantise the decoder, build small checkpoints)."""

from __future__ import annotations

import argparse

from embcap.builders import make_starter_checkpoint, make_tiny_checkpoint, smollm2_decoder_dir
from embcap.triton_server import ensure_python_stub, find_triton


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m embcap", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="put the Triton stub in place and de-quantise SmolLM2 once")
    tiny = commands.add_parser("tiny", help="write a tiny random-Llama checkpoint (for tests)")
    tiny.add_argument("out")
    starter = commands.add_parser("starter", help="write SmolLM2 + a seeded untrained projector")
    starter.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        install = find_triton()
        ensure_python_stub(install)
        print(f"tritonserver: {install.binary}")
        print(f"SmolLM2 decoder: {smollm2_decoder_dir()}")
    elif args.command == "tiny":
        print(make_tiny_checkpoint(args.out, smollm2_decoder_dir()))
    elif args.command == "starter":
        print(make_starter_checkpoint(args.out))


if __name__ == "__main__":
    main()
