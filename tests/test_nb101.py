"""NAS-Bench-101: module hash, pruning and validity, the bundled table, the builder's exact parameter count,
sampling and mutation, look-ups, and the command line."""
import json

import numpy as np
import pytest
import torch

from gradsign.cli import main
from gradsign.spaces import UnknownArchError, get_space
from gradsign.spaces.nb101 import (MAX_EDGES, MAX_VERTICES, NotTabulatedError, Spec, module_hash, mutate_spec,
                                   parse_spec, prune, random_spec)
from gradsign.spaces.nb101_model import OPS, build_nb101, nb101_param_count

SPACE = get_space("nb101")
#: first model of the sorted hashes; its spec and values are quoted in ../shared/data/SOURCES.md, section 3
FIRST = "00005c142e6f48ac74fdcf73e3439874"
FIRST_SPEC = {"matrix": [[0, 1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 1],
                         [0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1],
                         [0, 0, 0, 0, 0, 0, 0]],
              "ops": ["input", "conv3x3-bn-relu", "maxpool3x3", "conv3x3-bn-relu", "conv3x3-bn-relu",
                      "conv1x1-bn-relu", "output"]}


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def meta_param_count(spec: Spec) -> int:
    with torch.device("meta"):
        model = build_nb101(spec.matrix, spec.ops, 10)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- hash, pruning, validity
def test_every_data_1k_spec_hashes_to_its_key(shared_dir):
    data = json.loads((shared_dir / "data/nb101/nasbench_vis/data-1k.json").read_text())
    for adjacency, operations, key in zip(data["adjacency"], data["operations"], data["key"]):
        labels = [o for o in operations if o != -3]  # -3 marks padding after the output
        matrix = np.asarray(adjacency, dtype=np.int64)[: len(labels), : len(labels)]
        assert module_hash(matrix, labels) == key


def test_the_quoted_model_hashes_and_counts_as_published():
    spec = parse_spec(json.dumps(FIRST_SPEC))
    assert spec.hash() == FIRST
    assert SPACE.index(json.dumps(FIRST_SPEC)) == 0 == SPACE.index(FIRST)
    assert SPACE.param_count(FIRST) == 8_555_530 == nb101_param_count(spec.matrix, spec.ops)
    assert SPACE.query(FIRST, "cifar10", "valid", 108) == pytest.approx(93.048877, abs=1e-6)


def test_hash_is_invariant_to_inner_vertex_order_and_sees_ops():
    spec = parse_spec(FIRST_SPEC)
    perm = [0, 2, 1, 3, 4, 5, 6]  # swapping vertices 1 and 2 breaks the order (1 -> 2): use 4 and 3
    perm = [0, 1, 2, 4, 3, 5, 6]
    matrix = spec.matrix[np.ix_(perm, perm)]
    ops = [spec.ops[p] for p in perm]
    assert not np.any(np.tril(matrix))
    assert module_hash(matrix, [-1, *(OPS.index(o) for o in ops[1:-1]), -2]) == FIRST
    other = list(spec.labels())
    other[1] = 1
    assert module_hash(spec.matrix, other) != FIRST


def test_pruning_drops_vertices_off_every_input_output_path():
    matrix = np.zeros((5, 5), dtype=int)
    matrix[0, 1] = matrix[1, 4] = 1      # input -> 1 -> output
    matrix[0, 2] = 1                     # 2 is a dead end
    matrix[3, 4] = 1                     # 3 is not reachable from the input
    spec = prune(matrix, ["input", "conv3x3-bn-relu", "maxpool3x3", "conv1x1-bn-relu", "output"])
    assert spec.matrix.tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert spec.ops == ("input", "conv3x3-bn-relu", "output")


