"""The interface every search space implements; search algorithms and experiments use only this.

An architecture is identified by its arch string (the space's canonical text form) and by an index in
the benchmark's order (in a partly tabulated space such as NAS-Bench-101, only the tabulated archs have
an index: ``has_table`` says which). Internally it is a tuple of choice indices, one per decision
(``space.choices[d]`` lists the options of decision ``d``), which is what REINFORCE-style policies and
mutation work on.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np
from torch import nn


class UnknownArchError(ValueError):
    """Raised for an arch string or index that is not in the space."""


class UnknownDatasetError(ValueError):
    """Raised for a dataset the space has no benchmark results or model for."""


class SearchSpace(ABC):
    """A finite, enumerable space of architectures with benchmark look-ups."""

    name: str
    #: the options of each decision, e.g. six edges with five ops each for NAS-Bench-201
    choices: tuple[tuple[str, ...], ...]
    #: datasets with benchmark results, e.g. ("cifar10", "cifar100", "imagenet16-120")
    datasets: tuple[str, ...]

    @abstractmethod
    def __len__(self) -> int:
        """Number of architectures."""

    @abstractmethod
    def arch(self, index: int) -> str:
        """Arch string of benchmark index ``index``."""

    @abstractmethod
    def index(self, arch: str | int) -> int:
        """Benchmark index of ``arch`` (an arch string or an index given as int or digit string)."""

    @abstractmethod
    def encode(self, arch: str) -> tuple[int, ...]:
        """Choice indices of ``arch``, one per decision."""

    @abstractmethod
    def decode(self, choice_indices: Sequence[int]) -> str:
        """Arch string of a tuple of choice indices."""

    @abstractmethod
    def build(self, arch: str, *, num_classes: int, **options) -> nn.Module:
        """A freshly initialised torch model for ``arch`` (initialise under ``torch.manual_seed``)."""

    @abstractmethod
    def query(self, arch: str, dataset: str, metric: str = "test", epochs: int = 200) -> float:
        """Benchmark result of ``arch`` on ``dataset``: ``metric`` is "test" or "valid" accuracy in %,
        or "train_time" (seconds for ``epochs`` epochs); seed means where the benchmark has several."""

    #: the accuracy field reports use unless told otherwise: (metric, epochs)
    default_field: tuple[str, int] = ("test", 200)
    #: the final-accuracy fields that architecture selection reports: (metric, epochs) pairs
    final_fields: tuple[tuple[str, int], ...] = (("valid", 200), ("test", 200))
    #: how reports name ``final_fields``
    final_fields_name: str = "200-epoch accuracy, seed mean; valid = x-valid (cifar10-valid for cifar10)"

    def has_table(self, arch: str | int) -> bool:
        """Whether the benchmark has results for ``arch`` (every arch of a fully tabulated space)."""
        self.index(arch)
        return True

    def resolve(self, arch: str | int) -> str:
        """The canonical arch string of any accepted form of ``arch`` (an index, a spec, ...)."""
        return self.arch(self.index(arch))

    def accuracy_field(self, dataset: str, metric: str, epochs: int) -> str:
        """The name of a benchmark column, as reports print it, e.g. "cifar10 test accuracy, 200 epochs,
        seed mean"."""
        seeds = "seed mean" if epochs == 200 else "seed mean where several"
        return f"{dataset} {metric} accuracy, {epochs} epochs, {seeds}"

    def num_classes(self, dataset: str) -> int:
        """Number of classes of ``dataset``."""
        raise UnknownDatasetError(f"{self.name} has no dataset {dataset!r}")

    def canonical(self, arch: str) -> str:
        """A representative arch string shared by all archs computing the same function."""
        return arch

    def __iter__(self) -> Iterator[str]:
        return (self.arch(i) for i in range(len(self)))

    def sample(self, rng: np.random.Generator) -> str:
        """A uniformly random architecture."""
        return self.decode([int(rng.integers(len(c))) for c in self.choices])

    def mutate(self, arch: str, rng: np.random.Generator) -> str:
        """``arch`` with one decision changed to a different option, chosen uniformly."""
        choice_indices = list(self.encode(arch))
        decision = int(rng.integers(len(choice_indices)))
        options = [o for o in range(len(self.choices[decision])) if o != choice_indices[decision]]
        choice_indices[decision] = options[int(rng.integers(len(options)))]
        return self.decode(choice_indices)
