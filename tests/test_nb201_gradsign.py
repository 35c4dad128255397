"""GradSign of real NAS-Bench-201 networks against its definition, written out here as a plain loop
(Zhang & Jia, ICLR 2022; FIELD-NOTES section 1): each sample's loss alone with the network in train mode
(so BatchNorm normalises the one sample by its own statistics), Conv2d and Linear weights only,
sign(0) = 0, score = sum over weights of |sum over samples of the signs|."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsign
from gradsign.datasets import canonical_batch
from gradsign.spaces import get_space

SPACE = get_space("nb201")
#: archs with every op kind between them, none of them cut off (index, dataset)
CASES = [
    ("|nor_conv_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|none~2|", "imagenet16-120"),
    ("|nor_conv_1x1~0|+|skip_connect~0|avg_pool_3x3~1|+|none~0|nor_conv_3x3~1|skip_connect~2|", "cifar10"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared, loaded machine several threads per process slow these loops ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def definition(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """The GradSign sum by its definition: one forward/backward per sample, on a fresh copy each time."""
    def weights(net):
        return [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    totals = [torch.zeros_like(w) for w in weights(model)]
    for i in range(len(x)):
        net = copy.deepcopy(model).train()
        loss = F.cross_entropy(net(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, weights(net), allow_unused=True)
        for total, grad in zip(totals, grads):
            if grad is not None:
                total += torch.sign(grad)
    return int(sum(t.abs().sum() for t in totals))


@pytest.fixture(scope="module", params=CASES, ids=["imagenet16-120", "cifar10"])
def case(request):
    arch, dataset = request.param
    x, y = canonical_batch(dataset, 12, 0)
    torch.manual_seed(0)
    model = SPACE.build(SPACE.arch(SPACE.index(arch)), num_classes=SPACE.num_classes(dataset))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        reference = definition(model, x, y)
    return model, x, y, reference


def test_the_loop_engine_is_the_definition(case):
    model, x, y, reference = case
    assert reference > 0
    assert gradsign.score(model, x, y, engine="loop") == pytest.approx(reference, rel=1e-6)


def test_the_default_engine_equals_the_definition(case):
    """The auto engine (batched per-sample gradients, falling back to the loop when samples interact)
    gives the definition's value up to float noise in the signs of tiny gradients."""
    model, x, y, reference = case
    assert gradsign.score(model, x, y, engine="auto") == pytest.approx(reference, rel=1e-4)
