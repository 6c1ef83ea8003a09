"""Small MLP test model: (Linear -> BatchNorm1d -> ReLU(inplace) -> Dropout) x depth -> Linear.

Exercises batch-norm running statistics, random dropout masks and in-place activations.
"""

import torch
import torch.nn as nn


class MLP(nn.Sequential):
    def __init__(self, in_features: int = 64, hidden: int = 128, depth: int = 4,
                 num_classes: int = 10, p: float = 0.1):
        layers = []
        for i in range(depth):
            layers += [
                nn.Linear(in_features if i == 0 else hidden, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(p),
            ]
        super().__init__(*layers, nn.Linear(hidden if depth else in_features, num_classes))


def model() -> MLP:
    return MLP()


def example_inputs(batch_size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(batch_size, 64),)
