"""NAS-Bench-201 space: identities, bundled tables, canonical groups, network builder, benchmark loaders."""
from __future__ import annotations

import bz2
import csv
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from gradsign.spaces import UnknownArchError, UnknownDatasetError, get_space
from gradsign.spaces.nb201 import DATASETS, NUM_ARCHS, NasBench201, arch_to_ops, canonical_string, ops_to_arch
from gradsign.spaces.nb201_model import EDGES, OPS, NB201Cell, build_nb201, nb201_param_count, nb201_param_counts

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "gradsign" / "data" / "nb201.npz"
ARCH_6111 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"


@pytest.fixture(scope="module")
def space() -> NasBench201:
    return NasBench201()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- identities -------------------------------------------------------------------------------------
def test_get_space_and_basic_attributes(space):
    assert isinstance(get_space("nb201"), NasBench201)
    assert len(space) == NUM_ARCHS == 15625
    assert space.choices == tuple(OPS for _ in range(6)) and space.datasets == DATASETS
    assert [space.num_classes(d) for d in DATASETS] == [10, 100, 120]
    assert space.arch(0) == ("|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|"
                             "skip_connect~2|")
    assert space.arch(6111) == ARCH_6111


def test_index_string_ops_round_trip_for_all_archs(space):
    strings = [space.arch(i) for i in range(NUM_ARCHS)]
    assert len(set(strings)) == NUM_ARCHS
    for i, s in enumerate(strings):
        ops = space.encode(s)
        assert space.index(s) == i and space.index(str(i)) == i and space.index(np.int64(i)) == i
        assert space.decode(ops) == s and arch_to_ops(s) == ops and ops_to_arch(ops) == s
    assert np.array_equal(space.ops_table(), np.array([space.encode(i) for i in range(NUM_ARCHS)]))


@pytest.mark.parametrize("bad", ["foo", "", "15625", -1, 15625, 3.0, None, True, (1, 2, 3, 4, 5, 6),
                                 "|none~0|+|none~0|none~1|", "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|",
                                 "|none~0|+|none~1|none~0|+|none~0|none~1|none~2|", " " + ARCH_6111, "١٢"])
def test_unknown_arch_raises_one_line_error(space, bad):
    with pytest.raises(UnknownArchError) as info:
        space.index(bad)
    assert "\n" not in str(info.value)


def test_decode_rejects_bad_choices(space):
    for bad in ([0] * 5, [0] * 7, [0, 0, 0, 0, 0, 5], [0, 0, 0, 0, 0, -1], [0.0] * 6):
        with pytest.raises(UnknownArchError):
            space.decode(bad)


def test_sample_is_deterministic_and_mutate_changes_one_edge(space):
    first = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert len(set(first)) == 1
    rng_a, rng_b = np.random.default_rng(123), np.random.default_rng(123)
    seq_a = [space.sample(rng_a) for _ in range(50)]
    assert seq_a == [space.sample(rng_b) for _ in range(50)] and len(set(seq_a)) > 40
    rng = np.random.default_rng(5)
    for arch in seq_a:
        child = space.mutate(arch, rng)
        diff = [a != b for a, b in zip(space.encode(arch), space.encode(child))]
        assert sum(diff) == 1


# --- benchmark values ---------------------------------------------------------------------------------
def test_published_optima(space):
    expected = {("cifar10", "test"): (6111, 94.3733), ("cifar100", "test"): (9930, 73.5133),
                ("imagenet16-120", "test"): (857, 47.3111), ("cifar10", "valid"): (6111, 91.6067),
                ("cifar100", "valid"): (9930, 73.4933), ("imagenet16-120", "valid"): (10676, 46.7333)}
    for (dataset, metric), (index, value) in expected.items():
        table = space.benchmark_table(dataset, metric, 200)
        assert int(np.argmax(table)) == index
        assert space.query(index, dataset, metric) == pytest.approx(value, abs=5e-5)
    assert space.query(ARCH_6111, "cifar10", "test", 12) == pytest.approx(88.79, abs=1e-6)
    assert int(np.argmax(space.benchmark_table("cifar10", "test", 12))) == 5374


