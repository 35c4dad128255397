"""The bundled GradSign scores are what the package computes today."""
import numpy as np
import pytest

from gradsign.bundled import DATA_DIR, bundled_scores
from gradsign.evaluate import ScoringSetup, score_archs
from gradsign.executors import SerialExecutor
from gradsign.spaces import get_space

SPACE = get_space("nb201")
SETUP = ScoringSetup(SPACE, "cifar10", ("gradsign",), batch_size=64, seed=0)


def test_bundle_metadata_and_coverage():
    with np.load(DATA_DIR / "scores_nb201_cifar10_gradsign_b64_s0.npz") as f:
        known, values = f["known"], f["values"]
    assert len(known) == len(SPACE) and known.sum() >= 1000
    assert np.isfinite(values[known]).all() and (values[known] >= 0).all()
    # a score of 0 means no weight got a gradient: exactly the cells cut off from their input
    accuracy = SPACE.benchmark_table("cifar10", "test", 200)
    zero = known & (values == 0)
    assert zero.any() and (accuracy[zero] == 10.0).all()
    assert np.isnan(values[~known]).all()
    # the 1,000 archs of `correlate --sample 1000 --seed 0` were scored first
    assert known[np.random.default_rng(0).choice(len(SPACE), 1000, replace=False)].all()


def test_bundled_values_are_recomputed():
    bundled = bundled_scores(SETUP.key, "gradsign", SPACE)
    cheapest = sorted(bundled, key=lambda a: SPACE.params(a, "cifar10"))[:2]
    found, computed = score_archs(SETUP, cheapest, executor=SerialExecutor(threads=1))
    assert computed == 0  # the bundle answers
    fresh = {a: r["gradsign"].value for a, r in score_archs(
        ScoringSetup(SPACE, "cifar10", ("gradsign",), batch_size=64, seed=0, options={"n_inits": 1}),
        cheapest, executor=SerialExecutor(threads=1))[0].items()}
    for arch in cheapest:
        assert fresh[arch] == pytest.approx(bundled[arch].value, rel=1e-4)
