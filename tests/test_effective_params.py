"""effective_params and GradSign's chance level (gradsign.chance)."""
from __future__ import annotations

import copy
import itertools
import logging
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsign
from gradsign.chance import (chance_report, expected_abs_walk, expected_abs_walk_table, gradsign_vs_chance,
                             per_sample_sign_stats)
from gradsign.engine import sign_counts
from gradsign.proxies.effective_params import reached_weights_loop


# ---------------------------------------------------------------- E|S_n|
def test_expected_abs_walk_equals_enumeration_of_all_sign_vectors():
    for n in range(0, 13):
        exact = Fraction(sum(abs(sum(s)) for s in itertools.product((-1, 1), repeat=n)), 2 ** n)
        assert expected_abs_walk(n) == pytest.approx(float(exact), rel=1e-15, abs=0), n


def test_expected_abs_walk_matches_simulation_and_asymptote():
    rng = np.random.default_rng(0)
    draws = np.abs((rng.integers(0, 2, size=(200_000, 64), dtype=np.int8) * 2 - 1).sum(1, dtype=np.int64))
    standard_error = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - expected_abs_walk(64)) < 4 * standard_error
    assert expected_abs_walk(64) == pytest.approx(6.358192, abs=1e-6)  # the value quoted for batch 64
    # E|S_n| ~ sqrt(2n/pi) (1 - 1/(4n) + ...): the relative error of the plain asymptote falls like 1/n
    assert expected_abs_walk(10_000) / math.sqrt(2 * 10_000 / math.pi) == pytest.approx(1, abs=1e-4)
    assert list(expected_abs_walk_table(4)) == [0.0, 1.0, 1.0, 1.5, 1.5]
    with pytest.raises(ValueError):
        expected_abs_walk(-1)


# ---------------------------------------------------------------- models with known answers
class DeadBranchNet(nn.Module):
    """A conv path to the output, a conv fed only zeros, a conv whose output is thrown away and a layer
    that is never called: only the first conv and the classifier can get a gradient."""

    def __init__(self):
        super().__init__()
        self.live = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.zero_fed = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.discarded = nn.Conv2d(3, 5, 1)
        self.unused = nn.Linear(7, 7)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.live(x))) + self.zero_fed(x * 0)
        self.discarded(x)
        return self.head(h.mean((2, 3)))


def test_effective_params_counts_exactly_the_weights_a_gradient_reaches():
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    model = DeadBranchNet()
    expected = 4 * 3 * 3 * 3 + 3 * 4
    assert gradsign.score(model, x, y, "effective_params") == expected
    # GradSign counts only the same weights: none of the dead ones has a non-zero sign count
    counts = sign_counts(copy.deepcopy(model).train(), x, y, F.cross_entropy, engine="loop")
    assert all(not c.any() for name, c in counts.items() if name in ("zero_fed", "discarded", "unused"))


def test_effective_params_leaves_the_model_alone():
    torch.manual_seed(0)
    model = DeadBranchNet().eval()
    before = copy.deepcopy(model.state_dict())
    gradsign.score(model, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), "effective_params")
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _nb201(index: int, classes: int = 10) -> nn.Module:
    from gradsign.spaces import get_space

    space = get_space("nb201")
    torch.manual_seed(0)
    return space.build(space.arch(index), num_classes=classes, stem_channels=8, cells_per_stage=1)


@pytest.fixture(scope="module")
def batch16():
    from gradsign.datasets import canonical_batch

    return canonical_batch("cifar10", 6, 0)


@pytest.mark.parametrize("index", [12329])  # conv edges no gradient reaches
def test_effective_params_equals_a_per_sample_loop_on_nb201(index, batch16):
    x, y = batch16
    model = _nb201(index)
    loop = reached_weights_loop(copy.deepcopy(model).train(), x, y, F.cross_entropy)
    expected = sum(int(m.sum()) for m in loop.values())
    assert gradsign.score(model, x, y, "effective_params") == expected
    if index == 12329:
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert expected < weights  # its dead conv edges are not counted


class BatchMix(nn.Module):
    """x + mean over the batch: samples interact (alone, a sample gives 2x)."""

    def forward(self, x):
        return x + x.mean(0, keepdim=True)


def test_effective_params_falls_back_to_the_loop_when_samples_interact(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), BatchMix(), nn.ReLU(), nn.Linear(6, 2), nn.Linear(2, 2))
    x, y = torch.randn(8, 5), torch.randint(0, 2, (8,))
    loop = reached_weights_loop(copy.deepcopy(model).train(), x, y, F.cross_entropy)
    with caplog.at_level(logging.WARNING, logger="gradsign"):
        value = gradsign.score(model, x, y, "effective_params")
    assert "using the loop" in caplog.text
    assert value == sum(int(m.sum()) for m in loop.values())


