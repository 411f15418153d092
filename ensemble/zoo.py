"""The CIFAR nets the distillation literature compares on (CRD, Tian et al. 2020, and its
RepDistiller code): ResNets of basic blocks for 32x32 images and wide ResNets, by the names used
there. Written from the papers' descriptions:

- resnet<d> (He et al. 2016, §4.2): a 3x3 stem, three stages of (d - 2) / 6 basic blocks at
  strides 1, 2, 2, global average pooling, one Linear. resnet20 and resnet56 have 16, 32, 64
  channels per stage; the "x4" nets (resnet8x4, resnet32x4) 32 in the stem and 64, 128, 256.
- wrn_<d>_<k> (Zagoruyko & Komodakis 2016): pre-activation basic blocks, (d - 4) / 6 per stage,
  16k, 32k, 64k channels, no dropout.

Every net ends in a Linear named `fc` (the classifier a specialist replaces).
"""
from __future__ import annotations

from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (projected by a 1x1 conv where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus the input (a 1x1 conv of the activated input where the
    width changes): the wide ResNet's block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        act = self.bn1(x).relu()
        out = self.conv2(self.bn2(self.conv1(act)).relu())
        return out + (self.shortcut(act) if self.shortcut is not None else x)


class CifarNet(nn.Module):
    """stem -> three stages of `blocks` blocks (strides 1, 2, 2) -> [BN-ReLU] -> pool -> fc."""

    def __init__(self, block: type, blocks: int, widths: tuple[int, int, int, int],
                 in_channels: int, classes: int, preact: bool = False):
        super().__init__()
        stem = [conv3x3(in_channels, widths[0])]
        if not preact:
            stem += [nn.BatchNorm2d(widths[0]), nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            layers = []
            for j in range(blocks):
                layers.append(block(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        tail = [nn.BatchNorm2d(cin), nn.ReLU()] if preact else []
        self.pool = nn.Sequential(*tail, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


def resnet(depth: int, widths: tuple[int, int, int, int]):
    def build(in_channels: int, classes: int) -> nn.Module:
        return CifarNet(BasicBlock, (depth - 2) // 6, widths, in_channels, classes)
    return build


def wrn(depth: int, k: int):
    def build(in_channels: int, classes: int) -> nn.Module:
        return CifarNet(PreActBlock, (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k),
                        in_channels, classes, preact=True)
    return build


ZOO = {"resnet8x4": resnet(8, (32, 64, 128, 256)), "resnet32x4": resnet(32, (32, 64, 128, 256)),
       "resnet20": resnet(20, (16, 16, 32, 64)), "resnet56": resnet(56, (16, 16, 32, 64)),
       "wrn_16_2": wrn(16, 2), "wrn_40_2": wrn(40, 2)}
