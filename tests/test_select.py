"""Best-of-N selection (GradSign paper, Table 5) on the scored archs."""
import numpy as np
import pytest

from gradsign import bundled
from gradsign.evaluate import ScoringSetup, score_archs
from gradsign.select import format_selection, select
from gradsign.spaces import get_space
from gradsign.store import ScoreStore

SPACE = get_space("nb201")


@pytest.fixture
def no_bundled_scores(tmp_path, monkeypatch):
    """Only the scores these tests put in their store: params is bundled for the 1,000-arch sample."""
    empty = tmp_path / "no-bundles"
    empty.mkdir()
    monkeypatch.setattr(bundled, "DATA_DIR", empty)


def test_best_of_all_scored_picks_the_top_score(tmp_path, no_bundled_scores):
    setup = ScoringSetup(SPACE, "cifar10", ("params",))
    archs = [SPACE.arch(i) for i in (0, 6111, 100, 2000, 5000, 9930)]
    with ScoreStore(tmp_path / "s.sqlite") as store:
        found, _ = score_archs(setup, archs, store)
        result = select(setup, candidates=len(archs), runs=7, store=store, scored_only=True)
    assert result["drawn_from"] == len(archs) and result["computed"] == 0
    best = max(archs, key=lambda a: found[a]["params"].value)
    for dataset in SPACE.datasets:
        for metric in ("valid", "test"):
            picked = result["results"]["params"][dataset][metric]
            assert picked["mean"] == pytest.approx(SPACE.query(best, dataset, metric, 200))
            assert picked["std"] == pytest.approx(0.0, abs=1e-9)
            optimal = result["results"]["optimal"][dataset][metric]["mean"]
            assert optimal == pytest.approx(max(SPACE.query(a, dataset, metric, 200) for a in archs))
    assert "best of 6 by params" in format_selection(result)


def test_selection_is_deterministic_and_validates(tmp_path, no_bundled_scores):
    setup = ScoringSetup(SPACE, "cifar10", ("params",))
    with ScoreStore(tmp_path / "s.sqlite") as store:
        score_archs(setup, [SPACE.arch(i) for i in range(20)], store)
        first = select(setup, candidates=5, runs=30, store=store, scored_only=True)
        assert first == select(setup, candidates=5, runs=30, store=store, scored_only=True)
        with pytest.raises(ValueError, match="candidates"):
            select(setup, candidates=21, runs=3, store=store, scored_only=True)
        with pytest.raises(ValueError, match="runs"):
            select(setup, candidates=3, runs=0, store=store, scored_only=True)
        with pytest.raises(ValueError, match="recompute"):
            select(setup, candidates=3, runs=3, store=store, scored_only=True, recompute=True)
    assert first["sources"] == {"bundled": 0, "store": 20, "computed": 0}
    # pinned: the draws come from numpy's default_rng(0); a change of protocol or RNG use moves these
    pinned = {"params": (72.68675555473159, 32.06148693903788, 75.56966666666666, 33.372708162158915),
              "random": (80.81951111059742, 20.23217073469135, 83.80744444444446, 20.988167286375162),
              "optimal": (89.29195555433486, 1.041248437300214, 92.48988888888888, 0.8785369601182148)}
    for name, (valid_mean, valid_std, test_mean, test_std) in pinned.items():
        got = first["results"][name]["cifar10"]
        assert got["valid"] == {"mean": pytest.approx(valid_mean, abs=1e-9), "std": pytest.approx(valid_std, abs=1e-9)}
        assert got["test"] == {"mean": pytest.approx(test_mean, abs=1e-9), "std": pytest.approx(test_std, abs=1e-9)}


def test_one_run_has_no_standard_deviation(tmp_path, no_bundled_scores):
    setup = ScoringSetup(SPACE, "cifar10", ("params",))
    archs = [SPACE.arch(i) for i in (0, 6111, 100, 2000)]
    with ScoreStore(tmp_path / "s.sqlite") as store:
        score_archs(setup, archs, store)
        single = select(setup, candidates=2, runs=1, store=store, scored_only=True)
    assert np.isnan(single["results"]["params"]["cifar10"]["test"]["std"])
    assert "mean +- std over runs (ddof=1)" in format_selection(single)


#: the paper's Table 5 (CIFAR-10 test, best of 100 random archs, 500 runs): mean, std
PAPER_TABLE5 = {"gradsign": (93.31, 0.47), "random": (86.61, 13.46), "optimal": (93.84, 0.23)}


def test_table5_as_documented_and_near_the_paper():
    """docs/results.md's Table 5 is what `gradsign select` prints today (bundled scores: deterministic),
    and lands within 0.1 of the paper's means (0.5 of its stds)."""
    from pathlib import Path

    setup = ScoringSetup(SPACE, "cifar10", ("gradsign",), batch_size=64, seed=0)
    result = select(setup, candidates=100, runs=500, store=None)
    assert result["sources"]["computed"] == result["sources"]["store"] == 0
    assert result["sources"]["bundled"] > 14_000  # the distinct archs of 500 draws of 100
    table = format_selection(result)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    assert table in docs
    assert "| gradsign | 89.83 +- 0.65 | 93.24 +- 0.51 | 69.94 +- 1.45 | 70.06 +- 1.42 |" in table
    for name, (mean, std) in PAPER_TABLE5.items():
        got = result["results"][name]["cifar10"]["test"]
        assert abs(got["mean"] - mean) < 0.1 and abs(got["std"] - std) < 0.5