@pytest.mark.parametrize("spec, message", [
    ({"matrix": [[0, 1], [1, 0]], "ops": ["input", "output"]}, "upper-triangular"),
    ({"matrix": [[0, 0], [0, 0]], "ops": ["input", "output"]}, "not reachable"),
    ({"matrix": [[0, 1, 0], [0, 0, 0], [0, 0, 0]], "ops": ["input", "conv3x3-bn-relu", "output"]},
     "not reachable"),
    ({"matrix": [[0, 1, 0], [0, 0, 1], [0, 0, 0]], "ops": ["input", "conv5x5", "output"]}, "unknown op"),
    ({"matrix": [[0, 1], [0, 0]], "ops": ["output", "input"]}, "start with"),
    ({"matrix": [[0, 1, 1], [0, 0]], "ops": ["input", "output"]}, "square"),
    ({"matrix": [[0, 2], [0, 0]], "ops": ["input", "output"]}, "0 or 1"),
    ({"matrix": [[0, 1], [0, 0]]}, "exactly the keys"),
])
def test_malformed_specs_get_a_one_line_error(spec, message):
    with pytest.raises(UnknownArchError, match=message) as info:
        parse_spec(json.dumps(spec))
    assert "\n" not in str(info.value)


def test_too_many_vertices_or_edges_after_pruning_are_invalid():
    chain = np.eye(8, k=1, dtype=int)    # 8 vertices in a chain: nothing to prune
    ops = ["input"] + ["conv3x3-bn-relu"] * 6 + ["output"]
    with pytest.raises(UnknownArchError, match="8 vertices"):
        parse_spec({"matrix": chain.tolist(), "ops": ops})
    dense = np.triu(np.ones((6, 6), dtype=int), k=1)   # 15 edges
    with pytest.raises(UnknownArchError, match="15 edges"):
        parse_spec({"matrix": dense.tolist(), "ops": ["input"] + ["maxpool3x3"] * 4 + ["output"]})
    # > 9 edges before pruning is fine when pruning leaves <= 9 (as in the NASLib subset)
    big = np.triu(np.ones((7, 7), dtype=int), k=1)
    big[:, 6] = 0
    big[0, 6] = 1
    assert parse_spec({"matrix": big.tolist(), "ops": ["input"] + ["maxpool3x3"] * 5 + ["output"]}).num_vertices == 2


def test_unknown_hash_and_untabulated_model_are_told_apart():
    with pytest.raises(UnknownArchError, match="unknown NB101 module hash"):
        SPACE.index("f" * 32)
    rng = np.random.default_rng(3)
    while True:
        spec = random_spec(rng)
        if not SPACE.has_table(spec.to_json()):
            break
    with pytest.raises(NotTabulatedError, match="not among the 30,001 bundled"):
        SPACE.query(spec.to_json(), "cifar10")
    assert SPACE.resolve(spec.to_json()) == spec.to_json()
    assert SPACE.canonical(spec.to_json()) == spec.hash()


# ---------------------------------------------------------------- bundled table and builder
def test_bundled_table_is_30001_sorted_hashes_whose_specs_hash_back():
    assert len(SPACE) == 30_001
    rng = np.random.default_rng(0)
    for i in rng.choice(len(SPACE), 200, replace=False):
        arch = SPACE.arch(int(i))
        assert SPACE.spec(arch).hash() == arch and SPACE.index(arch) == i
        assert SPACE.resolve(SPACE.spec(arch).to_json()) == arch


def test_bundled_values_equal_the_shared_files(shared_dir):
    folder = shared_dir / "data/nb101/nasbench_vis"
    for name in ("data-20k.json", "data-10k.json"):
        data = json.loads((folder / name).read_text())
        for j in np.random.default_rng(1).choice(len(data["key"]), 300, replace=False):
            arch = data["key"][j]
            for epochs in (4, 12, 36, 108):
                assert SPACE.query(arch, "cifar10", "valid", epochs) == pytest.approx(
                    100 * data[f"{epochs}_final_validation_accuracy"][j], rel=1e-12)
            assert SPACE.query(arch, "cifar10", "train_time", 108) == data["final_training_time"][j]
            assert SPACE.param_count(arch) == data["trainable_parameters"][j]


