"""The one interface every network implements, so that training, export and CAM never look inside one.

`forward_features(x)` returns the last spatial maps [B, C, h, w]; `forward_head(f)` turns them into
logits. `cam_weights()` returns W with shape [K, C, h', w'] (h', w' either 1 or h, w) such that the class
activation map of class k is  sum_c W[k, c] * f[c]  (the formula is `serving.cam_maths.raw_cam`, shared with the
server); a network whose head is not linear in its feature maps raises CamUnsupported with the reason
(`cam_unsupported_reason`), which the export records and the server passes on to the client.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from serving.cam_maths import raw_cam


class CamUnsupported(Exception):
    """The network's logits are not a linear function of its feature maps, so CAM is undefined."""


class ImageClassifier(nn.Module):
    """Base class: holds the input contract and normalisation (kept in the graph, so exported models
    take pixels scaled to [0, 1] and any runtime, Triton included, serves them correctly)."""

    def __init__(self, in_channels: int, num_classes: int, input_size: int | Sequence[int],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        # An int means a square input, as torchvision and timm accept.
        size = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.input_size = (int(size[0]), int(size[1]))
        mean = list(mean) if mean is not None else [0.5] * in_channels
        std = list(std) if std is not None else [0.5] * in_channels
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError("mean and std need one value per input channel")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    # Why a non-GAP head has no CAM; subclasses with a classic head say it in their own words.
    cam_unsupported_reason = "the head is not a linear map of the feature maps, so CAM is undefined"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Default: a `features` stack over the normalised input."""
        return self.features(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def cam_weights(self) -> torch.Tensor:
        """Default: a GapHead has CAM weights, any other head has none."""
        head = getattr(self, "head", None)
        if isinstance(head, GapHead):
            return head.cam_weights()
        raise CamUnsupported(f"{type(self).__name__}: {self.cam_unsupported_reason}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class GapHead(nn.Module):
    """Global average pooling, optional dropout, one linear layer: the head CAM needs."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(f.mean(dim=(2, 3))))

    def cam_weights(self) -> torch.Tensor:
        return self.fc.weight.detach()[:, :, None, None]


def compute_cam(features: torch.Tensor, weights: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Raw CAM [B, h, w] of classes[b] for each image (before upsampling and normalisation): the server's
    formula on torch tensors, for tests and checks that compare against PyTorch."""
    return torch.from_numpy(raw_cam(*(t.detach().cpu().numpy() for t in (features, weights, classes))))


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, batch_norm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def he_init(model: nn.Module, linear_std: float | None = None) -> None:
    """torchvision's initialisation of these CNNs: Kaiming-normal convolutions (fan_out, ReLU), unit BN scale,
    zero biases; with linear_std, linear layers from N(0, linear_std) too."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
