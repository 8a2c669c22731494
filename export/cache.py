"""The export cache: a repository exported before is reused while nothing it was made from has changed.

server.py exports its checkpoint at every start: on the CPU about 5 s of imports and checks, on a
GPU also the FP8 calibration. What an export writes is decided by
- the checkpoint's path and the export options,
- the code that writes it (CODE_FOLDERS) and the installed packages,
- the environment variables it reads (EXPORT_ENVIRONMENT),
- the files it reads: the checkpoint folder, the decoder folder, the reranking encoder's files, a GGUF
  source. The export records their sizes and modification times in export.json (`inputs`),
- with `--device auto`, the device the export resolved (export.json's `device`), which the caller
  compares with its own GPU probe.
An entry is a copy of a successful export's repository, in `<cache>/<key>`, where the key is a digest of
the first three. `lookup` checks the fourth against the files as they are now; the caller checks the
last. The repository names no path of its own (the projector's ONNX file is relative to its model
folder), so a copy serves from anywhere.

Inputs modified within RACY_S of the export's fingerprint are not cached: a file rewritten in the
same clock tick, at the same size, would look unchanged (git's "racily clean" index entries).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from embcap.deadlines import REQUEST_TIMEOUT_ENV
from embcap.decoder_source import CACHE_ENV, cache_dir
from embcap.staged_folder import staged_folder

ROOT = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("embcap", "export", "model_repository")  # what writes a repository, and what it copies into one
# What the export reads from its environment: the decoder deadline written into the decoder's config, where GGUF
# decoders are de-quantised to, and the GPUs FP8 calibration may use.
EXPORT_ENVIRONMENT = (REQUEST_TIMEOUT_ENV, CACHE_ENV, "CUDA_VISIBLE_DEVICES")
EXPORT_RECORD = "export.json"  # the export's record inside the repository (inputs, device, options)
MANIFEST = ".entry.json"  # inside an entry: its files and their sizes, written last
FORMAT = 1  # bump when an entry's layout changes
MAX_ENTRIES = 8
RACY_S = 2.0
STAGING_PREFIX = ".staging-"
STALE_STAGING_S = 3600.0


def default_cache_root() -> Path:
    """Where entries live: `exports/` in the project's cache ($EMBCAP_CACHE_DIR)."""
    return cache_dir() / "exports"


def fingerprint(paths: Iterable[Path]) -> dict[str, list[int] | None]:
    """Each file under `paths` (a file, or a folder walked whole) -> [size, mtime_ns]; a missing path -> None."""
    found: dict[str, list[int] | None] = {}
    for path in paths:
        path = Path(path).resolve()
        if path.is_dir():
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                for name in sorted(files):
                    _stat_into(found, Path(folder) / name)
        else:
            _stat_into(found, path)
    return dict(sorted(found.items()))


def _stat_into(found: dict, path: Path) -> None:
    try:
        stat = path.stat()
    except OSError:
        found[str(path)] = None
    else:
        found[str(path)] = [stat.st_size, stat.st_mtime_ns]


def inputs_record(paths: Iterable[Path]) -> dict:
    """What the export writes into export.json as `inputs`: the paths it reads, their fingerprint and when it was
    taken."""
    roots = sorted({str(Path(path).resolve()) for path in paths})
    return {"taken_ns": time.time_ns(), "roots": roots, "files": fingerprint(map(Path, roots))}


def changed_input(record: dict) -> str | None:
    """The first input file that differs now from `record` (changed, removed or new in a recorded folder), or None."""
    files, current = record["files"], fingerprint(map(Path, record["roots"]))
    for path in sorted(set(files) | set(current)):
        if files.get(path) != current.get(path):
            return path
    return None


def racy_input(record: dict) -> str | None:
    """An input modified within RACY_S before the fingerprint was taken (not safe to cache), or None."""
    limit = record["taken_ns"] - int(RACY_S * 1e9)
    for path, stat in record["files"].items():
        if stat is not None and stat[1] >= limit:
            return path
    return None


