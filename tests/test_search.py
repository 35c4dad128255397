"""Simulated NAS: determinism, budget, algorithm behaviour, assistance and the result schema."""
from __future__ import annotations

import argparse
import json
from collections import deque
from itertools import product

import numpy as np
import pytest

from gradsign.search import (Assist, BenchmarkArrays, BOHBSampler, CategoricalKDE, CategoricalPolicy,
                             MovingAverage, SearchContext, Simulator, bohb, hyperband, hyperband_brackets,
                             regularized_evolution, run_once, run_search, validation_pass_epochs)
from gradsign.search.bohb import loo_bandwidth
from gradsign.search.simulator import BudgetExhausted
from gradsign.spaces import get_space

ALGOS = ("rs", "rea", "reinforce", "hb", "bohb")


@pytest.fixture(scope="module")
def space():
    return get_space("nb201")


@pytest.fixture(scope="module")
def tables(space):
    return BenchmarkArrays.from_space(space, "cifar10")


def oracle(space, dataset="cifar10"):
    """A perfect proxy: the 200-epoch validation accuracy on the search dataset."""
    table = space.benchmark_table(dataset, "valid", 200)
    return lambda indices: table[np.asarray(indices)]


def test_cost_is_training_plus_one_validation_pass(space, tables):
    t = space.train_time_per_epoch(123, "cifar10")
    assert tables.cost[12][123] == pytest.approx(12.32 * t)
    assert tables.cost[200][123] == pytest.approx(200.32 * t)
    assert tables.accuracy[12][123] == space.query(123, "cifar10", "valid", 12)
    c100 = BenchmarkArrays.from_space(space, "cifar100")
    assert validation_pass_epochs("cifar100") == pytest.approx(0.032)
    assert c100.cost[12][123] == pytest.approx(12.032 * space.train_time_per_epoch(123, "cifar100"))
    assert c100.accuracy[12][123] == space.query(123, "cifar100", "valid", 12)


@pytest.mark.parametrize("algo", ALGOS)
def test_deterministic_given_seed(space, tables, algo):
    a = run_search(space, algo, runs=3, seed=7, tables=tables)
    b = run_search(space, algo, runs=3, seed=7, tables=tables)
    c = run_search(space, algo, runs=3, seed=8, tables=tables)
    assert a["per_run"] == b["per_run"]
    assert [r["trace"] for r in a["per_run"]] != [r["trace"] for r in c["per_run"]]
    # run r alone, from its own generator, reproduces the record
    sim = run_once(space, algo, tables, np.random.default_rng([7, 2]))
    assert sim.incumbent == a["per_run"][2]["best_index"]
    assert sim.elapsed == a["per_run"][2]["simulated_seconds"]


@pytest.mark.parametrize("algo", ALGOS)
def test_budget_is_never_exceeded(space, tables, algo):
    seconds = np.full(len(space), 25.0)
    assist = Assist(oracle(space), True, seconds, "oracle")
    for kwargs in ({}, {"assist": assist, "charge_proxy_time": True}):
        for budget in (1_000.0, 5_000.0):
            for r in range(3):
                sim = run_once(space, algo, tables, np.random.default_rng([1, r]), budget=budget, **kwargs)
                assert sim.elapsed <= budget
                charged = sum(tables.cost[ev.epochs][ev.index] for ev in sim.history) + sim.proxy_seconds
                assert charged == pytest.approx(sim.elapsed)
                assert [ev.time for ev in sim.history] == sorted(ev.time for ev in sim.history)


def test_search_stops_at_the_first_evaluation_that_would_pass_the_budget(space, tables):
    sim = Simulator(space, tables, budget=100.0)
    cheap, dear = int(np.argmin(tables.cost[12])), int(np.argmax(tables.cost[12]))
    sim.evaluate(space.arch(cheap))
    with pytest.raises(BudgetExhausted):
        sim.evaluate(space.arch(dear))
    assert sim.elapsed == pytest.approx(tables.cost[12][cheap]) and len(sim.history) == 1
    tiny = run_search(space, "rs", runs=2, budget=1.0, tables=tables)
    assert all(r["best_index"] is None and r["evaluations"] == {} for r in tiny["per_run"])


def test_proxy_time_is_charged_once_per_arch_and_run(space, tables):
    seconds = np.full(len(space), 10.0)
    sim = Simulator(space, tables, 1e9, Assist(oracle(space), True, seconds), charge_proxy_time=True)
    sim.rank_scores(np.array([1, 2, 2, 3]))
    sim.rank_scores(np.array([3, 4]))
    assert sim.proxy_seconds == 40.0 and sim.elapsed == 40.0 and sim.proxy_evaluations == 4
    plain = run_search(space, "rs", assist=Assist(oracle(space), True, seconds), runs=5, tables=tables)
    charged = run_search(space, "rs", assist=Assist(oracle(space), True, seconds), runs=5, tables=tables,
                         charge_proxy_time=True)
    assert charged["evaluations_mean"] < plain["evaluations_mean"]
    assert charged["proxy_seconds_mean"] > 0 and plain["proxy_seconds_mean"] == 0


