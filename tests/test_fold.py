"""normprop_fx.fold: the inference form equals the converted model's eval outputs, folds
constant affines into the following layer only where exact, and never touches its argument."""

from __future__ import annotations

import copy
import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import fx, nn

import normprop_fx
from normprop_fx import (
    ConstantAffine,
    NormPropAffine,
    NormPropConv2d,
    NormPropLinear,
    Standardize,
)
from normprop_fx.errors import NormPropError
from normprop_fx.fold import ShiftedInputConv, gated_affine

NORMPROP_TYPES = (normprop_fx.NormPropLayer, normprop_fx.NormalizedActivation, NormPropAffine, Standardize)


class _NormPropLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, NORMPROP_TYPES) or super().is_leaf_module(m, name)


def traced(module: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, _NormPropLeaves().trace(module))


def randomize_normprop_parameters(gm: nn.Module) -> None:
    """Move gamma and beta off their initial values so they matter in the comparison."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _structure(model: nn.Module) -> str:
    """The module tree, and the code of every GraphModule in it (a converted model's rebuilt blocks)."""
    return str(model) + "".join(m.code for m in model.modules() if isinstance(m, fx.GraphModule))


def assert_fold_is_exact(gm: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = gm.double().eval()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    code = _structure(gm)
    folded = normprop_fx.fold(gm)
    with torch.no_grad():
        expected, got = gm(x.double()), folded(x.double())
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, f"relative error {rel:.3g}"
    # the argument is untouched: same graph, same tensors, still NormProp
    assert _structure(gm) == code
    assert all(torch.equal(state[k], v) for k, v in gm.state_dict().items())
    assert not folded.training
    inside = [p for _, paths in folded.fold_report.inside_leaves for p in paths]
    assert not any(isinstance(m, NORMPROP_TYPES) for path, m in folded.named_modules()
                   if not any(path == p or path.startswith(p + ".") for p in inside))
    return folded


def affines(gm: nn.Module) -> int:
    return sum(isinstance(m, ConstantAffine) for m in gm.modules())


# the core tests' models, and the other three that tools/bench.py times folded (SE gates,
# hardswish, SiLU, depthwise convs)
@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "resnet50", "mobilenet_v3_large", "efficientnet_b0"])
def test_zoo_model_fold_equals_eval_outputs(name):
    torch.manual_seed(0)
    converted = normprop_fx.convert(getattr(torchvision.models, name)())
    randomize_normprop_parameters(converted)
    folded = assert_fold_is_exact(converted, torch.randn(2, 3, 64, 64))
    plain_convs = sum(type(m) is nn.Conv2d for m in folded.modules())
    assert plain_convs == sum(type(m) is nn.Conv2d for m in getattr(torchvision.models, name)().modules())


class _StandardizeThenConv(nn.Module):
    def __init__(self, conv: nn.Module, mean: float | torch.Tensor, scale: float | torch.Tensor) -> None:
        super().__init__()
        self.std = Standardize(torch.as_tensor(mean), torch.as_tensor(scale))
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.std(x))


def _per_channel(c: int, offset: float) -> torch.Tensor:
    return (offset + torch.arange(c, dtype=torch.float32) / c).reshape(c, 1, 1)


