"""A MobileNetV2-shaped CNN (random init) for memory and CNN measurements: the network MCUNetV2
profiles, built from its (expansion, channels, repeats, stride) table."""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6()] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = conv_bn(cin, hidden, 1, 1) if expand != 1 else []
        layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + conv_bn(hidden, cout, 1, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.skip else self.body(x)


# MobileNetV2's (expansion, channels, repeats, stride) table.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2() -> nn.Sequential:
    torch.manual_seed(0)
    blocks: list[nn.Module] = [nn.Sequential(*conv_bn(3, 32, 3, 2))]
    cin = 32
    for expand, channels, repeats, stride in SETTINGS:
        for i in range(repeats):
            blocks.append(InvertedResidual(cin, channels, stride if i == 0 else 1, expand))
            cin = channels
    blocks.append(nn.Sequential(*conv_bn(cin, 1280, 1, 1)))
    return nn.Sequential(nn.Sequential(*blocks), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)).eval()
