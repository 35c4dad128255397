"""The bundled GradSign scores are what the package computes today."""
import numpy as np
import pytest

from gradsign.bundled import DATA_DIR, bundled_scores
from gradsign.evaluate import ScoringSetup, score_archs
from gradsign.executors import SerialExecutor
from gradsign.spaces import get_space

SPACE = get_space("nb201")
#: bundled dataset -> chance accuracy in % (what a cell cut off from its input scores on the benchmark)
DATASETS = {"cifar10": 10.0, "cifar100": 1.0, "imagenet16-120": 100 / 120}


@pytest.mark.parametrize("dataset", DATASETS)
def test_bundle_metadata_and_coverage(dataset):
    with np.load(DATA_DIR / f"scores_nb201_{dataset}_gradsign_b64_s0.npz") as f:
        known, values = f["known"], f["values"]
    assert len(known) == len(SPACE) and known.sum() >= 1000
    assert np.isfinite(values[known]).all() and (values[known] >= 0).all()
    # a score of 0 means no weight got a gradient: exactly the cells cut off from their input
    accuracy = SPACE.benchmark_table(dataset, "test", 200)
    zero = known & (values == 0)
    assert zero.any() and np.allclose(accuracy[zero], DATASETS[dataset], rtol=0, atol=1e-6)
    assert np.isnan(values[~known]).all()
    # the 1,000 archs of `correlate --sample 1000 --seed 0` were scored first
    assert known[np.random.default_rng(0).choice(len(SPACE), 1000, replace=False)].all()


@pytest.mark.parametrize("dataset", DATASETS)
def test_bundled_values_are_recomputed(dataset):
    setup = ScoringSetup(SPACE, dataset, ("gradsign",), batch_size=64, seed=0)
    bundled = bundled_scores(setup.key, "gradsign", SPACE)
    cheapest = sorted(bundled, key=lambda a: SPACE.params(a, dataset))[:2]
    found, computed = score_archs(setup, cheapest, executor=SerialExecutor(threads=1))
    assert computed == 0  # the bundle answers
    fresh = {a: r["gradsign"].value for a, r in score_archs(
        ScoringSetup(SPACE, dataset, ("gradsign",), batch_size=64, seed=0, options={"n_inits": 1}),
        cheapest, executor=SerialExecutor(threads=1))[0].items()}
    for arch in cheapest:
        assert fresh[arch] == pytest.approx(bundled[arch].value, rel=1e-4)
