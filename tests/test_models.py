"""Tests of the models package: architecture facts, init, switches, interop, execution."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import models
from models import ARCHS, AlexNet, alexnet, build_model, cifar_net, input_size, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Small but complete configs for the execution tests: (arch, build kwargs, input px).
SMALL = {
    "paper": (dict(num_classes=5, width=0.25), 99),
    "torchvision": (dict(num_classes=5, width=0.25), 99),
    "cifar": (dict(num_classes=5), 32),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small(arch: str, **overrides: object) -> tuple[nn.Module, Tensor]:
    kwargs, size = SMALL[arch]
    torch.manual_seed(0)
    return build_model(arch, **{**kwargs, **overrides}), torch.randn(2, 3, size, size)


def output_shapes(model: nn.Module, x: Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of every direct child of features and classifier."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for part in (model.features, model.classifier)
        for name, module in part.named_children()
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return shapes


@pytest.fixture(scope="module")
def paper_full() -> AlexNet:
    torch.manual_seed(0)
    return alexnet().eval()


# --- architecture facts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(), 60_965_224),
        (dict(groups=1), 62_378_344),
        (dict(lrn=False, pooling="nonoverlap", activation="tanh"), 60_965_224),
    ],
)
def test_paper_param_count(kwargs: dict, expected: int) -> None:
    with torch.device("meta"):
        model = build_model("paper", num_classes=1000, **kwargs)
    assert n_params(model) == expected
    assert n_params(model.avgpool) == 0


def test_torchvision_param_count_and_keys() -> None:
    with torch.device("meta"):
        ours = build_model("torchvision", num_classes=1000)
        theirs = torchvision.models.alexnet(weights=None)
    assert n_params(ours) == n_params(theirs) == 61_100_840
    keys = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")]
    keys += [f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")]
    assert list(ours.state_dict()) == keys == list(theirs.state_dict())


def test_paper_layer_shapes(paper_full: AlexNet) -> None:
    """Every layer's output at 227 px, as in the spec table."""
    shapes = output_shapes(paper_full, torch.randn(1, 3, 227, 227))
    expected = {
        "conv1": (96, 55, 55), "act1": (96, 55, 55), "lrn1": (96, 55, 55), "pool1": (96, 27, 27),
        "conv2": (256, 27, 27), "act2": (256, 27, 27), "lrn2": (256, 27, 27),
        "pool2": (256, 13, 13),
        "conv3": (384, 13, 13), "act3": (384, 13, 13),
        "conv4": (384, 13, 13), "act4": (384, 13, 13),
        "conv5": (256, 13, 13), "act5": (256, 13, 13), "pool5": (256, 6, 6),
        "fc6": (4096,), "act6": (4096,), "drop6": (4096,),
        "fc7": (4096,), "act7": (4096,), "drop7": (4096,), "fc8": (1000,),
    }  # fmt: skip
    assert shapes == expected
    assert list(shapes) == list(expected)  # the order of the layers, too


def test_avgpool_is_identity_at_227(paper_full: AlexNet) -> None:
    x = torch.randn(1, 3, 227, 227)
    with torch.no_grad():
        maps = paper_full.features(x)
        assert torch.equal(paper_full.avgpool(maps), maps)


def test_paper_conv_geometry(paper_full: AlexNet) -> None:
    f = paper_full.features
    geometry = {
        name: (m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.groups)
        for name, m in f.named_children()
        if isinstance(m, nn.Conv2d)
    }
    assert geometry == {
        "conv1": (96, 11, 4, 0, 1),
        "conv2": (256, 5, 1, 2, 2),
        "conv3": (384, 3, 1, 1, 1),
        "conv4": (384, 3, 1, 1, 2),
        "conv5": (256, 3, 1, 1, 2),
    }
    pools = [(m.kernel_size, m.stride) for m in f if isinstance(m, nn.MaxPool2d)]
    assert pools == [(3, 2)] * 3


@pytest.mark.parametrize("pooling", ["overlap", "nonoverlap"])
def test_pooling_spatial_sizes_at_227(pooling: str) -> None:
    model = build_model("paper", num_classes=10, pooling=pooling, width=0.25).eval()
    shapes = output_shapes(model, torch.randn(1, 3, 227, 227))
    assert [shapes[p][1:] for p in ("pool1", "pool2", "pool5")] == [(27, 27), (13, 13), (6, 6)]
    kernel = 3 if pooling == "overlap" else 2
    assert {m.kernel_size for m in model.features if isinstance(m, nn.MaxPool2d)} == {kernel}


