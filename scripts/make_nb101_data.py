"""Build src/gradsign/data/nb101.npz: the NAS-Bench-101 models of ../shared/data/nb101/nasbench_vis with
their cell specs, found by enumerating the whole space.

Enumeration (one-off, a few minutes), in the benchmark's generation order: for n = 2..7 vertices, every
upper-triangular 0/1 matrix with at most 9 edges in which every vertex lies on an input-to-output path (each
vertex but the output has an out-edge, each but the input an in-edge), in increasing order of its edge bits,
and every labelling of its inner vertices in ``itertools.product`` order; the first spec of each module hash
is kept. That first spec matters: vertex order decides which vertices get the extra channels, so isomorphic
specs can differ in parameter count, and the benchmark trained the first one. Labelled models that differ by
a permutation of the inner vertices have the same hash, so only the first matrix of each class of such
matrices is hashed (3^(n-2) labellings) and the others reuse its hashes. The benchmark paper
reports 423,624 unique models; the script checks that count, that every ``data-1k.json`` spec hashes to its
key, that every bundled hash is found, and that ``nb101_param_count`` of every found spec equals the file's
``trainable_parameters``.

Usage: python scripts/make_nb101_data.py [--shared ../shared] [--out src/gradsign/data/nb101.npz]
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from gradsign.spaces.nb101 import MAX_EDGES, MAX_VERTICES, NUM_MODELS, module_hash
from gradsign.spaces.nb101_model import INPUT, OPS, OUTPUT, nb101_param_count

EPOCHS = (4, 12, 36, 108)


def full_dags(n: int) -> np.ndarray:
    """All (k, n, n) uint8 upper-triangular matrices with <= MAX_EDGES edges where every vertex is on an
    input-to-output path, in the benchmark's generation order: increasing ``bits``, where edge (x, y), x < y,
    is bit y(y-1)/2 + x."""
    cols, rows = np.array([(y, x) for y in range(1, n) for x in range(y)]).reshape(-1, 2).T
    m = len(rows)
    codes = np.arange(2 ** m, dtype=np.int64)
    bits = ((codes[:, None] >> np.arange(m)) & 1).astype(np.uint8)
    bits = bits[bits.sum(axis=1) <= MAX_EDGES]
    mats = np.zeros((len(bits), n, n), dtype=np.uint8)
    mats[:, rows, cols] = bits
    out_ok = (mats[:, : n - 1, :].sum(axis=2) > 0).all(axis=1)
    in_ok = (mats[:, :, 1:].sum(axis=1) > 0).all(axis=1)
    return mats[out_ok & in_ok]


def matrix_classes(mats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each matrix: its class (matrices equal up to a permutation of the inner vertices, found exactly
    as the smallest bit code over all (n-2)! permutations), numbered by first member, and the permutation
    ``p`` reaching that smallest code (``m[p][:, p]`` is the same matrix for every member of a class)."""
    n = mats.shape[1]
    perms = np.array([[0, *p, n - 1] for p in itertools.permutations(range(1, n - 1))])
    weights = (np.int64(1) << np.arange(n * n, dtype=np.int64)).reshape(n, n)
    best = np.full(len(mats), np.iinfo(np.int64).max, dtype=np.int64)
    arg = np.zeros(len(mats), dtype=np.int64)
    for j, p in enumerate(perms):
        code = (mats[:, p][:, :, p].astype(np.int64) * weights).sum(axis=(1, 2))
        better = code < best
        best[better], arg[better] = code[better], j
    _, first, cls = np.unique(best, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[cls.ravel()], perms[arg]


def labelled_hashes(matrix: np.ndarray) -> list[tuple[str, tuple[int, ...]]]:
    """(module hash, inner labels) for every labelling of the inner vertices of ``matrix``.

    Same computation as ``gradsign.spaces.nb101.module_hash`` with the graph structure hoisted out of the
    loop over labellings (checked against it on a sample below)."""
    n = len(matrix)
    in_degree, out_degree = matrix.sum(axis=0), matrix.sum(axis=1)
    preds = [[u for u in range(n) if matrix[u, v]] for v in range(n)]
    succs = [[w for w in range(n) if matrix[v, w]] for v in range(n)]
    md5 = hashlib.md5
    start = {}
    for v in range(n):
        for label in (-1, -2, 0, 1, 2):
            start[v, label] = md5(str((int(out_degree[v]), int(in_degree[v]), label)).encode()).hexdigest()
    out = []
    for inner in itertools.product(range(len(OPS)), repeat=n - 2):
        labels = (-1, *inner, -2)
        hashes = [start[v, labels[v]] for v in range(n)]
        for _ in range(n):
            hashes = [md5(("".join(sorted([hashes[u] for u in preds[v]])) + "|"
                           + "".join(sorted([hashes[w] for w in succs[v]])) + "|" + hashes[v]).encode()
                          ).hexdigest() for v in range(n)]
        out.append((md5(str(sorted(hashes)).encode()).hexdigest(), inner))
    return out


def enumerate_space(log=print) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
    """Module hash -> (pruned matrix, inner op labels) of every unique model: the first spec of each hash in
    the benchmark's generation order (n = 2..7, then ``bits``, then labellings in ``itertools.product``
    order). Only the first matrix of each class is hashed; another member's labelled hashes are those of the
    first under the vertex correspondence of their permutations."""
    models: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {}
    rng = np.random.default_rng(0)
    for n in range(2, MAX_VERTICES + 1):
        t0 = time.time()
        mats = full_dags(n)
        cls, perm = matrix_classes(mats)
        tables: dict[int, tuple[dict[tuple[int, ...], str], np.ndarray]] = {}
        for i, matrix in enumerate(mats):
            c = int(cls[i])
            if c not in tables:
                tables[c] = (dict((inner, h) for h, inner in labelled_hashes(matrix)), perm[i])
            table, rep_perm = tables[c]
            # vertex rep_perm[a] of the first member corresponds to vertex perm[i][a] of this one
            to_rep = np.empty(n, dtype=np.int64)
            to_rep[rep_perm] = perm[i]
            check = rng.random() < 0.002
            for inner in itertools.product(range(len(OPS)), repeat=n - 2):
                labels = (-1, *inner, -2)
                h = table[tuple(labels[int(to_rep[v])] for v in range(1, n - 1))]
                if check:  # spot-check the correspondence against a direct hash
                    assert h == module_hash(matrix, labels)
                if h not in models:
                    models[h] = (matrix, inner)
        log(f"n={n}: {len(mats)} matrices in {len(tables)} classes, {len(models)} unique models so far "
            f"({time.time() - t0:.0f} s)")
    return models


def load_vis(shared: Path) -> dict[str, np.ndarray]:
    folder = shared / "data" / "nb101" / "nasbench_vis"
    parts = [json.loads((folder / f"data-{k}.json").read_text()) for k in ("20k", "10k")]
    columns = {}
    for key in ("key", "trainable_parameters", "final_training_time",
                *(f"{e}_final_validation_accuracy" for e in EPOCHS)):
        columns[key] = np.concatenate([np.asarray(p[key]) for p in parts])
    order = np.argsort(columns["key"])
    return {k: v[order] for k, v in columns.items()}


def check_data_1k(shared: Path) -> int:
    data = json.loads((shared / "data" / "nb101" / "nasbench_vis" / "data-1k.json").read_text())
    for adjacency, operations, key in zip(data["adjacency"], data["operations"], data["key"]):
        labels = [o for o in operations if o != -3]
        matrix = np.asarray(adjacency, dtype=np.int64)[: len(labels), : len(labels)]
        if module_hash(matrix, labels) != key:
            raise SystemExit(f"data-1k spec of {key} hashes to {module_hash(matrix, labels)}")
    return len(data["key"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/gradsign/data/nb101.npz"))
    args = parser.parse_args()
    shared = Path(args.shared)
    print(f"data-1k: all {check_data_1k(shared)} specs hash to their keys", flush=True)
    vis = load_vis(shared)
    if len(set(vis["key"])) != len(vis["key"]):
        raise SystemExit("duplicate hashes in nasbench_vis")
    models = enumerate_space(lambda s: print(s, flush=True))
    if len(models) != NUM_MODELS:
        raise SystemExit(f"enumeration found {len(models)} unique models, expected {NUM_MODELS}")
    data_1k = json.loads((shared / "data" / "nb101" / "nasbench_vis" / "data-1k.json").read_text())
    for adjacency, operations, key in zip(data_1k["adjacency"], data_1k["operations"], data_1k["key"]):
        labels = [o for o in operations if o != -3]
        n = len(labels)
        m, inner = models[key]
        if not (np.array_equal(m, np.asarray(adjacency)[:n, :n]) and list(inner) == labels[1:-1]):
            raise SystemExit(f"{key}: enumerated first spec differs from the data-1k spec")
    print("data-1k: every spec is the first of its hash in the generation order", flush=True)
    k = len(vis["key"])
    num_vertices = np.zeros(k, dtype=np.uint8)
    matrix = np.zeros((k, MAX_VERTICES, MAX_VERTICES), dtype=np.uint8)
    labels = np.full((k, MAX_VERTICES), -3, dtype=np.int8)
    for i, key in enumerate(vis["key"]):
        if key not in models:
            raise SystemExit(f"bundled hash {key} not found in the enumeration")
        m, inner = models[key]
        n = len(m)
        num_vertices[i], matrix[i, :n, :n], labels[i, :n] = n, m, (-1, *inner, -2)
        ops = [INPUT, *(OPS[o] for o in inner), OUTPUT]
        if nb101_param_count(m, ops) != int(vis["trainable_parameters"][i]):
            raise SystemExit(f"{key}: nb101_param_count {nb101_param_count(m, ops)} != "
                             f"trainable_parameters {vis['trainable_parameters'][i]}")
    print(f"all {k} bundled hashes found; nb101_param_count equals trainable_parameters for all", flush=True)
    accuracy = np.stack([vis[f"{e}_final_validation_accuracy"].astype(np.float32) for e in EPOCHS], axis=1)
    out = Path(args.out)
    np.savez_compressed(out, hashes=vis["key"].astype("S32"), num_vertices=num_vertices, matrix=matrix,
                        labels=labels, valid_accuracy=accuracy, epochs=np.array(EPOCHS, dtype=np.int64),
                        train_time_108=vis["final_training_time"].astype(np.float32),
                        params=vis["trainable_parameters"].astype(np.int64))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    sys.exit(main())
