"""Simulated NAS on a tabular benchmark: evaluations are table look-ups charged the benchmark's time.

Protocol (NAS-Bench-201 paper, section 6; FIELD-NOTES section 5; SOURCES 6d):

* an evaluation of an arch for ``e`` epochs returns its ``e``-epoch validation accuracy on the search
  dataset (cifar10: the cifar10-valid x-valid split; seed mean) and is charged ``e`` epochs of training
  plus one validation pass, ``(e + f) * t``, where ``t`` is the arch's benchmark time per training epoch
  and ``f`` the validation pass in epochs: ``0.32`` on cifar10-valid (25k train / 25k valid images,
  so ``12.32 t`` for 12 epochs), scaled by ``n_valid / n_train`` on the other sets (the benchmark's
  eval times are one per-sample time per arch times the set size);
* a search stops at the first evaluation (or, with ``charge_proxy_time``, the first proxy scoring)
  whose charge would take the total past the budget: the budget is never exceeded;
* the arch a search returns is the incumbent: the best validation accuracy seen among the evaluations
  at the highest rung evaluated so far (HpBandSter's rule: lowest loss at the largest budget; ties go to the
  earlier evaluation; with one rung, simply the best). An evaluation's rung is its fidelity in epochs unless
  the algorithm names another: Hyperband/BOHB under the benchmark protocol evaluate every rung (nominal
  budgets 22.2, 66.7, 200) with the same 12-epoch look-up, as the benchmark's scripts did.

Assisted proposals (GradSign paper, Appendix A.5): a random proposal is replaced by the best-scoring of
``pool`` independent draws of the same proposal (NaN scores rank last, ties go to the earlier draw).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gradsign.spaces.base import SearchSpace

#: the validation pass of one epoch on cifar10-valid, in epochs of training time (SOURCES 6d: v/t 0.29-0.35)
CIFAR10_VALID_PASS = 0.32
#: NAS-Bench-201 split sizes (train, validation) of the search datasets: cifar10-valid, cifar100 x-valid,
#: ImageNet16-120 x-valid
SPLIT_SIZES = {"cifar10": (25_000, 25_000), "cifar100": (50_000, 5_000), "imagenet16-120": (151_700, 3_000)}
#: datasets whose 200-epoch accuracies a search reports
REPORT_DATASETS = ("cifar10", "cifar100", "imagenet16-120")


class BudgetExhausted(Exception):
    """Raised by the simulator when a charge would pass the budget; ends the search."""


def validation_pass_epochs(dataset: str) -> float:
    """One validation pass on ``dataset``'s search split, in epochs of its training time."""
    if dataset not in SPLIT_SIZES:
        raise ValueError(f"no split sizes for search dataset {dataset!r}; known: {', '.join(SPLIT_SIZES)}")
    n_train, n_valid = SPLIT_SIZES[dataset]
    c10_train, c10_valid = SPLIT_SIZES["cifar10"]
    return CIFAR10_VALID_PASS * (n_valid / n_train) / (c10_valid / c10_train)


def benchmark_values(space: SearchSpace, dataset: str, metric: str, epochs: int) -> np.ndarray:
    """All values of ``space.query(·, dataset, metric, epochs)`` in index order."""
    fast = getattr(space, "benchmark_table", None)
    if fast is not None:
        return np.asarray(fast(dataset, metric, epochs), dtype=np.float64)
    return np.array([space.query(space.arch(i), dataset, metric, epochs) for i in range(len(space))])


@dataclass(frozen=True)
class BenchmarkArrays:
    """The look-up tables a simulated search needs, as numpy arrays in index order (built once)."""

    search_dataset: str
    fidelities: tuple[int, ...]
    #: validation accuracy on the search dataset after ``e`` epochs, by ``e``
    accuracy: dict[int, np.ndarray]
    #: simulated seconds charged for an evaluation of ``e`` epochs, by ``e``
    cost: dict[int, np.ndarray]
    #: 200-epoch accuracies reported for the returned arch, by (dataset, "valid" | "test")
    final: dict[tuple[str, str], np.ndarray]

    @classmethod
    def from_space(cls, space: SearchSpace, search_dataset: str = "cifar10",
                   fidelities: Sequence[int] = (12, 200)) -> "BenchmarkArrays":
        """Tables of ``space`` for a search on ``search_dataset`` with evaluations of ``fidelities`` epochs."""
        if search_dataset not in space.datasets:
            raise ValueError(f"{space.name} has no dataset {search_dataset!r}; known: {', '.join(space.datasets)}")
        fidelities = tuple(sorted({int(e) for e in fidelities}))
        valid_pass = validation_pass_epochs(search_dataset)
        accuracy, cost = {}, {}
        for e in fidelities:
            accuracy[e] = benchmark_values(space, search_dataset, "valid", e)
            per_epoch = benchmark_values(space, search_dataset, "train_time", e) / e
            cost[e] = (e + valid_pass) * per_epoch
            if not np.all(np.isfinite(cost[e])):
                raise ValueError(f"{space.name}: training times missing for {search_dataset} ({e} epochs)")
        final = {(d, m): benchmark_values(space, d, m, 200) for d in REPORT_DATASETS if d in space.datasets
                 for m in ("valid", "test")}
        return cls(search_dataset, fidelities, accuracy, cost, final)


@dataclass(frozen=True)
class Assist:
    """A proxy that ranks candidate archs: ``scores(indices) -> values``; ``seconds[index]`` is the measured
    time of scoring ``index`` (needed only to charge proxy time)."""

    scores: Callable[[np.ndarray], np.ndarray]
    higher_is_better: bool = True
    seconds: np.ndarray | None = None
    name: str = "proxy"


