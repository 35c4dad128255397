"""NAS-Bench-201 (= NATS-Bench topology search space): 15,625 cells, benchmark look-ups and network builder.

An arch is a cell of six edges ``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``, each one of ``none, skip_connect,
nor_conv_1x1, nor_conv_3x3, avg_pool_3x3``; its arch string is ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``
and its benchmark index is the row in the official API's order (not a base-5 enumeration: index 0 is
``|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|``).

Benchmark fields (``query``; all seed means; ``PROVENANCE.md`` in ``gradsign/data`` gives the sources):

=================  =============================================  ==========================================
dataset            metric "test"                                  metric "valid"
=================  =============================================  ==========================================
cifar10            ``cifar10`` ori-test (trained on train+valid)  ``cifar10-valid`` x-valid (trained on the
                                                                  25k train half, evaluated on the valid half)
cifar100           ``cifar100`` x-test                            ``cifar100`` x-valid
imagenet16-120     ``ImageNet16-120`` x-test                      ``ImageNet16-120`` x-valid
=================  =============================================  ==========================================

``epochs`` selects the benchmark's 200-epoch or 12-epoch ("hp=12") training schedule. ``train_time`` is the
benchmark's training time in seconds for ``epochs`` epochs: ``epochs * t_epoch``, where ``t_epoch`` is the
per-epoch time of the benchmark (one value per arch and dataset, the same for both schedules and all seeds;
for "cifar10" it is the **cifar10-valid** training set (25k images), the set searched on; CIFAR-100 is
exactly 2x and ImageNet16-120 6.068x the cifar10-valid time).
"""
from __future__ import annotations

import bz2
import io
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from gradsign.spaces.base import SearchSpace, UnknownArchError, UnknownDatasetError
from gradsign.spaces.nb201_model import EDGES, OPS, NB201Network, build_nb201, nb201_param_counts

__all__ = ["DATASETS", "EDGES", "EPOCHS", "METRICS", "NUM_ARCHS", "OPS", "NasBench201", "arch_to_ops",
           "canonical_string", "ops_to_arch"]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagenet16-120")
METRICS: tuple[str, ...] = ("test", "valid", "train_time")
EPOCHS: tuple[int, ...] = (12, 200)
NUM_ARCHS = len(OPS) ** len(EDGES)
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet16-120": 120}
_BUNDLED = Path(__file__).resolve().parents[1] / "data" / "nb201.npz"
_ACC_KEYS = ("test_200", "valid_200", "test_12", "valid_12")
_CODE_WEIGHTS = len(OPS) ** np.arange(len(EDGES) - 1, -1, -1)

# benchmark (dataset name, eval set) behind each (dataset, metric); train-time and params dataset
_EVAL_SOURCE = {
    ("cifar10", "test"): ("cifar10", "ori-test"),
    ("cifar10", "valid"): ("cifar10-valid", "x-valid"),
    ("cifar100", "test"): ("cifar100", "x-test"),
    ("cifar100", "valid"): ("cifar100", "x-valid"),
    ("imagenet16-120", "test"): ("ImageNet16-120", "x-test"),
    ("imagenet16-120", "valid"): ("ImageNet16-120", "x-valid"),
}
_TRAIN_SOURCE = {"cifar10": "cifar10-valid", "cifar100": "cifar100", "imagenet16-120": "ImageNet16-120"}


def arch_to_ops(arch: str) -> tuple[int, ...]:
    """Op indices (edge order ``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``) of an arch string."""
    if not isinstance(arch, str):
        raise UnknownArchError(f"not an NB201 arch string: {arch!r}")
    ops: list[int] = []
    nodes = arch[1:-1].split("|+|") if arch.startswith("|") and arch.endswith("|") else []
    if len(nodes) == 3:
        for target, text in enumerate(nodes, start=1):
            tokens = [t.split("~") for t in text.split("|")]
            if len(tokens) != target or any(len(t) != 2 or t[0] not in OPS for t in tokens) \
                    or [t[1] for t in tokens] != [str(s) for s in range(target)]:
                break
            ops.extend(OPS.index(t[0]) for t in tokens)
    if len(ops) != len(EDGES):
        raise UnknownArchError(f"not an NB201 arch string: {arch!r}")
    return tuple(ops)