def test_train_time_semantics(space):
    assert space.train_time_per_epoch(0, "cifar10") == pytest.approx(7.221092998981476, rel=1e-12)
    assert space.query(0, "cifar10", "train_time", 200) == pytest.approx(1444.2185997962952, rel=1e-12)
    assert space.train_time_per_epoch(6111, "cifar10") * 2 == pytest.approx(28.7974933385849, rel=1e-9)
    c10 = space.benchmark_table("cifar10", "train_time", 12)
    assert np.allclose(c10, 12 * space.benchmark_table("cifar10", "train_time", 200) / 200, rtol=1e-12)
    assert np.allclose(space.benchmark_table("cifar100", "train_time", 12), 2 * c10, rtol=1e-9)
    assert np.allclose(space.benchmark_table("imagenet16-120", "train_time", 12), 6.068 * c10, rtol=1e-9)
    assert 32 < c10.min() and c10.max() < 208


def test_query_errors_and_tables_are_read_only(space):
    with pytest.raises(UnknownDatasetError):
        space.query(0, "mnist")
    with pytest.raises(UnknownDatasetError):
        space.params(0, "cifar10-valid")
    with pytest.raises(ValueError, match="metric"):
        space.query(0, "cifar10", "accuracy")
    with pytest.raises(ValueError, match="epochs"):
        space.query(0, "cifar10", "test", 100)
    table = space.benchmark_table("cifar100", "valid", 12)
    assert table.shape == (NUM_ARCHS,) and table.dtype == np.float64 and not table.flags.writeable
    assert table[42] == space.query(42, "cifar100", "valid", 12)


def test_disconnected_cells_are_the_ten_percent_archs(space):
    ops = space.ops_table()
    reach = np.zeros((NUM_ARCHS, 4), dtype=bool)
    reach[:, 0] = True
    for e, (target, source) in enumerate(EDGES):
        reach[:, target] |= reach[:, source] & (ops[:, e] != 0)
    disconnected = ~reach[:, 3]
    assert disconnected.sum() == 341
    assert np.array_equal(disconnected, space.benchmark_table("cifar10", "test") == 10.0)


def test_query_matches_shared_tables(space, shared_dir):
    nb = shared_dir / "data" / "nb201"
    rows_a = _read_csv(nb / "nats_bench_tss_200ep_test_acc.csv")
    rows_c = _read_csv(nb / "mini_nasbench201_12ep_accs.csv")
    rows_d = _read_csv(nb / "nats_tss_200ep_valid_acc_and_train_time.csv")
    assert [space.arch(i) for i in range(NUM_ARCHS)] == [r["ArchitectureString"] for r in rows_a]
    columns = {
        ("test", 200): (rows_a, ["CIFAR10TestAccuracy200Epochs", "CIFAR100TestAccuracy200Epochs",
                                 "ImageNetTestAccuracy200Epochs"]),
        ("valid", 200): (rows_d, ["c10v_val_acc_mean", "c100_val_acc_mean", "in16_val_acc_mean"]),
        ("test", 12): (rows_c, ["cifar10-test", "cifar100-test", "imagenet-test"]),
        ("valid", 12): (rows_c, ["cifar10-val", "cifar100-val", "imagenet-val"]),
        ("train_time", 200): (rows_d, ["c10v_train_time_200ep", "c100_train_time_200ep", "in16_train_time_200ep"]),
    }
    for (metric, epochs), (rows, names) in columns.items():
        for dataset, name in zip(DATASETS, names):
            expected = np.array([float(r[name]) for r in rows])
            assert np.allclose(space.benchmark_table(dataset, metric, epochs), expected, rtol=1e-12, atol=0)
    per_epoch = np.array([space.train_time_per_epoch(i, "cifar10") for i in range(NUM_ARCHS)])
    assert np.allclose(per_epoch, [float(r["c10v_train_per_epoch"]) for r in rows_d], rtol=1e-12)
    assert np.allclose(12 * per_epoch, [float(r["c10v_train_all_time_12ep"]) for r in rows_d], rtol=1e-12)
    # canonical groups: the NATS UniqueString, reproduced by canonical_string for every arch
    assert [canonical_string(space.encode(i)) for i in range(NUM_ARCHS)] == [r["UniqueString"] for r in rows_a]
    # params: first-seed column as in the source; own-network counts differ only for the quirk archs
    with np.load(BUNDLED, allow_pickle=False) as f:
        first_seed = f["params_first_seed"]
    for d, name in enumerate(["c10v_params_mb", "c100_params_mb", "in16_params_mb"]):
        assert np.array_equal(first_seed[:, d], np.rint([float(r[name]) * 1e6 for r in rows_d]))
    quirk = np.array([r["params_seed_mismatch"] == "True" for r in rows_d])
    own = np.stack([[space.param_count(i, ds) for ds in DATASETS] for i in range(NUM_ARCHS)])
    differs = (own != first_seed).any(axis=1)
    assert quirk.sum() == 204 and differs.sum() == 150 and not (differs & ~quirk).any()


