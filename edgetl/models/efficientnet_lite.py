"""EfficientNet-Lite0/1/2 (no squeeze-excite, ReLU6, fixed stem/head) with TensorFlow "same" padding.

Padding is computed statically from the input size at construction, so the exported ONNX graph
has plain Pad nodes. The layout mirrors torchvision (`features`, `avgpool`, `classifier`) so the
rest of edgetl treats it like any other backbone.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

# (expand_ratio, kernel, stride, out_channels, repeats) — EfficientNet-B0 stages, width/depth 1.0
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
BN_EPS = 1e-3


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    out = math.ceil(size / s)
    pad = max((out - 1) * s + k - size, 0)
    return pad // 2, pad - pad // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding for a known input size (static, export-friendly)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, in_size: int = 224):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        top, bottom = _same_pad(in_size, k, stride)
        self._pad = (top, bottom, top, bottom)  # square inputs
        self.out_size = math.ceil(in_size / stride)

    def forward(self, x):
        if any(self._pad):
            x = F.pad(x, self._pad)
        return super().forward(x)


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k, stride, in_size):
        super().__init__()
        self.conv = Conv2dSame(cin, cout, k, stride, in_size=in_size)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self.out_size = self.conv.out_size

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, stride, in_size):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv = Conv2dSame(cin, mid, 1, in_size=in_size)
            self.bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.depthwise_conv = Conv2dSame(mid, mid, k, stride, groups=mid, in_size=in_size)
        self.bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.project_conv = Conv2dSame(mid, cout, 1, in_size=self.depthwise_conv.out_size)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout
        self.out_size = self.depthwise_conv.out_size

    def forward(self, x):
        y = F.relu6(self.bn0(self.expand_conv(x))) if self.has_expand else x
        y = F.relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return x + y if self.residual else y


# (width, depth) multipliers of the Lite variants (TF's efficientnet_lite_builder); Lite keeps the
# stem (32), the head (1280) and the first and last stages' repeats fixed.
LITE_SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    scaled = c * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * scaled else int(new)


def lite_stages(variant: int) -> list[tuple[int, int, int, int, int]]:
    """LITE0_STAGES scaled for EfficientNet-Lite`variant`."""
    width, depth = LITE_SCALING[variant]
    last = len(LITE0_STAGES) - 1
    return [(e, k, s, _round_filters(c, width), r if i in (0, last) else math.ceil(r * depth))
            for i, (e, k, s, c, r) in enumerate(LITE0_STAGES)]


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.2, variant: int = 0):
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 32, 3, 2, image_size)]
        size, cin = layers[0].out_size, 32
        for expand, k, stride, cout, repeats in lite_stages(variant):
            for r in range(repeats):
                block = MBConv(cin, cout, expand, k, stride if r == 0 else 1, size)
                layers.append(block)
                size, cin = block.out_size, cout
        layers.append(ConvBNAct(cin, 1280, 1, 1, size))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_lite0(image_size: int = 224) -> EfficientNetLite:
    """EfficientNet-Lite0 at `image_size` (weights loaded separately)."""
    return EfficientNetLite(1000, image_size)


def efficientnet_lite1(image_size: int = 240) -> EfficientNetLite:
    """EfficientNet-Lite1 at `image_size` (weights loaded separately)."""
    return EfficientNetLite(1000, image_size, variant=1)


def efficientnet_lite2(image_size: int = 260) -> EfficientNetLite:
    """EfficientNet-Lite2 at `image_size` (weights loaded separately); dropout 0.3 as in TF."""
    return EfficientNetLite(1000, image_size, dropout=0.3, variant=2)


def remap_lukemelas(state: dict) -> dict:
    """Key names of lukemelas-style EfficientNet-Lite checkpoints -> EfficientNetLite's (any variant)."""
    n_blocks = len({int(m[1]) for key in state if (m := re.match(r"_blocks\.(\d+)\.", key))})
    out = {}
    for key, value in state.items():
        new = key
        if m := re.match(r"_blocks\.(\d+)\._(\w+)\.(\w+)$", key):
            new = f"features.{int(m[1]) + 1}.{m[2]}.{m[3]}"
        elif m := re.match(r"_(conv_stem|bn0)\.(\w+)$", key):
            new = f"features.0.{'conv' if m[1] == 'conv_stem' else 'bn'}.{m[2]}"
        elif m := re.match(r"_(conv_head|bn1)\.(\w+)$", key):
            new = f"features.{n_blocks + 1}.{'conv' if m[1] == 'conv_head' else 'bn'}.{m[2]}"
        elif m := re.match(r"_fc\.(\w+)$", key):
            new = f"classifier.1.{m[1]}"
        out[new] = value
    return out
