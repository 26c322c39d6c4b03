"""CIFAR-size VGG-16, ResNet-18 and DenseNet with Gao et al.'s MPO placements (spec/mpo.md §4.3), and CIFAR-size
AlexNet and ZFNet (Qing et al.'s ADTN networks).

Where the paper's code fixes the placement it is followed; where the spec leaves it open the choice is stated in the
class docstring and is configurable: ``layers="mpo"`` tensorizes the fully connected maps (the paper's choice for
every network), and ``mpo_convs`` additionally makes chosen convolutions ``MPOConv2d``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_positive_int
from .blocks import adtn_config, conv2d, linear

__all__ = ["VGG16", "AlexNet", "ZFNet", "ResNet18", "DenseNet"]

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _head(in_features: int, hidden: int, num_classes: int, layers: str, rank: int, depth: int, dropout: float,
          shapes: Sequence = ((None, None),) * 3) -> nn.Sequential:
    """``in → hidden → hidden → classes`` with ReLU and dropout. ``layers="mpo"``: all three maps MPOs (modes from
    ``shapes``); ``"adtn"``: the two big maps ADTNs of ``depth`` brick layers (Qing et al. replace the two ~10⁷-weight
    layers of VGG-16), the small classifier dense."""
    last = "dense" if layers == "adtn" else layers
    return nn.Sequential(
        linear(in_features, hidden, layers, rank, in_shape=shapes[0][0], out_shape=shapes[0][1], depth=depth),
        nn.ReLU(), nn.Dropout(dropout),
        linear(hidden, hidden, layers, rank, in_shape=shapes[1][0], out_shape=shapes[1][1], depth=depth),
        nn.ReLU(), nn.Dropout(dropout),
        linear(hidden, num_classes, last, rank, in_shape=shapes[2][0], out_shape=shapes[2][1], depth=depth))


class _FeaturesHead(nn.Module):
    """``features`` then ``classifier``; ``config()`` is what :func:`~torchtn.models.build_model` rebuilds from."""

    features: nn.Module
    classifier: nn.Module

    def _record(self, layers: str, adtn_depth: int, **cfg) -> None:
        self._cfg = {**cfg, "layers": layers, **adtn_config(layers, adtn_depth)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def config(self) -> dict:
        return dict(self._cfg)


class VGG16(_FeaturesHead):
    """VGG-16 for ``(batch, 3, 32, 32)`` inputs: 13 BN-ReLU convolutions, then 512 → 4096 → 4096 → classes.

    ``layers="mpo"``: the three fully connected maps as MPOs with the paper's modes (512→4096
    ``(4,4,4,4,2)→(4,4,8,8,4)``, 4096→4096 ``(4,4,8,8,4)²``, 4096→10 ``(4,4,8,8,4)→(1,10,1,1,1)``) and bond
    ``rank`` (4: 1,376 + 2,432 + 928 weights). ``mpo_convs=True`` also makes the 3×3 convolutions MPOs at the
    same bond. The paper's extra 2048→2048 maps on 2×2×512 feature maps are not reproduced (a documented choice).
    ``layers="adtn"``: the 512→4096 and 4096→4096 maps as ADTNs of ``adtn_depth`` brick layers (Qing et al.'s
    headline replaces exactly these two), the classifier dense.
    """

    def __init__(self, num_classes: int = 10, layers: str = "dense", rank: int = 4, mpo_convs: bool = False,
                 dropout: float = 0.2, adtn_depth: int = 2) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        blocks, c = [], 3
        for v in _VGG16:
            if v == "M":
                blocks.append(nn.MaxPool2d(2))
                continue
            kind = "mpo" if mpo_convs and c > 3 else "dense"
            blocks += [conv2d(c, v, 3, kind, rank, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
        self.features = nn.Sequential(*blocks, nn.Flatten())
        last = ((4, 4, 8, 8, 4), (1, 10, 1, 1, 1)) if num_classes == 10 else (None, None)
        shapes = (((4, 4, 4, 4, 2), (4, 4, 8, 8, 4)), ((4, 4, 8, 8, 4), (4, 4, 8, 8, 4)), last)
        self.classifier = _head(512, 4096, num_classes, layers, rank, adtn_depth, dropout, shapes)
        self._record(layers, adtn_depth, name="vgg16", num_classes=num_classes, rank=rank, mpo_convs=mpo_convs,
                     dropout=dropout)


class _AlexLike(_FeaturesHead):
    """Five ReLU convolutions with three max-pools, then ``flat → 4096 → 4096 → classes`` (see :func:`_head`)."""

    name = ""
    #: (out channels, kernel, stride, padding, pool after) per convolution; pools are 3×3 stride-2 (padding 1)
    spec: tuple = ()

    def __init__(self, num_classes: int = 10, layers: str = "dense", rank: int = 4, dropout: float = 0.5,
                 adtn_depth: int = 2) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        blocks, c, size = [], 3, 32
        for out, k, stride, pad, pool in self.spec:
            blocks += [nn.Conv2d(c, out, k, stride, pad), nn.ReLU()]
            size = (size + 2 * pad - k) // stride + 1
            if pool:
                blocks.append(nn.MaxPool2d(3, 2, padding=1))
                size = (size - 1) // 2 + 1
            c = out
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.classifier = _head(c * size * size, 4096, num_classes, layers, rank, adtn_depth, dropout)
        self._record(layers, adtn_depth, name=self.name, num_classes=num_classes, rank=rank, dropout=dropout)


class AlexNet(_AlexLike):
    """A CIFAR-size AlexNet for ``(batch, 3, 32, 32)`` inputs (our variant; the paper's CIFAR layout could not be
    read): convolutions 64 (5×5), 192 (5×5), 384, 256, 256 (3×3), max-pools after the 1st, 2nd and 5th, no LRN;
    then 4096 → 4096 → classes with dropout. ``layers="mpo"`` / ``"adtn"``: the fully connected maps (see
    :func:`_head`); the convolutions stay dense."""

    name = "alexnet"
    spec = ((64, 5, 1, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
            (256, 3, 1, 1, True))


class ZFNet(_AlexLike):
    """A CIFAR-size ZFNet for ``(batch, 3, 32, 32)`` inputs (our variant): as AlexNet with ZFNet's changes — a 7×7
    stride-2 first convolution of 96 filters, then 256 (5×5), 384, 384, 256 (3×3) — and the same 4096 → 4096 →
    classes head. ``layers`` as :class:`AlexNet`."""

    name = "zfnet"
    spec = ((96, 7, 2, 3, True), (256, 5, 1, 2, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
            (256, 3, 1, 1, True))


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, kind: str, rank: int) -> None:
        super().__init__()
        self.conv1 = conv2d(cin, cout, 3, kind, rank, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv2d(cout, cout, 3, kind, rank, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for ``(batch, 3, 32, 32)`` inputs (3×3 stem, four stages of two basic blocks, 64–512 channels).

    The spec's code uses a wide ResNet with an MPO "TT block"; for ResNet-18 torchtn chooses (and documents):
    ``layers="mpo"`` makes the classifier 512→classes an MPO (``(4,4,8,4)→(1,5,2,1)``, bond ``rank``), and
    ``mpo_stages`` (default none; e.g. ``(3, 4)``) makes the 3×3 convolutions of those stages ``MPOConv2d``;
    ``layers="adtn"`` makes the classifier an ADTN of ``adtn_depth`` brick layers.
    """

    def __init__(self, num_classes: int = 10, layers: str = "dense", rank: int = 4,
                 mpo_stages: Sequence[int] = (), adtn_depth: int = 2) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        stages, c = [], 64
        for i, (width, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            kind = "mpo" if i in tuple(mpo_stages) else "dense"
            stages.append(nn.Sequential(_Basic(c, width, stride, kind, rank), _Basic(width, width, 1, kind, rank)))
            c = width
        self.stages = nn.Sequential(*stages)
        last = ((4, 4, 8, 4), (1, 5, 2, 1)) if num_classes == 10 else (None, None)
        self.fc = linear(512, num_classes, layers, rank, in_shape=last[0], out_shape=last[1], depth=adtn_depth)
        self._cfg = {"name": "resnet18", "num_classes": num_classes, "layers": layers, "rank": rank,
                     "mpo_stages": list(mpo_stages), **adtn_config(layers, adtn_depth)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))

    def config(self) -> dict:
        return dict(self._cfg)


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: bool) -> None:
        super().__init__()
        inner = 4 * growth if bottleneck else cin
        self.body = nn.Sequential(
            *([nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, inner, 1, bias=False)] if bottleneck else []),
            nn.BatchNorm2d(inner), nn.ReLU(), nn.Conv2d(inner, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    """CIFAR DenseNet: ``depth=40, growth=12`` is the paper's DenseNet-40 (3 blocks of 12 layers, 16 initial maps,
    448 final channels); ``bottleneck=True, compression=0.5, depth=100`` gives DenseNet-BC-100.

    ``layers="mpo"``: the final classifier as an MPO — for DenseNet-40 the paper's 448→10 ``(4,4,7,4)→(1,5,2,1)``,
    bond ``rank``; other sizes get balanced modes. ``layers="adtn"``: the classifier an ADTN of ``adtn_depth`` brick
    layers.
    """

    def __init__(self, num_classes: int = 10, depth: int = 40, growth: int = 12, bottleneck: bool = False,
                 compression: float = 1.0, layers: str = "dense", rank: int = 4, adtn_depth: int = 2) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        per_block = (depth - 4) // (6 if bottleneck else 3)
        if per_block < 1 or not 0 < compression <= 1:
            raise ValueError(f"depth={depth} / compression={compression} give no valid DenseNet")
        c = 2 * growth if bottleneck else 16
        parts: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for b in range(3):
            for _ in range(per_block):
                parts.append(_DenseLayer(c, growth, bottleneck))
                c += growth
            if b < 2:
                out = int(c * compression)
                parts += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.AvgPool2d(2)]
                c = out
        parts += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*parts)
        gao = c == 448 and num_classes == 10
        self.fc = linear(c, num_classes, layers, rank, in_shape=(4, 4, 7, 4) if gao else None,
                         out_shape=(1, 5, 2, 1) if gao else None, depth=adtn_depth)
        self._cfg = {"name": "densenet", "num_classes": num_classes, "depth": depth, "growth": growth,
                     "bottleneck": bottleneck, "compression": compression, "layers": layers, "rank": rank,
                     **adtn_config(layers, adtn_depth)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def config(self) -> dict:
        return dict(self._cfg)
