"""The documentation: README.md stays a front door (at most 250 lines) that links every page of docs/, and every
relative link in README.md and docs/ resolves, to a file that exists and, with an anchor, to one of its headings."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250  # what it is, the two commands, the API in brief, the architecture, the miner's path, links
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the file's headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated one numbered."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose(path):
        if match := re.match(r"#{1,6}\s+(.*?)[\s#]*$", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).replace("`", "").lower()).replace(" ", "-")
            count = counts.get(slug, 0)
            found.add(slug if count == 0 else f"{slug}-{count}")
            counts[slug] = count + 1
    return found


def relative_links(path: Path) -> list[str]:
    """Link targets in the file's prose (not in code), other than URLs with a scheme (http:, mailto:, ...)."""
    return [target for line in prose(path) for target in LINK.findall(INLINE_CODE.sub("", line))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


PAGES = [README, *sorted(DOCS.glob("*.md"))]


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail into a page of docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / unquote(target.partition("#")[0])).resolve() for target in relative_links(README)}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        destination = (page.parent / unquote(file)).resolve() if file else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == [], broken
