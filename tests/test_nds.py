"""NDS design spaces and the DARTS-family builder: published parameter counts, an independent closed-form
count, the spaces' sampling rules, the official result-file format (fixtures written here) and per-sample
gradient signs against a plain float64 loop."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from gradsign.spaces import get_space
from gradsign.spaces.base import UnknownArchError
from gradsign.spaces.darts_model import (AMOEBANET_A, DARTS_V1, DARTS_V2, NASNET_A, build_darts, format_genotype,
                                         param_count, parse_genotype)
from gradsign.spaces.nds import (ENV_VAR, SPACES, NDSFileError, NDSFilesMissingError, NDSSpace, load_results,
                                 loose_ends)

NAMES = tuple(SPACES)


# ------------------------------------------------------------------ closed-form parameter count (reference)
def _op_params(op: str, c: int, stride: int) -> int:
    """Parameters of one op at c channels, from DARTS's op definitions (BN: 2 per channel)."""
    k = {"3x3": 3, "5x5": 5, "7x7": 7}
    if op in ("none", "avg_pool_3x3", "max_pool_3x3", "max_pool_5x5", "max_pool_7x7"):
        return 0
    if op == "skip_connect":
        return 0 if stride == 1 else c * c + 2 * c  # two 1x1 convs to c/2 channels each, BN
    if op.startswith("sep_conv_") or op == "dil_sep_conv_3x3":
        size = 3 if op == "dil_sep_conv_3x3" else k[op[-3:]]
        return 2 * (size * size * c + c * c + 2 * c)
    if op.startswith("dil_conv_"):
        size = k[op[-3:]]
        return size * size * c + c * c + 2 * c
    if op in ("conv_1x1", "conv_3x3"):
        size = 1 if op == "conv_1x1" else 3
        return size * size * c * c + 2 * c
    if op in ("conv_3x1_1x3", "conv_7x1_1x7"):
        size = int(op[5])
        return 2 * size * c * c + 2 * c
    raise AssertionError(op)


def reference_params(g, width: int, depth: int, classes: int, aux: bool) -> int:
    total = 3 * 3 * 3 * 3 * width + 2 * 3 * width  # stem conv and BN
    pp, p, c, red_prev, c_aux = 3 * width, 3 * width, width, False, None
    for i in range(depth):
        red = i in (depth // 3, 2 * depth // 3)
        c = 2 * c if red else c
        entries, concat = g.cell(red)
        total += pp * c + 2 * c + p * c + 2 * c  # preprocess0 (either kind) and preprocess1
        total += sum(_op_params(op, c, 2 if red and j < 2 else 1) for op, j in entries)
        pp, p, red_prev = p, c * len(concat), red
        if i == 2 * depth // 3:
            c_aux = p
    total += p * classes + classes
    if aux:
        total += c_aux * 128 + 256 + 128 * 768 * 4 + 2 * 768 + 768 * classes + classes
    return total


def test_darts_v2_has_the_published_parameter_count():
    """3,349,342 parameters without the auxiliary head at 36 channels and 20 cells (DARTS reports 3.3M)."""
    model = build_darts(DARTS_V2, num_classes=10, width=36, depth=20, auxiliary=True)
    assert param_count(model, auxiliary=False) == 3_349_342
    assert param_count(build_darts(DARTS_V2, num_classes=10, width=16, depth=8), auxiliary=False) == 246_106


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2, NASNET_A, AMOEBANET_A])
@pytest.mark.parametrize("width,depth,aux", [(36, 20, True), (16, 8, False), (24, 5, True)])
def test_builder_matches_the_closed_form_count(genotype, width, depth, aux):
    model = build_darts(genotype, num_classes=10, width=width, depth=depth, auxiliary=aux)
    assert param_count(model) == reference_params(genotype, width, depth, 10, aux)


def test_amoebanet_lands_at_darts_table_figure():
    """DARTS's own training of AmoebaNet-A in this network: 3.1M parameters (DARTS, Table 1)."""
    model = build_darts(AMOEBANET_A, num_classes=10, width=36, depth=20)
    assert round(param_count(model, auxiliary=False) / 1e6, 1) == 3.1