def ops_to_arch(ops: Sequence[int]) -> str:
    """Arch string of six op indices."""
    names = [OPS[int(o)] for o in ops]
    return "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|".format(*names)


def canonical_string(ops: Sequence[int]) -> str:
    """NATS-Bench's canonical ("unique") string of a cell; archs that share it compute the same function.

    Node 0 is ``"0"``; node j is ``"+".join(sorted(terms))`` over its input edges, with term ``"#"`` for
    ``none``, the source's string for ``skip_connect``, ``"#"`` for any other op applied to a source whose
    string is ``"#"``, and ``"(" + source + ")@" + op`` otherwise; the cell's string is node 3's. Agrees
    with the ``UniqueString`` that NATS-Bench gives for all 15,625 archs (6,466 distinct strings).
    """
    strings = ["0"]
    for target in (1, 2, 3):
        terms = []
        for edge, (t, source) in enumerate(EDGES):
            if t != target:
                continue
            op, src = OPS[int(ops[edge])], strings[source]
            if op == "none" or (op != "skip_connect" and src == "#"):
                terms.append("#")
            elif op == "skip_connect":
                terms.append(src)
            else:
                terms.append(f"({src})@{op}")
        strings.append("+".join(sorted(terms)))
    return strings[3]


def _codes(ops: np.ndarray) -> np.ndarray:
    return np.asarray(ops, dtype=np.int64) @ _CODE_WEIGHTS


def _canonical_representatives(ops: np.ndarray) -> np.ndarray:
    """Smallest index sharing each arch's canonical string."""
    first: dict[str, int] = {}
    return np.array([first.setdefault(canonical_string(o), i) for i, o in enumerate(ops.tolist())],
                    dtype=np.int64)


