"""LeNet-5 (LeCun, Bottou, Bengio and Haffner, 1998, "Gradient-Based Learning Applied to Document
Recognition"), in its common modern form: conv 6@5x5, 2x2 average pool, conv 16@5x5, 2x2 average pool,
FC 120, FC 84, FC K. This drops the paper's trainable subsampling coefficients, its sparse S2-C3 connection
table and RBF output layer, which is what gives the usual 61,706 parameters at 32x32x1 and 10 classes.

The paper's digits are 28x28 centred in a 32x32 field; for smaller inputs the first convolution is padded so
that 28x28 (Fashion-)MNIST maps to the same 5x5x16 maps as 32x32.

head='classic' keeps the fully connected layers (no CAM: tanh/ReLU between them); head='gap' replaces
them with global average pooling + one linear layer over the 16 conv maps (Zhou et al., 2016), for CAM.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ._shapes import conv_out
from .base import GapHead, ImageClassifier
from .registry import register_model

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


class LeNet5(ImageClassifier):
    cam_unsupported_reason = ("with the classic head, the fully connected layers F5/F6 are separated by nonlinearities, "
                           "so the logits are not linear in the conv maps; use head='gap' (lenet5_gap) for CAM")

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int | Sequence[int] = (32, 32),
                 activation: str = "tanh", head: str = "classic", batch_norm: bool = False,
                 dropout: float = 0.0, padding: int | None = None, **norm):
        super().__init__(in_channels, num_classes, input_size, **norm)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(_ACTIVATIONS)}")
        if head not in ("classic", "gap"):
            raise ValueError(f"unknown head {head!r}; use 'classic' or 'gap'")
        act = _ACTIVATIONS[activation]
        if padding is None:
            # Pad up to the 32x32 field the architecture was designed for (28 -> padding 2).
            padding = max(0, (32 - min(self.input_size) + 1) // 2)
        h, w = (conv_out(conv_out(conv_out(n, 5, 1, padding), 2, 2), 5) for n in self.input_size)
        if h < 2 or w < 2:
            raise ValueError(f"input {self.input_size} is too small for LeNet-5")

        def conv(cin: int, cout: int, pad: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=pad, bias=not batch_norm)]
            return layers + ([nn.BatchNorm2d(cout)] if batch_norm else []) + [act()]

        # Features stop before the second pool: the GAP head then sees 10x10 maps (same mean as 5x5 after
        # average pooling, twice the CAM resolution); the classic head does that pool itself.
        self.features = nn.Sequential(*conv(in_channels, 6, padding), nn.AvgPool2d(2), *conv(6, 16, 0))
        if head == "gap":
            self.head: nn.Module = GapHead(16, num_classes, dropout)
        else:
            drop = [nn.Dropout(dropout)] if dropout > 0 else []
            self.head = nn.Sequential(
                nn.AvgPool2d(2), nn.Flatten(1),
                *drop, nn.Linear(16 * (h // 2) * (w // 2), 120), act(),
                *drop, nn.Linear(120, 84), act(),
                nn.Linear(84, num_classes),
            )


@register_model("lenet5_gap", family="lenet", head="gap")
@register_model("lenet5", family="lenet")
def lenet5(**kw) -> LeNet5:
    return LeNet5(**kw)
