"""Write a bench script's table into a docs page between its marker comments."""
from __future__ import annotations

from pathlib import Path


def write_section(path: Path, begin: str, end: str, body: str, intro: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path``; where the markers are absent, append
    ``intro`` (a heading and a paragraph) followed by the marked ``body``."""
    text = path.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"
    else:
        text = text.rstrip("\n") + f"\n\n{intro}{begin}\n{body}\n{end}\n"
    path.write_text(text)
