"""A zoo of small random-weight models written outside this project, to test and time per-sample engines.

Each entry is a named builder (``build(name, size, seed)``) and a matching batch (``example_batch``):

- families from Hugging Face ``transformers``, built from their config classes with random weights and no
  download (``pip install "gradsign[zoo]"``): ResNet, ConvNeXt (with drop-path), ViT, MobileNetV2,
  EfficientNet, RegNetX, Swin (window partition folds windows into the batch dimension, drop-path),
  MobileViT (patch unfolding folds patches into the batch dimension) and a BERT sequence classifier (integer
  token ids, dropout);
- plain-torch models that break naive per-sample engines: ``nn.TransformerEncoderLayer`` with and without
  ``batch_first`` (``MultiheadAttention`` uses ``out_proj.weight`` without calling ``out_proj``); two Linear
  layers sharing one weight; an Embedding tied with the output Linear; a weight used by ``F.linear`` outside
  its layer; ``MultiheadAttention(dropout=0.1)`` with ``nn.Dropout``; and the narrow 16-block residual CNN
  (16/32/64 channels, BatchNorm, 32x32 inputs).

Two sizes: ``"tiny"`` (unit tests: a few hundred to a few hundred thousand weights, 16x16 to 64x64 images, 8
tokens) and ``"bench"`` (CPU-sized timing: 64x64 images for the ImageNet-style families, 32x32 for the
residual CNN, 64 tokens). Families that reduce their input 32-fold get 64x64 images even when tiny: at 32x32
their last BatchNorm would see 1x1 maps, where one sample has no statistics and GradSign is undefined.
Every builder draws its weights under ``torch.random.fork_rng`` seeded with ``seed``, so the caller's RNG
state is untouched and a (name, size, seed) triple always gives the same model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SIZES = ("tiny", "bench")


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry. ``inputs`` is ``"image"`` (float (N, 3, S, S)), ``"tokens"`` (int64 (N, L) ids below
    ``vocab``) or ``"sequence"`` (float (N, L, width)); ``shape`` maps a size to the per-sample input shape."""

    name: str
    description: str
    library: str  # "transformers" or "torch"
    inputs: str
    num_classes: int
    shape: dict[str, tuple[int, ...]]
    builder: Callable[[str], nn.Module] = field(repr=False)
    vocab: int = 0


# ----------------------------------------------------------------------------------------------------------
# transformers families (imported lazily: an optional dependency)


def _transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('zoo models from transformers need it: pip install "gradsign[zoo]"') from error
    return transformers


def _resnet(size: str) -> nn.Module:
    t = _transformers()
    tiny = size == "tiny"
    config = t.ResNetConfig(embedding_size=16 if tiny else 32, hidden_sizes=[16, 32] if tiny else [32, 64, 128, 256],
                            depths=[1, 1] if tiny else [2, 2, 2, 2], layer_type="basic", num_labels=10)
    return t.ResNetForImageClassification(config)


def _convnext(size: str) -> nn.Module:
    t = _transformers()
    tiny = size == "tiny"
    config = t.ConvNextConfig(num_stages=2 if tiny else 4, hidden_sizes=[16, 32] if tiny else [32, 64, 128, 256],
                              depths=[1, 1] if tiny else [2, 2, 2, 2], patch_size=2 if tiny else 4,
                              drop_path_rate=0.1, num_labels=10)
    return t.ConvNextForImageClassification(config)


def _vit(size: str) -> nn.Module:
    t = _transformers()
    tiny = size == "tiny"
    config = t.ViTConfig(image_size=32 if tiny else 64, patch_size=8, hidden_size=32 if tiny else 128,
                         num_hidden_layers=2 if tiny else 4, num_attention_heads=2 if tiny else 4,
                         intermediate_size=64 if tiny else 256, hidden_dropout_prob=0.1,
                         attention_probs_dropout_prob=0.1, num_labels=10)
    return t.ViTForImageClassification(config)


def _mobilenet_v2(size: str) -> nn.Module:
    t = _transformers()
    config = t.MobileNetV2Config(image_size=64,
                                 depth_multiplier=0.35 if size == "tiny" else 0.5, finegrained_output=False,
                                 num_labels=10)
    return t.MobileNetV2ForImageClassification(config)


def _efficientnet(size: str) -> nn.Module:
    t = _transformers()
    tiny = size == "tiny"
    # B0's block layout; the tiny size shrinks widths and repeats (x0.25); hidden_dim must equal the head
    # convolution's width, round_filters(1280)
    config = t.EfficientNetConfig(image_size=64, width_coefficient=0.25 if tiny else 1.0,
                                  depth_coefficient=0.25 if tiny else 1.0, hidden_dim=320 if tiny else 1280,
                                  dropout_rate=0.2, drop_connect_rate=0.2, num_labels=10)
    model = t.EfficientNetForImageClassification(config)
    # transformers draws EfficientNet's BatchNorm scales from N(0, 0.02^2) like its conv weights: activations
    # then shrink about 50-fold per block and underflow float32 in a deep model (|x| ~ 1e-34 at the tiny
    # size), so GradSign would count rounding noise. BatchNorm's standard initialisation (scale 1) instead.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    return model