def code_digest(root: Path = ROOT) -> str:
    """A digest of every file in CODE_FOLDERS and of the installed distributions' names and versions."""
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\n".join(installed_distributions()).encode())
    return digest.hexdigest()


def installed_distributions() -> list[str]:
    """The `name-version.dist-info` folders of this interpreter's environment, sorted."""
    folders = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
    return sorted(name for folder in folders if os.path.isdir(folder)
                  for name in os.listdir(folder) if name.endswith(".dist-info"))


def export_key(checkpoint: Path, options: Mapping, environ: Mapping[str, str], code: str | None = None) -> str:
    """The entry name for exporting `checkpoint` with `options` (ExportOptions.to_dict()) under `environ`."""
    material = {"format": FORMAT, "python": sys.version, "checkpoint": str(Path(checkpoint).resolve()),
                "options": dict(options), "environment": {name: environ.get(name) for name in EXPORT_ENVIRONMENT},
                "code": code if code is not None else code_digest()}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CachedExport:
    """An entry that matches the files as they are now."""

    path: Path
    device: str  # what the export resolved the decoder's device to
    age_s: float


def _files(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != MANIFEST and "__pycache__" not in path.parts}


class ExportCache:
    """Entries under `root`, at most `max_entries` (the least recently used go first)."""

    def __init__(self, root: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.root = Path(root)
        self.max_entries = max_entries

    def lookup(self, key: str) -> tuple[CachedExport | None, str]:
        """The entry for `key` if its inputs are unchanged and its files whole; else None. Either way, why."""
        entry = self.root / key
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            record = json.loads((entry / EXPORT_RECORD).read_text())
            if _files(entry) != manifest["files"]:
                return None, f"the cached export {entry} is not whole"
            changed = changed_input(record["inputs"])
            if changed is not None:
                return None, f"{changed} changed since the cached export"
            return CachedExport(entry, record["device"], time.time() - manifest["stored"]), "unchanged"
        except FileNotFoundError:
            return None, "no cached export for this checkpoint, these options and this code"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"the cached export {entry} is unreadable ({exc})"

    def restore(self, entry: CachedExport, repository: Path) -> None:
        """Copy `entry` into `repository` (replaced whole, as an export does); OSError if the entry vanished."""
        with staged_folder(Path(repository).resolve()) as staging:
            shutil.copytree(entry.path, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        try:
            os.utime(entry.path)  # recently used: evicted last
        except OSError:
            pass  # evicted since it was copied: the copy is whole all the same

    def store(self, key: str, repository: Path) -> str | None:
        """Keep a copy of a fresh export's `repository` under `key`; None, or why it was not kept.
        Raises OSError when the cache cannot be written."""
        record = json.loads((Path(repository) / EXPORT_RECORD).read_text())
        racy = racy_input(record["inputs"])
        if racy is not None:
            return f"{racy} was modified less than {RACY_S:.0f} s before the export read it"
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            shutil.copytree(repository, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            (staging / MANIFEST).write_text(json.dumps({"stored": time.time(), "files": _files(staging)}))
            try:
                staging.rename(self.root / key)
            except OSError:  # stored meanwhile by another server on the same checkpoint
                if not (self.root / key).is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.evict()
        return None

    def evict(self) -> list[Path]:
        """Remove the least recently used entries beyond `max_entries`, and stale staging folders."""
        removed = []
        entries, now = [], time.time()
        for path in self.root.iterdir():
            try:
                modified = path.stat().st_mtime
            except OSError:
                continue
            if path.name.startswith(STAGING_PREFIX):
                if now - modified > STALE_STAGING_S:
                    removed.append(path)
            elif path.is_dir():
                entries.append((modified, path))
        removed += [path for _, path in sorted(entries, reverse=True)[self.max_entries:]]
        for path in removed:
            _remove(path)
        return removed


def _remove(path: Path) -> None:
    """Renamed first, so that a reader sees the whole entry or none of it."""
    doomed = path.with_name(f"{STAGING_PREFIX}{path.name}-{os.getpid()}")
    try:
        path.rename(doomed)
    except OSError:
        return  # removed by another server meanwhile
    shutil.rmtree(doomed, ignore_errors=True)
