"""Building a network from config switches: the one way the project makes models."""

from __future__ import annotations

from torch import nn

from models.alexnet import alexnet
from models.cifar_net import cifar_net
from models.rules import ARCHS, INPUT_SIZES, check_choice, check_switches
from models.torchvision_alexnet import torchvision_alexnet


def input_size(arch: str) -> int:
    """Native square input size of ``arch``: 227 paper, 224 torchvision, 32 cifar.

    Raises:
        ValueError: If ``arch`` is not one of :data:`ARCHS`.
    """
    check_choice("arch", arch, ARCHS)
    return INPUT_SIZES[arch]


def build_model(
    arch: str,
    *,
    num_classes: int,
    activation: str = "relu",
    pooling: str = "overlap",
    lrn: bool | None = None,
    groups: int | None = None,
    dropout: float | None = None,
    width: float = 1.0,
    init: str = "paper",
) -> nn.Module:
    """Builds one of :data:`ARCHS` from config switches.

    ``None`` for ``lrn``, ``groups`` or ``dropout`` means the arch's own value:
    paper lrn=True, groups=2, dropout=0.5; torchvision lrn=False, groups=1,
    dropout=0.5; cifar lrn=False, groups=1, dropout=0.0. torchvision and cifar have
    no LRN and no groups, so there ``lrn`` must be None/False and ``groups`` None/1;
    torchvision's architecture is exact, so its ``pooling`` must be ``"overlap"``.

    Args:
        arch: ``"paper"``, ``"torchvision"`` or ``"cifar"``.
        num_classes: Output classes, >= 2.
        activation: ``"relu"`` or ``"tanh"``.
        pooling: ``"overlap"`` (3/2) or ``"nonoverlap"`` (2/2); paper and cifar only.
        lrn: Local response normalisation after conv1 and conv2; paper only.
        groups: 2 for the paper's two-tower split, 1 for one tower; paper only.
        dropout: Drop probability in [0, 1).
        width: Multiplier > 0 for conv and hidden fc widths.
        init: ``"paper"`` (N(0, 0.01), the paper's biases) or ``"kaiming"``; paper only,
            the other archs keep PyTorch's default initialisation.

    Returns:
        The network (paper init for ``paper``, PyTorch default init otherwise).

    Raises:
        ValueError: Naming the bad key, its value and what is allowed.
    """
    check_switches(
        arch,
        activation=activation,
        pooling=pooling,
        lrn=lrn,
        groups=groups,
        dropout=dropout,
        width=width,
        init=init,
    )
    if arch == "paper":
        return alexnet(
            num_classes=num_classes,
            activation=activation,
            pooling=pooling,
            lrn=True if lrn is None else lrn,
            groups=2 if groups is None else groups,
            dropout=0.5 if dropout is None else dropout,
            width=width,
            init=init,
        )
    if arch == "torchvision":
        return torchvision_alexnet(
            num_classes=num_classes,
            activation=activation,
            dropout=0.5 if dropout is None else dropout,
            width=width,
        )
    return cifar_net(
        num_classes=num_classes,
        activation=activation,
        pooling=pooling,
        dropout=0.0 if dropout is None else dropout,
        width=width,
    )