@pytest.mark.parametrize("name", NAMES)
def test_random_models_match_the_closed_form_count(name):
    space = get_space(name)
    rng = np.random.default_rng(3)
    for _ in range(3):
        model = space.model(space.sample(rng))
        built = space.build(model.text(), num_classes=10, auxiliary=True)
        assert param_count(built) == reference_params(model.genotype, model.width, model.depth, 10, True)


# ------------------------------------------------------------------ genotype text
def test_genotype_text_round_trips_and_reads_dartss_own_form():
    text = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
            "normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('max_pool_3x3', 1)], reduce_concat=range(2, 6))")
    assert parse_genotype(text) == DARTS_V2
    assert parse_genotype(format_genotype(NASNET_A)) == NASNET_A


@pytest.mark.parametrize("text", ["Genotype(normal=[('sep_conv_3x3', 0)])", "not a genotype",
                                  "Genotype(normal=__import__('os'), normal_concat=[2], reduce=[], reduce_concat=[2])"])
def test_bad_genotype_text_is_refused(text):
    with pytest.raises(ValueError):
        parse_genotype(text)


# ------------------------------------------------------------------ the spaces' rules
@pytest.mark.parametrize("name", NAMES)
def test_sampling_follows_the_space_rules(name):
    space, spec = get_space(name), SPACES[name]
    rng = np.random.default_rng(0)
    for _ in range(20):
        arch = space.sample(rng)
        model = space.model(arch)
        assert model.width in (16, 24, 32) and model.depth in (4, 8, 12, 16, 20) and not model.aux
        for reduction in (False, True):
            entries, concat = model.genotype.cell(reduction)
            assert len(entries) == 2 * spec.nodes
            assert all(op in spec.ops and 0 <= i < 2 + k // 2 for k, (op, i) in enumerate(entries))
            used = {i for _, i in entries}
            expected = [s for s in range(2, 2 + spec.nodes) if not spec.loose_end or s not in used]
            assert list(concat) == expected
        assert space.decode(space.encode(arch)) == arch
        assert space.canonical(space.canonical(arch)) == space.canonical(arch)


def test_canonical_ignores_the_order_of_a_nodes_two_inputs():
    space = get_space("nds-darts")
    g = DARTS_V2
    swapped = g.__class__(g.normal[1::-1] + g.normal[2:], g.normal_concat, g.reduce, g.reduce_concat)
    a = f"{format_genotype(g)} width=16 depth=8 aux=0"
    b = f"{format_genotype(swapped)} width=16 depth=8 aux=0"
    assert a != b and space.canonical(a) == space.canonical(b)


def test_published_genotypes_belong_to_their_spaces():
    get_space("nds-darts").model(format_genotype(DARTS_V2))
    get_space("nds-nasnet").model(format_genotype(NASNET_A))
    get_space("nds-amoeba").model(format_genotype(AMOEBANET_A))
    with pytest.raises(UnknownArchError, match="unknown op"):
        get_space("nds-enas").model(format_genotype(DARTS_V2))  # dil_conv_3x3 is not an ENAS op
    with pytest.raises(UnknownArchError, match="nodes"):
        get_space("nds-pnas").model(format_genotype(DARTS_V2))  # 4 nodes, PNAS has 5
    bad_concat = format_genotype(NASNET_A).replace("reduce_concat=[4, 5, 6]", "reduce_concat=[2, 3, 4, 5, 6]")
    with pytest.raises(UnknownArchError, match="no other node uses"):
        get_space("nds-nasnet").model(bad_concat)


def test_bare_genotype_is_the_darts_evaluation_network():
    space = get_space("nds-darts")
    model = space.model(format_genotype(DARTS_V2))
    assert (model.width, model.depth, model.aux) == (36, 20, False)
    assert loose_ends(NASNET_A.reduce) == (4, 5, 6)


# ------------------------------------------------------------------ result files (official format)
def _entry(space: NDSSpace, arch: str, errors: list[float], seed: int) -> dict:
    model = space.model(arch)
    g = model.genotype
    return {"job_id": seed, "rng_seed": seed,
            "params": reference_params(g, model.width, model.depth, 10, model.aux), "flops": 1000 + seed,
            "net": {"genotype": {"normal": [list(e) for e in g.normal], "normal_concat": list(g.normal_concat),
                                 "reduce": [list(e) for e in g.reduce], "reduce_concat": list(g.reduce_concat)},
                    "width": model.width, "depth": model.depth, "aux": model.aux, "drop_prob": 0.2},
            "optim": {"base_lr": 0.1, "wd": 5e-4, "max_ep": len(errors)},
            "min_test_top1": min(errors), "test_ep_top1": errors, "train_ep_top1": errors}


@pytest.fixture
def enas_files(tmp_path):
    space = NDSSpace("nds-enas")
    rng = np.random.default_rng(5)
    archs = [space.sample(rng) for _ in range(4)]
    aux_arch = archs[3].replace("aux=0", "aux=1")
    entries = [_entry(space, archs[0], [50.0, 20.0, 9.5], 0), _entry(space, archs[1], [60.0, 30.0, 12.25], 1),
               _entry(space, archs[2], [40.0, 8.0, 8.5], 2), _entry(space, archs[0], [50.0, 21.0, 10.5], 3),
               _entry(space, aux_arch, [45.0, 15.0, 11.0], 4)]
    (tmp_path / "ENAS.json").write_text(json.dumps({"top": entries[:2], "mid": entries[2:]}))
    return tmp_path, archs[:3] + [aux_arch]


def test_result_file_round_trips(enas_files, monkeypatch):
    folder, archs = enas_files
    monkeypatch.setenv(ENV_VAR, str(folder))
    space = get_space("nds-enas")
    assert len(space) == 4 and space.duplicates == 1
    assert [space.arch(i) for i in range(4)] == archs
    assert [space.index(a) for a in archs] == [0, 1, 2, 3] and space.index("2") == 2
    assert space.query(archs[0], "cifar10") == pytest.approx(100 - (9.5 + 10.5) / 2)  # two runs of one net
    assert space.query(archs[2], "cifar10") == 91.5
    assert space.query(archs[2], "cifar10", "best_test") == 92.0
    assert space.query(archs[2], "cifar10", "test", 3) == 91.5
    with pytest.raises(ValueError, match="trained for \\[3\\] epochs"):
        space.query(archs[2], "cifar10", "test", 200)
    with pytest.raises(ValueError, match="no validation"):
        space.query(archs[2], "cifar10", "valid")
    assert list(space.benchmark_table("cifar10")) == [100 - 10.0, 100 - 12.25, 91.5, 89.0]
    for arch in archs:
        assert space.param_check(arch)["match"] is True
    assert space.param_check(archs[3])["params_file"] == space.param_check(archs[3])["params"]
    results = load_results(folder / "ENAS.json")
    assert [r.position for r in results] == [0, 1, 2, 3, 4] and results[4].model.aux


def test_a_plain_list_file_is_read_too(tmp_path):
    space = NDSSpace("nds-darts", nds_dir=tmp_path)
    arch = f"{format_genotype(DARTS_V2)} width=16 depth=8 aux=0"
    (tmp_path / "DARTS.json").write_text(json.dumps([_entry(space, arch, [30.0, 6.0], 0)]))
    assert len(space) == 1 and space.query(arch) == 94.0
    with pytest.raises(UnknownArchError, match="not in"):
        space.index(f"{format_genotype(DARTS_V1)} width=16 depth=8 aux=0")


def test_without_files_the_error_names_the_file_and_the_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    space = get_space("nds-pnas")
    with pytest.raises(NDSFilesMissingError, match=f"PNAS.json.*{ENV_VAR}.*dl.fbaipublicfiles.com/nds/data.zip"):
        len(space)
    assert not space.has_results()
    with pytest.raises(NDSFilesMissingError, match=str(tmp_path / "PNAS.json")):
        NDSSpace("nds-pnas", nds_dir=tmp_path).query(space.sample(np.random.default_rng(0)))
    space.build(space.sample(np.random.default_rng(0)), num_classes=10, width=4, depth=3)  # building needs no file


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"), ('{"a": []}', "top"),
                                           ('[{"net": {"width": 16}}]', "entry 0"), ("[]", "non-empty")])
