"""VGG (Simonyan and Zisserman, 2015, "Very Deep Convolutional Networks for Large-Scale Image
Recognition"): configurations A, B, D, E = VGG-11/13/16/19 from one table, optional batch norm (as in
torchvision's *_bn variants). VGG-16 with the classic head has 138,357,544 parameters at 224x224x3 and
1000 classes.

Small inputs: a 2x2 max-pool is applied only while the map is at least 2x2, so 28x28 runs through
28 -> 14 -> 7 -> 3 -> 1 and drops the fifth pool, while 32x32 keeps all five (-> 1x1). The classic head
uses torchvision's adaptive average pool to 7x7 only where the final maps are a multiple of 7 (identity at
224, where the published count is defined); otherwise it flattens the maps as they are, so that the fully
connected layers are sized for the configured input and the model exports to ONNX.

Batch norm variants drop the convolution bias that BN cancels, so vgg16 with batch_norm=True has 4,224
fewer parameters than torchvision's vgg16_bn.

head='gap' is the CAM variant of Zhou et al., 2016 ("Learning Deep Features for Discriminative
Localization"): pool5 and the fully connected layers are removed, a 3x3 convolution with 1024 channels is
added after conv5_3, then global average pooling and one linear layer. Its maps are 14x14 at 224 but only
1x1 at 28x28 and 2x2 at 32x32 (four pools), so on those inputs the CAM carries little spatial detail.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import GapHead, ImageClassifier, conv_bn_relu, he_init
from .registry import register_model

M = "M"  # 2x2 max-pool, stride 2

CONFIGS: dict[str, list[int | str]] = {
    "A": [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    "B": [64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    "D": [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M],
    "E": [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512, M],
}


class VGG(ImageClassifier):
    cam_unsupported_reason = ("with the classic head, fc6/fc7 with ReLU between them are nonlinear in the conv5 maps, "
                           "so CAM is undefined; use head='gap' (e.g. vgg16_gap)")

    def __init__(self, config: str | Sequence[int | str] = "D", in_channels: int = 3, num_classes: int = 1000,
                 input_size: int | Sequence[int] = (224, 224), batch_norm: bool = False, head: str = "classic",
                 dropout: float | None = None, fc_width: int = 4096, gap_channels: int = 1024, **norm):
        super().__init__(in_channels, num_classes, input_size, **norm)
        if head not in ("classic", "gap"):
            raise ValueError(f"unknown head {head!r}; use 'classic' or 'gap'")
        if dropout is None:
            # The paper's 0.5 on fc6/fc7; the GAP head has no large FC layers to regularise.
            dropout = 0.5 if head == "classic" else 0.0
        cfg = list(CONFIGS[config] if isinstance(config, str) else config)
        # The final pool belongs to the classic head, so the GAP variant keeps conv5's resolution (14x14 at 224).
        final_pool = bool(cfg) and cfg[-1] == M
        if final_pool:
            cfg = cfg[:-1]

        layers: list[nn.Module] = []
        cin, (h, w) = in_channels, self.input_size
        for v in cfg:
            if v == M:
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    h, w = h // 2, w // 2
            else:
                layers.append(conv_bn_relu(cin, int(v), 3, batch_norm=batch_norm))
                cin = int(v)

        if head == "gap":
            if gap_channels > 0:
                layers.append(conv_bn_relu(cin, gap_channels, 3, batch_norm=batch_norm))
                cin = gap_channels
            self.features = nn.Sequential(*layers)
            self.head: nn.Module = GapHead(cin, num_classes, dropout)
        else:
            self.features = nn.Sequential(*layers)
            pooling: list[nn.Module] = []
            if final_pool and min(h, w) >= 2:
                pooling.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
            if h % 7 == 0 and w % 7 == 0:
                # torchvision's adaptive pool to 7x7 (identity at 224). Only where it is a plain average pool:
                # ONNX cannot export non-integer adaptive windows, and the input size is fixed anyway.
                pooling.append(nn.AdaptiveAvgPool2d((7, 7)))
                h = w = 7
            self.head = nn.Sequential(
                *pooling, nn.Flatten(1),
                nn.Linear(cin * h * w, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(fc_width, num_classes),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation; the paper's own (pre-training the shallow net A) is impractical here.
        he_init(self, linear_std=0.01)


@register_model("vgg11_gap", family="vgg", head="gap")
@register_model("vgg11", family="vgg")
def vgg11(**kw) -> VGG:
    return VGG("A", **kw)


@register_model("vgg13_gap", family="vgg", head="gap")
@register_model("vgg13", family="vgg")
def vgg13(**kw) -> VGG:
    return VGG("B", **kw)


@register_model("vgg16_gap", family="vgg", head="gap")
@register_model("vgg16", family="vgg")
def vgg16(**kw) -> VGG:
    return VGG("D", **kw)


@register_model("vgg19_gap", family="vgg", head="gap")
@register_model("vgg19", family="vgg")
def vgg19(**kw) -> VGG:
    return VGG("E", **kw)