@pytest.mark.parametrize("arch", ["paper", "torchvision"])
@pytest.mark.parametrize("size", [99, 115])
def test_small_inputs_reach_the_same_classifier(arch: str, size: int) -> None:
    model = build_model(arch, num_classes=7, width=0.25).eval()
    with torch.no_grad():
        maps = model.features(torch.randn(1, 3, size, size))
        logits = model(torch.randn(1, 3, size, size))
    assert maps.shape[-2:] == (2, 2)  # the adaptive pool brings it to 6x6
    assert logits.shape == (1, 7)


def test_groups_split_conv2_into_two_towers(paper_full: AlexNet) -> None:
    """conv2's first 128 maps see only the first 48 maps of pool1 (the first GPU)."""
    conv2 = paper_full.features.conv2
    x = torch.randn(1, 96, 27, 27)
    y = x.clone()
    y[:, 48:] += 1.0  # change only the second tower's inputs
    with torch.no_grad():
        a, b = conv2(x), conv2(y)
    assert torch.equal(a[:, :128], b[:, :128])
    assert not torch.allclose(a[:, 128:], b[:, 128:])


@pytest.mark.parametrize(("width", "groups"), [(0.1, 2), (0.33, 2), (0.01, 2), (0.55, 1)])
def test_width_scales_and_keeps_groups_valid(width: float, groups: int) -> None:
    model = build_model("paper", num_classes=3, width=width, groups=groups)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    for conv, base in zip(convs, (96, 256, 384, 384, 256), strict=True):
        assert conv.out_channels % groups == 0
        assert conv.out_channels == max(groups, round(base * width / groups) * groups)
    assert model.classifier.fc6.out_features == max(1, round(4096 * width))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 99, 99)).shape == (1, 3)


def test_cifar_net_shapes() -> None:
    for pooling, sizes in (("overlap", [15, 7, 3]), ("nonoverlap", [16, 8, 4])):
        model = cifar_net(num_classes=10, pooling=pooling).eval()
        pools = []
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: pools.append(out.shape[-1]))  # noqa: B023 - called within this iteration
            for m in model.features
            if isinstance(m, nn.MaxPool2d)
        ]
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        assert pools == sizes
        for h in hooks:
            h.remove()
    convs = [m for m in cifar_net().features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64]
    assert n_params(cifar_net()) == 85_098


# --- LRN ---------------------------------------------------------------------------------


def lrn_by_hand(a: Tensor, n: int, k: float, alpha: float, beta: float) -> Tensor:
    """b = a / (k + alpha/n * sum_{window} a^2)^beta, window of n channels clipped at edges."""
    channels = a.shape[1]
    b = torch.empty_like(a)
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels - 1, c + n // 2)
        window = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        b[:, c] = a[:, c] / (k + alpha / n * window) ** beta
    return b


def test_lrn_matches_the_formula(paper_full: AlexNet) -> None:
    torch.manual_seed(0)
    # Large post-ReLU activations so the normalisation term is far from negligible.
    a = torch.rand(2, 9, 4, 4, dtype=torch.float64) * 80.0
    lrn = paper_full.features.lrn1
    b = lrn(a)
    torch.testing.assert_close(b, lrn_by_hand(a, n=5, k=2.0, alpha=1e-4, beta=0.75))
    # The paper's formula to the letter (alpha not divided by n) is a different layer.
    literal = lrn_by_hand(a, n=5, k=2.0, alpha=5e-4, beta=0.75)
    assert not torch.allclose(b, literal, rtol=1e-3)
    assert not torch.allclose(b, a / 2.0**0.75, rtol=1e-3)


def test_lrn_sits_after_relu_of_conv1_and_conv2_only() -> None:
    names = list(build_model("paper", num_classes=10, width=0.1).features._modules)
    assert names[:8] == ["conv1", "act1", "lrn1", "pool1", "conv2", "act2", "lrn2", "pool2"]
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in alexnet(width=0.1).features) == 2
    no_lrn = build_model("paper", num_classes=10, width=0.1, lrn=False)
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in no_lrn.modules())


# --- initialisation and dropout --------------------------------------------------------


def test_paper_initialisation() -> None:
    torch.manual_seed(0)
    model = alexnet(num_classes=10, width=0.5)
    layers = {
        name: m
        for part in (model.features, model.classifier)
        for name, m in part.named_children()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }
    assert list(layers) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    for name, layer in layers.items():
        w = layer.weight.detach()
        assert abs(w.std().item() - 0.01) < 0.0005, name
        assert abs(w.mean().item()) < 0.0005, name
        bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, bias)), name