# --- canonical groups ---------------------------------------------------------------------------------
def test_canonical_groups(space):
    table = space.canonical_table()
    assert len(np.unique(table)) == 6466 and len(space.unique_indices()) == 6466
    assert (table <= np.arange(NUM_ARCHS)).all()
    strings = [canonical_string(space.encode(i)) for i in range(NUM_ARCHS)]
    first: dict[str, int] = {}
    assert np.array_equal(table, [first.setdefault(s, i) for i, s in enumerate(strings)])
    assert space.canonical(space.canonical(123)) == space.canonical(123)
    # a dead node (3<-2 none) and a relabelled skip give the same function
    a = "|avg_pool_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|skip_connect~1|none~2|"
    b = "|skip_connect~0|+|none~0|none~1|+|skip_connect~0|avg_pool_3x3~1|none~2|"
    assert space.is_isomorphic(a, b) and not space.is_isomorphic(a, ARCH_6111)


# --- network -----------------------------------------------------------------------------------------
def test_param_counts_quoted_values():
    assert nb201_param_count(arch_to_ops("|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|"),
                             10) == 316346
    assert nb201_param_count(["skip_connect", "none", "avg_pool_3x3", "none", "none", "skip_connect"], 10) == 73306


def test_analytic_params_equal_benchmark_for_all_archs(space):
    ops = space.ops_table()
    for dataset in DATASETS:
        counts = nb201_param_counts(ops, space.num_classes(dataset))
        assert np.array_equal(counts, [space.param_count(i, dataset) for i in range(NUM_ARCHS)])
    assert space.params(6111, "cifar10") == pytest.approx(1.073466, abs=1e-9)


def test_built_models_match_analytic_counts(space):
    rng = np.random.default_rng(2024)
    indices = [0, 6111, 9930, 857] + rng.choice(NUM_ARCHS, size=8, replace=False).tolist()
    for index in indices:
        for dataset in DATASETS:
            model = space.build(index, num_classes=space.num_classes(dataset))
            assert sum(p.numel() for p in model.parameters()) == space.param_count(index, dataset)
    small = space.build(6111, num_classes=10, stem_channels=8, cells_per_stage=2)
    assert sum(p.numel() for p in small.parameters()) == nb201_param_count(space.encode(6111), 10, 8, 2)
    with pytest.raises(TypeError):
        space.build(0, num_classes=10, width=3)


def test_forward_shapes(space):
    torch.manual_seed(0)
    for dataset, side in zip(DATASETS, (32, 32, 16)):
        model = space.build(ARCH_6111, num_classes=space.num_classes(dataset))
        with torch.no_grad():
            out = model(torch.randn(2, 3, side, side))
        assert out.shape == (2, space.num_classes(dataset)) and torch.isfinite(out).all()


