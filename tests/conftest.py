from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """The read-only ../shared folder beside the project, for cross-checks; skips when absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is not available")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run torch on one thread: on a shared 2-core machine several threads per process wait on
    each other far more than they gain, and results do not depend on it."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def live_tensors():
    """A function counting the tensors alive in the process (after a garbage collection)."""
    import gc

    import torch

    def count() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    return count


@pytest.fixture
def engine_calls(monkeypatch):
    """A function that starts counting the calls of the named ``gradsign.engine`` functions (wrapped for the
    test) and returns the dict of their counts, kept up to date."""
    from gradsign import engine

    def counted(calls: dict, name: str, original):
        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return call

    def watch(*names: str) -> dict:
        calls = dict.fromkeys(names, 0)
        for name in names:
            monkeypatch.setattr(engine, name, counted(calls, name, getattr(engine, name)))
        return calls
    return watch
