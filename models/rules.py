"""What the networks accept, without building them: the one home of the config rules.

Torch-free on purpose: `pipeline.config` applies these rules when any stage loads its
params, and a stage that never builds a network (sample, shard, stats) must not depend on
the networks' code (DVC reruns a stage when a file it imports changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

ARCHS = ("paper", "torchvision", "cifar")
ACTIVATIONS = ("relu", "tanh")
POOLINGS = ("overlap", "nonoverlap")
INPUT_SIZES = {"paper": 227, "torchvision": 224, "cifar": 32}
MAX_SIDE = 4096  # what crop_range reports where a network sets no upper bound

# The spatial layers of each AlexNet's `features`, in order: (kernel, stride, padding) of
# a convolution, or "pool" for max pooling as model.pooling sets it (3/2 or 2/2).
# tests/test_models.py checks these against the built networks.
_CONV_AND_POOL = {
    "paper": ((11, 4, 0), "pool", (5, 1, 2), "pool", (3, 1, 1), (3, 1, 1), (3, 1, 1), "pool"),
    "torchvision": ((11, 4, 2), "pool", (5, 1, 2), "pool", (3, 1, 1), (3, 1, 1), (3, 1, 1), "pool"),
}
_POOLS = {"overlap": (3, 2, 0), "nonoverlap": (2, 2, 0)}


def reject(key: str, value: object, expected: str) -> NoReturn:
    """Raises the package's config error.

    Args:
        key: Config key under ``model.``, e.g. ``"pooling"``.
        value: The offending value.
        expected: What is allowed, e.g. ``"one of 'overlap', 'nonoverlap'"``.

    Raises:
        ValueError: Always, as ``model.<key>=<value!r>: expected <expected>``.
    """
    raise ValueError(f"model.{key}={value!r}: expected {expected}")


def check_choice(key: str, value: object, allowed: Sequence[object], context: str = "") -> None:
    """Raises ValueError unless ``value`` is one of ``allowed`` (same type too).

    Args:
        key: Config key under ``model.``.
        value: Value to check.
        allowed: Permitted values.
        context: Appended to the message, e.g. ``" for model.arch='cifar'"``.
    """
    # Compare types as well: True == 1, so groups=True must not pass for groups=1.
    if not any(type(value) is type(a) and value == a for a in allowed):
        reject(key, value, "one of " + ", ".join(map(repr, allowed)) + context)


def check_switches(
    arch: str,
    *,
    activation: str = "relu",
    pooling: str = "overlap",
    lrn: bool | None = None,
    groups: int | None = None,
    dropout: float | None = None,  # noqa: ARG001 - checked by the builders, with num_classes
    width: float = 1.0,  # noqa: ARG001
    init: str = "paper",
) -> None:
    """Checks that the switches make a network of ``arch`` (see ``models.build_model``).

    ``models.build_model`` applies these rules before building, and ``pipeline.config``
    when params are loaded.

    Raises:
        ValueError: Naming the bad key (``model.<key>``), its value and what is allowed.
    """
    check_choice("arch", arch, ARCHS)
    check_choice("activation", activation, ACTIVATIONS)
    if arch != "torchvision":
        check_choice("pooling", pooling, POOLINGS)
    if arch == "paper":
        return
    # torchvision's variant and the CIFAR net have no LRN and no two-tower groups.
    context = f" for model.arch={arch!r}"
    if init != "paper":
        reject("init", init, "'paper' (the default)" + context)
    if lrn not in (None, False):
        reject("lrn", lrn, "false" + context)
    if not (groups is None or (type(groups) is int and groups == 1)):
        reject("groups", groups, "1" + context)
    if arch == "torchvision" and pooling != "overlap":  # its architecture is exact
        reject("pooling", pooling, "'overlap'" + context)


def feature_side(arch: str, pooling: str, side: int) -> int:
    """Side of an AlexNet's feature map for a ``side`` x ``side`` input (0: it vanishes)."""
    for layer in _CONV_AND_POOL[arch]:
        kernel, stride, padding = _POOLS[pooling] if layer == "pool" else layer
        side = (side + 2 * padding - kernel) // stride + 1
        if side < 1:
            return 0
    return side


def crop_range(arch: str, pooling: str = "overlap") -> tuple[int, int]:
    """Smallest and largest square input side that ``arch`` takes.

    The CIFAR net's fc layer is sized for 32 px. The AlexNets end in an adaptive pool, so
    any input works whose feature map survives every convolution and pooling.

    Returns:
        (min side, max side); max is MAX_SIDE where the network sets no bound.
    """
    check_switches(arch, pooling=pooling)
    if arch == "cifar":
        return INPUT_SIZES["cifar"], INPUT_SIZES["cifar"]
    side = 1
    while feature_side(arch, pooling, side) < 1:
        side += 1
    return side, MAX_SIDE
