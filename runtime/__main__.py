"""`python -m runtime prepare`: put the Triton Python-backend stub in place and de-quantise the default decoder."""

from __future__ import annotations

import argparse

from embcap.decoder_source import smollm2_decoder_dir
from runtime.triton_install import ensure_python_stub, find_triton


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m runtime", description=__doc__)
    parser.add_argument("command", choices=("prepare",))
    parser.parse_args(argv)
    install = find_triton()
    ensure_python_stub(install)
    print(f"tritonserver: {install.binary}")
    print(f"SmolLM2 decoder: {smollm2_decoder_dir()}")


if __name__ == "__main__":
    main()
