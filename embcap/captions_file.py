"""The captions file format: `source<TAB>caption` lines or plain captions, `#` comments and blank lines skipped."""

from __future__ import annotations

from pathlib import Path

PLAIN_SOURCE = "captions"  # the source of a line without a tab


def read_caption_lines(path: str | Path) -> tuple[list[str], list[str]]:
    """(captions, sources) of a captions file; plain lines get the source `PLAIN_SOURCE`."""
    captions, sources = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        source, tab, text = line.partition("\t")
        captions.append(text.strip() if tab else line)
        sources.append(source if tab else PLAIN_SOURCE)
    return captions, sources
