"""Just enough of a Dockerfile parser for the evaluator's checks: instructions, ENV, stages."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

# The evaluator lower-cases the whole file and rejects it if any of these occurs anywhere
# (comments included). `host` is a plain substring: localhost, --host, HOSTNAME all fail.
FORBIDDEN_WORDS = ("privileged", "host", "sudo", "chmod 777", "/var/run/docker.sock")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-cased: FROM, RUN, ENV, ...
    arguments: str
    line: int  # where it starts, 1-based


def forbidden_words(text: str) -> list[tuple[int, str]]:
    """(line, word) for every forbidden word, as the evaluator's lower-cased check finds them."""
    hits = []
    for number, line in enumerate(text.lower().splitlines(), 1):
        hits += [(number, word) for word in FORBIDDEN_WORDS if word in line]
    return hits


def parse(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comment lines dropped."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are removed by Docker
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    if pending.strip():
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last build stage (from its FROM on): what the image runs."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1]:] if starts else instructions


def env(instructions: list[Instruction]) -> dict[str, str]:
    """Variables that ENV instructions set (later ones win)."""
    values: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword != "ENV":
            continue
        words = shlex.split(ins.arguments)
        if words and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
            values[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            values[key] = value
    return values


def load(path: Path) -> list[Instruction]:
    return parse(path.read_text())