def test_dropout_acts_on_fc6_and_fc7_outputs() -> None:
    torch.manual_seed(0)
    model = alexnet(num_classes=10, width=0.25, dropout=0.5).train()
    seen: dict[str, Tensor] = {}

    def keep(name: str, tensor: Tensor) -> None:
        seen[name] = tensor.detach().clone()  # clone: the ReLUs run in place

    c = model.classifier
    model.avgpool.register_forward_hook(lambda _m, _i, out: keep("pooled", out.flatten(1)))
    for fc in ("fc6", "fc7", "fc8"):
        c.get_submodule(fc).register_forward_pre_hook(lambda _m, i, fc=fc: keep(fc + "_in", i[0]))
    for fc in ("fc6", "fc7"):
        c.get_submodule(fc).register_forward_hook(lambda _m, _i, o, fc=fc: keep(fc + "_out", o))
    model(torch.randn(4, 3, 99, 99))

    assert torch.equal(seen["fc6_in"], seen["pooled"])  # fc6's inputs are not dropped
    for fc, nxt in (("fc6", "fc7_in"), ("fc7", "fc8_in")):
        kept = torch.relu(seen[fc + "_out"])
        dropped = seen[nxt] == 0
        assert kept.gt(0).float().mean() > 0.9
        assert 0.4 < (dropped & kept.gt(0)).float().mean() < 0.6  # about half were dropped
        torch.testing.assert_close(seen[nxt][~dropped], 2.0 * kept[~dropped])  # 1 / (1 - p)


# --- switches and validation -----------------------------------------------------------


def test_activation_switch() -> None:
    for arch in ARCHS:
        model = build_model(arch, num_classes=4, activation="tanh", width=0.1)
        assert any(isinstance(m, nn.Tanh) for m in model.modules()), arch
        assert not any(isinstance(m, nn.ReLU) for m in model.modules()), arch


def test_arch_defaults() -> None:
    assert [input_size(a) for a in ARCHS] == [227, 224, 32]
    paper, tv, cifar = (build_model(a, num_classes=4, width=0.1) for a in ARCHS)
    assert paper.features.conv2.groups == 2
    assert any(isinstance(m, nn.LocalResponseNorm) for m in paper.modules())
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in [*tv.modules(), *cifar.modules()])
    assert {m.p for m in paper.modules() if isinstance(m, nn.Dropout)} == {0.5}
    assert {m.p for m in tv.modules() if isinstance(m, nn.Dropout)} == {0.5}
    assert {m.p for m in cifar.modules() if isinstance(m, nn.Dropout)} == {0.0}
    assert isinstance(tv.classifier[0], nn.Dropout)  # torchvision drops fc6's inputs


@pytest.mark.parametrize(
    ("arch", "kwargs", "message"),
    [
        ("paper", dict(pooling="foo"), "model.pooling='foo': expected one of 'overlap', 'nonoverlap'"),
        ("paper", dict(activation="gelu"), "model.activation='gelu': expected one of 'relu', 'tanh'"),
        ("cifar", dict(activation="sigmoid"), "model.activation='sigmoid': expected one of"),
        ("paper", dict(lrn="yes"), "model.lrn='yes': expected one of True, False"),
        ("paper", dict(groups=3), "model.groups=3: expected one of 1, 2"),
        ("paper", dict(groups=True), "model.groups=True: expected one of 1, 2"),
        ("paper", dict(dropout=1.0), "model.dropout=1.0: expected a float in [0, 1)"),
        ("cifar", dict(dropout=-0.1), "model.dropout=-0.1: expected a float in [0, 1)"),
        ("paper", dict(num_classes=1), "model.num_classes=1: expected an int >= 2"),
        ("torchvision", dict(num_classes=2.0), "model.num_classes=2.0: expected an int >= 2"),
        ("paper", dict(width=0), "model.width=0: expected a finite float > 0"),
        ("cifar", dict(width=-1.0), "model.width=-1.0: expected a finite float > 0"),
        ("paper", dict(width=math.inf), "model.width=inf: expected a finite float > 0"),
        ("vgg", dict(), "model.arch='vgg': expected one of 'paper', 'torchvision', 'cifar'"),
        ("torchvision", dict(lrn=True), "model.lrn=True: expected false for model.arch='torchvision'"),  # noqa: E501
        ("torchvision", dict(groups=2), "model.groups=2: expected 1 for model.arch='torchvision'"),  # noqa: E501
        ("torchvision", dict(pooling="nonoverlap"), "model.pooling='nonoverlap': expected 'overlap' for model.arch='torchvision'"),  # noqa: E501
        ("cifar", dict(lrn=True), "model.lrn=True: expected false for model.arch='cifar'"),
        ("cifar", dict(groups=2), "model.groups=2: expected 1 for model.arch='cifar'"),
    ],
)  # fmt: skip
def test_invalid_config_is_named(arch: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(arch, **{"num_classes": 10, **kwargs})
    assert str(info.value).startswith(message)


def test_input_size_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match=r"model\.arch='alexnet': expected one of"):
        input_size("alexnet")


