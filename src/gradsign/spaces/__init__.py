"""Search spaces behind one interface (``base.SearchSpace``), looked up by name."""
from __future__ import annotations

from gradsign.spaces.base import SearchSpace, UnknownArchError, UnknownDatasetError


class UnknownSpaceError(ValueError):
    """Raised for a search-space name that does not exist."""


SPACES = ("nb201", "nb101")
#: the NDS design spaces (spaces/nds.py); tabulated only by the user's NDS result files
NDS_SPACES = ("nds-darts", "nds-enas", "nds-pnas", "nds-nasnet", "nds-amoeba")
SPACES += NDS_SPACES


def get_space(name: str, *, nds_dir: str | None = None) -> SearchSpace:
    """The search space ``name`` (loads its bundled benchmark tables); ``nds_dir``: the folder with the NDS
    result files, for the nds-* spaces (default: the GRADSIGN_NDS_DIR environment variable)."""
    if name == "nb201":
        from gradsign.spaces.nb201 import NasBench201

        return NasBench201()
    if name == "nb101":
        from gradsign.spaces.nb101 import NasBench101

        return NasBench101()
    if name in NDS_SPACES:
        from gradsign.spaces.nds import NDSSpace

        return NDSSpace(name, nds_dir=nds_dir)
    raise UnknownSpaceError(f"unknown search space {name!r}; known spaces: {', '.join(SPACES)}")


__all__ = ["SPACES", "SearchSpace", "UnknownArchError", "UnknownDatasetError", "UnknownSpaceError",
           "get_space"]
