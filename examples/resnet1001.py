"""Pre-activation bottleneck ResNet for CIFAR (He et al. 2016, "Identity Mappings in Deep
Residual Networks").

Depth 9n+2; depth 1001 (n = 111 blocks per stage, about 10.2M parameters) is the 1000-layer
network of Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost".
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class _PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int):
        super().__init__()
        out_channels = planes * self.expansion
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x), inplace=True)
        # A projection shortcut takes the pre-activated input, an identity shortcut the raw one.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out), inplace=True))
        out = self.conv3(F.relu(self.norm3(out), inplace=True))
        return out + shortcut


class PreActResNet(nn.Module):
    """CIFAR pre-activation ResNet: 3x3 stem, three stages of bottlenecks (64/128/256 out)."""

    def __init__(self, depth: int = 1001, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 9 != 0 or depth < 11:
            raise ValueError(f"pre-activation ResNet depth must be 9n+2 with n >= 1 "
                             f"(e.g. 164, 1001), got {depth}")
        n = (depth - 2) // 9
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        layers, channels = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_PreActBottleneck(channels, planes, stride if i == 0 else 1))
                channels = planes * _PreActBottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm(self.layers(self.conv(x))), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def model(depth: int = 1001) -> PreActResNet:
    return PreActResNet(depth)


def example_inputs(batch_size: int = 64) -> tuple[torch.Tensor]:
    return (torch.randn(batch_size, 3, 32, 32),)
