"""torchvision's single-tower AlexNet, layer for layer, so its state_dicts load strictly.

Same modules, order and state_dict keys as ``torchvision.models.alexnet``:
features.{0,3,6,8,10}, classifier.{1,4,6}; no LRN, no groups, dropout on the *inputs*
of fc6 and fc7; 61,100,840 parameters at 1000 classes; native input 224.
"""

from __future__ import annotations

from torch import nn

from models.alexnet import AlexNet
from models.common import check_common, make_activation, scale


def torchvision_alexnet(
    *,
    num_classes: int = 1000,
    activation: str = "relu",
    dropout: float = 0.5,
    width: float = 1.0,
) -> AlexNet:
    """Builds torchvision's AlexNet architecture (never downloads weights).

    Initialisation is PyTorch's default, as in torchvision. Load published or
    torchvision-trained weights with :func:`models.checkpoint.load_checkpoint`.

    Args:
        num_classes: Output classes, >= 2.
        activation: ``"relu"`` (torchvision's) or ``"tanh"``.
        dropout: Drop probability on the inputs of fc6 and fc7, in [0, 1).
        width: Multiplier for every conv and hidden fc width (1.0 is torchvision's).

    Returns:
        The network; at ``width=1.0`` its state_dict is interchangeable with torchvision's.

    Raises:
        ValueError: Naming the bad key, its value and what is allowed.
    """
    check_common(num_classes=num_classes, activation=activation, dropout=dropout, width=width)
    c1, c2, c3, c4, c5 = (scale(c, width) for c in (64, 192, 384, 256, 256))
    hidden = scale(4096, width)
    features = nn.Sequential(
        nn.Conv2d(3, c1, 11, stride=4, padding=2),  # 0: (B, 64, 55, 55) at 224
        make_activation(activation),
        nn.MaxPool2d(3, stride=2),  # (B, 64, 27, 27)
        nn.Conv2d(c1, c2, 5, padding=2),  # 3: (B, 192, 27, 27)
        make_activation(activation),
        nn.MaxPool2d(3, stride=2),  # (B, 192, 13, 13)
        nn.Conv2d(c2, c3, 3, padding=1),  # 6: (B, 384, 13, 13)
        make_activation(activation),
        nn.Conv2d(c3, c4, 3, padding=1),  # 8: (B, 256, 13, 13)
        make_activation(activation),
        nn.Conv2d(c4, c5, 3, padding=1),  # 10: (B, 256, 13, 13)
        make_activation(activation),
        nn.MaxPool2d(3, stride=2),  # (B, 256, 6, 6)
    )
    classifier = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(c5 * 6 * 6, hidden),  # 1: (B, 9216) -> (B, 4096)
        make_activation(activation),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),  # 4: (B, 4096)
        make_activation(activation),
        nn.Linear(hidden, num_classes),  # 6: (B, num_classes)
    )
    return AlexNet(features, classifier)
