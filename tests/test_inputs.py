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


class ImageAndMask(nn.Module):
    """A convolution over an image whose output is averaged over the positions a per-sample mask keeps."""

    def __init__(self):
        super().__init__()
        self.conv, self.head, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3), nn.ReLU()

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        kept = pixel_mask[:, None].to(pixel_values.dtype)
        return self.head((self.relu(self.conv(pixel_values)) * kept).sum((2, 3)) / kept.sum((2, 3)))


def image_and_mask(samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(samples, 3, 5, 5, generator=generator)
    mask = torch.rand(samples, 5, 5, generator=generator) > 0.3
    return pixels, mask, torch.randint(0, 3, (samples,), generator=generator)


def test_floating_and_integer_inputs_together_score_each_sample_with_its_own_rows(caplog):
    torch.manual_seed(0)
    model = ImageAndMask().double()
    pixels, mask, y = image_and_mask(6)
    pixels = pixels.double()
    with caplog.at_level("WARNING", logger="gradsign"):
        score = gradsign.score(model, {"pixel_values": pixels, "pixel_mask": mask}, y)
    assert caplog.text == ""
    calls = [((), {"pixel_values": pixels[i:i + 1], "pixel_mask": mask[i:i + 1]}) for i in range(6)]
    assert score == plain_gradsign_of_calls(model, calls, y)
    assert score != gradsign.score(model, {"pixel_values": pixels, "pixel_mask": ~mask}, y)  # the mask arrived
    assert score == gradsign.score(model, {"pixel_values": pixels, "pixel_mask": mask}, y, engine="loop")


def test_floating_inputs_beside_integer_ones_reach_a_float64_model_in_float64():
    # the exactness check runs a float32 model in float64; its float inputs must follow it there, as a lone
    # float input does, or the check could only fall back
    from gradsign.api import _OutputAdapter, _as_rows
    from gradsign.engine import _float64_mismatch, scoring_mode

    torch.manual_seed(0)
    model = ImageAndMask()
    pixels, mask, y = image_and_mask(6)
    rows, layout = _as_rows({"pixel_values": pixels, "pixel_mask": mask})
    assert not rows.is_floating_point()  # the pixels travel as bit patterns in the integer rows
    adapter = scoring_mode(_OutputAdapter(model, lambda out: out, layout))
    assert _float64_mismatch(adapter, rows, y, torch.nn.functional.cross_entropy, 1) is None
    assert gradsign.score(model.double(), {"pixel_values": pixels, "pixel_mask": mask}, y) == \
        gradsign.score(model, {"pixel_values": pixels.double(), "pixel_mask": mask}, y)


def test_every_proxy_scores_floating_and_integer_inputs_or_refuses_them_plainly():
    torch.manual_seed(0)
    model = ImageAndMask()
    pixels, mask, y = image_and_mask(6)
    before = copy.deepcopy(model.state_dict())
    refused = {}
    for proxy in gradsign.available_proxies():
        try:
            value = gradsign.score(model, {"pixel_values": pixels, "pixel_mask": mask}, y, proxy=proxy)
        except ValueError as error:
            refused[proxy] = str(error)
            continue
        assert value == value  # not NaN
    # zen and synflow feed the model inputs of their own, jacob_cov differentiates by the inputs
    assert set(refused) == {"zen", "synflow", "jacob_cov"}
    assert "partly integer (pixel_mask)" in refused["zen"] and "\n" not in refused["zen"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("inputs, message", [
    ((torch.randn(6, 3, 5, 5), torch.randn(5, 5)), r"input 1 has 5 rows and input 0 has 6: every input tensor"),
    ((torch.randn(6, 3, 5, 5), torch.randn(6, 5, dtype=torch.float64)), r"floating inputs of different dtypes"),
    ((2.0,), r"inputs hold no tensor"),
    ((torch.randn(6, 3, 5, 5), {"features": torch.randn(6, 5)}), r"input 1 holds tensors inside a container"),
    ((torch.randn(6, 5, dtype=torch.complex64),), r"complex inputs \(0\)"),
    ("pixels", r"inputs must be a tensor, a dict of keyword inputs or a tuple of positional ones, not str")],
    ids=["rows", "mixed dtypes", "no tensor", "nested", "complex", "a string"])
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