class _BenchmarkUnpickler(pickle.Unpickler):
    """Unpickler for NATS-Bench result files: plain containers, OrderedDict and numpy scalars only."""

    _ALLOWED = {
        ("collections", "OrderedDict"), ("collections", "defaultdict"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} (only the weight-free "
                                         "'simple' NATS-Bench files are supported)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _load_pbz2(path: Path) -> object:
    with bz2.open(path, "rb") as f:
        return _BenchmarkUnpickler(io.BytesIO(f.read())).load()


def _seed_results(arch_results: Mapping, dataset: str) -> list[Mapping]:
    """ResultsCount dicts of all seeds of ``dataset`` in an ArchResults state dict, in seed order."""
    runs = arch_results.get("all_results", {})
    keys = sorted(k for k in runs if isinstance(k, tuple) and len(k) == 2 and k[0] == dataset)
    return [runs[k] for k in keys]


def _tables_from_results(per_arch: Mapping[int, Mapping[int, Mapping]], ops: np.ndarray) -> dict[str, np.ndarray]:
    """Benchmark tables (NaN where absent) from ``{index: {epochs: ArchResults state dict}}``."""
    n = len(ops)
    tables = {key: np.full((n, len(DATASETS)), np.nan) for key in (*_ACC_KEYS, "train_per_epoch")}
    own = np.stack([nb201_param_counts(ops, _NUM_CLASSES[ds]) for ds in DATASETS], axis=1)
    params = np.full((n, len(DATASETS)), -1, dtype=np.int64)
    for index, by_epochs in per_arch.items():
        for epochs, results in by_epochs.items():
            for d, ds in enumerate(DATASETS):
                for metric in ("test", "valid"):
                    bench_ds, eval_set = _EVAL_SOURCE[(ds, metric)]
                    accs = []
                    for run in _seed_results(results, bench_ds):
                        key = f"{eval_set}@{int(run.get('epochs', epochs)) - 1}"
                        if key in run.get("eval_acc1es", {}):
                            accs.append(float(run["eval_acc1es"][key]))
                    if accs:
                        tables[f"{metric}_{epochs}"][index, d] = float(np.mean(accs))
                runs = _seed_results(results, _TRAIN_SOURCE[ds])
                times = [float(np.mean(list(r["train_times"].values()))) for r in runs if r.get("train_times")]
                if times and (epochs == 200 or np.isnan(tables["train_per_epoch"][index, d])):
                    tables["train_per_epoch"][index, d] = float(np.mean(times))
                # some seeds report the count of an isomorphic arch whose run was reused: prefer the
                # seed that reports this arch's own network
                counts = [int(round(float(r["params"]) * 1e6)) for r in runs if r.get("params") is not None]
                if counts and (epochs == 200 or params[index, d] < 0):
                    params[index, d] = own[index, d] if own[index, d] in counts else counts[0]
    tables["params"] = params
    return tables


def _read_nats_dir(path: Path, ops: np.ndarray) -> dict[str, np.ndarray]:
    """Tables from a NATS-Bench topology "simple" directory (``NATS-tss-v1_0-3ffb9-simple``).

    Format (NATS-Bench API ``api_utils.py``; not checked against a downloaded archive here): optional
    ``meta.pickle.pbz2`` with ``meta_archs`` (arch strings in index order) and one bz2 pickle
    ``{index:06d}.pickle.pbz2`` per arch holding ``{"12": ArchResults, "200": ArchResults}`` state dicts:
    ``arch_str`` and ``all_results[(dataset, seed)]`` with ``eval_acc1es["<set>@<epoch>"]``,
    ``train_times{epoch: seconds}``, ``params`` (millions) and ``epochs``.
    """
    meta_file = path / "meta.pickle.pbz2"
    if meta_file.is_file():
        meta = _load_pbz2(meta_file)
        archs = list(meta["meta_archs"]) if isinstance(meta, Mapping) and "meta_archs" in meta else None
        if archs is None or archs != [ops_to_arch(o) for o in ops]:
            raise ValueError(f"{meta_file}: meta_archs differ from the NAS-Bench-201 index order")
    per_arch: dict[int, dict[int, Mapping]] = {}
    for file in sorted(path.glob("*.pickle.pbz2")):
        stem = file.name[: -len(".pickle.pbz2")]
        if not stem.isdigit():
            continue
        index = int(stem)
        if index >= len(ops):
            raise ValueError(f"{file}: index {index} out of range")
        data = _load_pbz2(file)
        by_epochs = {int(hp): res for hp, res in data.items() if str(hp) in ("12", "200")}
        for res in by_epochs.values():
            if res.get("arch_str") not in (None, ops_to_arch(ops[index])):
                raise ValueError(f"{file}: arch {res.get('arch_str')} is not index {index}")
        per_arch[index] = by_epochs
    if not per_arch:
        raise FileNotFoundError(f"no NATS-Bench result files (######.pickle.pbz2) in {path}")
    return _tables_from_results(per_arch, ops)


def _read_nb201_pth(path: Path, ops: np.ndarray) -> dict[str, np.ndarray]:
    """Tables from a NAS-Bench-201 ``.pth`` (``NAS-Bench-201-v1_[01]-*.pth``).

    Format (NAS-Bench-201 API ``api_201.py``; not checked against a downloaded file here): a dict with
    ``meta_archs`` and ``arch2infos[index] = {"less": ArchResults (12 epochs), "full": ArchResults
    (200 epochs)}`` state dicts, read with ``torch.load(weights_only=True)``.
    """
    core = getattr(np, "_core", None) or np.core
    allowed = [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct,
               *(getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"))]
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        if allow is None:
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with allow(allowed):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: not a loadable NAS-Bench-201 file ({str(error).splitlines()[0]})") from None
    if not isinstance(data, Mapping) or "arch2infos" not in data or "meta_archs" not in data:
        raise ValueError(f"{path}: expected a dict with 'meta_archs' and 'arch2infos'")
    if list(data["meta_archs"]) != [ops_to_arch(o) for o in ops]:
        raise ValueError(f"{path}: meta_archs differ from the NAS-Bench-201 index order")
    per_arch = {int(i): {e: info[k] for e, k in ((12, "less"), (200, "full")) if k in info}
                for i, info in data["arch2infos"].items()}
    return _tables_from_results(per_arch, ops)


class NasBench201(SearchSpace):
    """NAS-Bench-201 with its benchmark tables.

    By default the tables bundled with the package are used. ``benchmark_path`` builds them instead from a
    NATS-Bench topology "simple" directory, a NAS-Bench-201 ``.pth`` file, or an ``.npz`` written by
    ``save_tables``; accuracies and times missing there read as NaN.
    """

    name = "nb201"
    choices: tuple[tuple[str, ...], ...] = tuple(OPS for _ in EDGES)
    datasets: tuple[str, ...] = DATASETS

    def __init__(self, benchmark_path: str | Path | None = None) -> None:
        with np.load(_BUNDLED, allow_pickle=False) as f:
            bundled = {k: f[k] for k in f.files}
        ops = bundled["ops"].astype(np.uint8)
        if benchmark_path is None:
            tables = bundled
        else:
            path = Path(benchmark_path)
            if path.is_dir():
                tables = _read_nats_dir(path, ops)
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as f:
                    tables = {k: f[k] for k in f.files}
                if not np.array_equal(tables.get("ops"), ops):
                    raise ValueError(f"{path}: ops differ from the NAS-Bench-201 index order")
            elif path.is_file():
                tables = _read_nb201_pth(path, ops)
            else:
                raise FileNotFoundError(f"no benchmark file or directory at {path}")
        self._ops = ops
        self._ops.setflags(write=False)
        self._index_of_code = np.empty(NUM_ARCHS, dtype=np.int64)
        self._index_of_code[_codes(ops)] = np.arange(NUM_ARCHS)
        canonical = tables.get("canonical")
        self._canonical = (np.asarray(canonical, dtype=np.int64) if canonical is not None
                           else _canonical_representatives(ops))
        self._columns: dict[tuple[str, str], np.ndarray] = {}
        for key in (*_ACC_KEYS, "train_per_epoch"):
            for d, ds in enumerate(DATASETS):
                self._columns[(key, ds)] = np.ascontiguousarray(tables[key][:, d], dtype=np.float64)
        for d, ds in enumerate(DATASETS):
            self._columns[("params", ds)] = np.ascontiguousarray(tables["params"][:, d], dtype=np.int64)
        for column in (*self._columns.values(), self._canonical):
            column.setflags(write=False)

    # --- identities -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return NUM_ARCHS

    def index(self, arch: str | int) -> int:
        """Benchmark index of an arch string, an int index or a digit string."""
        if isinstance(arch, (int, np.integer)) and not isinstance(arch, bool):
            value = int(arch)
        elif isinstance(arch, str) and arch.isdigit() and arch.isascii():
            value = int(arch)
        elif isinstance(arch, str):
            return int(self._index_of_code[_codes(np.array(arch_to_ops(arch)))])
        else:
            raise UnknownArchError(f"not an NB201 arch string or index: {arch!r}")
        if not 0 <= value < NUM_ARCHS:
            raise UnknownArchError(f"NB201 index {value} out of range 0..{NUM_ARCHS - 1}")
        return value

    def arch(self, index: int) -> str:
        """Arch string of benchmark index ``index``."""
        return ops_to_arch(self._ops[self.index(index)])

    def encode(self, arch: str | int) -> tuple[int, ...]:
        """Op indices of ``arch`` (an arch string or index), one per edge."""
        return tuple(int(o) for o in self._ops[self.index(arch)])

    def decode(self, choice_indices: Sequence[int]) -> str:
        """Arch string of six op indices."""
        values = list(choice_indices)
        if len(values) != len(EDGES) or any(
                isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < len(OPS)
                for v in values):
            raise UnknownArchError(f"not six NB201 op indices in 0..{len(OPS) - 1}: {choice_indices!r}")
        return ops_to_arch(values)

    def ops_table(self) -> np.ndarray:
        """Read-only uint8 array (15625, 6) of op indices in index order."""
        return self._ops

    # --- isomorphism ------------------------------------------------------------------------------
    def canonical_index(self, arch: str | int) -> int:
        """Smallest index of an arch computing the same function (same NATS canonical string)."""
        return int(self._canonical[self.index(arch)])

    def canonical(self, arch: str | int) -> str:
        """Arch string of ``canonical_index(arch)``."""
        return self.arch(self.canonical_index(arch))

    def is_isomorphic(self, a: str | int, b: str | int) -> bool:
        """Whether two archs compute the same function (share a canonical string)."""
        return self.canonical_index(a) == self.canonical_index(b)

    def canonical_table(self) -> np.ndarray:
        """Read-only int64 array (15625,): the canonical index of every arch."""
        return self._canonical

    def unique_indices(self) -> np.ndarray:
        """Sorted indices of one representative per canonical group (6,466 archs)."""
        return np.flatnonzero(self._canonical == np.arange(NUM_ARCHS))

    # --- benchmark ------------------------------------------------------------------------------
    def num_classes(self, dataset: str) -> int:
        """10, 100 or 120."""
        self._check_dataset(dataset)
        return _NUM_CLASSES[dataset]

    def _check_dataset(self, dataset: str) -> None:
        if not isinstance(dataset, str) or dataset not in DATASETS:
            raise UnknownDatasetError(f"{self.name} has no dataset {dataset!r}; known: {', '.join(DATASETS)}")

    def benchmark_table(self, dataset: str, metric: str = "test", epochs: int = 200) -> np.ndarray:
        """All 15,625 values of ``query(·, dataset, metric, epochs)`` in index order (read-only float64)."""
        self._check_dataset(dataset)
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
        if isinstance(epochs, bool) or epochs not in EPOCHS:
            raise ValueError(f"epochs must be one of {EPOCHS}, got {epochs!r}")
        if metric == "train_time":
            table = self._columns[("train_per_epoch", dataset)] * float(epochs)
            table.setflags(write=False)
            return table
        return self._columns[(f"{metric}_{int(epochs)}", dataset)]

    def query(self, arch: str | int, dataset: str, metric: str = "test", epochs: int = 200) -> float:
        """Seed-mean ``metric`` of ``arch`` on ``dataset`` after ``epochs`` (12 or 200) epochs: "test" or
        "valid" accuracy in %, or "train_time" in seconds (see the module docstring for the fields)."""
        index = self.index(arch)
        return float(self.benchmark_table(dataset, metric, epochs)[index])

    def train_time_per_epoch(self, arch: str | int, dataset: str) -> float:
        """Benchmark seconds per training epoch (cifar10: the cifar10-valid training set)."""
        index = self.index(arch)
        self._check_dataset(dataset)
        return float(self._columns[("train_per_epoch", dataset)][index])

    def param_count(self, arch: str | int, dataset: str) -> int:
        """Exact number of parameters of the benchmark network (conv, BN affine, linear), as the benchmark
        reports it; raises ``LookupError`` when a loaded benchmark lacks it."""
        index = self.index(arch)
        self._check_dataset(dataset)
        count = int(self._columns[("params", dataset)][index])
        if count < 0:
            raise LookupError(f"the loaded benchmark has no params for arch {index} on {dataset}")
        return count

    def params(self, arch: str | int, dataset: str) -> float:
        """Parameters in millions (``param_count / 1e6``); NaN when a loaded benchmark lacks them."""
        try:
            return self.param_count(arch, dataset) / 1e6
        except LookupError:
            return float("nan")

    def save_tables(self, path: str | Path) -> None:
        """Write this instance's tables as an ``.npz`` that ``NasBench201(benchmark_path=...)`` reads back."""
        arrays: dict[str, np.ndarray] = {"ops": self._ops, "canonical": self._canonical,
                                         "datasets": np.array(DATASETS)}
        for key in (*_ACC_KEYS, "train_per_epoch", "params"):
            arrays[key] = np.stack([self._columns[(key, ds)] for ds in DATASETS], axis=1)
        np.savez_compressed(path, **arrays)

    # --- models ---------------------------------------------------------------------------------
    def build(self, arch: str | int, *, num_classes: int, stem_channels: int = 16,
              cells_per_stage: int = 5, **options) -> NB201Network:
        """The benchmark network of ``arch`` (``nb201_model.NB201Network``), freshly initialised."""
        if options:
            raise TypeError(f"unknown build options for nb201: {', '.join(sorted(options))}")
        return build_nb201(self.encode(arch), num_classes, stem_channels=stem_channels,
                           cells_per_stage=cells_per_stage)

