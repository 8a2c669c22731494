"""A folder or file written whole or not at all: filled beside its target, renamed into place only once complete."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it replaces `target`, on any error it is removed.

    A reader never sees a half-written `target` (an interrupted export, import or conversion leaves none)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def staged_leftovers(target: Path) -> list[Path]:
    """The staging folders a killed writer of `target` left beside it (mkdtemp's 8-character suffix)."""
    return [Path(path) for path in glob.glob(str(target.parent / f"{glob.escape(target.name)}.????????"))]


@contextmanager
def staged_file(target: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file beside `target`; on success it replaces `target` (with `mode`), on any error it is
    removed. A concurrent reader (another process filling the same cache) sees no file or a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
        os.chmod(staging, mode)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
