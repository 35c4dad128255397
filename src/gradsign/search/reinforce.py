"""REINFORCE (Williams 1992) over a categorical policy per decision, and its assisted variant.

Protocol (NAS-Bench-201 settings and scripts): one logit vector per decision, initialised to
``1e-3 * N(0, 1)``; an arch is sampled decision by decision from the softmax; its reward is the 12-epoch
validation accuracy in %; the baseline is an exponential moving average of the rewards with momentum 0.9
(bias-corrected, updated with the reward before the advantage is taken); the loss
``-log pi(arch) * (reward - baseline)`` takes one Adam step (Kingma & Ba 2015, betas 0.9/0.999,
eps 1e-8) with learning rate 0.5 per evaluation. G-REINFORCE (GradSign paper, Appendix A.5) samples a
pool of archs from the policy, evaluates the best-scoring one and updates with that arch's log-probability.
(The GradSign repository's script instead scores 10 random mutations of one policy sample and updates with
the log-probability of the unmutated sample.)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gradsign.search.simulator import SearchContext


@dataclass
class MovingAverage:
    """Bias-corrected exponential moving average: ``sum m^k (1-m) x_k / sum m^k (1-m)``."""

    momentum: float = 0.9
    numerator: float = 0.0
    denominator: float = 0.0

    def update(self, value: float) -> None:
        self.numerator = self.momentum * self.numerator + (1 - self.momentum) * value
        self.denominator = self.momentum * self.denominator + (1 - self.momentum)

    @property
    def value(self) -> float:
        return self.numerator / self.denominator if self.denominator else 0.0


@dataclass
class CategoricalPolicy:
    """Independent categorical distributions, one per decision, with an Adam optimiser on the logits."""

    sizes: tuple[int, ...]
    rng: np.random.Generator
    learning_rate: float = 0.5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    logits: list[np.ndarray] = field(init=False)
    _m: list[np.ndarray] = field(init=False)
    _v: list[np.ndarray] = field(init=False)
    _step: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.logits = [1e-3 * self.rng.standard_normal(n) for n in self.sizes]
        self._m = [np.zeros(n) for n in self.sizes]
        self._v = [np.zeros(n) for n in self.sizes]

    def probabilities(self) -> list[np.ndarray]:
        """Softmax of each decision's logits."""
        out = []
        for z in self.logits:
            e = np.exp(z - z.max())
            out.append(e / e.sum())
        return out

    def sample(self) -> tuple[int, ...]:
        """One choice per decision (inverse-CDF sampling with one uniform per decision)."""
        u = self.rng.random(len(self.sizes))
        return tuple(min(int(np.searchsorted(np.cumsum(p), x, side="right")), len(p) - 1)
                     for p, x in zip(self.probabilities(), u))

    def log_prob(self, choices: Sequence[int]) -> float:
        """log pi(choices)."""
        return float(sum(np.log(p[c]) for p, c in zip(self.probabilities(), choices)))

    def update(self, choices: Sequence[int], advantage: float) -> None:
        """One Adam step on ``-log pi(choices) * advantage``; its gradient per decision is
        ``-advantage * (onehot(choice) - softmax(logits))``."""
        self._step += 1
        b1, b2 = self.betas
        for d, (p, c) in enumerate(zip(self.probabilities(), choices)):
            grad = p.copy()
            grad[c] -= 1.0
            grad *= advantage
            self._m[d] = b1 * self._m[d] + (1 - b1) * grad
            self._v[d] = b2 * self._v[d] + (1 - b2) * grad * grad
            m_hat = self._m[d] / (1 - b1 ** self._step)
            v_hat = self._v[d] / (1 - b2 ** self._step)
            self.logits[d] = self.logits[d] - self.learning_rate * m_hat / (np.sqrt(v_hat) + self.eps)


def reinforce(ctx: SearchContext, *, learning_rate: float = 0.5, momentum: float = 0.9, epochs: int = 12,
              policy: CategoricalPolicy | None = None) -> None:
    """Run REINFORCE until ``BudgetExhausted``. ``policy`` may be passed in to observe it."""
    space, sim = ctx.space, ctx.sim
    if not learning_rate > 0 or not 0 <= momentum < 1:
        raise ValueError(f"need learning_rate > 0 and 0 <= momentum < 1, got {learning_rate}, {momentum}")
    if policy is None:
        policy = CategoricalPolicy(tuple(len(c) for c in space.choices), ctx.rng, learning_rate)
    baseline = MovingAverage(momentum)
    while True:
        arch = ctx.propose(lambda: space.decode(policy.sample()))
        reward = sim.evaluate(arch, epochs)
        baseline.update(reward)
        policy.update(space.encode(arch), reward - baseline.value)
