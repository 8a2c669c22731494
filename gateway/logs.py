"""Log lines: one JSON object per line for the project's loggers, each line bounded, floods held back.

Whatever a client sends, no log line exceeds MAX_LINE_BYTES: the project's JSON lines
shrink their longest strings until they fit, and uvicorn's and asyncio's records are cut
by `BoundedRecords`. A message that repeats (accept errors while file descriptors run out,
"Invalid HTTP request received." from a flood of bad connections) is written at most once
per `RepeatLimit.interval_s`, with the count of the ones held back.
"""

from __future__ import annotations

import json
import logging
import time

MAX_LINE_BYTES = 4096  # any log line, whatever the input
MAX_MESSAGE_CHARS = 1024  # a message or a traceback of a foreign logger, before its own prefix
REPEAT_INTERVAL_S = 10.0
FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio")

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fit(entry: dict, limit: int) -> str:
    """`entry` as one JSON line of at most `limit` bytes: the longest strings are halved until it fits."""
    line = json.dumps(entry, default=str)
    while len(line) > limit:
        strings = [(len(v), k) for k, v in entry.items() if isinstance(v, str)]
        if not strings:
            entry = {k: entry[k] for k in ("ts", "level", "logger") if k in entry} | {"msg": "(log entry too large)"}
            return json.dumps(entry)
        size, key = max(strings)
        keep = max(0, min(size // 2, size - (len(line) - limit) - 16))
        entry[key] = entry[key][:keep] + "...(cut)"
        line = json.dumps(entry, default=str)
    return line


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON; `extra={...}` fields become top-level keys; at most MAX_LINE_BYTES."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                      for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _fit(entry, MAX_LINE_BYTES)


def _cut(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "(cut)..." + text[-limit:] if keep_end else text[:limit] + "...(cut)"


class BoundedRecords(logging.Filter):
    """Cuts a foreign logger's message and traceback to MAX_MESSAGE_CHARS each (a line stays < 4 KB)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_MESSAGE_CHARS:
            record.msg, record.args = _cut(message, MAX_MESSAGE_CHARS), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _cut(logging.Formatter().formatException(record.exc_info), MAX_MESSAGE_CHARS,
                                   keep_end=True)  # the end of a traceback says what failed
        return True


class RepeatLimit(logging.Filter):
    """Lets each (logger, message template) through at most once per `interval_s`; the next one that
    passes says how many were held back."""

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "request_id", None):
            return True  # per-request lines are already one per request
        key = (record.name, str(record.msg)[:200].split("\n")[0])
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like this in the last {self.interval_s:g} s not shown)"
            record.args = None
        if len(self._last) > 1000:  # bounded memory under a flood of distinct messages
            self._last.clear()
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines for the project's loggers; uvicorn and asyncio keep their format, bounded and
    without floods (call again after uvicorn configured its loggers: the filters are set once)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatLimit())
    project = logging.getLogger("embcap")
    project.handlers[:] = [handler]
    project.setLevel(level)
    project.propagate = False
    bound_foreign_loggers()


def bound_foreign_loggers() -> None:
    """Put BoundedRecords and one RepeatLimit on uvicorn's and asyncio's loggers (idempotent)."""
    repeat = RepeatLimit()
    for name in FOREIGN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, BoundedRecords) for f in logger.filters):
            logger.addFilter(BoundedRecords())
            logger.addFilter(repeat)