def test_builder_parameter_count_equals_the_benchmark_on_a_sample():
    rng = np.random.default_rng(2)
    archs = [SPACE.arch(int(i)) for i in rng.choice(len(SPACE), 2000, replace=False)]
    for arch in archs:
        spec = SPACE.spec(arch)
        assert nb101_param_count(spec.matrix, spec.ops) == SPACE.param_count(arch)
    for arch in archs[:12]:   # the builder's own modules, built on the meta device (no memory, no init)
        assert meta_param_count(SPACE.spec(arch)) == SPACE.param_count(arch)


def test_network_runs_and_concatenates_to_the_cell_width():
    torch.manual_seed(0)
    model = SPACE.build(FIRST, num_classes=10, stem_channels=8)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    widths = [c.channels for c in model.cells if hasattr(c, "channels")]
    assert [w[-1] for w in widths] == [8, 8, 8, 16, 16, 16, 32, 32, 32]
    # vertex channels: vertices 2 and 5 feed the output: 8 // 2 each; 1 -> 2 takes 4, 3 and 4 -> 5 take 4
    assert widths[0] == [8, 4, 4, 4, 4, 4, 8]


# ---------------------------------------------------------------- sampling, mutation, encoding
def test_random_specs_are_valid_pruned_and_reproducible():
    a = [random_spec(np.random.default_rng(5)).hash() for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(6)
    for _ in range(100):
        spec = random_spec(rng)
        assert spec.num_vertices <= MAX_VERTICES and spec.num_edges <= MAX_EDGES
        assert parse_spec(spec.to_json()) == spec
    archs = [SPACE.sample(np.random.default_rng(s)) for s in range(20)]
    assert all(SPACE.canonical(a) == (a if len(a) == 32 else json.loads(a) and SPACE.canonical(a)) for a in archs)


def test_mutation_gives_another_valid_model():
    rng = np.random.default_rng(7)
    spec = parse_spec(FIRST_SPEC)
    for _ in range(30):
        child = mutate_spec(spec, rng)
        assert child.hash() != spec.hash() and child.num_edges <= MAX_EDGES
    assert SPACE.canonical(SPACE.mutate(FIRST, rng)) != FIRST


def test_encode_decode_round_trip():
    rng = np.random.default_rng(8)
    for i in rng.choice(len(SPACE), 50, replace=False):
        arch = SPACE.arch(int(i))
        code = SPACE.encode(arch)
        assert len(code) == len(SPACE.choices) == 26
        assert SPACE.decode(code) == arch


# ---------------------------------------------------------------- look-ups
def test_query_names_its_field_and_refuses_what_is_not_bundled():
    assert SPACE.accuracy_field("cifar10", "valid", 108) == "cifar10 validation accuracy, 108 epochs, one run"
    with pytest.raises(ValueError, match="test accuracy is not bundled"):
        SPACE.query(FIRST, "cifar10", "test", 108)
    with pytest.raises(ValueError, match="epochs must be one of 4, 12, 36, 108"):
        SPACE.query(FIRST, "cifar10", "valid", 200)
    with pytest.raises(ValueError, match="no dataset"):
        SPACE.query(FIRST, "cifar100")
    table = SPACE.benchmark_table("cifar10", "valid", 4)
    assert table.shape == (30_001,) and not table.flags.writeable


# ---------------------------------------------------------------- command line
def test_correlate_json_carries_hashes_and_the_bundled_accuracies(capsys, tmp_path):
    status, out, err = run(capsys, "correlate", "--space", "nb101", "--dataset", "cifar10", "--sample", 2,
                           "--seed", 11, "--proxies", "params", "--no-cache", "--bootstrap", 10,
                           "--json", tmp_path / "r.json")
    assert status == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["space"] == "nb101" and report["n"] == 2
    assert report["accuracy_field"] == "cifar10 validation accuracy, 108 epochs, one run"
    for row in report["archs"]:
        assert SPACE.arch(row["index"]) == row["arch"] and len(row["arch"]) == 32
        assert row["accuracy"] == SPACE.query(row["arch"], "cifar10", "valid", 108)
        assert row["scores"]["params"] == pytest.approx(SPACE.params(row["arch"]))


def test_arch_file_takes_hashes_and_unpruned_specs(capsys, tmp_path):
    small = next(SPACE.spec(i) for i in range(len(SPACE)) if SPACE.spec(i).num_vertices < MAX_VERTICES)
    n = small.num_vertices   # add a dead-end vertex fed by the input, before the output: pruning drops it
    matrix = np.zeros((n + 1, n + 1), dtype=int)
    matrix[: n - 1, : n - 1] = small.matrix[: n - 1, : n - 1]
    matrix[: n - 1, n] = small.matrix[: n - 1, n - 1]
    matrix[0, n - 1] = 1
    unpruned = {"matrix": matrix.tolist(), "ops": [*small.ops[:-1], "maxpool3x3", "output"]}
    spec = parse_spec(unpruned)
    assert spec == small and SPACE.has_table(json.dumps(unpruned))
    archs = tmp_path / "archs.txt"
    archs.write_text(f"# two\n{FIRST}\n{json.dumps(FIRST_SPEC)}\n{json.dumps(unpruned)}\n")
    status, out, err = run(capsys, "correlate", "--space", "nb101", "--dataset", "cifar10", "--archs", archs,
                           "--proxies", "params", "--no-cache", "--bootstrap", 0, "--epochs", 12,
                           "--json", tmp_path / "r.json")
    assert status == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [a["arch"] for a in report["archs"]] == [FIRST, spec.hash()]
    assert report["accuracy_field"] == "cifar10 validation accuracy, 12 epochs, one run"


@pytest.mark.parametrize("arch, message", [
    ("f" * 32, "unknown NB101 module hash"),
    ('{"matrix": [[0, 1], [1, 0]], "ops": ["input", "output"]}', "upper-triangular"),
    ('{"matrix": [[0, 1], [0, 0]], "ops": ["input", "output"', "not an NB101 module hash or JSON spec"),
    ("nonsense", "not an NB101 module hash, JSON spec or index"),
    ("30001", "out of range"),
])
def test_bad_archs_exit_2_with_one_line(capsys, arch, message):
    status, out, err = run(capsys, "score", "--space", "nb101", "--arch", arch, "--proxies", "params",
                           "--no-cache")
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_score_and_test_metric_refusal_on_the_command_line(capsys, tmp_path):
    status, out, err = run(capsys, "score", "--space", "nb101", "--arch", FIRST, "--proxies", "params",
                           "--no-cache")
    assert status == 0, err
    assert "cifar10 validation accuracy, 108 epochs, one run: 93.05" in out and "params: 8.55553" in out
    status, out, err = run(capsys, "correlate", "--space", "nb101", "--dataset", "cifar10", "--sample", 3,
                           "--metric", "test", "--proxies", "params", "--no-cache")
    assert status == 2 and "test accuracy is not bundled" in err
    rng = np.random.default_rng(3)
    while SPACE.has_table((spec := random_spec(rng)).to_json()):
        pass
    status, out, err = run(capsys, "score", "--space", "nb101", "--arch", spec.to_json(), "--proxies", "params",
                           "--no-cache")
    assert status == 0, err
    assert "no benchmark results" in out and spec.to_json() in out
    archs = tmp_path / "archs.txt"
    archs.write_text(spec.to_json() + "\n")
    status, out, err = run(capsys, "correlate", "--space", "nb101", "--dataset", "cifar10", "--archs", archs,
                           "--proxies", "params", "--no-cache")
    assert status == 2 and "not among the 30,001 bundled models" in err


def test_select_runs_on_nb101(capsys):
    status, out, err = run(capsys, "select", "--space", "nb101", "--dataset", "cifar10", "--proxies", "params",
                           "--candidates", 2, "--runs", 1, "--no-cache")
    assert status == 0, err
    assert "validation accuracy, 108 epochs, one run" in out and "cifar10 valid" in out
