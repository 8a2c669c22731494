"""Just enough of a Dockerfile parser for the evaluator's checks: instructions, ENV, stages."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

# The evaluator lower-cases the whole file and rejects it if any of these occurs anywhere
# (comments included). `host` is a plain substring: localhost, --host, HOSTNAME all fail.
FORBIDDEN_WORDS = ("privileged", "host", "sudo", "chmod 777", "/var/run/docker.sock")

# The evaluator builds with docker-py, which uses the legacy builder, not BuildKit. That
# builder refuses every RUN flag (--mount, --network, --security, --device) and
# COPY/ADD --chmod ("the --X option requires BuildKit"); Docker < 23 also refuses the
# COPY/ADD flags of Dockerfile 1.4+ as unknown (newer ones silently ignore them).
# --from, --chown and FROM --platform are legacy-builder syntax and fine.
LEGACY_COPY_FLAGS = ("from", "chown")
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_HEREDOC = re.compile(r"^\d*<<-?\s*([^<]+)$")  # BuildKit's heredoc word, with a name


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


def buildkit_only(text: str) -> list[tuple[int, str]]:
    """(line, what) for each piece of BuildKit-only syntax the legacy builder cannot build."""
    hits = []
    for number, raw in enumerate(text.splitlines(), 1):  # parser directives: only the leading comments
        match = _DIRECTIVE.match(raw.strip())
        if not match:
            break
        if match[1].lower() == "syntax":
            hits.append((number, f"'# syntax={match[2]}' directive (a BuildKit frontend; the legacy builder "
                                 "ignores it and whatever needs it fails)"))
    for ins in parse(text):
        if ins.keyword not in ("RUN", "COPY", "ADD"):
            continue
        words = _words(ins.arguments)
        flags = [word[2:].split("=")[0] for word in _leading_flags(words)]
        if ins.keyword == "RUN":
            hits += [(ins.line, f"RUN --{flag}") for flag in flags]
        else:
            hits += [(ins.line, f"{ins.keyword} --{flag}") for flag in flags if flag not in LEGACY_COPY_FLAGS]
        if any(_HEREDOC.match(w) for w in words):
            hits.append((ins.line, f"heredoc in {ins.keyword} ('<<')"))
    return sorted(hits)


def _words(arguments: str) -> list[str]:
    try:
        return shlex.split(arguments, posix=False)  # keeps quotes: a quoted "<<EOF" is no heredoc
    except ValueError:
        return arguments.split()


def _leading_flags(words: list[str]) -> list[str]:
    flags = []
    for word in words:
        if not word.startswith("--"):
            break
        flags.append(word)
    return flags


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
