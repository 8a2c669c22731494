"""`.dockerignore` matching with Docker's rules: last match wins, `!` re-includes,
`*` stays within one path segment, `**` spans any, and a matched folder takes its
contents with it."""

from __future__ import annotations

import os
import re
from functools import lru_cache


def patterns(text: str) -> list[str]:
    """Non-empty, non-comment lines, as Docker reads them."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern:
    pattern = os.path.normpath(pattern.lstrip("/")) if pattern.strip("/") else "."
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.find("]", i)
            if end < 0:
                out += re.escape(char)
            else:
                out += "[" + pattern[i + 1:end].replace("!", "^", 1) + "]"
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def _matches(pattern: str, path: str) -> bool:
    parts = path.split("/")
    return any(_regex(pattern).match("/".join(parts[:n])) for n in range(1, len(parts) + 1))


def is_excluded(path: str, rules: list[str]) -> bool:
    """Whether `path` (relative to the build context, '/'-separated) stays out of the build."""
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        if _matches(rule[1:].strip() if negated else rule, path.strip("/")):
            excluded = not negated
    return excluded