@pytest.mark.parametrize("algo", ALGOS)
def test_algorithms_beat_a_random_pick(space, tables, algo):
    result = run_search(space, algo, runs=15, seed=3, tables=tables)
    random_pick = space.benchmark_table("cifar10", "test", 200).mean()
    assert result["results"]["cifar10"]["test"]["mean"] > random_pick + 3.0


@pytest.mark.parametrize("algo", ALGOS)
def test_oracle_assisted_variant_beats_its_twin(space, tables, algo):
    plain = run_search(space, algo, runs=30, seed=4, tables=tables)
    assisted = run_search(space, algo, assist=oracle(space), runs=30, seed=4, tables=tables)
    assert assisted["name"] == "G-" + plain["name"]
    assert assisted["results"]["cifar10"]["test"]["mean"] > plain["results"]["cifar10"]["test"]["mean"] + 0.2


def test_assist_direction_is_respected(space, tables):
    table = space.benchmark_table("cifar10", "valid", 200)
    up = run_search(space, "rs", assist=Assist(lambda i: table[i], True), runs=4, tables=tables)
    down = run_search(space, "rs", assist=Assist(lambda i: -table[i], False), runs=4, tables=tables)
    wrong = run_search(space, "rs", assist=Assist(lambda i: -table[i], True), runs=4, tables=tables)
    assert up["per_run"] == down["per_run"]
    assert wrong["results"]["cifar10"]["test"]["mean"] < up["results"]["cifar10"]["test"]["mean"] - 1.0


def test_best_of_pool_picks_the_top_score_and_ranks_nan_last(space, tables):
    scores = np.arange(len(space), dtype=float)
    scores[::2] = np.nan
    sim = Simulator(space, tables, 1e9, Assist(lambda i: scores[i], True))
    draws = iter([space.arch(i) for i in (10, 7, 3, 12, 9)])
    ctx = SearchContext(space, sim, np.random.default_rng(0), pool=5)
    assert space.index(ctx.propose(lambda: next(draws))) == 9


def test_rea_keeps_the_youngest_population(space, tables):
    population: deque = deque()
    sim = Simulator(space, tables, 3_000.0)
    ctx = SearchContext(space, sim, np.random.default_rng(0))
    with pytest.raises(BudgetExhausted):
        regularized_evolution(ctx, population_size=10, sample_size=3, population=population)
    assert len(sim.history) > 10 and len(population) == 10
    youngest = sim.history[-10:]
    assert [space.index(a) for a, _ in population] == [ev.index for ev in youngest]
    assert [acc for _, acc in population] == [ev.accuracy for ev in youngest]
    # every child is one decision away from a member of the population it was bred from
    for k in range(10, len(sim.history)):
        child = np.array(space.encode(sim.history[k].index))
        parents = [np.array(space.encode(ev.index)) for ev in sim.history[k - 10:k]]
        assert any((child != p).sum() == 1 for p in parents)


def test_reinforce_update_moves_probability_with_the_advantage():
    rng = np.random.default_rng(0)
    for advantage, sign in ((5.0, 1), (-5.0, -1), (0.0, 0)):
        policy = CategoricalPolicy((5, 5, 3), rng, learning_rate=0.5)
        before = policy.probabilities()
        choices = (1, 4, 2)
        policy.update(choices, advantage)
        after = policy.probabilities()
        for p0, p1, c in zip(before, after, choices):
            assert np.sign(round(p1[c] - p0[c], 12)) == sign
            assert p1.sum() == pytest.approx(1.0)
    ema = MovingAverage(0.9)
    ema.update(80.0)
    assert ema.value == pytest.approx(80.0)  # bias-corrected
    ema.update(90.0)
    assert ema.value == pytest.approx((0.9 * 0.1 * 80 + 0.1 * 90) / (0.9 * 0.1 + 0.1))


def test_reinforce_policy_samples_follow_its_probabilities():
    policy = CategoricalPolicy((4,), np.random.default_rng(1))
    policy.logits[0] = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    counts = np.bincount([policy.sample()[0] for _ in range(20_000)], minlength=4) / 20_000
    assert np.allclose(counts, [0.1, 0.2, 0.3, 0.4], atol=0.015)