def test_corrupt_result_files_are_refused(tmp_path, content, match):
    (tmp_path / "NASNet.json").write_text(content)
    with pytest.raises(NDSFileError, match=match):
        len(NDSSpace("nds-nasnet", nds_dir=tmp_path))


def test_a_file_of_another_space_is_refused(tmp_path):
    darts = NDSSpace("nds-darts")
    arch = f"{format_genotype(DARTS_V2)} width=16 depth=8 aux=0"
    (tmp_path / "Amoeba.json").write_text(json.dumps([_entry(darts, arch, [30.0, 6.0], 0)]))
    with pytest.raises(NDSFileError, match="entry 0 is not a nds-amoeba model"):
        len(NDSSpace("nds-amoeba", nds_dir=tmp_path))


# ------------------------------------------------------------------ scoring: signs against a plain float64 loop
@pytest.mark.parametrize("name", NAMES)
def test_per_sample_signs_match_a_float64_loop(name):
    """The default engine's sign counts equal a plain float64 per-sample loop's on every weight whose
    gradient is clearly non-zero for every sample. Weights whose gradient is zero in exact arithmetic (a
    branch that ends in BatchNorm and reaches the output only through global average pooling: single-sample
    BatchNorm makes its spatial mean the constant bias) get float-noise signs in any implementation."""
    from gradsign.datasets import canonical_batch
    from gradsign.engine import sign_counts

    space = get_space(name)
    inputs, targets = canonical_batch("cifar10", 4, 0)
    rng = np.random.default_rng(11)
    for _ in range(5):  # the first sampled model whose output depends on its input at all
        torch.manual_seed(0)
        model = space.build(space.sample(rng), num_classes=10, width=4, depth=4)
        if _clear_weights(_float64_grads(model, inputs, targets)):
            break
    grads = _float64_grads(model, inputs, targets)
    counts = sign_counts(copy.deepcopy(model), inputs, targets, nn.functional.cross_entropy)
    for n, g in grads.items():
        sure = (g.abs() > 1e-5).all(0)
        assert torch.equal(counts[n][sure], torch.sign(g).sum(0).to(counts[n].dtype)[sure]), n
    assert _clear_weights(grads) > 0


