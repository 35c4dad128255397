"""Write a bench script's table into a docs page between its marker comments; name the engine it measured."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_version() -> str:
    """The last commit of src/gradsign/engine.py, marked when the working copy differs from it."""
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("log", "-1", "--format=%h", "--", "src/gradsign/engine.py") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "src/gradsign/engine.py") else "")


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
