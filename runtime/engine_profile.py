"""The decoder's load profile as its stubs publish it, for the gateway's admission in server.py.

Each decoder instance's engine writes its profile (embcap.load_profile) into the temp folder of the
tritonserver that runs it (embcap.contract.engine_profile_file) every second. With several instances
Triton spreads requests over them, so the gateway's queue is judged against their combined capacity.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from embcap.contract import DECODER, engine_profile_files
from embcap.load_profile import LoadProfile

log = logging.getLogger("embcap.server")
REFRESH_S = 1.0  # the stubs publish every second: reading more often gains nothing


class EngineProfile:
    """Callable: the decoder's current load profile, or None (none published yet, or another engine)."""

    def __init__(self, folder: Callable[[], Path | None], clock=time.monotonic) -> None:
        self.folder = folder  # the running tritonserver's temp folder, None while there is none
        self.clock = clock
        self._read_at = float("-inf")
        self._profile: LoadProfile | None = None

    def __call__(self) -> LoadProfile | None:
        if self.clock() - self._read_at >= REFRESH_S:
            self._read_at = self.clock()
            self._profile = self._read()
        return self._profile

    def _read(self) -> LoadProfile | None:
        folder = self.folder()
        if folder is None:
            return None
        profiles = []
        for path in engine_profile_files(DECODER, folder):
            try:
                profiles.append(LoadProfile.from_json(path.read_text()))
            except FileNotFoundError:  # its stub is being restarted
                continue
            except (OSError, ValueError) as exc:
                log.warning("cannot read the decoder's load profile %s: %s", path, exc)
        if not profiles:
            return None
        slowest = max(profiles, key=lambda p: p.seconds_to_answer(p.capacity, 0))
        return slowest.scaled(len(profiles))
