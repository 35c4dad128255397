"""The bundled GradSign scores are what the package computes today, and are used only under their own key."""
import json
import warnings

import numpy as np
import pytest

from gradsign.bundled import DATA_DIR, bundled_scores, save_scores
from gradsign.evaluate import SCORING_VERSION, ScoringSetup, score_archs, score_arrays
from gradsign.executors import SerialExecutor
from gradsign.spaces import get_space
from gradsign.store import ScoreKey

SPACE = get_space("nb201")
#: bundled dataset -> chance accuracy in % (what a cell cut off from its input scores on the benchmark)
DATASETS = {"cifar10": 10.0, "cifar100": 1.0, "imagenet16-120": 100 / 120}
CONV_OPS = {"nor_conv_1x1", "nor_conv_3x3"}


@pytest.mark.parametrize("dataset", DATASETS)
def test_bundle_metadata_and_coverage(dataset):
    with np.load(DATA_DIR / f"scores_nb201_{dataset}_gradsign_b64_s0.npz") as f:
        known, values, meta = f["known"], f["values"], json.loads(str(f["meta"]))
    assert meta == {"space": "nb201", "dataset": dataset, "proxy": "gradsign", "batch_size": 64, "seed": 0,
                    "options": "{}", "version": SCORING_VERSION}
    assert len(known) == len(SPACE) and known.all()  # every arch, as PROVENANCE.md says
    assert np.isfinite(values).all() and (values >= 0).all()
    # a score of 0 means no weight got a gradient: exactly the cells cut off from their input
    accuracy = SPACE.benchmark_table(dataset, "test", 200)
    zero = values == 0
    assert zero.sum() == 341 and np.allclose(accuracy[zero], DATASETS[dataset], rtol=0, atol=1e-6)


def conv_archs(dataset: str, count: int) -> list[str]:
    """The first ``count`` archs of a default_rng(dataset's position) permutation with one 3x3 and one 1x1
    conv edge, pooling or skip on the others and no "none" edge (so every conv gets input and gradient),
    under 0.36M parameters (to keep the test quick)."""
    rng = np.random.default_rng(list(DATASETS).index(dataset))
    found = []
    for index in rng.permutation(len(SPACE)):
        ops = set(_ops(SPACE.arch(int(index))))
        if CONV_OPS <= ops and "none" not in ops and SPACE.params(int(index), dataset) < 0.36:
            found.append(SPACE.arch(int(index)))
            if len(found) == count:
                return found
    raise AssertionError("too few archs")


def _ops(arch: str) -> list[str]:
    return [edge.split("~")[0] for edge in arch.replace("+", "").split("|") if edge]


@pytest.mark.parametrize("dataset", DATASETS)
def test_bundled_scores_of_conv_archs_are_recomputed(dataset):
    setup = ScoringSetup(SPACE, dataset, ("gradsign",), batch_size=64, seed=0)
    archs = conv_archs(dataset, 2 if dataset == "imagenet16-120" else 1)  # 16x16 images score quicker
    bundled, _ = score_archs(setup, archs)
    assert {bundled[a]["gradsign"].source for a in archs} == {"bundled"}
    fresh, computed = score_archs(setup, archs, recompute=True, executor=SerialExecutor(threads=1))
    assert computed == len(archs)
    for arch in archs:
        assert fresh[arch]["gradsign"].source == "computed" and fresh[arch]["gradsign"].error is None
        # made with one torch thread in worker processes; float noise may flip a few tiny gradients' signs
        assert fresh[arch]["gradsign"].value == pytest.approx(bundled[arch]["gradsign"].value, rel=1e-5)
        assert fresh[arch]["gradsign"].value > 0


def test_a_bundle_answers_only_its_own_key_and_scoring_version(tmp_path, monkeypatch):
    from gradsign import bundled

    setup = ScoringSetup(SPACE, "cifar10", ("params",))
    archs = [SPACE.arch(i) for i in (3, 6111)]
    found, _ = score_archs(setup, archs)
    values, seconds, known = score_arrays(SPACE, {(a, "params"): found[a]["params"] for a in archs})
    monkeypatch.setattr(bundled, "DATA_DIR", tmp_path)
    path = tmp_path / bundled.bundled_file_name(setup.key, "params")
    save_scores(path, setup.key, "params", values, seconds, known)
    again, computed = score_archs(setup, archs)
    assert computed == 0 and {again[a]["params"].source for a in archs} == {"bundled"}
    assert [again[a]["params"].value for a in archs] == [found[a]["params"].value for a in archs]
    # another scoring version: ignored, with a warning, and computed instead
    old = ScoreKey(**{**setup.key.__dict__, "version": "0.0.1"})
    save_scores(path, old, "params", values, seconds, known)
    with pytest.warns(UserWarning, match="scoring version 0.0.1, not " + SCORING_VERSION):
        again, computed = score_archs(setup, archs)
    assert computed == len(archs) and {again[a]["params"].source for a in archs} == {"computed"}
    # other options (here the number of initialisations): the file does not answer, silently
    save_scores(path, setup.key, "params", values, seconds, known)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        averaged = ScoringSetup(SPACE, "cifar10", ("params",), options={"n_inits": 2})
        assert bundled_scores(averaged.key, "params", SPACE) == {}