@pytest.mark.parametrize(
    ("conv", "mean_offset", "folds"),
    [
        (nn.Conv2d(4, 6, 3, padding=1), 0.3, False),  # zero padding sees the shift: must stay
        (nn.Conv2d(4, 6, 3, padding=1), 0.0, True),  # a pure scale commutes with zero padding
        (nn.Conv2d(4, 6, 1), 0.3, True),
        (nn.Conv2d(4, 6, 3, padding=0), 0.3, True),
        (nn.Conv2d(4, 6, 3, padding="same"), 0.3, False),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), 0.3, True),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"), 0.3, True),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), 0.3, True),
        (nn.Conv2d(4, 6, 1, groups=2, bias=False), 0.3, True),
        (nn.Conv2d(4, 4, 3, groups=4), 0.3, True),  # depthwise, no padding
    ],
)
def test_standardize_before_plain_conv(conv, mean_offset, folds):
    torch.manual_seed(0)
    gm = traced(_StandardizeThenConv(conv, _per_channel(4, mean_offset) * (mean_offset != 0), _per_channel(4, 0.5)))
    folded = assert_fold_is_exact(gm, torch.randn(2, 4, 9, 9))
    assert affines(folded) == (0 if folds else 1)
    if not folds:  # the conv took the per-channel scale; the shift stays, one add
        (kept,) = [m for m in folded.modules() if isinstance(m, ConstantAffine)]
        assert torch.equal(kept.scale, torch.ones_like(kept.scale))
        assert folded.fold_report.counts["scales folded into the zero-padded layer that reads them (the shift kept)"] == 1
        assert "(the layer took the scale)" in str(folded.fold_report)


def test_standardize_before_normprop_conv_and_linear():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.std1 = Standardize(_per_channel(3, 0.2), _per_channel(3, 0.7))
            self.conv = NormPropConv2d(3, 5, 1, activation="silu")
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.std2 = Standardize(torch.full((5,), 0.1), torch.tensor(0.8))
            self.fc = NormPropLinear(5, 7, activation="identity")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.std2(self.pool(self.conv(self.std1(x))).flatten(1)))

    gm = traced(Net())
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(3, 3, 6, 6))
    # std1 folds into the 1x1 conv; std2 into the Linear; the silu normalization stays
    # (the pool sits between it and the Linear)
    assert affines(folded) == 1


def test_normprop_affine_then_normalized_activation_then_1x1_conv():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.affine = NormPropAffine(4, activation="relu")
            self.std = Standardize(torch.tensor(0.0), torch.tensor(0.5))
            self.act = normprop_fx.NormalizedActivation("hardswish")
            self.conv = nn.Conv2d(4, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.act(self.std(self.affine(x))))

    gm = traced(Net())
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 4, 5, 5))
    # the per-channel affine stays before its relu, and takes relu's normalization and the
    # Standardize (moved in front of the clamp); hardswish's folds into the 1x1 conv
    assert affines(folded) == 1


def test_shared_layers_are_not_folded_into():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = NormPropConv2d(4, 4, 3, padding=1, activation="silu")  # an affine after its silu
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.head(self.layer(x))  # head is called twice: folding into it would change
            b = self.head(self.layer(a.repeat(1, 2, 1, 1)))  # the other call
            return a.mean() + b

    gm = traced(Net())
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 4, 6, 6))
    assert affines(folded) == 2
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 2  # the shared layer stays one module


def test_layer_whose_weight_is_read_elsewhere_is_not_folded_into():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.std = Standardize(torch.tensor(0.3), torch.tensor(2.0))
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.std(x)) + self.conv.weight.sum()

    folded = assert_fold_is_exact(traced(Net()), torch.randn(2, 4, 3, 3))
    assert affines(folded) == 1


def test_tied_weights_with_different_gammas():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = NormPropConv2d(4, 4, 1)
            self.b = NormPropConv2d(4, 4, 1)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    gm = traced(Net())
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 4, 5, 5))
    assert affines(folded) == 0  # ReLU layers: each normalization is in its own conv and clamp


def test_fold_refuses_what_convert_did_not_return():
    with pytest.raises(NormPropError, match="GraphModule"):
        normprop_fx.fold(nn.Linear(2, 2))


def test_fold_output_keeps_working_after_deepcopy_and_in_float32():
    converted = normprop_fx.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    folded = copy.deepcopy(normprop_fx.fold(converted))
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), converted.eval()(x), rtol=1e-5, atol=1e-6)