# ---------------------------------------------------------------- per-sample statistics and chance
def test_per_sample_stats_count_samples_with_a_nonzero_gradient():
    # Linear(3 -> 2), no bias, loss = output sum: dL_i/dW[o, j] = x_i[j], so n_k = #{i : x_i[j] != 0}
    # and the sign sum is sum_i sign(x_i[j]), whatever the weights are
    model = nn.Linear(3, 2, bias=False)
    x = torch.tensor([[1.0, 0.0, -2.0], [3.0, 0.0, -1.0], [-1.0, 5.0, 0.0], [2.0, 0.0, 4.0]])
    stats = per_sample_sign_stats(model, x, torch.zeros(4), lambda out, t: out.sum())
    signs, nonzero = stats[""]
    assert nonzero.tolist() == [[4, 1, 3]] * 2
    assert signs.tolist() == [[2, 1, -1]] * 2
    report = chance_report(stats, 4)
    assert (report.weights, report.reached, report.full) == (6, 6, 2)
    assert report.gradsign == 2 * (2 + 1 + 1)
    assert report.chance == pytest.approx(2 * (1.5 + 1.0 + 1.5))
    assert report.excess == pytest.approx(report.gradsign - report.chance)
    assert report.ratio == pytest.approx(8 / 8)


def test_chance_report_of_nb201_agrees_with_the_engine_and_effective_params(batch16):
    x, y = batch16
    model = _nb201(12329)
    report = gradsign_vs_chance(model, x, y)
    engine = sign_counts(copy.deepcopy(model).train(), x, y, F.cross_entropy, engine="loop")
    assert report.gradsign == sum(int(c.abs().sum()) for c in engine.values())
    assert report.reached == gradsign.score(model, x, y, "effective_params")
    # every reached weight gets a non-zero gradient from all 6 samples here
    assert report.full == report.reached
    assert report.chance == pytest.approx(report.reached * expected_abs_walk(6))


def test_token_inputs_without_gradient_reach_the_embedding_not_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randint(0, 11, (5, 3)), torch.tensor([0, 1, 2, 0, 1])
    assert gradsign.score(model, x, y, "effective_params") == 36
    report = gradsign_vs_chance(model, x, y)
    assert (report.weights, report.reached) == (36, 36)


def test_chance_report_rejects_counts_above_the_batch():
    with pytest.raises(ValueError):
        chance_report({"l": (torch.zeros(2, dtype=torch.int32), torch.tensor([3, 1], dtype=torch.int32))}, 2)


# ---------------------------------------------------------------- partial Spearman
def test_partial_spearman_equals_the_correlation_of_rank_residuals():
    from scipy.stats import pearsonr, rankdata

    from gradsign.chance import partial_spearman

    rng = np.random.default_rng(1)
    z = rng.normal(size=300)
    x, y = z + rng.normal(size=300), np.exp(z) + 0.5 * rng.normal(size=300)
    rx, ry, rz = rankdata(x), rankdata(y), rankdata(z)
    design = np.column_stack([np.ones_like(rz), rz])
    residual = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    result = partial_spearman(x, y, z, n_boot=200)
    assert result["partial"] == pytest.approx(pearsonr(*residual).statistic, abs=1e-12)
    assert result["ci95"][0] < result["partial"] < result["ci95"][1]
    # x and y related only through z: the partial correlation is near 0, the plain one is not
    assert abs(result["partial"]) < 0.15 < pearsonr(rx, ry).statistic
    # non-finite entries are left out
    x[0] = np.nan
    assert partial_spearman(x, y, z)["n"] == 299


# ---------------------------------------------------------------- command line
def test_correlate_command_scores_effective_params_beside_gradsign(tmp_path, capsys):
    import csv

    from gradsign.cli import main

    status = main(["correlate", "--space", "nb201", "--sample", "3", "--proxies", "gradsign,effective_params",
                   "--batch-size", "2", "--no-cache", "--bootstrap", "0", "--out", str(tmp_path)])
    assert status == 0
    with open(tmp_path / "correlate_nb201_cifar10.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert all(float(r["effective_params"]) >= 0 for r in rows)
    assert main(["correlate", "--sample", "3", "--proxies", "effective_param", "--no-cache",
                 "--out", str(tmp_path)]) == 2
    assert "unknown proxy 'effective_param'" in capsys.readouterr().err
