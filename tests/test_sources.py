"""Where each score comes from (bundled, store, computed), recomputing on request, and score keys that
hold everything that changes a value."""
import json

import numpy as np
import pytest
import torch

from gradsign import bundled
from gradsign.bundled import save_scores
from gradsign.evaluate import SCORING_VERSION, ProxyScores, ScoringSetup, count_sources, score_archs, score_arrays
from gradsign.spaces import get_space
from gradsign.store import ScoreStore, StoredScore

SPACE = get_space("nb201")
ARCHS = [SPACE.arch(i) for i in (3, 100, 2000, 6111, 9930)]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_keys_hold_what_changes_a_value_and_only_that():
    def options_of(proxy, **options):
        return json.loads(ScoringSetup(SPACE, "cifar10", (proxy,), options=options).key.options)

    # options at their defaults (the proxy's and the API's signature) key as no option at all
    assert options_of("gradsign") == {}
    assert options_of("gradsign", engine="auto", aggregation="sum", n_inits=1, seed=0) == {}
    assert options_of("gradsign", chunk_size=8) == {}  # bounds memory only
    # an explicitly chosen engine does key: engines agree only up to float noise
    assert options_of("gradsign", engine="loop") == {"engine": "loop"}
    assert options_of("gradsign", aggregation="mean", n_inits=3) == {"aggregation": "mean", "n_inits": 3}
    both = ScoringSetup(SPACE, "cifar10", ("gradsign", "params"), options={"engine": "loop"})
    assert json.loads(both.key_for("params").options) == {}  # params takes no engine
    with pytest.raises(ValueError, match="key_for"):
        both.key
    key = ScoringSetup(SPACE, "cifar10", ("params",)).key
    assert key.version == SCORING_VERSION and (key.batch_size, key.seed) == (64, 0)


def test_every_score_says_where_it_came_from(tmp_path, monkeypatch):
    setup = ScoringSetup(SPACE, "cifar10", ("params",))
    monkeypatch.setattr(bundled, "DATA_DIR", tmp_path)  # only this test's own bundle, made below
    first, computed = score_archs(setup, ARCHS)
    assert computed == len(ARCHS) and count_sources(first) == {"bundled": 0, "store": 0, "computed": 5}
    # a bundle with the first two archs, a store with the third
    values, seconds, known = score_arrays(SPACE, {(a, "params"): first[a]["params"] for a in ARCHS[:2]})
    save_scores(tmp_path / bundled.bundled_file_name(setup.key, "params"), setup.key, "params", values, seconds,
                known)
    with ScoreStore(tmp_path / "s.sqlite") as store:
        store.put(setup.key, [first[ARCHS[2]]["params"]])
        found, computed = score_archs(setup, ARCHS, store)
        assert computed == 2 and count_sources(found) == {"bundled": 2, "store": 1, "computed": 2}
        assert [found[a]["params"].source for a in ARCHS] == ["bundled", "bundled", "store", "computed", "computed"]
        found, computed = score_archs(setup, ARCHS, store)
        assert computed == 0 and count_sources(found) == {"bundled": 2, "store": 3, "computed": 0}
        # recompute: neither bundle nor store is read; the new values still go to the store
        store.put(setup.key, [StoredScore(ARCHS[3], "params", -1.0, None, 0.0)])
        fresh, computed = score_archs(setup, ARCHS, store, recompute=True)
        assert computed == 5 and count_sources(fresh) == {"bundled": 0, "store": 0, "computed": 5}
        assert {a: fresh[a]["params"].value for a in ARCHS} == {a: first[a]["params"].value for a in ARCHS}
        assert store.get(setup.key, ARCHS, ["params"])[(ARCHS[3], "params")].value == first[ARCHS[3]]["params"].value
        # the search-side view: ProxyScores counts its sources too, and recomputes on request
        scores = ProxyScores(setup, store)
        assert scores.source_counts() == {"bundled": 0, "store": 5, "computed": 0}  # the store overrides
        again = ProxyScores(setup, store, recompute=True)
        assert again.source_counts() == {"bundled": 0, "store": 0, "computed": 0} and not again.known.any()
        index = SPACE.index(ARCHS[4])
        assert again(np.array([index]))[0] == first[ARCHS[4]]["params"].value
        assert again.source_counts() == {"bundled": 0, "store": 0, "computed": 1}


def test_an_explicit_engine_never_gets_a_value_stored_for_another(tmp_path):
    arch = SPACE.arch(SPACE.index("|nor_conv_1x1~0|+|skip_connect~0|avg_pool_3x3~1|+|none~0|nor_conv_3x3~1|skip_connect~2|"))
    default = ScoringSetup(SPACE, "imagenet16-120", ("gradsign",), batch_size=4)
    loop = ScoringSetup(SPACE, "imagenet16-120", ("gradsign",), batch_size=4, options={"engine": "loop"})
    with ScoreStore(tmp_path / "s.sqlite") as store:
        store.put(default.key, [StoredScore(arch, "gradsign", -7.0, None, 0.0)])  # a value no engine gives
        assert score_archs(default, [arch], store)[0][arch]["gradsign"].value == -7.0
        found, computed = score_archs(loop, [arch], store)
        assert computed == 1 and found[arch]["gradsign"].source == "computed"
        assert found[arch]["gradsign"].value > 0
        assert store.get(loop.key, [arch], ["gradsign"])[(arch, "gradsign")].value == found[arch]["gradsign"].value
