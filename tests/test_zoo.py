"""The default engine on models nobody here wrote (gradsign.zoo), against a per-sample reference written here.

Reference (the GradSign definition, Zhang & Jia, ICLR 2022, with the scoring rule of this package): for
each sample i alone, the model in eval mode except normalisation layers (BatchNorm, InstanceNorm, GroupNorm,
LayerNorm in train mode, so BatchNorm uses that one sample's statistics), the cross-entropy of that sample's
logits, the autograd gradient of every distinct Conv2d/Linear weight Parameter (a weight shared by several
modules counts once, with its total gradient); counts = sum_i sign(grad) with sign(0) = 0, and
GradSign = sum |counts|. It uses neither the package's engines nor its output adapter.
"""
from __future__ import annotations

import copy
import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsign
from gradsign import zoo

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
#: the heavier tiny models run on 4 samples, the rest on 8
BATCH = {"mobilenet_v2": 4, "mobilevit": 4, "resnet16_narrow": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this file: tiny models gain nothing from more, and on a shared machine extra
    threads cost several times the CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zoo_params() -> list:
    """Every zoo model; the transformers ones are skipped where transformers is not installed."""
    skip = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (extra 'zoo')")
    return [pytest.param(name, marks=[skip] if zoo.info(name).library == "transformers" else [])
            for name in zoo.names()]


def logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def reference_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """sum_i sign(dL_i/dW) for each distinct Conv2d/Linear weight, one sample at a time (see module doc)."""
    model = copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if isinstance(module, NORMS):
            module.train()
    distinct: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            distinct.setdefault(id(module.weight), module.weight)
    weights = list(distinct.values())
    model.requires_grad_(True)
    counts = [torch.zeros_like(w, dtype=torch.int64) for w in weights]
    for i in range(len(inputs)):
        loss = F.cross_entropy(logits_of(model(inputs[i:i + 1])), targets[i:i + 1])
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for count, grad in zip(counts, grads):
            if grad is not None:
                count += torch.sign(grad).to(torch.int64)
    return counts


def reference_gradsign(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    return sum(int(count.abs().sum()) for count in reference_counts(model, inputs, targets))


def zoo_case(name: str, double: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = zoo.build(name, "tiny", seed=0)
    inputs, targets = zoo.example_batch(name, BATCH.get(name, 8), "tiny", seed=1)
    if double:
        model = model.double()
        if inputs.is_floating_point():
            inputs = inputs.double()
    return model, inputs, targets


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def score_with_warnings(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[str]]:
    """gradsign.score with the default engine, and the warnings the "gradsign" logger gave meanwhile."""
    handler, logger = _Records(), logging.getLogger("gradsign")
    logger.addHandler(handler)
    try:
        return gradsign.score(model, inputs, targets), handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module", params=zoo_params())
def scored(request) -> dict:
    """One float32 default-engine score per zoo model (shared by the exactness and no-fallback tests)."""
    name = request.param
    model, inputs, targets = zoo_case(name)
    value, warnings = score_with_warnings(model, inputs, targets)
    return {"name": name, "value": value, "warnings": warnings,
            "reference": reference_gradsign(model, inputs, targets)}


def test_default_engine_matches_reference_in_float32(scored):
    reference = scored["reference"]
    assert reference > 0
    assert abs(scored["value"] - reference) <= 1e-3 * reference, (
        f"{scored['name']}: default engine {scored['value']}, per-sample reference {reference}")


#: models whose counted weights get gradient outside any call the engine sees (an Embedding tied to the
#: output layer and ``F.linear(h, layer.weight)`` are calls it sees): the default engine must hand them to
#: an exact engine and say why. No zoo model does.
FALLS_BACK: dict[str, str] = {}


def test_default_engine_falls_back_only_where_it_must(scored):
    # no zoo model lets samples of a batch interact once dropout and drop-path are off
    expected = FALLS_BACK.get(scored["name"])
    if expected is None:
        assert scored["warnings"] == [], f"{scored['name']}: {scored['warnings']}"
    else:
        assert len(scored["warnings"]) == 1 and expected in scored["warnings"][0]
        assert "vmap engine" in scored["warnings"][0]


@pytest.mark.parametrize("name", zoo_params())
def test_default_engine_counts_are_exact_in_float64(name):
    # also with the batch in chunks of 3 samples: the verification sees the first chunk only
    model, inputs, targets = zoo_case(name, double=True)
    reference = reference_gradsign(model, inputs, targets)
    assert gradsign.score(model, inputs, targets) == reference
    assert gradsign.score(model, inputs, targets, chunk_size=3) == reference


@pytest.mark.parametrize("name", zoo_params())
def test_scoring_again_keeps_no_tensor_alive(name, live_tensors):
    # a process scores model after model: nothing of one score may outlive it (the batched pass's hooks
    # once kept every layer input alive through a reference cycle with torch's graph)
    model, inputs, targets = zoo_case(name)
    gradsign.score(model, inputs, targets)
    before = live_tensors()
    gradsign.score(model, inputs, targets)
    assert live_tensors() == before


def test_reference_counts_a_tied_weight_once_with_its_total_gradient():
    model, inputs, targets = zoo_case("tied_linear", double=True)
    counts = reference_counts(model, inputs, targets)
    assert len(counts) == 2  # fc1/fc2's shared weight and the head
    # the shared weight's counts are those of the summed gradient of both uses, by a second route: a copy whose
    # second layer has its own (equal) weight gives the two partial gradients
    untied = copy.deepcopy(model)
    untied.fc2.weight = nn.Parameter(untied.fc1.weight.detach().clone())
    expected = torch.zeros_like(counts[0])
    for i in range(len(inputs)):
        loss = F.cross_entropy(untied(inputs[i:i + 1]), targets[i:i + 1])
        g1, g2 = torch.autograd.grad(loss, [untied.fc1.weight, untied.fc2.weight])
        expected += torch.sign(g1 + g2).to(torch.int64)
    assert torch.equal(counts[0], expected)


def test_batchnorm_on_flat_input_is_refused_with_a_one_line_error():
    # BatchNorm1d on (N, C) input normalises by batch statistics: one sample alone has no variance, so
    # GradSign's per-sample loss is undefined
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    inputs, targets = torch.randn(8, 8), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError) as error:
        gradsign.score(model, inputs, targets)
    message = str(error.value)
    assert "\n" not in message
    assert "batchnorm" in message.lower().replace(" ", "") and "sample" in message.lower(), message


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs the zoo extra (transformers)")
def test_regnet_at_64x64_is_scored_with_a_warning_that_rounding_decides_its_signs(engine_calls):
    # RegNetX-400MF's last stage normalises 2x2 maps: its float32 gradients differ between two exact
    # computations by more than their size, so about half the signs of a sample's gradients are rounding
    # noise in any engine, and the score says so; the reference computed again with the convolutions
    # rounded as in the batched pass (on oneDNN) agrees with the batched pass, and no float64 check runs
    from gradsign.engine import RoundingNoiseWarning

    calls = engine_calls("_reference_on_onednn", "_float64_mismatch")
    model = zoo.build("regnet", "bench", seed=0)
    x, y = zoo.example_batch("regnet", 2, "bench", seed=1)
    with pytest.warns(RoundingNoiseWarning, match=r"differ in sign on \d+\.\d% of the counted weights") as caught:
        gradsign.score(model, x, y)
    assert caught[0].message.share > 0.1
    onednn = torch.backends.mkldnn.is_available()
    assert calls == {"_reference_on_onednn": int(onednn), "_float64_mismatch": int(not onednn)}


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first = zoo.build("resnet16_narrow", seed=3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    again = zoo.build("resnet16_narrow", seed=3).state_dict()
    other = zoo.build("resnet16_narrow", seed=4).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["0.weight"], other["0.weight"])


def test_example_batches_fit_their_models():
    for name in zoo.names("torch"):
        entry = zoo.info(name)
        inputs, targets = zoo.example_batch(name, 3, "bench", seed=0)
        assert inputs.shape == (3, *entry.shape["bench"])
        assert targets.dtype == torch.int64 and int(targets.max()) < entry.num_classes
        assert inputs.dtype == (torch.int64 if entry.inputs == "tokens" else torch.float32)


def test_unknown_names_and_sizes_are_errors():
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build("alexnet")
    with pytest.raises(ValueError, match="unknown zoo size"):
        zoo.example_batch("resnet", 2, size="huge")