def test_folded_model_survives_torch_save_and_load():
    from normprop_fx.fold import ConstantAffine

    # ConstantAffine's load hook is a module-level function: a lambda made torch.save fail; a
    # ShiftedInputConv pickles with the maps it keeps
    converted = normprop_fx.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1),
                                                  nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1)))
    folded = normprop_fx.fold(converted)
    assert any(isinstance(m, ConstantAffine) for m in folded.modules())  # after SiLU, zero padding keeps it
    assert any(isinstance(m, ShiftedInputConv) for m in folded.modules())  # (the strided conv takes it)
    with torch.no_grad():
        folded(torch.randn(2, 3, 8, 8))  # a map kept
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x))


def test_scalar_constant_affine_follows_a_loaded_state_dict():
    from normprop_fx.fold import ConstantAffine

    affine = ConstantAffine(torch.tensor(2.0), torch.tensor(-1.0))
    x = torch.randn(3, 4)
    torch.testing.assert_close(affine(x), x * 2 - 1)
    affine.load_state_dict({"scale": torch.tensor(0.5), "shift": torch.tensor(3.0)})
    torch.testing.assert_close(affine(x), x * 0.5 + 3)
    per_channel = ConstantAffine(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), channel_dim=1)
    torch.testing.assert_close(per_channel(torch.ones(2, 2, 3)), torch.tensor([1.0, 3.0]).reshape(1, 2, 1).expand(2, 2, 3))


# --- the ReLU family folds to plain conv + clamp (issue 19) -------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "vgg11_bn", "resnet18"])
def test_relu_networks_fold_to_convs_and_clamps(name):
    """Every normalization of a ReLU network goes into a conv's weights, an add's alpha or a
    clamp's bounds, and the activations overwrite the conv outputs they read, as a BN-folded
    torchvision model's ReLU(inplace=True) does. resnet18's correction after the max pool, read
    by a zero-padded conv and by the residual add, goes into the stem conv once the add reads it
    instead (its other operand's conv takes the shift)."""
    torch.manual_seed(0)
    converted = normprop_fx.convert(getattr(torchvision.models, name)(num_classes=10))
    randomize_normprop_parameters(converted)
    folded = assert_fold_is_exact(converted, torch.randn(2, 3, 64, 64))
    report = folded.fold_report
    assert affines(folded) == len(report.kept_affines) == 0
    assert "no constant affine kept" in str(report)
    clamps = [n for n in folded.graph.nodes if n.target is torch.nn.functional.hardtanh]
    assert clamps and all(n.kwargs.get("inplace") for n in clamps)
    if name == "resnet18":
        assert report.counts["made the only reader of their input, its adds reading them instead"] == 1


@pytest.mark.parametrize("act", ["relu", "relu6", "hardtanh", "leaky_relu"])
def test_normprop_conv_of_the_relu_family_folds_without_an_affine(act):
    layer = NormPropConv2d(3, 4, 3, padding=1, activation=act)
    gm = traced(nn.Sequential(layer))
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 3, 6, 6))
    # leaky_relu: the scale goes into the conv, the shift stays (the graph's output follows)
    assert affines(folded) == (1 if act == "leaky_relu" else 0)
    assert [why for _, why in folded.fold_report.kept_affines] == (["before it: leaky_relu (an op the affine cannot move "
                                                                     "in front of); after it: the model's output"] if act == "leaky_relu" else [])


def test_affine_after_a_residual_add_goes_into_the_conv_and_the_add():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = NormPropConv2d(4, 4, 3, padding=1)
            self.conv2 = NormPropConv2d(4, 4, 3, padding=1, activation="identity")
            self.identity_correction = Standardize(torch.tensor(0.1), torch.tensor(1.2))
            self.add_correction = Standardize(torch.tensor(0.3), torch.tensor(0.7))
            self.act = normprop_fx.NormalizedActivation("relu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv2(self.conv1(x)) + self.identity_correction(x)
            return self.act(self.add_correction(y))

    gm = traced(Block())
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 4, 6, 6))
    assert affines(folded) == 0
    adds = [n for n in folded.graph.nodes if n.target is torch.add]
    assert len(adds) == 1 and adds[0].kwargs["alpha"] != 1.0


