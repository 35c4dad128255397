"""The public API refuses a batch whose inputs and targets differ in length and a model whose lazy
parameters have no shape yet, and says why a loss-based proxy scored exactly 0 instead of returning the 0
silently."""
import math
import warnings

import pytest
import torch
from torch import nn

import gradsign


def tiny(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, outputs))


def test_inputs_and_targets_of_different_lengths_are_refused():
    x, y = torch.randn(4, 3, 2, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="4 samples, 3 targets"):
        gradsign.score(tiny(2), x, y)


@pytest.mark.parametrize("proxy", ["gradsign", "synflow"])
def test_a_model_with_lazy_parameters_not_yet_shaped_is_refused_plainly(proxy):
    # torch's own error came from cloning an uninitialised parameter, naming neither the cause nor the cure
    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="uninitialised parameters .*lazy.* run it once on a batch"):
        gradsign.score(model, torch.randn(4, 3), torch.zeros(4, dtype=torch.long), proxy=proxy)
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)  # left as it was


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


@pytest.mark.parametrize("proxy", ["gradsign", "snip", "fisher", "synflow", "zen", "flops"])
@pytest.mark.parametrize("form", ["script", "export", "scripted part", "quantized"])
def test_a_model_whose_layers_no_proxy_can_read_is_refused(form, proxy):
    # a TorchScript module runs no Python hooks and hides its modules' types (gradsign, snip, fisher,
    # synflow and flops scored it 0, zen another value); a torch.export graph applies its weights as ATen
    # operations (synflow scored it 0; proxies on the lent model failed in torch's train()); a quantized
    # layer's packed integer weights have no gradient (gradient proxies scored 0 "for a constant loss")
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    model = conv_net()
    if form == "script":
        model = torch.jit.script(model)
    elif form == "export":
        model = torch.export.export(model, (x,)).module()
    elif form == "scripted part":
        model[0] = torch.jit.script(model[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes that its eager quantization is deprecated
            model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    expected = {"script": "the model, a TorchScript module: .*score the nn.Module it was made from",
                "export": "the model, a graph of ATen operations .*score the nn.Module it was made from",
                "scripted part": "module '0', a TorchScript module: .*score the nn.Module it was made from",
                "quantized": "module '4', a quantized Linear: .*no gradient; score the floating-point model"}[form]
    with pytest.raises(ValueError, match=f"cannot score {expected}"):
        gradsign.score(model, x, y, proxy=proxy)


def test_a_symbolically_traced_module_keeps_its_layers_and_scores_as_the_model():
    # torch.fx's symbolic trace calls the model's own modules (torch.compile, too, was scored exactly, ad hoc)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    expected = gradsign.score(conv_net(), x, y)
    assert gradsign.score(torch.fx.symbolic_trace(conv_net()), x, y) == expected


@pytest.mark.parametrize("proxy", ["gradsign", "grad_norm", "snip"])
def test_a_constant_loss_scores_zero_with_a_warning(proxy):
    # cross-entropy over one output is log(1) = 0 whatever the weights: every gradient is exactly 0
    x, y = torch.randn(6, 3, 2, 2), torch.zeros(6, dtype=torch.long)
    with pytest.warns(UserWarning, match=f"{proxy} scored 0: .*constant loss"):
        assert gradsign.score(tiny(1), x, y, proxy=proxy) == 0


def test_no_warning_for_a_loss_that_depends_on_the_weights():
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gradsign.score(tiny(2), x, y) > 0


class MatrixLayer(nn.Module):
    """A linear layer that is neither nn.Linear nor nn.Conv2d (as transformers' GPT-2 Conv1D: x W + b)."""

    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features_in, features_out) / features_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(features_out))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def test_gradsign_says_when_most_weights_are_in_layers_it_does_not_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), MatrixLayer(12, 16), nn.Tanh(), MatrixLayer(16, 16), nn.Tanh(),
                          nn.Linear(16, 2))
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    with pytest.warns(UserWarning, match=r"counts Conv2d and Linear weights only \(32 here\).*MatrixLayer 448"):
        assert gradsign.score(model, x, y) > 0
    assert gradsign.engine.uncounted_weights(tiny(2)) == {}
    # attention input projections and position tables count as uncounted, embeddings do not
    attention = nn.MultiheadAttention(8, 2)
    assert gradsign.engine.uncounted_weights(nn.ModuleList([attention, nn.Embedding(50, 8)])) == {
        "MultiheadAttention": 3 * 8 * 8}


@pytest.mark.parametrize("api", ["parametrizations", "hooks"])
def test_gradsign_names_the_parametrized_layers_it_cannot_count(api):
    # weight_norm computes the weight anew at every access (a parametrization), or sets it as a plain
    # tensor before every forward (the older hook-based API): no engine can read its gradient. Before,
    # the hook-based layers were counted, sent the default engine to the loop with a wrong cause and
    # counted zero there.
    import warnings

    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based weight_norm
        wrap = parametrizations if api == "parametrizations" else nn.utils
        model = nn.Sequential(nn.Flatten(), wrap.weight_norm(nn.Linear(12, 16)), nn.Tanh(),
                              wrap.spectral_norm(nn.Linear(16, 8)), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    with pytest.warns(UserWarning, match=r"does not count the weights of 2 layer\(s\).*: model\.1, model\.3"):
        with gradsign.engine.engine_warnings() as fallbacks:
            score = gradsign.score(model, x, y)
    assert fallbacks == []
    assert score == gradsign.score(model, x, y, engine="loop") > 0
    assert [name for name, _ in gradsign.engine.counted_layers(model)] == ["5"]
    assert gradsign.engine.uncounted_weights(model) == {}
    # every proxy that reads layer weights runs on it (their weights are a new tensor at each access); the
    # hook-based modules cannot be deep-copied (torch refuses), which those proxies need
    for proxy in ("grad_norm", "snip", "grasp", "fisher", "synflow") if api == "parametrizations" else ():
        assert math.isfinite(gradsign.score(model, x, y, proxy=proxy))