def test_hyperband_brackets_for_eta_3():
    # Li et al. (2018), Table 1: R = 81, eta = 3 -> five rungs
    assert hyperband_brackets(5, 3) == [
        [(81, 0), (27, 1), (9, 2), (3, 3), (1, 4)],
        [(34, 1), (11, 2), (3, 3), (1, 4)],
        [(15, 2), (5, 3), (1, 4)],
        [(8, 3), (2, 4)],
        [(5, 4)],
    ]
    assert hyperband_brackets(2, 3) == [[(3, 0), (1, 1)], [(2, 1)]]
    assert hyperband_brackets(1, 3) == [[(1, 0)]]


def test_hyperband_promotes_the_best_of_each_rung(space, tables):
    sim = Simulator(space, tables, 1e9)
    ctx = SearchContext(space, sim, np.random.default_rng(2))
    brackets_done = []

    def observe(arch, epochs, accuracy):
        brackets_done.append((space.index(arch), epochs, accuracy))
        if len(brackets_done) == 2 * (3 + 1 + 2):
            raise BudgetExhausted

    with pytest.raises(BudgetExhausted):
        hyperband(ctx, eta=3, observe=observe)
    epochs = [e for _, e, _ in brackets_done]
    assert epochs == [12, 12, 12, 200, 200, 200] * 2
    for start in (0, 6):
        screened = brackets_done[start:start + 3]
        best = max(screened, key=lambda t: t[2])[0]
        assert brackets_done[start + 3][0] == best
    # the incumbent is the best 200-epoch result, although 12-epoch results are lower
    full = [(i, a) for i, e, a in brackets_done if e == 200]
    assert sim.incumbent == max(full, key=lambda t: t[1])[0]


def test_categorical_kde_is_a_density_and_samples_near_good_points():
    data = np.array([[0, 1], [0, 1], [0, 2], [1, 1]])
    kde = CategoricalKDE.fit(data, (3, 3), min_bandwidth=0.05)
    grid = np.array(list(product(range(3), range(3))))
    assert kde.pdf(grid).sum() == pytest.approx(1.0)
    assert np.argmax(kde.pdf(grid)) == 1  # (0, 1)
    # sampling with factor 1 draws from the density itself
    draws = kde.sample(np.random.default_rng(0), 20_000, factor=1.0)
    freq = np.bincount(draws[:, 0] * 3 + draws[:, 1], minlength=9) / len(draws)
    assert np.allclose(freq, kde.pdf(grid), atol=0.012)
    # widening moves mass away from the data, but never past uniform
    wide = kde.sample(np.random.default_rng(1), 20_000, factor=3.0)
    assert np.mean((wide == [0, 1]).all(axis=1)) < kde.pdf(np.array([[0, 1]]))[0]
    huge = kde.sample(np.random.default_rng(2), 20_000, factor=100.0)
    assert np.allclose(np.bincount(huge[:, 1], minlength=3) / len(huge), 1 / 3, atol=0.015)
    assert loo_bandwidth(np.array([2, 2, 2, 2]), 5, 0.05) == pytest.approx(0.05)
    assert loo_bandwidth(np.array([0, 1, 2, 3, 4]), 5, 0.05) == pytest.approx(0.8)


def test_bohb_uses_its_model_once_enough_results_exist(space, tables):
    sim = Simulator(space, tables, 60_000.0)
    ctx = SearchContext(space, sim, np.random.default_rng(5))
    sampler = BOHBSampler(ctx)
    with pytest.raises(BudgetExhausted):
        bohb(ctx, sampler=sampler)
    assert sampler.random_picks >= 1 and sampler.model_picks >= 1
    n12 = sum(ev.epochs == 12 for ev in sim.history)
    assert n12 >= sampler.min_points + 2


def test_result_schema_and_json(space, tables):
    result = run_search(space, "rea", assist=oracle(space), pool=4, runs=3, budget=3_000.0, seed=2,
                        tables=tables, assist_name="oracle")
    for key in ("algo", "assist", "runs", "budget", "seed", "results", "per_run"):
        assert key in result
    assert (result["algo"], result["assist"], result["runs"], result["budget"], result["seed"]) == \
        ("rea", "oracle", 3, 3000.0, 2)
    assert set(result["results"]) == {"cifar10", "cifar100", "imagenet16-120"}
    for per_dataset in result["results"].values():
        assert set(per_dataset) == {"valid", "test"}
        for stats in per_dataset.values():
            assert set(stats) == {"mean", "std"} and np.isfinite(stats["mean"]) and stats["std"] >= 0
    assert len(result["per_run"]) == 3
    rec = result["per_run"][0]
    assert rec["best_arch"] == space.arch(rec["best_index"])
    assert rec["results"]["cifar10"]["test"] == space.query(rec["best_index"], "cifar10", "test", 200)
    assert rec["search_accuracy"] == space.query(rec["best_index"], "cifar10", "valid", 12)
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text)["per_run"][0]["trace"] == [list(t) for t in rec["trace"]]


