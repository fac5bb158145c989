"""The small CIFAR-10 network behind the paper's ReLU-vs-tanh figure (Figure 1).

The paper only says "a four-layer convolutional neural network"; this is the
cuda-convnet CIFAR-10 layout it most likely was: three 5x5 conv layers with
32, 32, 64 maps, each followed by the activation and 3/2 max pooling, then one fc
layer. No LRN and, by default, no dropout ("no regularization of any kind was
employed"). Input 3x32x32; about 85k parameters at 10 classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.common import check_common, make_activation, make_pool, pooled_size, scale
from models.rules import POOLINGS, check_choice

INPUT_SIZE = 32


class CifarNet(nn.Module):
    """features (three conv blocks) -> flatten -> classifier (dropout, one fc)."""

    features: nn.Sequential
    classifier: nn.Sequential

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        """Maps images (B, 3, 32, 32) to logits (B, num_classes)."""
        return self.classifier(torch.flatten(self.features(x), 1))  # (B, 64 * 3 * 3) -> (B, C)


def cifar_net(
    *,
    num_classes: int = 10,
    activation: str = "relu",
    pooling: str = "overlap",
    dropout: float = 0.0,
    width: float = 1.0,
) -> CifarNet:
    """Builds the four-layer CIFAR-10 net (PyTorch default initialisation).

    Args:
        num_classes: Output classes, >= 2.
        activation: ``"relu"`` or ``"tanh"``, the comparison of the paper's Figure 1.
        pooling: ``"overlap"`` (3/2: 32 -> 15 -> 7 -> 3) or ``"nonoverlap"``
            (2/2: 32 -> 16 -> 8 -> 4); the fc layer is sized to match.
        dropout: Drop probability on the fc layer's input, in [0, 1); 0 is the paper's.
        width: Multiplier for the conv channels.

    Returns:
        The network, for 3x32x32 inputs.

    Raises:
        ValueError: Naming the bad key, its value and what is allowed.
    """
    check_common(num_classes=num_classes, activation=activation, dropout=dropout, width=width)
    check_choice("pooling", pooling, POOLINGS)
    c1, c2, c3 = (scale(c, width) for c in (32, 32, 64))
    size = INPUT_SIZE
    for _ in range(3):
        size = pooled_size(size, pooling)  # 5x5 convs with padding 2 keep the size
    features = nn.Sequential(
        nn.Conv2d(3, c1, 5, padding=2),  # (B, 32, 32, 32)
        make_activation(activation),
        make_pool(pooling),  # (B, 32, 15, 15)
        nn.Conv2d(c1, c2, 5, padding=2),  # (B, 32, 15, 15)
        make_activation(activation),
        make_pool(pooling),  # (B, 32, 7, 7)
        nn.Conv2d(c2, c3, 5, padding=2),  # (B, 64, 7, 7)
        make_activation(activation),
        make_pool(pooling),  # (B, 64, 3, 3)
    )
    classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c3 * size * size, num_classes))
    return CifarNet(features, classifier)
