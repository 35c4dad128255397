"""Injected faults: nothing finished is lost and the final result equals an uninterrupted run's."""
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fault_proxies  # noqa: F401  (registers the misbehaving proxies in this process)
from gradsign.evaluate import ScoringSetup, score_archs
from gradsign.executors import WORKER_DIED, LocalExecutor, SerialExecutor
from gradsign.spaces import get_space
from gradsign.store import ScoreStore, StoreError

SPACE = get_space("nb201")
TESTS = Path(__file__).parent
# archs with 0, 5 (one pool edge per cell) and 15+ avg pools
NO_POOL = SPACE.arch(SPACE.index("|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|skip_connect~1|nor_conv_3x3~2|"))
ONE_POOL = SPACE.arch(SPACE.index("|avg_pool_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|skip_connect~1|nor_conv_3x3~2|"))
MANY_POOLS = SPACE.arch(SPACE.index("|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|none~0|skip_connect~1|nor_conv_3x3~2|"))
SOME_ARCHS = [SPACE.arch(i) for i in (0, 1, 2, 3, 4, 5)]


def setup(*proxies, dataset="imagenet16-120"):
    return ScoringSetup(SPACE, dataset, tuple(proxies), batch_size=8, seed=0)


def values(found):
    return {(a, p): (s.value, s.error) for a, per in found.items() for p, s in per.items()}


def same(a, b):
    return a.keys() == b.keys() and all(
        (math.isnan(a[k][0]) and math.isnan(b[k][0]) or a[k][0] == b[k][0]) and a[k][1] == b[k][1] for k in a)


def test_a_raising_proxy_is_recorded_and_the_run_goes_on(tmp_path):
    archs = [NO_POOL, ONE_POOL, *SOME_ARCHS]
    with ScoreStore(tmp_path / "s.sqlite") as store:
        found, computed = score_archs(setup("params", "test_raises"), archs, store)
        assert computed == len(archs)
        assert found[ONE_POOL]["test_raises"].error == "RuntimeError: injected failure"
        assert math.isnan(found[ONE_POOL]["test_raises"].value)
        assert found[ONE_POOL]["params"].error is None and found[ONE_POOL]["params"].value > 0
        assert found[NO_POOL]["test_raises"].error is None
        again, computed = score_archs(setup("params", "test_raises"), archs, store)
        assert computed == 0 and same(values(again), values(found))


def test_nan_and_inf_stay_visible(tmp_path, capsys):
    from gradsign.correlate import correlate
    with ScoreStore(tmp_path / "s.sqlite") as store:
        result = correlate(setup("test_nan"), [NO_POOL, ONE_POOL, MANY_POOLS, *SOME_ARCHS], store=store,
                           n_boot=0)
        from_store = correlate(setup("test_nan"), [NO_POOL, ONE_POOL, MANY_POOLS, *SOME_ARCHS], store=store,
                               n_boot=0)
    by_arch = {r["arch"]: r["scores"]["test_nan"] for r in result.archs}
    assert math.isnan(by_arch[ONE_POOL]) and by_arch[MANY_POOLS] == math.inf
    assert result.proxies["test_nan"]["excluded"] >= 2
    assert from_store.sources == {"bundled": 0, "store": len(from_store.archs), "computed": 0}
    assert math.isnan({r["arch"]: r["scores"]["test_nan"] for r in from_store.archs}[ONE_POOL])


def test_a_dying_worker_is_recorded_and_the_others_finish(monkeypatch):
    monkeypatch.setenv("GRADSIGN_PLUGINS", "fault_proxies")
    archs = [NO_POOL, MANY_POOLS, *SOME_ARCHS]
    killers = {a for a in archs if fault_proxies.pools(SPACE.build(a, num_classes=120)) >= 30}
    assert killers == {MANY_POOLS, SOME_ARCHS[2]}
    found, _ = score_archs(setup("test_crash"), archs, executor=LocalExecutor(2))
    for arch in killers:
        assert found[arch]["test_crash"].error.startswith(WORKER_DIED)
    serial, _ = score_archs(setup("params"), [a for a in archs if a not in killers])
    for arch, per in serial.items():
        assert found[arch]["test_crash"].error is None
        assert found[arch]["test_crash"].value == per["params"].value * 1e6


