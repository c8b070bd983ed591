"""The linear classifier (perceptron) and the multi-layer perceptron.

Linear: y = u(W^T x + b) over the normalised pixels, with u the sigmoid for one binary output or the
softmax over K logits (Rosenblatt, 1958, "The Perceptron: A Probabilistic Model for Information Storage and
Organization in the Brain"). MLP: fully connected hidden layers trained by back-propagation (Rumelhart,
Hinton and Williams, 1986, "Learning representations by back-propagating errors").

Both treat the normalised image itself as the "feature map", so for a linear model the class activation map
is the per-pixel contribution W[k] * x, whose sum plus the bias is exactly logit k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import CamUnsupported, ImageClassifier
from .registry import register_model

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _num_outputs(num_classes: int, binary: bool) -> int:
    if not binary:
        return num_classes
    if num_classes != 2:
        raise ValueError(f"binary=True needs num_classes == 2, got {num_classes}")
    # One logit whose sigmoid is P(class 1): the classic single-unit perceptron.
    return 1


class LinearClassifier(ImageClassifier):
    """Flatten + one Linear layer over C*H*W normalised pixels (family `linear`)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int | Sequence[int] = (28, 28),
                 binary: bool = False, **norm):
        super().__init__(in_channels, num_classes, input_size, **norm)
        self.binary = binary
        h, w = self.input_size
        self.fc = nn.Linear(in_channels * h * w, _num_outputs(num_classes, binary))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(features, 1))

    def cam_weights(self) -> torch.Tensor:
        h, w = self.input_size
        return self.fc.weight.detach().view(-1, self.in_channels, h, w)


class MLP(ImageClassifier):
    """Flatten + hidden fully connected layers + a linear output layer (family `mlp`).

    With `hidden=()` it is the linear classifier and keeps its CAM.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int | Sequence[int] = (28, 28),
                 hidden: Sequence[int] = (256, 128), activation: str = "relu", dropout: float = 0.0,
                 binary: bool = False, **norm):
        super().__init__(in_channels, num_classes, input_size, **norm)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(_ACTIVATIONS)}")
        self.binary = binary
        self.hidden = tuple(int(n) for n in hidden)
        h, w = self.input_size
        width = in_channels * h * w
        layers: list[nn.Module] = []
        for n in self.hidden:
            layers += [nn.Linear(width, n), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = n
        self.hidden_layers = nn.Sequential(*layers)
        self.fc = nn.Linear(width, _num_outputs(num_classes, binary))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden_layers(torch.flatten(features, 1)))

    def cam_weights(self) -> torch.Tensor:
        if self.hidden:
            raise CamUnsupported(f"MLP with hidden layers {list(self.hidden)}: the hidden layers are nonlinear, "
                                 "so the logits are not a linear map of the pixels and CAM is undefined")
        h, w = self.input_size
        return self.fc.weight.detach().view(-1, self.in_channels, h, w)


@register_model("linear", family="linear")
def linear(**kw) -> LinearClassifier:
    return LinearClassifier(**kw)


@register_model("mlp", family="mlp")
def mlp(**kw) -> MLP:
    return MLP(**kw)
