"""Weight files as the evaluator downloads them: a Hugging Face repository, where big files live in Git LFS.

The evaluator fetches the miner's Hugging Face repository (`snapshot_download`, later
`git clone --depth=1` + `git lfs pull`), so LFS-tracked weights of any size arrive as real
files. Hugging Face refuses a push with a file over 10 MiB that is not in LFS, and the
evaluator's code names 18 GiB as its size limit (not enforced on the container path).
GitHub's 100 MiB limit is this project's rule for its own default model, not a miner's.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from embcap.completeness import LFS_POINTER

HF_LFS_THRESHOLD = 10 * 1024 * 1024  # Hugging Face: larger files must be LFS-tracked
MAX_HUGGING_FACE_BYTES = 18 * 1024**3  # the evaluator's MAX_HUGGING_FACE_BYTES
GITHUB_FILE_LIMIT = 100 * 1024 * 1024  # GitHub's per-file limit: the project's own models/default stays under it


@dataclass(frozen=True)
class Findings:
    """What is wrong with a set of weight files, for the Hugging Face route."""

    pointers: list[str]  # LFS pointers whose content was never fetched
    not_routed: list[tuple[str, int]]  # (name, bytes) over the threshold and not LFS-tracked
    total_bytes: int
    largest_bytes: int


def is_pointer(path: Path) -> bool:
    """A Git LFS pointer file (the object itself was not pulled)."""
    if path.stat().st_size >= 1024:
        return False
    with open(path, "rb") as file:
        return file.read(len(LFS_POINTER)) == LFS_POINTER


def lfs_tracked(repo: Path, names: list[str]) -> set[str]:
    """Which of `names` (relative to `repo`) `.gitattributes` routes to LFS (`filter=lfs`).

    git's own answer (`git check-attr`) where `repo` is a git work tree; else the root
    `.gitattributes` read with its basename-or-path matching."""
    if not names:
        return set()
    if (repo / ".git").exists() and shutil.which("git"):
        done = subprocess.run(["git", "-C", str(repo), "check-attr", "-z", "filter", "--", *names],
                              capture_output=True)
        if done.returncode == 0:
            fields = done.stdout.decode().split("\0")
            return {fields[i] for i in range(0, len(fields) - 2, 3) if fields[i + 2] == "lfs"}
    tracked: set[str] = set()
    attributes = repo / ".gitattributes"
    lines = attributes.read_text(errors="replace").splitlines() if attributes.is_file() else []
    for line in lines:
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        pattern, attrs = parts[0], parts[1:]
        routed = "filter=lfs" in attrs
        for name in names:
            target = name if "/" in pattern.strip("/") else Path(name).name
            if fnmatch.fnmatch(target, pattern.lstrip("/")):
                (tracked.add if routed else tracked.discard)(name)
    return tracked


def inspect(repo: Path, files: list[Path]) -> Findings:
    """Pointers, big files not routed to LFS, and sizes of `files` (inside `repo`)."""
    names = [str(path.relative_to(repo)) for path in files]
    sizes = [path.stat().st_size for path in files]
    big = [(name, size) for name, size in zip(names, sizes) if size > HF_LFS_THRESHOLD]
    tracked = lfs_tracked(repo, [name for name, _ in big])
    return Findings(
        pointers=[name for name, path in zip(names, files) if is_pointer(path)],
        not_routed=[(name, size) for name, size in big if name not in tracked],
        total_bytes=sum(sizes), largest_bytes=max(sizes, default=0))


def attribute_line(name: str) -> str:
    """The `.gitattributes` line that routes files like `name` to LFS (Hugging Face's own form)."""
    suffix = Path(name).suffix
    pattern = f"*{suffix}" if suffix else name
    return f"{pattern} filter=lfs diff=lfs merge=lfs -text"