class FullDisk:
    """A connection whose writes fail after ``allowed`` transactions, like SQLite on a full disk."""

    def __init__(self, connection, allowed):
        self.connection, self.allowed = connection, allowed

    def executemany(self, *args):
        if self.allowed == 0:
            raise sqlite3.OperationalError("database or disk is full")
        self.allowed -= 1
        return self.connection.executemany(*args)

    def __getattr__(self, name):
        return getattr(self.connection, name)

    def __enter__(self):
        return self.connection.__enter__()

    def __exit__(self, *exc):
        return self.connection.__exit__(*exc)


def test_a_full_disk_stops_the_run_and_keeps_what_was_written(tmp_path):
    archs = SOME_ARCHS
    with ScoreStore(tmp_path / "s.sqlite") as store:
        store.connection = FullDisk(store.connection, allowed=2)
        with pytest.raises(StoreError, match="disk is full"):
            score_archs(setup("params"), archs, store)
        store.connection = store.connection.connection
    with ScoreStore(tmp_path / "s.sqlite") as store:
        assert len(store.get(setup("params").key, archs, ["params"])) == 2
        resumed, computed = score_archs(setup("params"), archs, store)
    assert computed == len(archs) - 2
    uninterrupted, _ = score_archs(setup("params"), archs)
    assert same(values(resumed), values(uninterrupted))


def cli(*argv, env_extra=None):
    env = {**os.environ, "GRADSIGN_PLUGINS": "fault_proxies",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "gradsign", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows(path):
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=30) as connection:
            return connection.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def correlate_args(archs_file, cache, json_path, workers=1):
    return ["correlate", "--archs", archs_file, "--dataset", "imagenet16-120", "--batch-size", 8,
            "--proxies", "params,test_slow", "--cache", cache, "--out", json_path.with_suffix(".out"),
            "--json", json_path, "--bootstrap", 0, "--workers", workers]


def wait_for_rows(path, count, process, limit=90):
    deadline = time.time() + limit
    while rows(path) < count:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.1)


def comparable(path):
    report = json.loads(path.read_text())
    return [{k: v for k, v in a.items() if k != "sources"} for a in report["archs"]], report["proxies"]


@pytest.fixture
def archs_file(tmp_path):
    path = tmp_path / "archs.txt"
    path.write_text("\n".join(str(i) for i in range(10, 22)) + "\n")
    return path


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, archs_file, how):
    cache = tmp_path / "s.sqlite"
    first = cli(*correlate_args(archs_file, cache, tmp_path / "first.json"))
    wait_for_rows(cache, 2 * 4, first)
    first.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
    out, err = first.communicate(timeout=60)
    kept = rows(cache)
    assert kept >= 8
    if how == "SIGINT":
        assert first.returncode == 130 and "finished architecture is kept" in err
    resumed = cli(*correlate_args(archs_file, cache, tmp_path / "resumed.json"))
    assert resumed.wait(timeout=120) == 0, resumed.communicate()
    report = json.loads((tmp_path / "resumed.json").read_text())
    sources = report["sources"]  # scores: 12 archs x 2 proxies
    assert sources["store"] == kept and sources["bundled"] == 0 and sources["store"] + sources["computed"] == 24
    clean = cli(*correlate_args(archs_file, tmp_path / "clean.sqlite", tmp_path / "clean.json"))
    assert clean.wait(timeout=120) == 0
    assert comparable(tmp_path / "resumed.json") == comparable(tmp_path / "clean.json")


def test_two_processes_share_one_store(tmp_path, archs_file):
    cache = tmp_path / "s.sqlite"
    runs = [cli(*correlate_args(archs_file, cache, tmp_path / f"run{i}.json")) for i in range(2)]
    for run in runs:
        assert run.wait(timeout=180) == 0, run.communicate()
    with sqlite3.connect(cache) as connection:
        assert connection.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 12 * 2
    assert comparable(tmp_path / "run0.json") == comparable(tmp_path / "run1.json")


def test_local_workers_and_serial_give_identical_scores(monkeypatch):
    archs = SOME_ARCHS[:4]
    serial, _ = score_archs(setup("gradsign", "synflow"), archs, executor=SerialExecutor(threads=1))
    pooled, _ = score_archs(setup("gradsign", "synflow"), archs, executor=LocalExecutor(2, threads=1))
    assert values(serial) == values(pooled)


def test_ray_gives_the_same_scores_as_local():
    pytest.importorskip("ray")
    from gradsign.ray_executor import RayExecutor
    archs = SOME_ARCHS[:3]
    serial, _ = score_archs(setup("gradsign", "params"), archs, executor=SerialExecutor(threads=1))
    on_ray, _ = score_archs(setup("gradsign", "params"), archs, executor=RayExecutor(2, threads=1))
    assert values(serial) == values(on_ray)
