"""Write a bench script's table into a docs page between its marker comments; name the engine it measured."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


#: the engine's source files (named in the tables as "the engine")
ENGINE_FILES = ("src/gradsign/engine.py", "src/gradsign/sign_kernels.py", "src/gradsign/_sign_loops.py")


def engine_version() -> str:
    """The last commit of the engine's files, marked when the working copy differs from it."""
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("log", "-1", "--format=%h", "--", *ENGINE_FILES) or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", *ENGINE_FILES) else "")


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
