"""NAS-Bench-101 (Ying et al., ICML 2019): cell specs, the module hash, sampling, mutation, look-ups.

A model is a cell spec: an upper-triangular 0/1 matrix over n <= 7 vertices (0 = input, n-1 = output)
and the ops of the inner vertices (``conv3x3-bn-relu``, ``conv1x1-bn-relu``, ``maxpool3x3``), with at most
9 edges once pruned. Pruning removes every vertex that is not on an input-to-output path; a spec whose
output is unreachable is invalid. The space has 423,624 unique models up to isomorphism; the benchmark
names each by its **module hash** (``module_hash``), which is this space's arch string. A spec can also be
given as JSON: ``{"matrix": [[0,1,...],...], "ops": ["input", ..., "output"]}``.

Bundled table (``data/nb101.npz``, see ``PROVENANCE.md``): 30,001 of the 423,624 models (contiguous slices
of the sorted hashes, so a uniform sample), with the validation accuracy of **one** training run after 4,
12, 36 and 108 epochs, the 108-epoch training time and the parameter count. The benchmark index of a model
is its position among the bundled ones (sorted by hash); a valid model outside them has a hash but no
index, and look-ups for it raise ``NotTabulatedError``. No test accuracy is bundled.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gradsign.spaces.base import SearchSpace, UnknownArchError, UnknownDatasetError
from gradsign.spaces.nb101_model import INPUT, OPS, OUTPUT, NB101Network, build_nb101

__all__ = ["DATASETS", "EPOCHS", "INPUT", "MAX_EDGES", "MAX_VERTICES", "NUM_MODELS", "OPS", "OUTPUT",
           "NasBench101", "NotTabulatedError", "Spec", "module_hash", "parse_spec", "prune", "random_spec",
           "mutate_spec"]

DATASETS: tuple[str, ...] = ("cifar10",)
EPOCHS: tuple[int, ...] = (4, 12, 36, 108)
MAX_VERTICES = 7
MAX_EDGES = 9
#: unique models of the whole space (benchmark paper; reproduced by scripts/make_nb101_data.py)
NUM_MODELS = 423_624
_BUNDLED = Path(__file__).resolve().parents[1] / "data" / "nb101.npz"
_LABEL = {INPUT: -1, OUTPUT: -2, **{op: i for i, op in enumerate(OPS)}}


class NotTabulatedError(UnknownArchError, LookupError):
    """A valid NB101 model that is not among the bundled (tabulated) ones."""


class Spec:
    """A pruned, valid cell spec: ``matrix`` (n x n int array, read-only) and ``ops`` (n names)."""

    __slots__ = ("matrix", "ops")

    def __init__(self, matrix: np.ndarray, ops: Sequence[str]) -> None:
        self.matrix = np.array(matrix, dtype=np.int64)
        self.matrix.setflags(write=False)
        self.ops = tuple(ops)

    @property
    def num_vertices(self) -> int:
        return len(self.ops)

    @property
    def num_edges(self) -> int:
        return int(self.matrix.sum())

    def labels(self) -> list[int]:
        """Module-hash labels: -1 input, -2 output, the op's position in ``OPS`` otherwise."""
        return [_LABEL[op] for op in self.ops]

    def hash(self) -> str:
        """The benchmark's module hash of this spec."""
        return module_hash(self.matrix, self.labels())

    def to_json(self) -> str:
        """Compact JSON ``{"matrix": ..., "ops": ...}`` (one line)."""
        return json.dumps({"matrix": self.matrix.tolist(), "ops": list(self.ops)}, separators=(",", ":"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spec) and self.ops == other.ops and np.array_equal(self.matrix, other.matrix)

    def __hash__(self) -> int:
        return hash((self.ops, self.matrix.tobytes()))

    def __repr__(self) -> str:
        return f"Spec({self.matrix.tolist()}, {list(self.ops)})"


def module_hash(matrix: np.ndarray, labels: Sequence[int]) -> str:
    """The benchmark's module hash (``graph_util.hash_module``) of a pruned spec.

    Per vertex v, start from md5(str((out_degree, in_degree, label))); then n times, all vertices at once,
    v's hash becomes md5(sorted in-neighbour hashes joined + "|" + sorted out-neighbour hashes joined + "|"
    + v's hash); the fingerprint is md5(str(sorted(final hashes))). Labels: -1 input, -2 output, op index.
    """
    matrix = np.asarray(matrix)
    n = len(matrix)
    in_degree, out_degree = matrix.sum(axis=0), matrix.sum(axis=1)
    hashes = [hashlib.md5(str((int(out_degree[v]), int(in_degree[v]), int(labels[v]))).encode()).hexdigest()
              for v in range(n)]
    preds = [[u for u in range(n) if matrix[u, v]] for v in range(n)]
    succs = [[w for w in range(n) if matrix[v, w]] for v in range(n)]
    for _ in range(n):
        hashes = [hashlib.md5(("".join(sorted(hashes[u] for u in preds[v])) + "|"
                               + "".join(sorted(hashes[w] for w in succs[v])) + "|" + hashes[v]).encode()
                              ).hexdigest() for v in range(n)]
    return hashlib.md5(str(sorted(hashes)).encode()).hexdigest()


def prune(matrix: np.ndarray, ops: Sequence[str]) -> Spec:
    """Drop every vertex not on an input-to-output path (benchmark's ``ModelSpec._prune``), then check
    the pruned spec: <= 7 vertices and <= 9 edges. Raises ``UnknownArchError`` for an unreachable output."""
    matrix = np.asarray(matrix, dtype=np.int64)
    n = len(matrix)
    from_input = {0}
    for v in range(1, n):
        if any(matrix[u, v] for u in from_input):
            from_input.add(v)
    to_output = {n - 1}
    for v in range(n - 2, -1, -1):
        if any(matrix[v, w] for w in to_output):
            to_output.add(v)
    if n - 1 not in from_input:
        raise UnknownArchError("invalid NB101 spec: the output is not reachable from the input")
    keep = sorted(from_input & to_output)
    spec = Spec(matrix[np.ix_(keep, keep)], [ops[v] for v in keep])
    if spec.num_vertices > MAX_VERTICES:
        raise UnknownArchError(f"invalid NB101 spec: {spec.num_vertices} vertices after pruning "
                               f"(at most {MAX_VERTICES})")
    if spec.num_edges > MAX_EDGES:
        raise UnknownArchError(f"invalid NB101 spec: {spec.num_edges} edges after pruning (at most {MAX_EDGES})")
    return spec


def parse_spec(spec: str | dict) -> Spec:
    """A pruned, valid ``Spec`` from JSON text or a dict ``{"matrix": ..., "ops": ...}``.

    Raises ``UnknownArchError`` (one line) for malformed input: not a square 0/1 matrix, not strictly
    upper-triangular (which also rules out cycles), ops not ``input``, inner ops, ``output``, an unknown
    op, an unreachable output, or more than 7 vertices / 9 edges after pruning."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as error:
            raise UnknownArchError(f"not an NB101 module hash or JSON spec: {error.msg} at char {error.pos}") \
                from None
    if not isinstance(spec, dict) or set(spec) != {"matrix", "ops"}:
        raise UnknownArchError('an NB101 spec is a JSON object with exactly the keys "matrix" and "ops"')
    rows, ops = spec["matrix"], spec["ops"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and len(r) == len(rows)
                                                         for r in rows):
        raise UnknownArchError("invalid NB101 spec: matrix must be a non-empty square list of lists")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x in (0, 1) for r in rows for x in r):
        raise UnknownArchError("invalid NB101 spec: matrix entries must be 0 or 1")
    matrix = np.array(rows, dtype=np.int64)
    n = len(matrix)
    if n < 2:
        raise UnknownArchError("invalid NB101 spec: at least 2 vertices (input and output)")
    if np.any(np.tril(matrix)):
        raise UnknownArchError("invalid NB101 spec: matrix must be strictly upper-triangular (a DAG with "
                               "vertices in order; no cycles or self-loops)")
    if not isinstance(ops, list) or len(ops) != n:
        raise UnknownArchError(f"invalid NB101 spec: {n} vertices need {n} ops")
    bad = [op for op in ops[1:-1] if op not in OPS]
    if bad:
        raise UnknownArchError(f"invalid NB101 spec: unknown op {bad[0]!r}; inner ops: {', '.join(OPS)}")
    if ops[0] != INPUT or ops[-1] != OUTPUT:
        raise UnknownArchError(f'invalid NB101 spec: ops must start with "{INPUT}" and end with "{OUTPUT}"')
    return prune(matrix, ops)


def random_spec(rng: np.random.Generator) -> Spec:
    """A random valid spec by the benchmark's rule: a 7 x 7 upper-triangular matrix with each edge
    present with probability 1/2 and uniform inner ops, redrawn until valid; returned pruned."""
    n = MAX_VERTICES
    while True:
        matrix = np.triu(rng.integers(0, 2, size=(n, n)), k=1)
        ops = [INPUT] + [OPS[int(i)] for i in rng.integers(0, len(OPS), size=n - 2)] + [OUTPUT]
        try:
            return prune(matrix, ops)
        except UnknownArchError:
            continue


def mutate_spec(spec: Spec, rng: np.random.Generator, mutation_rate: float = 1.0) -> Spec:
    """A mutated, valid spec different from ``spec``, by the benchmark's example rule: on the spec padded to
    7 vertices, flip each upper-triangular edge with probability ``mutation_rate / 7`` (the number of
    vertices) and redraw each inner op, with probability ``mutation_rate / 5`` (the op spots), among the
    other two ops; repeat until the pruned result is valid. Unlike the example, a result with the same module
    hash as ``spec`` is also redrawn, so that a mutation always yields another model."""
    n = MAX_VERTICES
    matrix, ops = _padded(spec)
    own = spec.hash()
    edge_p, op_p = mutation_rate / n, mutation_rate / (n - 2)
    while True:
        new_matrix = matrix.copy()
        for u in range(n - 1):
            for v in range(u + 1, n):
                if rng.random() < edge_p:
                    new_matrix[u, v] = 1 - new_matrix[u, v]
        new_ops = list(ops)
        for v in range(1, n - 1):
            if rng.random() < op_p:
                others = [op for op in OPS if op != ops[v]]
                new_ops[v] = others[int(rng.integers(len(others)))]
        try:
            mutated = prune(new_matrix, new_ops)
        except UnknownArchError:
            continue
        if mutated.hash() != own:
            return mutated


def _padded(spec: Spec) -> tuple[np.ndarray, list[str]]:
    """``spec`` on 7 vertices: unconnected inner vertices inserted before the output (pruning removes them)."""
    n, k = MAX_VERTICES, spec.num_vertices
    matrix = np.zeros((n, n), dtype=np.int64)
    matrix[: k - 1, : k - 1] = spec.matrix[: k - 1, : k - 1]
    matrix[: k - 1, n - 1] = spec.matrix[: k - 1, k - 1]
    ops = list(spec.ops[:-1]) + [OPS[0]] * (n - k) + [OUTPUT]
    return matrix, ops


def _is_hash(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _edge_positions() -> list[tuple[int, int]]:
    return [(u, v) for u in range(MAX_VERTICES - 1) for v in range(u + 1, MAX_VERTICES)]


class NasBench101(SearchSpace):
    """NAS-Bench-101 with its bundled table of 30,001 models (see the module docstring).

    Arch strings are module hashes; ``index``, ``resolve``, ``build`` and ``query`` also take a spec as
    JSON text (pruned first). Indices run over the bundled models in hash order. ``encode`` gives the spec
    padded to 7 vertices as 21 edge bits (row-major upper triangle) followed by 5 op indices.
    """

    name = "nb101"
    choices: tuple[tuple[str, ...], ...] = (*(("0", "1") for _ in _edge_positions()),
                                            *(OPS for _ in range(MAX_VERTICES - 2)))
    datasets: tuple[str, ...] = DATASETS
    default_field = ("valid", 108)
    final_fields = (("valid", 108),)
    final_fields_name = "validation accuracy, 108 epochs, one run"

    def __init__(self) -> None:
        with np.load(_BUNDLED, allow_pickle=False) as f:
            table = {k: f[k] for k in f.files}
        self._hashes = table["hashes"]
        if np.any(self._hashes[1:] <= self._hashes[:-1]):
            raise ValueError(f"{_BUNDLED}: hashes are not sorted and unique")
        self._num_vertices, self._matrix, self._labels = table["num_vertices"], table["matrix"], table["labels"]
        self._accuracy = {int(e): np.ascontiguousarray(table["valid_accuracy"][:, j], dtype=np.float64) * 100.0
                          for j, e in enumerate(table["epochs"])}
        self._train_time = table["train_time_108"].astype(np.float64)
        self._params = table["params"].astype(np.int64)
        for column in (*self._accuracy.values(), self._train_time, self._params):
            column.setflags(write=False)

    # --- identities -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._hashes)

    def _position(self, module_hash: str) -> int | None:
        key = module_hash.encode()
        i = int(np.searchsorted(self._hashes, key))
        return i if i < len(self._hashes) and self._hashes[i] == key else None

    def index(self, arch: str | int) -> int:
        """Position among the bundled models of a module hash, a JSON spec, or an index (int or digits).
        Raises ``UnknownArchError`` for an unknown hash or a malformed spec and ``NotTabulatedError`` for
        a valid spec outside the bundled models."""
        if isinstance(arch, (int, np.integer)) and not isinstance(arch, bool):
            value = int(arch)
        elif isinstance(arch, str) and arch.isdigit() and arch.isascii() and not _is_hash(arch):
            value = int(arch)
        elif isinstance(arch, str) and _is_hash(arch):
            position = self._position(arch)
            if position is None:
                raise UnknownArchError(f"unknown NB101 module hash {arch}: not among the {len(self):,} bundled "
                                       "models (give a model outside them as a JSON spec)")
            return position
        elif isinstance(arch, str) and arch.lstrip().startswith("{"):
            spec = parse_spec(arch)
            module = spec.hash()
            position = self._position(module)
            if position is None:
                raise NotTabulatedError(f"valid NB101 model {module} is not among the {len(self):,} bundled "
                                        "models: no index or benchmark results")
            return position
        else:
            raise UnknownArchError(f"not an NB101 module hash, JSON spec or index: {arch!r}")
        if not 0 <= value < len(self):
            raise UnknownArchError(f"NB101 index {value} out of range 0..{len(self) - 1}")
        return value

    def arch(self, index: int) -> str:
        """Module hash of bundled model ``index``."""
        return self._hashes[self.index(index)].decode()

    def has_table(self, arch: str | int) -> bool:
        """Whether ``arch`` is one of the bundled models (raises for invalid input)."""
        try:
            self.index(arch)
        except NotTabulatedError:
            return False
        return True

    def resolve(self, arch: str | int) -> str:
        """The arch string of ``arch``: its module hash when bundled, else its pruned spec as JSON."""
        try:
            return self.arch(self.index(arch))
        except NotTabulatedError:
            return parse_spec(arch).to_json()

    def spec(self, arch: str | int) -> Spec:
        """The pruned spec of a bundled model (hash or index) or of a JSON spec."""
        if isinstance(arch, str) and arch.lstrip().startswith("{"):
            return parse_spec(arch)
        i = self.index(arch)
        n = int(self._num_vertices[i])
        labels = self._labels[i, :n]
        return Spec(self._matrix[i, :n, :n], [INPUT, *(OPS[int(o)] for o in labels[1:-1]), OUTPUT])

    def canonical(self, arch: str | int) -> str:
        """Module hash of ``arch`` (isomorphic specs share it)."""
        return self.spec(arch).hash()

    def encode(self, arch: str | int) -> tuple[int, ...]:
        """21 edge bits of the spec padded to 7 vertices (row-major upper triangle), then 5 op indices."""
        matrix, ops = _padded(self.spec(arch))
        return (*(int(matrix[u, v]) for u, v in _edge_positions()), *(OPS.index(op) for op in ops[1:-1]))

    def decode(self, choice_indices: Sequence[int]) -> str:
        """Arch string (``resolve``) of an encoding; raises ``UnknownArchError`` if its spec is invalid."""
        values = list(choice_indices)
        edges = _edge_positions()
        if len(values) != len(self.choices) or any(
                isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= x < len(c)
                for x, c in zip(values, self.choices)):
            raise UnknownArchError(f"not {len(edges)} edge bits and {MAX_VERTICES - 2} op indices: "
                                   f"{choice_indices!r}")
        matrix = np.zeros((MAX_VERTICES, MAX_VERTICES), dtype=np.int64)
        for (u, v), bit in zip(edges, values):
            matrix[u, v] = int(bit)
        ops = [INPUT, *(OPS[int(o)] for o in values[len(edges):]), OUTPUT]
        return self._arch_of(prune(matrix, ops))

    def _arch_of(self, spec: Spec) -> str:
        module = spec.hash()
        return module if self._position(module) is not None else spec.to_json()

    def sample(self, rng: np.random.Generator) -> str:
        """A random model by the benchmark's rule (``random_spec``): its hash if bundled, else its JSON spec."""
        return self._arch_of(random_spec(rng))

    def sample_tabulated(self, rng: np.random.Generator) -> str:
        """A uniformly random bundled model (= a uniform sample of the space's unique models)."""
        return self.arch(int(rng.integers(len(self))))

    def mutate(self, arch: str | int, rng: np.random.Generator) -> str:
        """A mutation by the benchmark's rule (``mutate_spec``): hash if bundled, else JSON spec."""
        return self._arch_of(mutate_spec(self.spec(arch), rng))

    # --- benchmark ------------------------------------------------------------------------------
    def num_classes(self, dataset: str) -> int:
        """10 (CIFAR-10)."""
        self._check_dataset(dataset)
        return 10

    def _check_dataset(self, dataset: str) -> None:
        if not isinstance(dataset, str) or dataset not in DATASETS:
            raise UnknownDatasetError(f"{self.name} has no dataset {dataset!r}; known: {', '.join(DATASETS)}")

    def accuracy_field(self, dataset: str, metric: str, epochs: int) -> str:
        """E.g. "cifar10 validation accuracy, 108 epochs, one run"."""
        self.benchmark_table(dataset, metric, epochs)
        if metric == "train_time":
            return f"{dataset} training time, {epochs} epochs, one run"
        return f"{dataset} validation accuracy, {epochs} epochs, one run"

    def benchmark_table(self, dataset: str, metric: str = "valid", epochs: int = 108) -> np.ndarray:
        """All bundled values of ``query(·, dataset, metric, epochs)`` in index order (read-only)."""
        self._check_dataset(dataset)
        if metric == "test":
            raise ValueError("NB101 test accuracy is not bundled (only the validation accuracy of one run); "
                             "use metric 'valid'")
        if metric not in ("valid", "train_time"):
            raise ValueError(f"unknown metric {metric!r}; NB101 metrics: valid, train_time")
        if isinstance(epochs, bool) or epochs not in EPOCHS:
            raise ValueError(f"NB101 epochs must be one of {', '.join(map(str, EPOCHS))}, got {epochs!r}")
        if metric == "train_time":
            if epochs != 108:
                raise ValueError("only the 108-epoch NB101 training time is bundled")
            return self._train_time
        return self._accuracy[int(epochs)]

    def query(self, arch: str | int, dataset: str, metric: str = "valid", epochs: int = 108) -> float:
        """Validation accuracy in % of one training run after ``epochs`` (4, 12, 36 or 108) epochs, or
        ``train_time`` (seconds, 108 epochs) of a bundled model. "test" is not bundled and raises."""
        index = self.index(arch)
        return float(self.benchmark_table(dataset, metric, epochs)[index])

    def param_count(self, arch: str | int, dataset: str = "cifar10") -> int:
        """The benchmark's ``trainable_parameters`` of a bundled model."""
        self._check_dataset(dataset)
        return int(self._params[self.index(arch)])

    def params(self, arch: str | int, dataset: str = "cifar10") -> float:
        """Parameters in millions."""
        return self.param_count(arch, dataset) / 1e6

    # --- models ---------------------------------------------------------------------------------
    def build(self, arch: str | int, *, num_classes: int, stem_channels: int = 128, num_stacks: int = 3,
              cells_per_stack: int = 3, **options) -> NB101Network:
        """The benchmark network of ``arch`` (hash, index or JSON spec), freshly initialised."""
        if options:
            raise TypeError(f"unknown build options for nb101: {', '.join(sorted(options))}")
        spec = self.spec(arch)
        return build_nb101(spec.matrix, spec.ops, num_classes, stem_channels=stem_channels,
                           num_stacks=num_stacks, cells_per_stack=cells_per_stack)