def test_bad_arguments_raise_value_error(space, tables):
    with pytest.raises(ValueError, match="unknown search algorithm"):
        run_search(space, "grid", runs=1, tables=tables)
    with pytest.raises(ValueError, match="runs"):
        run_search(space, "rs", runs=0, tables=tables)
    with pytest.raises(ValueError, match="budget"):
        run_search(space, "rs", runs=1, budget=-5, tables=tables)
    with pytest.raises(ValueError, match="unknown option"):
        run_search(space, "rea", runs=1, tables=tables, learning_rate=0.1)
    for algo, bad in (("bohb", {"min_points": "x"}), ("bohb", {"n_samples": 0}), ("rea", {"population_size": 0}),
                      ("reinforce", {"learning_rate": -1.0}), ("hb", {"eta": 1}), ("rs", {"epochs": 13})):
        with pytest.raises(ValueError):
            run_search(space, algo, runs=1, tables=tables, **bad)
    with pytest.raises(ValueError, match="charge_proxy_time"):
        run_search(space, "rs", runs=1, tables=tables, charge_proxy_time=True)
    with pytest.raises(ValueError, match="seconds"):
        run_search(space, "rs", assist=oracle(space), runs=1, tables=tables, charge_proxy_time=True)


# ------------------------------------------------------------------ command line
def _parser():
    from gradsign.search.cli import add_search_command

    parser = argparse.ArgumentParser(prog="gradsign")
    add_search_command(parser.add_subparsers(dest="command", required=True))
    return parser


def _fill_store(path, space, dataset, proxy="gradsign"):
    import gradsign
    from gradsign.store import ScoreKey, ScoreStore, StoredScore

    table = space.benchmark_table(dataset, "valid", 200)
    key = ScoreKey(space.name, dataset, 64, 0, "{}", gradsign.__version__)
    with ScoreStore(path) as store:
        store.put(key, [StoredScore(space.arch(i), proxy, float(table[i]), None, 0.5) for i in range(len(space))])


def test_cli_search_with_stored_scores(tmp_path, space, capsys):
    _fill_store(tmp_path / "s.sqlite", space, "cifar10")
    args = _parser().parse_args(["search", "--algo", "rs", "--assist", "gradsign", "--runs", "4", "--budget",
                                 "3000", "--cache", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "out"),
                                 "--json", str(tmp_path / "r.json"), "--charge-proxy-time", "--seed", "3"])
    args.run(args)
    out = capsys.readouterr().out
    assert "| G-RS |" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["name"] == "G-RS" and result["scores"]["archs_with_scores"] == len(space)
    assert result["proxy_seconds_mean"] > 0
    assert (tmp_path / "out" / "search_nb201_cifar10_G-RS.png").stat().st_size > 0


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cli_search_uses_the_bundled_scores(tmp_path, monkeypatch, dataset):
    from gradsign.evaluate import ScoringSetup

    def no_batch(self):
        raise AssertionError("a search over bundled scores computed one")

    monkeypatch.setattr(ScoringSetup, "batch", no_batch)
    args = _parser().parse_args(["search", "--algo", "rea", "--assist", "gradsign", "--search-dataset", dataset,
                                 "--runs", "2", "--no-cache", "--json", str(tmp_path / "r.json")])
    args.run(args)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["scores"]["archs_with_scores"] == 15_625
    assert all(run["results"] for run in result["per_run"])


def test_cli_errors_when_scores_are_missing_and_cannot_be_computed(tmp_path, monkeypatch):
    from gradsign.cli import CliError
    from gradsign.evaluate import ScoringSetup

    def no_batch(self):
        raise FileNotFoundError("no cifar100 images here")

    monkeypatch.setattr(ScoringSetup, "batch", no_batch)
    monkeypatch.setattr("gradsign.bundled.DATA_DIR", tmp_path)  # as if no scores were bundled
    args = _parser().parse_args(["search", "--algo", "rs", "--assist", "gradsign", "--search-dataset",
                                 "cifar100", "--runs", "1", "--cache", str(tmp_path / "empty.sqlite")])
    with pytest.raises(CliError, match="cannot be computed"):
        args.run(args)


@pytest.mark.parametrize("argv, message", [
    (["--runs", "0"], "--runs"),
    (["--budget", "0"], "--budget"),
    (["--charge-proxy-time"], "needs --assist"),
    (["--search-dataset", "mnist"], "--search-dataset"),
    (["--set", "nonsense=1"], "unknown option"),
])
def test_cli_bad_input(argv, message):
    from gradsign.cli import CliError

    args = _parser().parse_args(["search", "--algo", "rea", *argv])
    with pytest.raises(ValueError if message == "unknown option" else CliError, match=message):
        args.run(args)