def test_cell_semantics():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    identity = NB201Cell(["none", "none", "none", "skip_connect", "none", "none"], 4)
    assert torch.equal(identity(x), x) and len(list(identity.parameters())) == 0
    dead = NB201Cell(["nor_conv_3x3", "avg_pool_3x3", "skip_connect", "none", "none", "none"], 4)
    assert torch.equal(dead(x), torch.zeros_like(x)) and len(dead.edges) == 3
    chain = NB201Cell(["skip_connect", "none", "skip_connect", "none", "none", "avg_pool_3x3"], 4)
    pooled = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert torch.allclose(chain(x), pooled)
    with torch.no_grad():
        out = build_nb201([0] * 6, 10)(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()


# --- loaders for the official files ---------------------------------------------------------------------
def _arch_results(space: NasBench201, index: int, epochs: int, wrong_params: int | None = None) -> dict:
    """An ArchResults state dict in the NATS-Bench layout, built from the bundled tables."""
    last = epochs - 1
    runs: dict[tuple[str, int], dict] = {}

    def add(dataset: str, seed: int, evals: dict[str, float], per_epoch: float, params: int) -> None:
        runs[(dataset, seed)] = {
            "name": dataset, "seed": seed, "epochs": epochs, "params": params / 1e6, "flop": 1.0,
            "train_times": OrderedDict((e, per_epoch) for e in range(epochs)),
            "eval_acc1es": {f"{k}@{e}": (v if e == last else 0.0) for k, v in evals.items() for e in range(epochs)},
            "eval_names": list(evals), "net_state_dict": None, "latency": [0.01],
        }

    def q(ds: str, metric: str) -> float:
        return space.query(index, ds, metric, epochs)

    t10, own10 = space.train_time_per_epoch(index, "cifar10"), space.param_count(index, "cifar10")
    add("cifar10-valid", 777, {"x-valid": q("cifar10", "valid") + 0.5}, t10,
        wrong_params if wrong_params is not None else own10)
    add("cifar10-valid", 888, {"x-valid": q("cifar10", "valid") - 0.5}, t10, own10)
    add("cifar10", 777, {"ori-test": q("cifar10", "test")}, 2 * t10, own10)
    for ds, name in (("cifar100", "cifar100"), ("imagenet16-120", "ImageNet16-120")):
        for seed, delta in ((777, 0.25), (999, -0.25)):
            add(name, seed, {"x-valid": q(ds, "valid") + delta, "x-test": q(ds, "test") - delta},
                space.train_time_per_epoch(index, ds), space.param_count(index, ds))
    seeds: dict[str, list[int]] = {}
    for ds, seed in runs:
        seeds.setdefault(ds, []).append(seed)
    return {"arch_index": index, "arch_str": space.arch(index), "all_results": runs, "dataset_seed": seeds,
            "clear_net_done": True}


def _check_loaded(loaded: NasBench201, space: NasBench201, written: list[int]) -> None:
    missing = next(i for i in range(NUM_ARCHS) if i not in written)
    for index in written:
        for ds in DATASETS:
            for metric in ("test", "valid", "train_time"):
                for epochs in (12, 200):
                    assert loaded.query(index, ds, metric, epochs) == pytest.approx(
                        space.query(index, ds, metric, epochs), rel=1e-12, abs=1e-9)
            assert loaded.param_count(index, ds) == space.param_count(index, ds)
    assert np.isnan(loaded.query(missing, "cifar10")) and np.isnan(loaded.params(missing, "cifar10"))
    with pytest.raises(LookupError):
        loaded.param_count(missing, "cifar100")
    assert np.array_equal(loaded.canonical_table(), space.canonical_table())
    assert loaded.arch(written[0]) == space.arch(written[0])


def test_nats_simple_directory_round_trip(space, tmp_path):
    quirk = space.index("|skip_connect~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_1x1~1|none~2|")
    written = [0, 1, 6111, quirk]
    folder = tmp_path / "NATS-tss-v1_0-3ffb9-simple"
    folder.mkdir()
    with bz2.open(folder / "meta.pickle.pbz2", "wb") as f:
        pickle.dump({"meta_archs": [space.arch(i) for i in range(NUM_ARCHS)], "evaluated_indexes": written}, f)
    for index in written:
        wrong = space.param_count(index, "cifar10") - 28000 if index == quirk else None
        data = {hp: _arch_results(space, index, int(hp), wrong) for hp in ("12", "200")}
        with bz2.open(folder / f"{index:06d}.pickle.pbz2", "wb") as f:
            pickle.dump(data, f, protocol=4)
    loaded = NasBench201(benchmark_path=folder)
    _check_loaded(loaded, space, written)
    # save_tables writes an .npz that reads back identically
    loaded.save_tables(tmp_path / "tables.npz")
    again = NasBench201(benchmark_path=tmp_path / "tables.npz")
    for ds in DATASETS:
        assert np.array_equal(again.benchmark_table(ds, "test"), loaded.benchmark_table(ds, "test"), equal_nan=True)
    # a file claiming another arch is refused
    with bz2.open(folder / "000002.pickle.pbz2", "wb") as f:
        pickle.dump({"200": _arch_results(space, 3, 200)}, f)
    with pytest.raises(ValueError, match="not index 2"):
        NasBench201(benchmark_path=folder)


def test_nats_loader_refuses_unexpected_objects(space, tmp_path):
    with bz2.open(tmp_path / "000000.pickle.pbz2", "wb") as f:
        pickle.dump({"200": {"arch_str": space.arch(0), "all_results": {}, "bad": Path("x")}}, f)
    with pytest.raises(pickle.UnpicklingError):
        NasBench201(benchmark_path=tmp_path)
    with pytest.raises(FileNotFoundError):
        NasBench201(benchmark_path=tmp_path / "absent")


def test_nb201_pth_round_trip(space, tmp_path):
    written = [5, 6111]
    data = {"meta_archs": [space.arch(i) for i in range(NUM_ARCHS)], "evaluated_indexes": written,
            "arch2infos": {i: {"less": _arch_results(space, i, 12), "full": _arch_results(space, i, 200)}
                           for i in written}}
    torch.save(data, tmp_path / "NAS-Bench-201-v1_1-test.pth")
    _check_loaded(NasBench201(benchmark_path=tmp_path / "NAS-Bench-201-v1_1-test.pth"), space, written)
