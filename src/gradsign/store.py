"""A persistent score store: one SQLite row per (space, arch, dataset, proxy, batch size, seed, options,
scoring version), written as each architecture finishes so an interrupted run loses nothing finished.

NaN scores are stored as NULL with no error and read back as NaN; a failed score keeps its error text.
The file is opened in WAL mode with a busy timeout so several processes can share it.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    space TEXT NOT NULL, arch TEXT NOT NULL, dataset TEXT NOT NULL, proxy TEXT NOT NULL,
    batch_size INTEGER NOT NULL, seed INTEGER NOT NULL, options TEXT NOT NULL, version TEXT NOT NULL,
    value REAL, error TEXT, seconds REAL, created REAL NOT NULL,
    PRIMARY KEY (space, arch, dataset, proxy, batch_size, seed, options, version)
)
"""


class StoreError(RuntimeError):
    """The score store file cannot be used (corrupt, not a database, not writable)."""


def default_store_path() -> Path:
    """``$GRADSIGN_CACHE``, else ``$XDG_CACHE_HOME/gradsign/scores.sqlite`` (``~/.cache`` by default)."""
    if os.environ.get("GRADSIGN_CACHE"):
        return Path(os.environ["GRADSIGN_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gradsign" / "scores.sqlite"


@dataclass(frozen=True)
class ScoreKey:
    """Everything a stored score depends on, besides the architecture and the proxy."""

    space: str
    dataset: str
    batch_size: int
    seed: int
    options: str = "{}"
    version: str = ""

    @staticmethod
    def options_text(options: dict) -> str:
        """Canonical JSON of the scoring options that change a score's value."""
        return json.dumps(options, sort_keys=True, separators=(",", ":"))


#: where a score came from: the package's bundled files, the score store, or computed in this run
SOURCES = ("bundled", "store", "computed")


@dataclass(frozen=True)
class StoredScore:
    """One proxy's score of one arch: value (NaN when the proxy raised: see ``error``), the measured
    scoring seconds, and where it came from (one of ``SOURCES``; not stored, set when read)."""

    arch: str
    proxy: str
    value: float
    error: str | None
    seconds: float | None
    source: str = "computed"


class ScoreStore:
    """Scores in one SQLite file; use as a context manager or call ``close``."""

    def __init__(self, path: str | Path, *, timeout: float = 60.0):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"score store {self.path} is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.connection = sqlite3.connect(self.path, timeout=timeout)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open score store {self.path}: {error}") from None
        try:
            self._check_and_create(timeout)
        except sqlite3.OperationalError as error:
            self.connection.close()
            if _is_busy(error):
                raise StoreError(f"score store {self.path} stayed locked by another process for "
                                 f"{timeout:g} s") from None
            raise StoreError(f"score store {self.path} is unusable ({error}); it was left untouched: "
                             "move it away, or pass another --cache or --no-cache") from None
        except sqlite3.DatabaseError as error:
            self.connection.close()
            raise StoreError(f"score store {self.path} is unreadable ({error}); it was left untouched: "
                             "move it away, or pass another --cache or --no-cache") from None

    def _check_and_create(self, timeout: float) -> None:
        # a read first, so that a corrupt or foreign file is reported before anything is written to it
        tables = {row[0] for row in self.connection.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "scores" not in tables:
            raise sqlite3.DatabaseError("it holds other tables, not a gradsign score store")
        if tables:
            columns = [row[1] for row in self.connection.execute("PRAGMA table_info(scores)")]
            if columns[:12] != ["space", "arch", "dataset", "proxy", "batch_size", "seed", "options",
                                "version", "value", "error", "seconds", "created"]:
                raise sqlite3.DatabaseError("its scores table has an unknown layout")
        # switching to WAL needs a moment alone with the file, which the busy timeout does not wait for
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.connection.execute("PRAGMA journal_mode=WAL")
                with self.connection:
                    self.connection.execute(SCHEMA)
                return
            except sqlite3.OperationalError as error:
                if not _is_busy(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> ScoreStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    def get(self, key: ScoreKey, archs: Iterable[str], proxies: Iterable[str]) -> dict[tuple[str, str], StoredScore]:
        """Stored scores of ``archs`` x ``proxies`` under ``key``, keyed by (arch, proxy)."""
        archs, proxies = set(archs), list(proxies)
        marks = ",".join("?" * len(proxies))
        rows = self.connection.execute(
            f"SELECT arch, proxy, value, error, seconds FROM scores WHERE space=? AND dataset=? AND "
            f"batch_size=? AND seed=? AND options=? AND version=? AND proxy IN ({marks})",
            (key.space, key.dataset, key.batch_size, key.seed, key.options, key.version, *proxies))
        found = {}
        for arch, proxy, value, error, seconds in rows:
            if arch in archs:
                found[(arch, proxy)] = StoredScore(arch, proxy, _read_value(value), error, seconds, "store")
        return found

    def put(self, key: ScoreKey, results: Iterable[StoredScore]) -> None:
        """Write the scores of one architecture (or more) in one transaction; replaces equal keys."""
        now = time.time()
        rows = [(key.space, r.arch, key.dataset, r.proxy, key.batch_size, key.seed, key.options,
                 key.version, None if math.isnan(r.value) else r.value, r.error, r.seconds, now)
                for r in results]
        try:
            with self.connection:
                self.connection.executemany(
                    "INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        except sqlite3.Error as error:
            raise StoreError(f"cannot write to score store {self.path}: {error}") from None

    def prune(self, *, errors: bool = False, other_versions: bool = False, version: str = "") -> int:
        """Delete rows whose scoring raised and/or rows of versions other than ``version``."""
        clauses = (["error IS NOT NULL"] if errors else []) + (["version != ?"] if other_versions else [])
        if not clauses:
            raise ValueError("nothing to prune: choose errors and/or other versions")
        params = (version,) if other_versions else ()
        with self.connection:
            cursor = self.connection.execute(f"DELETE FROM scores WHERE {' OR '.join(clauses)}", params)
        return cursor.rowcount

    def rows(self) -> Iterator[tuple]:
        """Every row, as stored (for export)."""
        yield from self.connection.execute("SELECT * FROM scores ORDER BY space, dataset, proxy, arch")

    def summary(self) -> list[tuple]:
        """(space, dataset, proxy, batch_size, seed, options, version, rows, errors) groups."""
        return list(self.connection.execute(
            "SELECT space, dataset, proxy, batch_size, seed, options, version, COUNT(*), "
            "SUM(error IS NOT NULL) FROM scores GROUP BY space, dataset, proxy, batch_size, seed, "
            "options, version ORDER BY space, dataset, proxy"))


def _is_busy(error: sqlite3.OperationalError) -> bool:
    return "locked" in str(error) or "busy" in str(error)


def _read_value(value: float | None) -> float:
    return float("nan") if value is None else float(value)