def _regnet(size: str) -> nn.Module:
    t = _transformers()
    tiny = size == "tiny"
    # RegNetX-style (no squeeze-excitation); the bench size has RegNetX-400MF's widths and depths
    config = t.RegNetConfig(embedding_size=16 if tiny else 32, hidden_sizes=[16, 32] if tiny else [32, 64, 160, 384],
                            depths=[1, 1] if tiny else [1, 2, 7, 12], groups_width=8 if tiny else 16,
                            layer_type="x", num_labels=10)
    return t.RegNetForImageClassification(config)


def _swin(size: str) -> nn.Module:
    t = _transformers()
    tiny = size == "tiny"
    config = t.SwinConfig(image_size=32 if tiny else 64, patch_size=2 if tiny else 4, embed_dim=16 if tiny else 48,
                          depths=[2, 2] if tiny else [2, 2, 2], num_heads=[1, 2] if tiny else [2, 4, 8],
                          window_size=4, drop_path_rate=0.1, hidden_dropout_prob=0.1,
                          attention_probs_dropout_prob=0.1, num_labels=10)
    return t.SwinForImageClassification(config)


def _mobilevit(size: str) -> nn.Module:
    t = _transformers()
    tiny = size == "tiny"
    config = t.MobileViTConfig(image_size=64,
                               hidden_sizes=[16, 24, 32] if tiny else [64, 80, 96],
                               neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64] if tiny else [16, 16, 24, 48, 64, 80, 320],
                               num_attention_heads=2, num_labels=10)
    return t.MobileViTForImageClassification(config)


def _bert(size: str) -> nn.Module:
    t = _transformers()
    tiny = size == "tiny"
    config = t.BertConfig(vocab_size=64 if tiny else 1000, hidden_size=32 if tiny else 128,
                          num_hidden_layers=2 if tiny else 4, num_attention_heads=2 if tiny else 4,
                          intermediate_size=64 if tiny else 512, max_position_embeddings=64,
                          hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=3)
    return t.BertForSequenceClassification(config)


# ----------------------------------------------------------------------------------------------------------
# plain-torch models


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoderLayer`` (dropout 0), a Linear applied to every token embedding, logits averaged
    over tokens. With ``batch_first=False`` the layers see (tokens, samples, width): inputs stay (N, L, width)."""

    def __init__(self, width: int, heads: int, num_classes: int, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.encoder = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                                  batch_first=batch_first)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        logits = self.head(self.encoder(x))
        return logits.mean(1 if self.batch_first else 0)


class TiedLinear(nn.Module):
    """Two Linear layers sharing one weight Parameter (``fc2.weight is fc1.weight``), then a Linear head."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.fc2.weight = self.fc1.weight
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TiedEmbedding(nn.Module):
    """Token embedding whose weight is also the output Linear's (a language-model head over the vocabulary):
    mean of the token embeddings, a Linear+tanh, then logits over the vocabulary."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.decoder = nn.Linear(width, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.mix(self.embed(tokens).mean(1))))


class FunctionalReuse(nn.Module):
    """A Linear layer called as a module once and whose weight is used again by ``F.linear`` outside it."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        return self.head(torch.tanh(F.linear(h, self.fc.weight)))


