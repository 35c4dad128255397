"""Regularised (aging) evolution, REA (Real et al. 2019, Algorithm 1), and its assisted variant G-REA.

Protocol (NAS-Bench-201 settings): population 10, tournament sample size 3 drawn uniformly with
replacement from the population, the parent is the sample's most accurate member, the child is the parent
with one decision changed (``space.mutate``), and the oldest member is removed after each child.
Evaluations are 12-epoch validation accuracies. G-REA (GradSign paper, Appendix A.5) replaces every random
proposal, the initial random archs and each random mutation, by the best-scoring of a pool of such draws.
(The GradSign repository's script assists only the mutations; its initial population is plain random.)
"""
from __future__ import annotations

from collections import deque

from gradsign.search.simulator import SearchContext


def regularized_evolution(ctx: SearchContext, *, population_size: int = 10, sample_size: int = 3,
                          epochs: int = 12, population: deque | None = None) -> None:
    """Run aging evolution until ``BudgetExhausted``. ``population`` (a deque of ``(arch, accuracy)``,
    oldest first) may be passed in to observe it; it is filled and updated in place."""
    if population_size < 1 or sample_size < 1 or int(population_size) != population_size \
            or int(sample_size) != sample_size:
        raise ValueError(f"need integers population_size >= 1 and sample_size >= 1, got {population_size}, "
                         f"{sample_size}")
    population_size, sample_size = int(population_size), int(sample_size)
    space, rng, sim = ctx.space, ctx.rng, ctx.sim
    population = deque() if population is None else population
    while len(population) < population_size:
        arch = ctx.propose(lambda: space.sample(rng))
        population.append((arch, sim.evaluate(arch, epochs)))
    while True:
        picks = rng.integers(len(population), size=sample_size)
        parent = max((population[int(i)] for i in picks), key=lambda member: member[1])[0]
        child = ctx.propose(lambda: space.mutate(parent, rng))
        population.append((child, sim.evaluate(child, epochs)))
        population.popleft()
