"""server.py's export: the cached one when it fits this start (export.cache), else `python -m export` in a child.

The supervisor asks `reuse` first, then runs `start` and `problem`, and hands a successful export to `keep`.
The cache never fails a start: one that cannot be read, copied or written only costs the reuse (logged).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from export import EXPORT_FAILED
from export.cache import CachedExport, ExportCache
from export.options import ExportOptions, to_argv
from runtime.lifetime import dies_with_this_process
from runtime.local import ROOT

log = logging.getLogger("embcap.server")


def export_problem(stderr: bytes) -> str:
    """Health's reason for a failed export: its last lines, prefixed once."""
    lines = [line.strip() for line in stderr.decode(errors="replace").strip().splitlines() if line.strip()][-5:]
    return EXPORT_FAILED + " | ".join(line.removeprefix(EXPORT_FAILED) for line in lines)


async def start(checkpoint: Path, repository: Path, options: ExportOptions) -> asyncio.subprocess.Process:
    """`python -m export` in a child that dies with this process."""
    command = [sys.executable, "-m", "export", str(checkpoint), "--out", str(repository), *to_argv(options)]
    log.info("exporting: %s", " ".join(command))
    return await asyncio.create_subprocess_exec(*command, cwd=ROOT, stderr=asyncio.subprocess.PIPE,
                                                preexec_fn=dies_with_this_process())


async def problem(process: asyncio.subprocess.Process) -> str | None:
    """Wait for the export `start` began: None when it succeeded, else health's reason (logged)."""
    _, stderr = await process.communicate()
    if process.returncode == 0:
        return None
    reason = export_problem(stderr)
    log.error(reason)
    return reason


def probe_disagrees(entry: CachedExport, decision: dict | None) -> str | None:
    """Why a cached `--device auto` export does not fit the device this start's GPU probe decided; None: it fits."""
    if decision is None:
        return f"the cached export is for {entry.device}, and the GPU probe gave no answer"
    if not decision["serve"]:
        return f"the cached export is for {entry.device}, and the GPU probe refuses to serve"
    if decision["device"] != entry.device:
        return f"the cached export is for {entry.device}, the GPU probe decided {decision['device']}"
    return None


async def reuse(cache: ExportCache, key: str, repository: Path, device_option: str, probe: asyncio.Task) -> bool:
    """Copy the entry for `key` into `repository` when its inputs are unchanged and, with --device auto, the GPU
    probe (`probe`: the task answering (report, decision)) decides the device it was exported for. False: export."""
    entry, why = await asyncio.to_thread(cache.lookup, key)
    if entry is None:
        log.info("export cache: %s", why)
        return False
    if device_option == "auto":
        _, decision = await probe
        disagreement = probe_disagrees(entry, decision)
        if disagreement:
            log.info("export cache: %s; exporting", disagreement)
            return False
    try:
        await asyncio.to_thread(cache.restore, entry, repository)
    except OSError as exc:  # evicted meanwhile by another server, or a full disk
        log.warning("export cache: cannot copy %s (%s); exporting", entry.path, exc)
        return False
    log.info("export cache: reused the export of %.0f s ago (%s): the checkpoint's files, the options and the "
             "code are unchanged (--fresh-export exports again)", entry.age_s, entry.path)
    return True


def keep(cache: ExportCache, key: str, repository: Path) -> bool:
    """Keep a copy of a fresh export for the next start; a cache that cannot be written only costs that (logged)."""
    try:
        refused = cache.store(key, repository)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("export cache: the export is not kept (%s)", exc)
        return False
    if refused:
        log.info("export cache: the export is not kept: %s", refused)
    return refused is None