def test_a_module_tree_with_a_rebuilt_root_folds_every_normprop_module():
    """The root's F.relu, which a NormProp layer reads, fuses into the child's BatchNorm: convert
    rebuilds the root as a GraphModule that calls the child; fold must trace through it, not take
    the root as it is."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.nn.functional.relu(self.block(x)))

    converted = normprop_fx.convert(Net())
    assert isinstance(converted, fx.GraphModule) or any(isinstance(m, fx.GraphModule) for m in converted.modules())
    assert_fold_is_exact(converted, torch.randn(2, 3, 8, 8))


def test_fold_report_counts_every_sub_pass():
    converted = normprop_fx.convert(torchvision.models.resnet18(num_classes=10))
    report = normprop_fx.fold(converted).fold_report
    assert report.counts["NormProp modules expanded"] > 0
    assert report.counts["folded into the add that reads them"] > 0
    assert str(report).startswith("fold: ")


# --- in place: what overwrites a fresh tensor (issue 19) -----------------------------------------


def _in_place_nodes(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.kwargs.get("inplace")
            or (n.op == "call_module" and getattr(gm.get_submodule(n.target), "inplace", False))]


def test_fold_overwrites_only_fresh_tensors_nothing_else_reads():
    """A SiLU layer folds to conv, SiLU and its constant affine (kept: a zero-padded conv reads
    it); SiLU overwrites its conv's output and the affine SiLU's output, and the user's own
    F.silu overwrites the conv output it reads. Where that conv output is read twice it is not
    overwritten, the affine that reads the model's input never overwrites it, and the caller's
    input is never changed."""

    class Net(nn.Module):
        def __init__(self, reuse: bool) -> None:
            super().__init__()
            self.reuse = reuse
            self.std = Standardize(torch.tensor(0.2), torch.tensor(1.5))
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.layer = NormPropConv2d(4, 4, 3, padding=1, activation="silu")
            self.head = nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c = self.conv(self.std(x))
            out = self.head(self.layer(torch.nn.functional.silu(c)))
            return out + c.mean() if self.reuse else out

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    once = assert_fold_is_exact(traced(Net(reuse=False)), x)
    assert affines(once) == 2 and len(_in_place_nodes(once)) == 3
    assert once.fold_report.counts["activations and affines computed in place"] == 3
    twice = assert_fold_is_exact(traced(Net(reuse=True)), x)
    assert len(_in_place_nodes(twice)) == 2  # the user's F.silu no longer overwrites c
    before = x.clone()
    with torch.no_grad():
        once(x), twice(x)
    assert torch.equal(x, before)


def test_an_in_place_affine_stays_out_of_place_while_a_gradient_is_recorded():
    """The folded model under autograd (a user's input gradient, torch.func) computes the same
    value and gradient as the converted model: its affines overwrite nothing then."""
    torch.manual_seed(0)
    gm = traced(nn.Sequential(NormPropConv2d(3, 4, 3, padding=1, activation="silu"), nn.Conv2d(4, 2, 3, padding=1)))
    randomize_normprop_parameters(gm)
    gm = gm.double().eval()
    folded = normprop_fx.fold(gm)
    assert _in_place_nodes(folded)
    grads = []
    for model in (gm, folded):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = model(x)
        grads.append((out.detach(), torch.autograd.grad(out.square().sum(), x)[0]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pool_on_left", [True, False])
def test_an_affine_read_beside_a_residual_add_goes_into_the_layer_before_the_max_pool(pool_on_left):
    """``m = maxpool(relu layer)``, read by a correction (then a zero-padded conv) and by a
    residual add: the add reads the correction instead, with the shift in its other operand's
    conv, and the correction moves through the max pool and the clamp into the first layer."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = NormPropConv2d(3, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.correction = Standardize(torch.tensor(0.3), torch.tensor(1.4))
            self.conv = NormPropConv2d(4, 4, 3, padding=1, activation="identity")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.pool(self.stem(x))
            y = self.conv(self.correction(m))
            return torch.add(m, y, alpha=0.7) if pool_on_left else torch.add(y, m, alpha=0.7)

    torch.manual_seed(0)
    gm = traced(Net())
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 3, 8, 8))
    assert affines(folded) == 0
    assert folded.fold_report.counts["made the only reader of their input, its adds reading them instead"] == 1


