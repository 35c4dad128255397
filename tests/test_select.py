"""Best-of-N selection (GradSign paper, Table 5) on the scored archs."""
import numpy as np
import pytest

from gradsign.evaluate import ScoringSetup, score_archs
from gradsign.select import format_selection, select
from gradsign.spaces import get_space
from gradsign.store import ScoreStore

SPACE = get_space("nb201")


def test_best_of_all_scored_picks_the_top_score(tmp_path):
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


def test_selection_is_deterministic_and_validates(tmp_path):
    setup = ScoringSetup(SPACE, "cifar10", ("params",))
    with ScoreStore(tmp_path / "s.sqlite") as store:
        score_archs(setup, [SPACE.arch(i) for i in range(20)], store)
        first = select(setup, candidates=5, runs=30, store=store, scored_only=True)
        assert first == select(setup, candidates=5, runs=30, store=store, scored_only=True)
        with pytest.raises(ValueError, match="candidates"):
            select(setup, candidates=21, runs=3, store=store, scored_only=True)
        with pytest.raises(ValueError, match="runs"):
            select(setup, candidates=3, runs=0, store=store, scored_only=True)
    random_mean = first["results"]["random"]["cifar10"]["test"]["mean"]
    assert first["results"]["optimal"]["cifar10"]["test"]["mean"] >= random_mean
    assert np.isfinite(random_mean)
