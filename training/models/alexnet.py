"""AlexNet (Krizhevsky, Sutskever and Hinton, 2012, "ImageNet Classification with Deep Convolutional Neural
Networks"), in torchvision's single-tower form (64/192/384/256/256 channels, no local response norm):
61,100,840 parameters at 224x224x3 and 1000 classes.

Small inputs (min(H, W) < 64, e.g. 28x28 Fashion-MNIST or 32x32 CIFAR) cannot survive the 11x11 stride-4
stem and three stride-2 pools, so the stem becomes a 3x3 stride-1 convolution and the pools keep the paper's
overlapping 3x3 stride-2 window with padding 1; the maps are 7x7 (28) or 8x8 (32) after conv5 and 4x4 after
the last pool, and the fully connected layers are sized for that. torchvision's adaptive average pool to 6x6
is kept only where the maps are a multiple of 6 (identity at 224): ONNX cannot export non-integer adaptive
windows, and the input size is fixed at construction anyway. fc_width (4096 in the paper) sets the size of
fc6/fc7, which hold most of the parameters (33.6M of 35.9M at 28x28x1 with the default).

head='gap' is the CAM variant of Zhou et al., 2016 ("Learning Deep Features for Discriminative
Localization"): everything after conv5 is removed, a 3x3 convolution with 1024 channels is added, then
global average pooling and one linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ._shapes import conv_out
from .base import GapHead, ImageClassifier
from .registry import register_model


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, padding, bias=not batch_norm)]
    return layers + ([nn.BatchNorm2d(cout)] if batch_norm else []) + [nn.ReLU(inplace=True)]


class AlexNet(ImageClassifier):
    cam_unsupported_reason = ("with the classic head, fc6/fc7 with ReLU between them are nonlinear in the conv5 maps, "
                           "so CAM is undefined; use alexnet_gap")

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, input_size: int | Sequence[int] = (224, 224),
                 head: str = "classic", dropout: float | None = None, batch_norm: bool = False, fc_width: int = 4096,
                 gap_channels: int = 1024, **norm):
        super().__init__(in_channels, num_classes, input_size, **norm)
        if head not in ("classic", "gap"):
            raise ValueError(f"unknown head {head!r}; use 'classic' or 'gap'")
        self.small_input = min(self.input_size) < 64
        bn = batch_norm
        if dropout is None:
            # The paper's 0.5 before fc6/fc7; the GAP head has no large FC layers to regularise.
            dropout = 0.5 if head == "classic" else 0.0
        # (kernel, stride, padding) of the stem, conv2 and the max-pools.
        if self.small_input:
            stem, conv2, pool = (3, 1, 1), (3, 1, 1), (3, 2, 1)
        else:
            stem, conv2, pool = (11, 4, 2), (5, 1, 2), (3, 2, 0)
        self.features = nn.Sequential(
            *_conv(in_channels, 64, *stem, bn), nn.MaxPool2d(*pool),
            *_conv(64, 192, *conv2, bn), nn.MaxPool2d(*pool),
            *_conv(192, 384, 3, 1, 1, bn),
            *_conv(384, 256, 3, 1, 1, bn),
            *_conv(256, 256, 3, 1, 1, bn),
        )
        # conv2..conv5 preserve the size, so only the stem and the two pools change it.
        h, w = (conv_out(conv_out(conv_out(n, *stem), *pool), *pool) for n in self.input_size)
        if min(h, w) < 1:
            raise ValueError(f"input {self.input_size} is too small for AlexNet")

        if head == "gap":
            if gap_channels > 0:
                self.features.extend(_conv(256, gap_channels, 3, 1, 1, bn))
            self.head: nn.Module = GapHead(gap_channels or 256, num_classes, dropout)
            return
        h, w = conv_out(h, *pool), conv_out(w, *pool)
        pooling: list[nn.Module] = [nn.MaxPool2d(*pool)]
        if h % 6 == 0 and w % 6 == 0:
            # A plain average pool here (see the module docstring), so it exports to ONNX.
            pooling.append(nn.AdaptiveAvgPool2d((6, 6)))
            h = w = 6
        self.head = nn.Sequential(
            *pooling, nn.Flatten(1),
            nn.Dropout(dropout), nn.Linear(256 * h * w, fc_width), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True),
            nn.Linear(fc_width, num_classes),
        )


@register_model("alexnet_gap", family="alexnet", head="gap")
@register_model("alexnet", family="alexnet")
def alexnet(**kw) -> AlexNet:
    return AlexNet(**kw)
