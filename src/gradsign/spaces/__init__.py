"""Search spaces behind one interface (``base.SearchSpace``), looked up by name."""
from __future__ import annotations

from gradsign.spaces.base import SearchSpace, UnknownArchError, UnknownDatasetError


class UnknownSpaceError(ValueError):
    """Raised for a search-space name that does not exist."""


SPACES = ("nb201", "nb101")


def get_space(name: str) -> SearchSpace:
    """The search space ``name`` (loads its bundled benchmark tables)."""
    if name == "nb201":
        from gradsign.spaces.nb201 import NasBench201

        return NasBench201()
    if name == "nb101":
        from gradsign.spaces.nb101 import NasBench101

        return NasBench101()
    raise UnknownSpaceError(f"unknown search space {name!r}; known spaces: {', '.join(SPACES)}")


__all__ = ["SPACES", "SearchSpace", "UnknownArchError", "UnknownDatasetError", "UnknownSpaceError",
           "get_space"]
