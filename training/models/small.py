"""The small Fashion-MNIST network: four 3x3 convolutions with batch norm, two max-pools, GAP and one
linear layer; about 94k parameters at 28x28x1 and 10 classes."""

from __future__ import annotations

from torch import nn

from .base import GapHead, ImageClassifier, conv_bn_relu
from .registry import register_model


class SmallNet(ImageClassifier):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size=(28, 28),
                 widths=(32, 64, 64, 64), dropout: float = 0.1, batch_norm: bool = True, **norm):
        super().__init__(in_channels, num_classes, input_size, **norm)
        c1, c2, c3, c4 = widths
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, c1, batch_norm=batch_norm),
            nn.MaxPool2d(2),
            conv_bn_relu(c1, c2, batch_norm=batch_norm),
            conv_bn_relu(c2, c3, batch_norm=batch_norm),
            nn.MaxPool2d(2),
            conv_bn_relu(c3, c4, batch_norm=batch_norm),
        )
        self.head = GapHead(c4, num_classes, dropout)


@register_model("small_fmnist", family="small")
def small_fmnist(**kw) -> SmallNet:
    return SmallNet(**kw)