class _TimmStyleSE(nn.Module):
    """timm's SqueezeExcite: the squeeze is ``x.mean((2, 3), keepdim=True)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


@pytest.mark.parametrize("se", [lambda: torchvision.ops.SqueezeExcitation(4, 2, scale_activation=nn.Hardsigmoid),
                                lambda: _TimmStyleSE(4)], ids=["torchvision", "timm"])
@pytest.mark.parametrize("also_read", [False, True])
def test_the_affine_in_front_of_a_squeeze_excitation_block_goes_into_its_gate(se, also_read):
    """A SiLU layer's normalization read by an SE block's pool and gate product leaves no affine:
    the pool's copy goes into the SE's first conv and the product becomes one addcmul
    (fold.gated_affine). Read by anything else too, it stays."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = NormPropConv2d(3, 4, 1, activation="silu")
            self.se = se()
            self.head = nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.layer(x)
            out = self.head(self.se(y))
            return out + y.sum() if also_read else out

    torch.manual_seed(0)
    gm = traced(Net())
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 3, 6, 6))
    taken = folded.fold_report.counts["taken into the channel gate and the pool that read them"]
    assert (taken, affines(folded)) == ((0, 1) if also_read else (1, 0))
    assert any(n.target is gated_affine for n in folded.graph.nodes) != also_read


def test_gated_affine_is_the_product_it_replaces():
    x, gate = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.rand(2, 4, 1, 1, dtype=torch.float64)
    for g in (gate, torch.rand(2, 4, 5, 5, dtype=torch.float64)):  # a channel gate, and a full-size one
        torch.testing.assert_close(gated_affine(x, g, 1.7, -0.4), (x * 1.7 - 0.4) * g)


def test_an_in_place_constant_affine_never_widens_its_input():
    """A per-channel affine whose buffers would broadcast its input wider computes out of place."""
    affine = ConstantAffine(torch.full((1, 1, 1), 2.0), torch.ones(1, 1, 1))
    affine.inplace = True
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = affine(x)
    assert out.shape == (1, 3, 4) and torch.equal(out[0], x * 2 + 1)


# --- a shift in front of a strided zero-padded conv goes behind it (issue 19) -------------------


class _SiLUThenConv(nn.Module):
    """A SiLU layer (its normalization's shift meets the next conv's zero padding), then that conv."""

    def __init__(self, *, channels_out: int = 6, groups: int = 6, stride: int = 2, padding: int = 1) -> None:
        super().__init__()
        self.layer = NormPropConv2d(3, 6, 1, activation="silu")
        self.conv = nn.Conv2d(6, channels_out, 3, stride=stride, padding=padding, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer(x))


