"""Residual networks (He, Zhang, Ren and Sun, 2016, "Deep Residual Learning for Image Recognition").

`ResNet` is the ImageNet family (torchvision layout, stride on the 3x3 convolution of the bottleneck, i.e.
"ResNet v1.5"): ResNet-18/34 from BasicBlock, ResNet-50/101/152 from Bottleneck; 11,689,512 (ResNet-18) and
25,557,032 (ResNet-50) parameters at 224x224x3 and 1000 classes. For inputs under 64 pixels the 7x7 stride-2
stem and its max-pool would leave 1x1 maps, so the stem becomes one 3x3 stride-1 convolution with no pool
(the usual CIFAR adaptation); the four stages then give 4x4 maps at 28x28 and 32x32.

`CifarResNet` is the paper's Section 4.2 CIFAR-10 family: a 3x3 stem with 16 channels, three stages of n
BasicBlocks with 16/32/64 channels, depth 6n+2 (ResNet-20/32/44/56/110). Shortcut option 'A' (strided
identity with zero-padded channels, parameter-free, used in the paper for CIFAR) or 'B' (1x1 convolution
projection + BN when the shape changes); ResNet-20 has about 0.27M parameters either way.

Both end in global average pooling + one linear layer, so CAM is defined. Residual branches start at zero
(zero_init_residual=True, unlike torchvision's default), see `_init_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import GapHead, ImageClassifier, he_init
from .registry import register_model


def _norm(batch_norm: bool) -> Callable[[int], nn.Module]:
    return nn.BatchNorm2d if batch_norm else (lambda _channels: nn.Identity())


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)


def _conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, 0, bias=bias)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and an identity (or projected) shortcut."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None,
                 batch_norm: bool = True):
        super().__init__()
        norm, bias = _norm(batch_norm), not batch_norm
        self.conv1 = _conv3x3(cin, planes, stride, bias)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, 1, bias)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4: cheaper than two 3x3 at the same depth."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None,
                 batch_norm: bool = True):
        super().__init__()
        norm, bias = _norm(batch_norm), not batch_norm
        self.conv1 = _conv1x1(cin, planes, 1, bias)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride, bias)
        self.bn2 = norm(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion, 1, bias)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


Block = type[BasicBlock] | type[Bottleneck]


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by striding and append zero channels, so the shortcut adds no parameters."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Strided slicing matches the 3x3 stride-s padding-1 conv's output size, ceil(n / s), for odd n too.
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))


def _projection(cin: int, cout: int, stride: int, batch_norm: bool) -> nn.Sequential:
    """Option B: a 1x1 convolution projection (+ BN) where the shape changes."""
    return nn.Sequential(_conv1x1(cin, cout, stride, not batch_norm), _norm(batch_norm)(cout))


Shortcut = Callable[[int, int, int], nn.Module]  # (in channels, out channels, stride) -> the shortcut branch


def _make_layer(block: Block, cin: int, planes: int, blocks: int, stride: int, shortcut: Shortcut,
                batch_norm: bool) -> tuple[nn.Sequential, int]:
    """One stage, for every ResNet here: `blocks` blocks of `planes` channels, the first carrying the stride and,
    where the shape changes, the `shortcut`; and the stage's output channels."""
    cout = planes * block.expansion
    layers = []
    for j in range(blocks):
        s = stride if j == 0 else 1
        layers.append(block(cin, planes, s, shortcut(cin, cout, s) if (s != 1 or cin != cout) else None, batch_norm))
        cin = cout
    return nn.Sequential(*layers), cout


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    he_init(model)
    if zero_init_residual:
        # Zero the last BN scale of each residual branch so every block starts as the identity (Goyal et al.,
        # 2017, "Accurate, Large Minibatch SGD"). Besides easing optimisation, this keeps an untrained deep
        # network tame in eval mode: with unit BN statistics the summed Kaiming-initialised branches grow
        # the features to ~4e3 (ResNet-56) and ~4e8 (ResNet-110), beyond any absolute ONNX parity tolerance.
        for m in model.modules():
            last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
            if isinstance(last, nn.BatchNorm2d):
                nn.init.zeros_(last.weight)


class ResNet(ImageClassifier):
    def __init__(self, block: Block, layers: Sequence[int], in_channels: int = 3, num_classes: int = 1000,
                 input_size: int | Sequence[int] = (224, 224), batch_norm: bool = True, dropout: float = 0.0,
                 zero_init_residual: bool = True, small_stem: bool | None = None, **norm):
        super().__init__(in_channels, num_classes, input_size, **norm)
        if small_stem is None:
            small_stem = min(self.input_size) < 64
        self.small_stem = small_stem
        bias = not batch_norm
        if small_stem:
            stem: list[nn.Module] = [_conv3x3(in_channels, 64, 1, bias)]
        else:
            stem = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=bias)]
        stem += [_norm(batch_norm)(64), nn.ReLU(inplace=True)]
        if not small_stem:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)

        cin, stages = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stage, cin = _make_layer(block, cin, planes, n, 1 if i == 0 else 2, partial(_projection, batch_norm=batch_norm),
                                     batch_norm)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = GapHead(cin, num_classes, dropout)
        _init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CifarResNet(ImageClassifier):
    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
                 input_size: int | Sequence[int] = (32, 32), shortcut: str = "B", widths: Sequence[int] = (16, 32, 64),
                 batch_norm: bool = True, dropout: float = 0.0, zero_init_residual: bool = True, **norm):
        super().__init__(in_channels, num_classes, input_size, **norm)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"unknown shortcut option {shortcut!r}; use 'A' or 'B'")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(in_channels, widths[0], 1, not batch_norm), _norm(batch_norm)(widths[0]),
                                  nn.ReLU(inplace=True))
        project = ZeroPadShortcut if shortcut == "A" else partial(_projection, batch_norm=batch_norm)
        cin, stages = widths[0], []
        for i, planes in enumerate(widths):
            stage, cin = _make_layer(BasicBlock, cin, planes, n, 1 if i == 0 else 2, project, batch_norm)
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.head = GapHead(cin, num_classes, dropout)
        _init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(self.normalize(x)))


@register_model("resnet18", family="resnet")
def resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


@register_model("resnet34", family="resnet")
def resnet34(**kw) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kw)


@register_model("resnet50", family="resnet")
def resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


@register_model("resnet101", family="resnet")
def resnet101(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), **kw)


@register_model("resnet152", family="resnet")
def resnet152(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), **kw)


@register_model("resnet20", family="resnet_cifar")
def resnet20(**kw) -> CifarResNet:
    return CifarResNet(20, **kw)


@register_model("resnet32", family="resnet_cifar")
def resnet32(**kw) -> CifarResNet:
    return CifarResNet(32, **kw)


@register_model("resnet44", family="resnet_cifar")
def resnet44(**kw) -> CifarResNet:
    return CifarResNet(44, **kw)


@register_model("resnet56", family="resnet_cifar")
def resnet56(**kw) -> CifarResNet:
    return CifarResNet(56, **kw)


@register_model("resnet110", family="resnet_cifar")
def resnet110(**kw) -> CifarResNet:
    return CifarResNet(110, **kw)
