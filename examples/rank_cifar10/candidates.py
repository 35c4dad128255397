"""Candidate models for the ``gradsign rank`` example: small CNNs of growing width and depth, and a
``transformers`` ResNet given by its configuration.

``candidates(num_classes)`` returns ``{name: builder or configuration}``; gradsign builds each one right after
``torch.manual_seed(seed)``, so every candidate's weights depend on the seed alone.
"""
from __future__ import annotations

from torch import nn


def conv_net(widths: list[int], convs_per_stage: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Stages of ``convs_per_stage`` 3x3 conv-BN-ReLU blocks, each stage but the last followed by a 2x2
    max-pool; then global average pooling and a linear classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for stage, width in enumerate(widths):
        for _ in range(convs_per_stage):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        if stage < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def candidates(num_classes: int) -> dict:
    from transformers import ResNetConfig

    return {
        "tiny-cnn": lambda: conv_net([8], num_classes=num_classes),
        "cnn-16-32": lambda: conv_net([16, 32], num_classes=num_classes),
        "cnn-32-64-128": lambda: conv_net([32, 64, 128], num_classes=num_classes),
        "cnn-32-64-128-x2": lambda: conv_net([32, 64, 128], convs_per_stage=2, num_classes=num_classes),
        "cnn-64-128-256": lambda: conv_net([64, 128, 256], num_classes=num_classes),
        # a configuration: gradsign sets num_labels and builds AutoModelForImageClassification from it
        "hf-resnet-basic": ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                                        layer_type="basic"),
    }