MOVED = "shifts moved behind the strided zero-padded conv that reads them"


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations:UserWarning")
@pytest.mark.parametrize("groups", [6, 1])
@pytest.mark.parametrize("padding", [1, 2])
def test_a_shift_in_front_of_a_strided_conv_goes_behind_it(groups, padding):
    """The SiLU normalization's shift before a stride-2 zero-padded conv (depthwise or not)
    becomes that conv plus the conv of the shift alone, a map that differs at the border: exact,
    on inputs of several sizes (each its own kept map), odd and even, and unbatched."""
    torch.manual_seed(0)
    gm = traced(_SiLUThenConv(groups=groups, padding=padding))
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 3, 9, 9))
    assert folded.fold_report.counts[MOVED] == 1 and affines(folded) == 0
    shifted = [m for m in folded.modules() if isinstance(m, ShiftedInputConv)]
    assert len(shifted) == 1
    for shape in ((3, 3, 8, 8), (1, 3, 5, 7), (2, 3, 9, 9), (3, 9, 9)):
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), gm(x), rtol=1e-10, atol=1e-10)
    assert len(shifted[0]._maps) == 4
    # scripted with maps kept (a TorchScript module computes its map every call)
    scripted = torch.jit.script(folded)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), folded(x), rtol=1e-10, atol=1e-10)
    # a forward hook that keeps the conv's output keeps the conv's output, not the sum
    conv, seen = shifted[0].conv, []
    conv.register_forward_hook(lambda _, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm(x), rtol=1e-10, atol=1e-10)
        conv_input, kept = seen[0]
        torch.testing.assert_close(kept, conv._conv_forward(conv_input, conv.weight, conv.bias), rtol=0, atol=0)


def test_the_map_is_not_a_bias():
    """The map is the shift's conv with the zero border: a constant bias would be wrong at the
    border (what makes this test fail if the map were replaced by its interior value)."""
    torch.manual_seed(0)
    gm = traced(_SiLUThenConv())
    randomize_normprop_parameters(gm)
    folded = normprop_fx.fold(gm.double().eval())
    module = next(m for m in folded.modules() if isinstance(m, ShiftedInputConv))
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        the_map = module(x) - module.conv(x)
    interior = the_map[..., 1:-1, 1:-1]
    assert torch.allclose(interior, interior[..., :1, :1].expand_as(interior))
    assert not torch.allclose(the_map[..., 0, 0], interior[..., 0, 0])


@pytest.mark.parametrize("kwargs", [dict(stride=1), dict(stride=2, padding=0), dict(stride=1, channels_out=2, groups=1)])
def test_a_shift_stays_in_front_where_moving_it_gains_nothing(kwargs):
    """Where the conv is not strided (even with fewer output channels: not measured to gain) the
    shift stays one in-place add; with no padding it goes into the conv's bias as before."""
    torch.manual_seed(0)
    gm = traced(_SiLUThenConv(**kwargs))
    randomize_normprop_parameters(gm)
    folded = assert_fold_is_exact(gm, torch.randn(2, 3, 9, 9))
    assert folded.fold_report.counts[MOVED] == 0
    assert affines(folded) == (0 if kwargs.get("padding") == 0 else 1)


def test_a_kept_map_follows_the_weights_and_the_gradient():
    """A kept map is recomputed when the conv's weight changes in place (a loaded state dict),
    and none is used where a gradient flows: the gradients through the folded model, for its
    input and for a weight the user made trainable, equal those of the function it stands for."""
    torch.manual_seed(0)
    gm = traced(_SiLUThenConv())
    randomize_normprop_parameters(gm)
    gm = gm.double().eval()
    folded = normprop_fx.fold(gm)
    module = next(m for m in folded.modules() if isinstance(m, ShiftedInputConv))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = folded(x)
        folded.load_state_dict({k: v * 1.5 if k.endswith("conv.weight") else v for k, v in folded.state_dict().items()})
        after = folded(x)
    bias = module.conv.bias.reshape(1, -1, 1, 1)
    # the conv of the shifted input is linear in the weight: without its bias it scales by 1.5
    torch.testing.assert_close(after - bias, (before - bias) * 1.5, rtol=1e-10, atol=1e-10)

    inputs = []
    module.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    module.conv.weight.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    out = folded(xg)
    gx, gw = torch.autograd.grad(out.square().sum(), (xg, module.conv.weight))
    # the reference: the shift added in front of the zero-padded conv, and the NormProp model
    w_ref = module.conv.weight.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.conv2d(inputs[0].detach() + module.shift.reshape(1, -1, 1, 1), w_ref, module.conv.bias,
                                     2, 1, 1, 6)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, torch.autograd.grad(ref.square().sum(), w_ref)[0], rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        gm.conv.weight.mul_(1.5)
    xr = x.clone().requires_grad_(True)
    torch.testing.assert_close(gx, torch.autograd.grad(gm(xr).square().sum(), xr)[0], rtol=1e-10, atol=1e-10)


