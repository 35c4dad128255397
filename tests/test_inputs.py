"""Models that take several inputs per sample: a dict of keyword inputs (a tokenizer's ``input_ids`` and
``attention_mask``) or a tuple of positional ones, scored as one batch whose rows are the samples."""
import copy

import pytest
import torch
from torch import nn

import gradsign
from test_engine import plain_gradsign_of_calls  # the per-sample definition, written independently of gradsign


def padded_tokens(samples: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask of 1s then 0s (padding), each sample of its own length."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (samples, length), generator=generator)
    lengths = torch.randint(2, length + 1, (samples,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids * mask, mask


def test_a_dict_of_token_ids_and_attention_mask_scores_each_sample_with_its_own_mask(caplog):
    zoo = pytest.importorskip("gradsign.zoo")
    pytest.importorskip("transformers")
    model = zoo.build("bert", "tiny", seed=0).double()
    ids, mask = padded_tokens(6, 8, 64)
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))
    with caplog.at_level("WARNING", logger="gradsign"):
        score = gradsign.score(model, {"input_ids": ids, "attention_mask": mask}, y)
    assert caplog.text == ""  # no fallback
    calls = [((), {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]}) for i in range(6)]
    assert score == plain_gradsign_of_calls(model, calls, y, output=lambda out: out.logits)
    # the mask reached the model: without it the padding is attended to
    assert score != gradsign.score(model, ids, y)
    assert score == gradsign.score(model, {"input_ids": ids, "attention_mask": mask}, y, engine="loop")


class ImageAndFeatures(nn.Module):
    """A convolution over an image and a Linear over a feature vector, joined before the head."""

    def __init__(self):
        super().__init__()
        self.conv, self.features, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(5, 4), nn.Linear(8, 3)
        self.relu = nn.ReLU()  # a module, which naswot reads its codes from

    def forward(self, image: torch.Tensor, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        pooled = self.relu(self.conv(image)).mean((2, 3))
        return self.head(torch.cat([pooled, self.relu(self.features(features)) * scale], 1))


def test_a_tuple_of_positional_inputs_with_a_constant_scores_as_each_sample_alone(caplog):
    torch.manual_seed(0)
    model = ImageAndFeatures().double()
    image, features, y = torch.randn(6, 3, 5, 5).double(), torch.randn(6, 5).double(), torch.randint(0, 3, (6,))
    with caplog.at_level("WARNING", logger="gradsign"):
        score = gradsign.score(model, (image, features, 2.0), y)
    assert caplog.text == ""
    calls = [((image[i:i + 1], features[i:i + 1], 2.0), {}) for i in range(6)]
    assert score == plain_gradsign_of_calls(model, calls, y)
    assert score != gradsign.score(model, (image, features, 0.0), y)  # the constant reached the model


def test_every_proxy_takes_several_floating_inputs():
    torch.manual_seed(0)
    model = ImageAndFeatures()
    inputs, y = (torch.randn(6, 3, 5, 5), torch.randn(6, 5)), torch.randint(0, 3, (6,))
    before = copy.deepcopy(model.state_dict())
    results = gradsign.scores(model, inputs, y, proxies=gradsign.available_proxies())
    assert set(results) == set(gradsign.available_proxies())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("inputs, message", [
    ((torch.randn(6, 3, 5, 5), torch.randn(5, 5)), r"input 1 has 5 rows and input 0 has 6: every input tensor"),
    ({"image": torch.randn(6, 3, 5, 5), "ids": torch.zeros(6, 5, dtype=torch.long)},
     r"inputs mix floating and integer tensors \(image: torch.float32, ids: torch.int64\)"),
    ((torch.randn(6, 3, 5, 5), torch.randn(6, 5, dtype=torch.float64)), r"floating inputs of different dtypes"),
    ((2.0,), r"inputs hold no tensor"),
    ((torch.randn(6, 3, 5, 5), {"features": torch.randn(6, 5)}), r"input 1 holds tensors inside a container"),
    ((torch.randn(6, 5, dtype=torch.complex64),), r"complex inputs \(0\)"),
    ("pixels", r"inputs must be a tensor, a dict of keyword inputs or a tuple of positional ones, not str")],
    ids=["rows", "mixed kinds", "mixed dtypes", "no tensor", "nested", "complex", "a string"])
def test_inputs_that_cannot_be_rows_of_samples_are_refused_plainly(inputs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        gradsign.score(ImageAndFeatures(), inputs, torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("proxy", ["zen", "synflow"])
def test_a_proxy_that_draws_floating_inputs_refuses_integer_inputs(proxy):
    # such a proxy's Gaussian or all-ones inputs cannot stand for token ids: cast to integers they would
    # be other tokens, silently
    zoo = pytest.importorskip("gradsign.zoo")
    pytest.importorskip("transformers")
    model = zoo.build("bert", "tiny", seed=0)
    ids, mask = padded_tokens(4, 8, 64)
    with pytest.raises(ValueError, match=f"gets torch.float(32|64) inputs where its inputs are integer "
                                         r"\(input_ids, attention_mask\)"):
        gradsign.score(model, {"input_ids": ids, "attention_mask": mask}, torch.zeros(4, dtype=torch.long),
                       proxy=proxy)