def resolve_assist(assist, higher_is_better: bool | None = None) -> Assist | None:
    """An ``Assist`` from a callable (e.g. ``evaluate.ProxyScores``). The direction is, in order:
    ``higher_is_better`` if given, the callable's own ``higher_is_better`` attribute, the registered
    direction of its ``proxy`` attribute, else higher is better."""
    if assist is None or isinstance(assist, Assist):
        return assist
    if not callable(assist):
        raise TypeError(f"assist must be callable (indices -> scores), got {type(assist).__name__}")
    name = getattr(assist, "proxy", None)
    if higher_is_better is None:
        higher_is_better = getattr(assist, "higher_is_better", None)
    if higher_is_better is None and isinstance(name, str):
        from gradsign.proxies import get_proxy
        higher_is_better = get_proxy(name).higher_is_better
    seconds = getattr(assist, "seconds", None)
    return Assist(assist, True if higher_is_better is None else bool(higher_is_better),
                  None if seconds is None else np.asarray(seconds),
                  name if isinstance(name, str) else getattr(assist, "__name__", "proxy"))


@dataclass
class Evaluation:
    """One simulated evaluation: finished at ``time`` seconds into the search."""

    time: float
    index: int
    epochs: int
    accuracy: float
    #: the rung the algorithm evaluated it for (its nominal budget); equals ``epochs`` unless named
    rung: float


@dataclass
class Simulator:
    """The state of one simulated search run: the clock, the evaluations and the incumbent."""

    space: SearchSpace
    tables: BenchmarkArrays
    budget: float
    assist: Assist | None = None
    charge_proxy_time: bool = False
    elapsed: float = 0.0
    proxy_seconds: float = 0.0
    proxy_evaluations: int = 0
    history: list[Evaluation] = field(default_factory=list)
    #: (time, index) each time the incumbent changes
    trace: list[tuple[float, int]] = field(default_factory=list)
    #: counts an algorithm keeps about its own choices (e.g. BOHB's model-based and random picks)
    counters: dict[str, int] = field(default_factory=dict)
    _incumbent: tuple[float, float, int] | None = None
    _scored: set[int] = field(default_factory=set)

    def evaluate(self, arch: str, epochs: int = 12, rung: float | None = None) -> float:
        """Validation accuracy of ``arch`` after ``epochs`` epochs, charged to the clock; raises
        ``BudgetExhausted`` (charging nothing) when the charge would pass the budget. ``rung`` (default
        ``epochs``) is the budget the algorithm evaluated it for; the incumbent is chosen at the highest."""
        index = self.space.index(arch)
        if epochs not in self.tables.cost:
            raise ValueError(f"no {epochs}-epoch results; fidelities: {self.tables.fidelities}")
        cost = float(self.tables.cost[epochs][index])
        if self.elapsed + cost > self.budget:
            raise BudgetExhausted
        self.elapsed += cost
        accuracy = float(self.tables.accuracy[epochs][index])
        rung = float(epochs if rung is None else rung)
        self.history.append(Evaluation(self.elapsed, index, epochs, accuracy, rung))
        key = (rung, accuracy)
        if self._incumbent is None or key > self._incumbent[:2]:
            self._incumbent = (rung, accuracy, index)
            self.trace.append((self.elapsed, index))
        return accuracy

    @property
    def incumbent(self) -> int | None:
        """Index of the best arch seen at the highest rung evaluated; None before any evaluation."""
        return None if self._incumbent is None else self._incumbent[2]

    @property
    def incumbent_rung(self) -> float | None:
        """The rung at which the incumbent was chosen; None before any evaluation."""
        return None if self._incumbent is None else self._incumbent[0]

    def rank_scores(self, indices: np.ndarray) -> np.ndarray:
        """Proxy scores of ``indices`` oriented so that larger is better, NaN as -inf; charges the proxy
        time of archs not yet scored in this run when ``charge_proxy_time`` is set."""
        if self.assist is None:
            raise RuntimeError("no assist proxy")
        values = np.asarray(self.assist.scores(indices), dtype=np.float64)
        if values.shape != indices.shape:
            raise ValueError(f"assist returned shape {values.shape} for {indices.shape} indices")
        new = [int(i) for i in dict.fromkeys(indices.tolist()) if int(i) not in self._scored]
        if new:
            charge = 0.0
            if self.charge_proxy_time:
                if self.assist.seconds is None:
                    raise ValueError("charge_proxy_time needs the proxy's measured seconds (assist.seconds)")
                seconds = self.assist.seconds[new]
                if not np.all(np.isfinite(seconds)):
                    raise ValueError(f"no measured proxy time for arch {new[int(np.argmin(np.isfinite(seconds)))]}")
                charge = float(seconds.sum())
                if self.elapsed + charge > self.budget:
                    raise BudgetExhausted
            self.elapsed += charge
            self.proxy_seconds += charge
            self.proxy_evaluations += len(new)
            self._scored.update(new)
        oriented = values if self.assist.higher_is_better else -values
        return np.where(np.isnan(oriented), -np.inf, oriented)


@dataclass
class SearchContext:
    """What an algorithm gets for one run: the space, the simulator, its random generator and the pool."""

    space: SearchSpace
    sim: Simulator
    rng: np.random.Generator
    pool: int = 10

    @property
    def assisted(self) -> bool:
        return self.sim.assist is not None

    def propose(self, draw: Callable[[], str]) -> str:
        """One random proposal from ``draw``; when assisted, the best-scoring of ``pool`` draws."""
        if self.sim.assist is None:
            return draw()
        candidates = [draw() for _ in range(self.pool)]
        indices = np.array([self.space.index(a) for a in candidates], dtype=np.int64)
        return candidates[int(np.argmax(self.sim.rank_scores(indices)))]
