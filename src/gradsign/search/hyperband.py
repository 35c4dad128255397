"""Hyperband (Li et al. 2018) as HpBandSter runs it, under two protocols, and G-HB.

``protocol="benchmark"`` (default): NAS-Bench-201's and the GradSign code's BOHB/HB scripts (NAS-Bench-201
``exps/algos/BOHB.py``, January 2020; GradSign ``autodl/BOHB.py``) drive HpBandSter 0.7.4 with ``eta=3``,
``min_budget=12``, ``max_budget=200``, and a worker that ignores the budget: every evaluation, at every rung,
returns the arch's 12-epoch validation accuracy and is charged 12 epochs of training plus one validation
pass, the same charge as RS/REA. A configuration promoted to a higher rung is looked up and charged again.
HpBandSter's schedule (``hpbandster.optimizers.bohb.BOHB``):

* ``n_rungs = -int(log(min_budget / max_budget) / log(eta)) + 1`` rungs with budgets
  ``max_budget * eta^-k``, ``k = n_rungs - 1 .. 0`` (here 3 rungs: 22.2, 66.7, 200);
* iteration ``i`` runs bracket ``s = n_rungs - 1 - (i mod n_rungs)`` with
  ``n0 = floor(n_rungs / (s + 1)) * eta^s`` configurations and stages ``max(int(n0 eta^-j), 1)``,
  ``j = 0..s``, on the last ``s + 1`` budgets (here [9, 3, 1], [3, 1], [3]), cycling until the budget ends;
* successive halving promotes the lowest losses (loss = 100 - accuracy), ranked with numpy's default
  ``argsort`` as HpBandSter ranks them (tied losses, e.g. one arch drawn twice, are split the same way);
  promoted configurations run in the order they were sampled; one sequential worker, so each new
  configuration is sampled right before its evaluation and sees every earlier result.

``protocol="two-fidelity"`` (this project's variant, not a published protocol): rungs are the epochs the
tables hold (12 and 200) and each evaluation returns and charges that many epochs; Li et al.'s brackets
``n = ceil((s_max + 1) eta^s / (s + 1))`` with ``floor(n / eta^i)`` promoted (bracket 1: 3 archs for 12
epochs, the best for 200; bracket 0: 2 archs for 200 epochs).

G-HB (GradSign code, ``autodl/BOHB.py``): every configuration the generator returns is replaced by the
best-scoring of ``pool`` random archs (the search context's best-of-pool proposal).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from gradsign.search.simulator import SearchContext

#: observer of each evaluation: (arch, rung budget, validation accuracy)
Observer = Callable[[str, float, float], None]
#: the protocols ``hyperband`` and ``bohb`` run; the first is the default
PROTOCOLS = ("benchmark", "two-fidelity")
#: HpBandSter settings of the benchmark's scripts
BENCHMARK_MIN_BUDGET, BENCHMARK_MAX_BUDGET, BENCHMARK_EPOCHS = 12.0, 200.0, 12


def hyperband_brackets(n_fidelities: int, eta: int = 3) -> list[list[tuple[int, int]]]:
    """Li et al.'s brackets ``s = s_max .. 0`` over ``n_fidelities`` rungs, each a list of stages
    ``(number of configurations, rung index)`` (the two-fidelity protocol)."""
    eta = _check_eta(eta)
    if n_fidelities < 1:
        raise ValueError(f"need at least one fidelity, got {n_fidelities}")
    s_max = n_fidelities - 1
    brackets = []
    for s in range(s_max, -1, -1):
        n = -(-(s_max + 1) * eta ** s // (s + 1))  # integer ceil
        brackets.append([(n // eta ** i, s_max - s + i) for i in range(s + 1)])
    return brackets


def hpbandster_budgets(min_budget: float, max_budget: float, eta: int = 3) -> list[float]:
    """HpBandSter's rung budgets: ``max_budget * eta^-k`` for ``k = n - 1 .. 0``,
    ``n = -int(log(min_budget / max_budget) / log(eta)) + 1``."""
    eta = _check_eta(eta)
    if not 0 < min_budget <= max_budget:
        raise ValueError(f"need 0 < min_budget <= max_budget, got {min_budget}, {max_budget}")
    n = -int(math.log(min_budget / max_budget) / math.log(eta)) + 1
    return [max_budget * eta ** -float(k) for k in range(n - 1, -1, -1)]


def hpbandster_bracket(iteration: int, n_rungs: int, eta: int = 3) -> list[tuple[int, int]]:
    """Stages ``(number of configurations, rung index)`` of HpBandSter iteration ``iteration``:
    ``s = n_rungs - 1 - iteration mod n_rungs``, ``n0 = floor(n_rungs / (s + 1)) eta^s``, stage ``j`` keeps
    ``max(int(n0 eta^-j), 1)`` on rung ``n_rungs - 1 - s + j``."""
    eta = _check_eta(eta)
    s = n_rungs - 1 - iteration % n_rungs
    n0 = (n_rungs // (s + 1)) * eta ** s
    return [(max(n0 // eta ** j, 1), n_rungs - 1 - s + j) for j in range(s + 1)]


def _check_eta(eta) -> int:
    if isinstance(eta, bool) or eta < 2 or int(eta) != eta:
        raise ValueError(f"eta must be an integer >= 2, got {eta!r}")
    return int(eta)


def successive_halving(stages: list[tuple[int, float]], sample: Callable[[], str],
                       run: Callable[[str, float], float]) -> None:
    """One bracket: ``stages[0][0]`` configurations, each sampled right before it runs at budget
    ``stages[0][1]``; at each later stage the ``n`` lowest losses ``100 - accuracy`` (HpBandSter's ranks,
    ``argsort(argsort(losses)) < n``) run again at its budget, in the order they were sampled."""
    n0, budget0 = stages[0]
    configs, scores = [], []
    for _ in range(n0):
        arch = sample()
        configs.append(arch)
        scores.append(run(arch, budget0))
    for n, budget in stages[1:]:
        ranks = np.argsort(np.argsort(100.0 - np.array(scores, dtype=np.float64)))
        keep = [j for j in range(len(configs)) if ranks[j] < n]
        configs = [configs[j] for j in keep]
        scores = [run(arch, budget) for arch in configs]


def hyperband(ctx: SearchContext, *, eta: int = 3, protocol: str = "benchmark", min_budget: float | None = None,
              max_budget: float | None = None, sampler: Callable[[], str] | None = None,
              observe: Observer | None = None) -> None:
    """Run Hyperband brackets until ``BudgetExhausted`` under ``protocol`` (module docstring).

    ``min_budget``/``max_budget`` (benchmark protocol only; default 12 and 200) set the nominal rungs.
    ``sampler`` draws a configuration (default: a random arch, best-of-pool when assisted); ``observe`` is
    told every evaluation as (arch, rung budget, accuracy)."""
    space, rng, sim = ctx.space, ctx.rng, ctx.sim
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown Hyperband protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if sampler is None:
        def sampler() -> str:
            return ctx.propose(lambda: space.sample(rng))

    if protocol == "benchmark":
        budgets = hpbandster_budgets(BENCHMARK_MIN_BUDGET if min_budget is None else float(min_budget),
                                     BENCHMARK_MAX_BUDGET if max_budget is None else float(max_budget), eta)
        epochs = BENCHMARK_EPOCHS

        def run(arch: str, budget: float) -> float:
            accuracy = sim.evaluate(arch, epochs, rung=budget)  # the budget is ignored, as in the scripts
            if observe is not None:
                observe(arch, budget, accuracy)
            return accuracy

        iteration = 0
        while True:
            stages = hpbandster_bracket(iteration, len(budgets), eta)
            successive_halving([(n, budgets[k]) for n, k in stages], sampler, run)
            iteration += 1

    if min_budget is not None or max_budget is not None:
        raise ValueError("min_budget and max_budget apply to the benchmark protocol only; the two-fidelity "
                         "protocol's rungs are the epochs the tables hold")
    fidelities = sim.tables.fidelities

    def run_epochs(arch: str, budget: float) -> float:
        accuracy = sim.evaluate(arch, int(budget))
        if observe is not None:
            observe(arch, budget, accuracy)
        return accuracy

    brackets = hyperband_brackets(len(fidelities), eta)
    while True:
        for bracket in brackets:
            successive_halving([(n, float(fidelities[k])) for n, k in bracket], sampler, run_epochs)
