"""The paper's AlexNet (Krizhevsky, Sutskever, Hinton, NIPS 2012), two-tower form.

The split over two GPUs is expressed as ``groups=2`` on conv2, conv4 and conv5: each of
those sees only the half of the previous maps that lived on its own GPU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from models.common import check_common, make_activation, make_pool, scale
from models.rules import POOLINGS, check_choice

# Layers whose bias the paper initialises to 1 (the rest get 0).
ONE_BIAS = ("conv2", "conv4", "conv5", "fc6", "fc7")


class AlexNet(nn.Module):
    """features -> AdaptiveAvgPool2d((6, 6)) -> flatten -> classifier.

    Shared by the paper's network (:func:`alexnet`) and torchvision's single-tower
    variant (:func:`models.torchvision_alexnet.torchvision_alexnet`). The adaptive pool
    is the identity at the native input (227 paper, 224 torchvision), where features
    already end at 6x6; it has no parameters and lets small profiles feed smaller
    images (e.g. 99 or 115 px, where conv5's pool ends at 2x2) to the same classifier.
    Inputs must be at least 67 px so that the last pool has something to pool.
    """

    features: nn.Sequential
    avgpool: nn.AdaptiveAvgPool2d
    classifier: nn.Sequential

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        """Maps images (B, 3, H, W) to logits (B, num_classes)."""
        x = self.features(x)  # (B, 256, 6, 6) at native size
        x = self.avgpool(x)  # (B, 256, 6, 6)
        return self.classifier(torch.flatten(x, 1))  # (B, 9216) -> (B, num_classes)


def paper_lrn() -> nn.LocalResponseNorm:
    """Local response normalisation of the paper (section 3.3), Caffe / cuda-convnet reading.

    ``b_c = a_c / (k + alpha / n * sum_{c' in window(c)} a_c'^2) ** beta`` with n=5 channels
    centred on c (clipped at the edges, still divided by n), k=2, alpha=1e-4, beta=0.75.
    torch.nn.LocalResponseNorm, like Caffe and cuda-convnet2, divides alpha by n; the
    paper's formula to the letter (no division) would be alpha=5e-4 here.
    """
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)


def alexnet(
    *,
    num_classes: int = 1000,
    activation: str = "relu",
    pooling: str = "overlap",
    lrn: bool = True,
    groups: int = 2,
    dropout: float = 0.5,
    width: float = 1.0,
    init: str = "paper",
) -> AlexNet:
    """Builds the paper's AlexNet with the paper's initialisation (or He's).

    At the defaults: 227 input, 60,965,224 parameters (62,378,344 with ``groups=1``).

    Args:
        num_classes: Output classes, >= 2.
        activation: ``"relu"`` (paper) or ``"tanh"`` (the saturating baseline).
        pooling: ``"overlap"`` (3/2, paper) or ``"nonoverlap"`` (2/2; same sizes at 227).
        lrn: Local response normalisation after the ReLU of conv1 and conv2.
        groups: 2 for the paper's two-tower split of conv2/4/5, 1 for a single tower.
        dropout: Drop probability on the outputs of fc6 and fc7, in [0, 1).
        width: Multiplier for every conv and hidden fc width; conv channels are rounded
            to a multiple of ``groups``.
        init: ``"paper"``: weights N(0, 0.01), biases 1 in conv2/4/5 and fc6/7, else 0.
            ``"kaiming"``: He-normal weights (fan-in, ReLU gain) and zero biases; the
            paper's fixed 0.01 makes activations vanish in narrow (width < 1) networks.

    Returns:
        The initialised network.

    Raises:
        ValueError: Naming the bad key, its value and what is allowed.
    """
    check_common(num_classes=num_classes, activation=activation, dropout=dropout, width=width)
    check_choice("pooling", pooling, POOLINGS)
    check_choice("lrn", lrn, (True, False))
    check_choice("groups", groups, (1, 2))
    check_choice("init", init, INITS)
    c1, c2, c3, c4, c5 = (scale(c, width, groups) for c in (96, 256, 384, 384, 256))
    hidden = scale(4096, width)

    def act() -> nn.Module:
        return make_activation(activation)

    lrn1 = [("lrn1", paper_lrn())] if lrn else []
    lrn2 = [("lrn2", paper_lrn())] if lrn else []
    features = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, c1, 11, stride=4)),  # (B, 96, 55, 55) at 227
        ("act1", act()),
        *lrn1,
        ("pool1", make_pool(pooling)),  # (B, 96, 27, 27)
        ("conv2", nn.Conv2d(c1, c2, 5, padding=2, groups=groups)),  # (B, 256, 27, 27)
        ("act2", act()),
        *lrn2,
        ("pool2", make_pool(pooling)),  # (B, 256, 13, 13)
        ("conv3", nn.Conv2d(c2, c3, 3, padding=1)),  # (B, 384, 13, 13): sees both towers
        ("act3", act()),
        ("conv4", nn.Conv2d(c3, c4, 3, padding=1, groups=groups)),  # (B, 384, 13, 13)
        ("act4", act()),
        ("conv5", nn.Conv2d(c4, c5, 3, padding=1, groups=groups)),  # (B, 256, 13, 13)
        ("act5", act()),
        ("pool5", make_pool(pooling)),  # (B, 256, 6, 6)
    ]))
    # The paper drops fc6/fc7 *outputs*; torchvision drops their inputs instead.
    classifier = nn.Sequential(OrderedDict([
        ("fc6", nn.Linear(c5 * 6 * 6, hidden)),  # (B, 9216) -> (B, 4096)
        ("act6", act()),
        ("drop6", nn.Dropout(dropout)),
        ("fc7", nn.Linear(hidden, hidden)),  # (B, 4096)
        ("act7", act()),
        ("drop7", nn.Dropout(dropout)),
        ("fc8", nn.Linear(hidden, num_classes)),  # (B, num_classes); softmax is in the loss
    ]))
    model = AlexNet(features, classifier)
    (init_paper_ if init == "paper" else init_kaiming_)(model)
    return model


INITS = ("paper", "kaiming")


@torch.no_grad()
def init_kaiming_(model: AlexNet) -> None:
    """He initialisation in place: weights N(0, 2 / fan_in), biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            module.bias.zero_()


@torch.no_grad()
def init_paper_(model: AlexNet) -> None:
    """Paper initialisation in place: weights N(0, 0.01); biases 1 in :data:`ONE_BIAS`, else 0."""
    for name, module in (*model.features.named_children(), *model.classifier.named_children()):
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.weight.normal_(0.0, 0.01)
            module.bias.fill_(1.0 if name in ONE_BIAS else 0.0)