def _float64_grads(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample weight gradients (samples first) of a float64 copy, one sample at a time."""
    from gradsign.engine import counted_layers, scoring_mode

    reference = scoring_mode(copy.deepcopy(model).double())
    layers = dict(counted_layers(reference))
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for i in range(len(inputs)):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(inputs[i:i + 1].double()), targets[i:i + 1]).backward()
        for n, layer in layers.items():
            grads[n].append(layer.weight.grad.detach().clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def _clear_weights(grads: dict[str, torch.Tensor]) -> int:
    """Weights whose gradient is above 1e-5 in magnitude for every sample (float32 gets their signs right)."""
    return sum(int((g.abs() > 1e-5).all(0).sum()) for g in grads.values())


# ------------------------------------------------------------------ command line
def test_cli_correlates_with_the_files_final_test_accuracy(tmp_path, capsys):
    from scipy import stats

    from gradsign.cli import main

    space = NDSSpace("nds-amoeba")
    rng = np.random.default_rng(2)
    archs = [space.sample(rng).rsplit(" width=", 1)[0] + " width=4 depth=3 aux=0" for _ in range(5)]
    finals = [9.0, 7.5, 12.0, 8.25, 10.0]
    entries = [_entry(space, a, [50.0, e], k) for k, (a, e) in enumerate(zip(archs, finals))]
    (tmp_path / "Amoeba.json").write_text(json.dumps(entries))
    out = tmp_path / "result.json"
    common = ["--space", "nds-amoeba", "--nds-dir", str(tmp_path), "--batch-size", "4", "--no-cache"]
    assert main(["correlate", *common, "--all", "--bootstrap", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy (last epoch)" in printed and "Amoeba.json" in printed
    result = json.loads(out.read_text())
    scores = [row["scores"]["gradsign"] for row in result["archs"]]
    assert [row["accuracy"] for row in result["archs"]] == [100 - e for e in finals]
    expected = stats.kendalltau(scores, [100 - e for e in finals]).statistic
    assert result["proxies"]["gradsign"]["kendall"] == pytest.approx(expected)
    assert main(["score", *common, "--arch", "3"]) == 0
    assert "91.75" in capsys.readouterr().out


def test_cli_without_files_is_one_line_with_status_2(monkeypatch, capsys):
    from gradsign.cli import main

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert main(["correlate", "--space", "nds-darts", "--sample", "5", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DARTS.json" in err and ENV_VAR in err