# --- layers that pad their own input (issue 20) --------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations:UserWarning")
def test_tensorflow_same_padding_stays_in_front_of_the_plain_conv():
    """timm's Conv2dSame (TensorFlow 'SAME' padding computed from the input size at run time, as
    in every tf_* model) converts to NormPropConv2dSame; folded, the padding stays in front of
    the plain conv. (fold dropped it: tf_efficientnet_b0 folded differed by 94% of its output's
    scale at 128 px and failed at 96 px.) Exact at even and odd sizes, where the padding differs."""
    from timm.layers import Conv2dSame

    from normprop_fx.conv_same import pad_same

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                          Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    converted = normprop_fx.convert(model, example_inputs=torch.randn(2, 3, 16, 16)).eval().double()
    randomize_normprop_parameters(converted)
    folded = normprop_fx.fold(converted)
    assert sum(n.target is pad_same for n in folded.graph.nodes) == 2
    scripted = torch.jit.script(folded)  # (pad_same's annotations are TorchScript's)
    for shape in ((2, 3, 16, 16), (1, 3, 15, 21), (1, 3, 9, 8)):
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), converted(x), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(scripted(x), folded(x), rtol=1e-10, atol=1e-10)


def test_a_layer_subclass_with_its_own_forward_is_refused():
    """A NormProp layer subclass whose forward fold does not know is refused, not folded into a
    plain conv that would compute something else."""

    class Doubled(NormPropConv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(2 * x)

    gm = traced(nn.Sequential(Doubled(3, 4, 1, activation="relu")))
    with pytest.raises(NormPropError, match="forward is its own"):
        normprop_fx.fold(gm.eval())

    class Reflected(NormPropConv2d):  # pads by hand, as NormPropConv2dSame does
        def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")

    gm = traced(nn.Sequential(Reflected(3, 4, 3, activation="relu")))
    with pytest.raises(NormPropError, match="input padding is its own"):
        normprop_fx.fold(gm.eval())


def _zoo_sample(seed: int = 0, count: int = 40, tf_count: int = 10) -> list[tuple[str, tuple[int, ...]]]:
    """A seeded draw of the zoo's BatchNorm models that passed the zoo check (docs/zoo-results.jsonl)
    at up to 128 px and converted in under 8 s there: ``tf_count`` of the tf_* models (TensorFlow
    'SAME' padding) and ``count`` others, as (``source:name``, input shape)."""
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "docs" / "zoo-results.jsonl").read_text().splitlines()]
    fast = {r["model"]: tuple(r["input_shape"]) for r in rows if r.get("has_bn") and r.get("passed")
            and r.get("conversion_seconds", 99) < 8 and r["input_shape"][-1] <= 128}
    names = sorted(fast)
    tf = [n for n in names if n.startswith("timm:tf_")]
    rest = [n for n in names if n not in tf]
    rng = random.Random(seed)
    return [(n, fast[n]) for n in rng.sample(tf, tf_count) + rng.sample(rest, count)]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "shape"), _zoo_sample())
