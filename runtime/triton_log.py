"""Reading tritonserver's log: the line that says why it failed, for health's `error`.

Triton logs errors as `E<MMDD> <time> <tid> <file>:<line>] "<message>"`. On a host
without a GPU it also logs `CudaDriverHelper has not been initialized.` as an error at
every start, which is harmless (docs/configuration.md, "Triton's CUDA lines on a CPU host"), so it is
never taken as the cause. A model that fails to load gives a `failed to load '<model>'`
line, which names the model: that one is preferred to the lines before it.
"""

from __future__ import annotations

import asyncio
import re
from typing import BinaryIO

ERROR_LINE = re.compile(r'^E\d{4} \S+ +\d+ [^\]]+\] "?(?P<message>.*?)"?$')
FINAL_LINE = re.compile(r"^error: (?P<message>.+)$")  # tritonserver's last words before exiting
BENIGN = ("CudaDriverHelper has not been initialized",  # logged at every start on a host without a GPU
          "CUDA driver version is insufficient")  # ditto (the ensemble's CUDA stream); the GPU probe reports a real one
PREFERRED = "failed to load '"
MAX_CHARS = 300  # health's error stays short


def _clean(message: str) -> str:
    text = " ".join(message.replace("\\n", " ").replace('\\"', '"').split())
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 3] + "..."


class TritonLog:
    """Collects the error lines of one tritonserver run and names the one that explains a failure."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.final: str | None = None

    def feed(self, line: str) -> None:
        """One line of Triton's output."""
        match = ERROR_LINE.match(line.rstrip("\r\n"))
        if match and not any(benign in match["message"] for benign in BENIGN):
            if len(self.errors) < 50:  # a failing server repeats itself; the first lines say why
                self.errors.append(_clean(match["message"]))
            return
        final = FINAL_LINE.match(line.strip())
        if final and self.final is None:
            self.final = _clean(final["message"])

    def reset(self) -> None:
        """Forget the lines so far (the server came up: what follows explains a later failure)."""
        self.errors.clear()
        self.final = None

    def first_error(self) -> str | None:
        """The line that explains a failure: a `failed to load` line, else the first error, else the last words."""
        for message in self.errors:
            if PREFERRED in message:
                return message
        return self.errors[0] if self.errors else self.final


async def pump(stream: BinaryIO, log: TritonLog, sink: BinaryIO) -> None:
    """Copy Triton's output pipe `stream` to `sink` line by line, feeding `log`, until the pipe closes.

    Runs on the event loop (no thread: threads count against the container's pids limit)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stream)
    try:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # a line above the limit: pass on what was read
                line = await reader.read(1 << 20)
            if not line:
                return
            sink.write(line)
            sink.flush()
            log.feed(line.decode(errors="replace"))
    finally:
        transport.close()
