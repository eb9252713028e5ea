"""Generated sections of docs/*.md: each lives between `<!-- key -->` and `<!-- /key -->` markers and is replaced
by the next run that produces it, leaving the hand-written text and other sections alone."""

from __future__ import annotations

from pathlib import Path


def replace_section(body: str, key: str, text: str, heading: str = "") -> str:
    """`body` with the section `key` set to `text` (appended under `heading` the first time)."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in body and end in body:
        return body[:body.index(start)] + block + body[body.index(end) + len(end):]
    return body.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"


def write_section(doc: Path, key: str, text: str, heading: str = "", header: str = "") -> None:
    """Update one generated section of `doc` in place (a missing file starts from `header`)."""
    body = doc.read_text() if doc.exists() else header
    doc.write_text(replace_section(body, key, text, heading))
