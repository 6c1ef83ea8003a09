"""DenseNet-BC (Huang et al. 2017, "Densely Connected Convolutional Networks").

Follows the reference code of Pleiss et al. 2017, "Memory-Efficient Implementation of
DenseNets". ``efficient=True`` recomputes each layer's concat + BN + ReLU + 1x1 conv in the
backward pass with ``torch.utils.checkpoint``, the paper's shared-memory strategy; memplan
uses it only as a benchmark baseline.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class _DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float,
                 efficient: bool):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.efficient = efficient

    def _bottleneck(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        if self.efficient:
            out = checkpoint(self._bottleneck, *features, use_reentrant=False)
        else:
            out = self._bottleneck(*features)
        out = self.conv2(self.relu2(self.norm2(out)))
        return F.dropout(out, p=self.drop_rate, training=self.training) if self.drop_rate else out


class _DenseBlock(nn.ModuleList):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self:
            features.append(layer(*features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2, stride=2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC; ``small_inputs`` picks the CIFAR stem (32x32) or the ImageNet stem."""

    def __init__(self, growth_rate: int = 12, block_config: tuple[int, ...] = (16, 16, 16),
                 compression: float = 0.5, num_init_features: int = 24, bn_size: int = 4,
                 drop_rate: float = 0.0, num_classes: int = 10, small_inputs: bool = True,
                 efficient: bool = False):
        super().__init__()
        if small_inputs:
            stem = [nn.Conv2d(3, num_init_features, 3, padding=1, bias=False)]
        else:
            stem = [
                nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(num_init_features),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        self.features = nn.Sequential(*stem)
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.append(_DenseBlock(
                _DenseLayer(channels + j * growth_rate, growth_rate, bn_size, drop_rate, efficient)
                for j in range(num_layers)))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.append(_Transition(channels, int(channels * compression)))
                channels = int(channels * compression)
        self.features.append(nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


def model(depth: int = 100, growth_rate: int = 12) -> DenseNet:
    """DenseNet-BC for CIFAR: three dense blocks of (depth - 4) // 6 bottleneck layers."""
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(f"DenseNet-BC depth must be 6n+4 with n >= 1 (e.g. 40, 100), got {depth}")
    n = (depth - 4) // 6
    return DenseNet(growth_rate, (n, n, n), num_init_features=2 * growth_rate)


def example_inputs(batch_size: int = 64) -> tuple[torch.Tensor]:
    return (torch.randn(batch_size, 3, 32, 32),)


def densenet264() -> DenseNet:
    """ImageNet DenseNet-264 with k=32 (about 33M parameters)."""
    return DenseNet(32, (6, 12, 64, 48), num_init_features=64, num_classes=1000,
                    small_inputs=False)
