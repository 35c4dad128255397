"""Proxy scores bundled with the package (``data/scores_*.npz``), made by ``gradsign cache export``.

A bundled file holds one proxy's scores for every arch of a space, by benchmark index, with a mask of
the archs it covers, and the key they were computed under. It answers look-ups whose key equals its
own, scoring version included (``evaluate.SCORING_VERSION``: it changes only when a score's definition
or protocol does, not with every package release). A file made by another scoring version is ignored
with a warning, so its scores are computed afresh instead of being passed off as current ones.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from gradsign.store import ScoreKey, StoredScore

DATA_DIR = Path(__file__).parent / "data"


def bundled_file_name(key: ScoreKey, proxy: str) -> str:
    return f"scores_{key.space}_{key.dataset}_{proxy}_b{key.batch_size}_s{key.seed}.npz"


def save_scores(path: Path, key: ScoreKey, proxy: str, values: np.ndarray, seconds: np.ndarray,
                known: np.ndarray) -> None:
    """Write one proxy's scores (arrays by benchmark index) with their key."""
    meta = {"space": key.space, "dataset": key.dataset, "proxy": proxy, "batch_size": key.batch_size,
            "seed": key.seed, "options": key.options, "version": key.version}
    with open(path, "wb") as f:
        np.savez_compressed(f, values=values.astype(np.float64), seconds=seconds.astype(np.float32),
                            known=known.astype(bool), meta=np.array(json.dumps(meta, sort_keys=True)))


def bundled_arrays(key: ScoreKey, proxy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(values, seconds, known) of the bundled scores of ``proxy`` under ``key`` (options and scoring
    version included), arrays by benchmark index; None if there are none. A file for this key made by
    another scoring version is ignored with a ``UserWarning``."""
    path = DATA_DIR / bundled_file_name(key, proxy)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        if meta["options"] != key.options or meta["proxy"] != proxy:
            return None
        if meta.get("version") != key.version:
            warnings.warn(f"bundled scores {path.name} were made by scoring version {meta.get('version')}, "
                          f"not {key.version}: ignored, their scores are computed instead", stacklevel=3)
            return None
        return f["values"], f["seconds"], f["known"]


def bundled_scores(key: ScoreKey, proxy: str, space) -> dict[str, StoredScore]:
    """Bundled scores of ``proxy`` under ``key``, by arch string; empty if there are none (see
    ``bundled_arrays``)."""
    arrays = bundled_arrays(key, proxy)
    if arrays is None:
        return {}
    values, seconds, known = arrays
    return {space.arch(int(i)): StoredScore(space.arch(int(i)), proxy, float(values[i]), None,
                                            float(seconds[i]), "bundled")
            for i in np.flatnonzero(known)}