def test_neutral_switches_pass_for_torchvision_and_cifar() -> None:
    for arch in ("torchvision", "cifar"):
        build_model(arch, num_classes=3, lrn=False, groups=1, pooling="overlap", width=0.1)
    assert cifar_net(pooling="nonoverlap").classifier[1].in_features == 64 * 4 * 4


def test_models_package_does_not_import_pipeline() -> None:
    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("pipeline", "stages") for n in names), path


# --- torchvision interop and checkpoints -----------------------------------------------


def test_torchvision_weights_load_strictly_and_match() -> None:
    torch.manual_seed(0)
    theirs = torchvision.models.alexnet(weights=None).eval()
    ours = build_model("torchvision", num_classes=1000).eval()
    assert repr(ours.features) == repr(theirs.features)
    assert repr(ours.classifier) == repr(theirs.classifier)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["", "module.", "module._orig_mod."])
def test_load_checkpoint_round_trips(tmp_path: Path, prefix: str) -> None:
    saved, x = small("paper")
    path = tmp_path / "model.pt"
    torch.save({prefix + k: v for k, v in saved.state_dict().items()}, path)
    loaded, _ = small("paper")
    for p in loaded.parameters():
        nn.init.zeros_(p)
    assert load_checkpoint(loaded, path) is loaded
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), saved.eval()(x))


def test_load_checkpoint_is_strict_and_weights_only(tmp_path: Path) -> None:
    model, _ = small("cifar")
    path = tmp_path / "other.pt"
    torch.save(small("cifar", width=2.0)[0].state_dict(), path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(model, path)
    torch.save({"obj": Path("not a tensor")}, path)  # needs unpickling arbitrary classes
    with pytest.raises(Exception, match="weights_only"):
        load_checkpoint(model, path)


# --- execution: training step, channels_last + bf16, export, cost ----------------------


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_reaches_every_parameter(arch: str, activation: str) -> None:
    model, x = small(arch, activation=activation)
    logits = model.train()(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_and_bf16_autocast(arch: str) -> None:
    model, x = small(arch)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    first_conv = next(m for m in model.features if isinstance(m, nn.Conv2d))
    layouts: list[bool] = []
    first_conv.register_forward_hook(
        lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-5)
    assert layouts == [True]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.train()(x)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).float()
    assert (low - reference).abs().max() <= 0.05 * reference.abs().max() + 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_eager(arch: str) -> None:
    model, x = small(arch)
    model.eval()
    program = torch.export.export(model, (x,))
    other = torch.randn_like(x)  # not the tracing input
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), model(other), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("arch", "gmacs"), [("paper", 0.7244), ("torchvision", 0.7142)])
def test_multiply_accumulates_per_image(arch: str, gmacs: float) -> None:
    """torchvision's "0.71 GFLOPS" for AlexNet counts conv/linear multiply-accumulates."""
    size = input_size(arch)
    with torch.device("meta"):
        model = build_model(arch, num_classes=1000)
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, size, size))
    assert counter.get_total_flops() / 2e9 == pytest.approx(gmacs, abs=1e-4)


@pytest.mark.parametrize(
    ("arch", "pooling"), [("paper", "overlap"), ("paper", "nonoverlap"), ("torchvision", "overlap")]
)
def test_crop_range_is_the_built_networks(arch: str, pooling: str) -> None:
    # models.rules describes the layers without torch; the built network must agree.
    from models.rules import crop_range, feature_side

    lo, _ = crop_range(arch, pooling)
    model = build_model(arch, num_classes=2, pooling=pooling, width=0.05).eval()
    with torch.no_grad():
        for side in (lo, 100, 227):
            out = model.features(torch.zeros(1, 3, side, side))  # (1, C, s, s)
            assert out.shape[-1] == feature_side(arch, pooling, side)
        model(torch.zeros(1, 3, lo, lo))
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, lo - 1, lo - 1))


def test_config_rules_import_without_torch() -> None:
    # Stages that only load params (sample, shard, stats) must not depend on the networks.
    code = "import sys, pipeline.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
