from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """The read-only ../shared folder beside the project, for cross-checks; skips when absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is not available")
    return SHARED
