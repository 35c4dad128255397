"""The SQLite score store: round trips, NaN kept visible, corrupt files reported and left untouched."""
import math

import pytest

from gradsign.store import ScoreKey, ScoreStore, StoredScore, StoreError

KEY = ScoreKey("nb201", "cifar10", 64, 0, "{}", "test")


def test_round_trip_keeps_nan_inf_and_errors(tmp_path):
    path = tmp_path / "scores.sqlite"
    with ScoreStore(path) as store:
        store.put(KEY, [StoredScore("a", "gradsign", 12.5, None, 0.1),
                        StoredScore("a", "synflow", math.inf, None, 0.2),
                        StoredScore("b", "gradsign", math.nan, None, 0.1),
                        StoredScore("c", "gradsign", math.nan, "RuntimeError: out of memory", 0.3)])
    with ScoreStore(path) as store:
        found = store.get(KEY, ["a", "b", "c", "d"], ["gradsign", "synflow"])
    assert found[("a", "gradsign")].value == 12.5
    assert found[("a", "synflow")].value == math.inf
    assert math.isnan(found[("b", "gradsign")].value) and found[("b", "gradsign")].error is None
    assert found[("c", "gradsign")].error.startswith("RuntimeError")
    assert ("d", "gradsign") not in found


def test_other_keys_do_not_match(tmp_path):
    with ScoreStore(tmp_path / "s.sqlite") as store:
        store.put(KEY, [StoredScore("a", "gradsign", 1.0, None, 0.0)])
        for other in (ScoreKey("nb201", "cifar100", 64, 0, "{}", "test"),
                      ScoreKey("nb201", "cifar10", 128, 0, "{}", "test"),
                      ScoreKey("nb201", "cifar10", 64, 1, "{}", "test"),
                      ScoreKey("nb201", "cifar10", 64, 0, '{"aggregation":"mean"}', "test"),
                      ScoreKey("nb201", "cifar10", 64, 0, "{}", "other-version")):
            assert store.get(other, ["a"], ["gradsign"]) == {}


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 5000])
def test_corrupt_file_is_reported_and_left_untouched(tmp_path, content):
    path = tmp_path / "scores.sqlite"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="left untouched"):
        ScoreStore(path)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.sqlite"]


def test_foreign_database_is_refused(tmp_path):
    import sqlite3
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a gradsign score store"):
        ScoreStore(path)
    assert path.read_bytes() == before
