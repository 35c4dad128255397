"""Random search (RS) and GradSign-assisted random search (G-RS).

RS (NAS-Bench-201 paper's baseline): evaluate uniformly random archs for 12 epochs until the budget ends.
G-RS (GradSign paper, Appendix A.5): each random arch is the best-scoring of a pool of random archs.
Archs are not de-duplicated: a repeat is evaluated (and charged) again, as in the benchmark's scripts.
"""
from __future__ import annotations

from gradsign.search.simulator import SearchContext


def random_search(ctx: SearchContext, *, epochs: int = 12) -> None:
    """Evaluate random proposals for ``epochs`` epochs until ``BudgetExhausted`` is raised."""
    space, rng = ctx.space, ctx.rng
    while True:
        arch = ctx.propose(lambda: space.sample(rng))
        ctx.sim.evaluate(arch, epochs)
