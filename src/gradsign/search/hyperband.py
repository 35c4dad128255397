"""Hyperband (Li et al. 2018, Algorithm 1) over a ladder of fidelities, and G-HB.

Brackets: with ``k`` fidelities ``f_0 < ... < f_{k-1}`` (here the epochs the benchmark tables hold) and
``s_max = k - 1``, bracket ``s`` (run for ``s = s_max, ..., 0``) starts ``n = ceil((s_max + 1) eta^s /
(s + 1))`` configurations at fidelity ``f_{s_max - s}`` and successive-halves them: stage ``i`` evaluates
``floor(n / eta^i)`` of them at ``f_{s_max - s + i}``, keeping the most accurate for the next stage.
A ladder with ``eta``-spaced fidelities gives exactly Li et al.'s brackets; NAS-Bench-201's tables hold
12 and 200 epochs only, so ``s_max = 1``: bracket 1 screens 3 random archs for 12 epochs and trains the best
for 200, bracket 0 trains 2 random archs for 200 epochs; the brackets repeat until the budget ends.

Configurations of a bracket's first stage are sampled one at a time, each right before its evaluation
(as a sequential HpBandSter worker sees them), so a model-based sampler (BOHB) learns within a bracket.
G-HB (GradSign paper, Appendix A.5): every random configuration is the best-scoring of a pool.
"""
from __future__ import annotations

from collections.abc import Callable

from gradsign.search.simulator import SearchContext

#: observer of each evaluation: (arch, epochs, validation accuracy)
Observer = Callable[[str, int, float], None]


def hyperband_brackets(n_fidelities: int, eta: int = 3) -> list[list[tuple[int, int]]]:
    """Brackets ``s = s_max .. 0``, each a list of stages ``(number of configurations, fidelity rung)``."""
    if n_fidelities < 1 or eta < 2 or int(eta) != eta:
        raise ValueError(f"need at least one fidelity and an integer eta >= 2, got {n_fidelities}, {eta}")
    eta = int(eta)
    s_max = n_fidelities - 1
    brackets = []
    for s in range(s_max, -1, -1):
        n = -(-(s_max + 1) * eta ** s // (s + 1))  # integer ceil
        brackets.append([(n // eta ** i, s_max - s + i) for i in range(s + 1)])
    return brackets


def hyperband(ctx: SearchContext, *, eta: int = 3, sampler: Callable[[], str] | None = None,
              observe: Observer | None = None) -> None:
    """Run Hyperband brackets until ``BudgetExhausted``. ``sampler`` draws a configuration (default: a
    random arch, best-of-pool when assisted); ``observe`` is told every evaluation."""
    space, rng, sim = ctx.space, ctx.rng, ctx.sim
    fidelities = sim.tables.fidelities
    brackets = hyperband_brackets(len(fidelities), eta)
    if sampler is None:
        def sampler() -> str:
            return ctx.propose(lambda: space.sample(rng))

    def run(arch: str, epochs: int) -> float:
        accuracy = sim.evaluate(arch, epochs)
        if observe is not None:
            observe(arch, epochs, accuracy)
        return accuracy

    while True:
        for bracket in brackets:
            n0, rung0 = bracket[0]
            configs, scores = [], []
            for _ in range(n0):
                arch = sampler()
                configs.append(arch)
                scores.append(run(arch, fidelities[rung0]))
            for n_i, rung in bracket[1:]:
                order = sorted(range(len(configs)), key=lambda j: -scores[j])[:n_i]
                configs = [configs[j] for j in order]
                scores = [run(arch, fidelities[rung]) for arch in configs]