class AttentionDropout(nn.Module):
    """``nn.MultiheadAttention(dropout=0.1)`` (attention dropout inside the functional call), ``nn.Dropout``,
    mean over tokens, Linear head."""

    def __init__(self, width: int, heads: int, num_classes: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, dropout=0.1, batch_first=True)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attention(x, x, x, need_weights=False)
        return self.head(self.dropout(h + x).mean(1))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (projected) input, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def narrow_residual_cnn(blocks: int = 16, width: int = 16, num_classes: int = 10) -> nn.Module:
    """A CIFAR-style residual CNN: conv3x3-BN-ReLU stem, ``blocks`` basic blocks split over three stages of
    ``width``, 2x and 4x channels (stride 2 into stages 2 and 3), global average pool, Linear."""
    per_stage = [blocks // 3 + (1 if i < blocks % 3 else 0) for i in range(3)]
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, count in enumerate(per_stage):
        cout = width * 2 ** stage
        for b in range(count):
            layers.append(BasicBlock(cin, cout, 2 if (b == 0 and stage > 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def _width(size: str) -> int:
    return 16 if size == "tiny" else 256


def _image(tiny: int, bench: int) -> dict[str, tuple[int, ...]]:
    return {"tiny": (3, tiny, tiny), "bench": (3, bench, bench)}


_SEQUENCE = {"tiny": (8, 16), "bench": (64, 64)}

_ENTRIES = [
    ZooModel("resnet", "transformers ResNet, basic blocks, BatchNorm", "transformers", "image", 10,
             _image(32, 64), _resnet),
    ZooModel("convnext", "transformers ConvNeXt, LayerNorm, layer scale, drop-path 0.1", "transformers", "image",
             10, _image(32, 64), _convnext),
    ZooModel("vit", "transformers ViT, patch 8, dropout 0.1", "transformers", "image", 10, _image(32, 64), _vit),
    ZooModel("mobilenet_v2", "transformers MobileNetV2, depthwise convs, BatchNorm, TF padding", "transformers",
             "image", 10, _image(64, 64), _mobilenet_v2),
    ZooModel("efficientnet", "transformers EfficientNet (B0 layout), squeeze-excitation, drop-connect 0.2",
             "transformers", "image", 10, _image(64, 64), _efficientnet),
    ZooModel("regnet", "transformers RegNetX, grouped convs, BatchNorm", "transformers", "image", 10,
             _image(32, 64), _regnet),
    ZooModel("swin", "transformers Swin, windows folded into the batch dimension, drop-path 0.1",
             "transformers", "image", 10, _image(32, 64), _swin),
    ZooModel("mobilevit", "transformers MobileViT, patches folded into the batch dimension", "transformers",
             "image", 10, _image(64, 64), _mobilevit),
    ZooModel("bert", "transformers BERT sequence classifier, integer token ids, dropout 0.1", "transformers",
             "tokens", 3, {"tiny": (8,), "bench": (64,)}, _bert, vocab=64),  # ids below the tiny vocabulary
    ZooModel("encoder_batch_first", "nn.TransformerEncoderLayer(batch_first=True) + Linear on tokens", "torch",
             "sequence", 10, _SEQUENCE, lambda size: EncoderClassifier(_SEQUENCE[size][1], 2, 10, True)),
    ZooModel("encoder_seq_first", "nn.TransformerEncoderLayer(batch_first=False) + Linear on tokens", "torch",
             "sequence", 10, _SEQUENCE, lambda size: EncoderClassifier(_SEQUENCE[size][1], 2, 10, False)),
    ZooModel("tied_linear", "two Linear layers sharing one weight", "torch", "sequence", 10,
             {"tiny": (16,), "bench": (512,)}, lambda size: TiedLinear(16 if size == "tiny" else 512, 10)),
    ZooModel("tied_embedding", "Embedding tied with the output Linear (logits over the vocabulary)", "torch",
             "tokens", 64, {"tiny": (8,), "bench": (64,)}, lambda size: TiedEmbedding(64, _width(size)), vocab=64),
    ZooModel("functional_linear", "a Linear weight reused by F.linear outside its layer", "torch", "sequence",
             10, {"tiny": (16,), "bench": (512,)}, lambda size: FunctionalReuse(16 if size == "tiny" else 512, 10)),
    ZooModel("mha_dropout", "nn.MultiheadAttention(dropout=0.1) + nn.Dropout", "torch", "sequence", 10,
             _SEQUENCE, lambda size: AttentionDropout(_SEQUENCE[size][1], 2, 10)),
    ZooModel("resnet16_narrow", "16 basic blocks, 16/32/64 channels, BatchNorm", "torch", "image", 10,
             _image(16, 32), lambda size: narrow_residual_cnn(16, 16, 10)),
]
_ZOO = {entry.name: entry for entry in _ENTRIES}


def names(library: str | None = None) -> list[str]:
    """Names of the zoo models, in a fixed order; ``library="transformers"`` or ``"torch"`` selects one kind."""
    return [e.name for e in _ENTRIES if library is None or e.library == library]


def info(name: str) -> ZooModel:
    """The zoo entry ``name`` (ValueError for an unknown name)."""
    try:
        return _ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(_ZOO)}") from None


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; choose one of {', '.join(SIZES)}")


def build(name: str, size: str = "tiny", seed: int = 0) -> nn.Module:
    """Zoo model ``name`` at ``size`` with random weights drawn from seed ``seed`` (the global RNG state is
    restored afterwards), in train mode."""
    entry = info(name)
    _check_size(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.builder(size)
    return model.train()


def example_batch(name: str, batch_size: int, size: str = "tiny", seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch for zoo model ``name``: inputs (standard-normal floats, or token ids uniform below the
    vocabulary) and class targets uniform below ``num_classes``, drawn from seed ``seed`` on a private
    generator."""
    entry = info(name)
    _check_size(size)
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, *entry.shape[size])
    if entry.inputs == "tokens":
        inputs = torch.randint(0, entry.vocab, shape, generator=generator)
    else:
        inputs = torch.randn(shape, generator=generator)
    targets = torch.randint(0, entry.num_classes, (batch_size,), generator=generator)
    return inputs, targets