def test_fold_is_exact_across_a_zoo_sample(model, shape):
    """fold's promise on zoo models drawn at random: the eval outputs to rounding (float64,
    gamma and beta moved off their initial values), at the model's zoo size and 8 px larger
    (fold must keep nothing the trace saw of the first size). "To rounding" is measured on the
    model itself: a deep network with moved gammas can amplify rounding by many orders
    (tf_efficientnet_b7 at 72 px: an input change of 1e-12 moves its output by 10%), so fold may
    differ from the converted model by up to 10x what the converted model's compiled form (the
    same function, rounded differently) differs by, and 1e-9 at least."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from common import create_model

    from normprop_fx.eager import compiled_form

    source, name = model.split(":", 1)
    torch.manual_seed(0)
    converted = normprop_fx.convert(create_model(source, name).eval(), example_inputs=torch.randn(2, *shape)).eval()
    randomize_normprop_parameters(converted)
    folded = assert_fold_is_exact(converted, torch.randn(2, *shape))

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    for size in (shape, (shape[0], shape[1] + 8, shape[2] + 8)):
        x = torch.randn(2, *size, dtype=torch.float64)
        with torch.no_grad():
            try:
                expected = converted(x)
            except RuntimeError:
                continue  # (a model built for one input size)
            with compiled_form():
                rounding = relative(converted(x), expected)
            assert relative(folded(x), expected) <= max(1e-9, 10 * rounding), size


def test_normprop_modules_inside_a_module_the_trace_cannot_enter_are_reported():
    """A BatchNorm inside a leaf module (an untraceable block) becomes an OpaqueNormPropAffine
    there; fold sees one call of the block, so it stays, exact, and fold_report lists it."""

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > -1e9 else x  # (data-dependent: no symbolic trace)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Untraceable(), nn.Conv2d(4, 2, 1))
    converted = normprop_fx.convert(model, example_inputs=torch.randn(2, 3, 8, 8), leaf_modules=["3"]).eval()
    folded = assert_fold_is_exact(converted, torch.randn(2, 3, 8, 8))
    assert folded.fold_report.inside_leaves == [("3", ["3.bn"])]
    assert "NormProp modules left inside 3" in str(folded.fold_report)


class _Conv1dOverPositions(nn.Module):
    """Conv1d -> BatchNorm1d -> ELU over the flattened positions, reshaped back to ``x.shape``: the
    shape is read after the affine that fold moves behind the reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv1d(4, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4), nn.ELU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x.flatten(2)))).reshape(x.shape)


def test_an_affine_moved_behind_a_reshape_keeps_the_graph_in_order():
    """Found by tests/test_fuzz.py: moving the reshape in front of the affine put it before the
    ``x.shape`` it reads, and the folded graph did not lint."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Hardtanh(0.0, 6.0),
                          _Conv1dOverPositions(), nn.Conv2d(4, 2, 1)).double()
    converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 6, 6, dtype=torch.float64)).eval()
    folded = normprop_fx.fold(converted)
    folded.graph.lint()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(folded(x), converted(x), rtol=1e-9, atol=1e-12)


def test_an_input_correction_of_a_same_padded_conv_goes_in_front_of_its_padding():
    """Found by tests/test_fuzz.py: an untrained Conv2dSame after trained features (a frozen
    BatchNorm, then ELU) gets an input correction that subtracts a mean. The module tree applied
    it after the TF-'same' zeros, shifting them (and in the eager form absorbed it into the bias,
    missing the border): 2% off the flat graph, where the correction is a node in front. The
    tree, the flat graph and fold agree now."""
    from timm.layers import Conv2dSame
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ELU(),
                          Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).double()
    example = torch.empty(2, 3, 8, 8, dtype=torch.float64)
    converted = normprop_fx.convert(model, example_inputs=example).eval()
    assert converted[3].input_correction.subtracts_mean
    flat = normprop_fx.convert(model, example_inputs=example, flat=True).eval()
    for shape in ((3, 3, 8, 8), (1, 3, 7, 9)):
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), flat(x), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(normprop_fx.fold(converted)(x), flat(x), rtol=1e-10, atol=1e-12)
