"""The project's own architecture fuzzer (issue 20): random networks from a grammar of blocks,
every one converted, and every promise of the README checked on it.

The grammar: a stem conv, 1-5 blocks drawn from conv-BN-activation (plain, depthwise, strided
depthwise, 1x1 with a conv bias), residual blocks (activation after the add, or a standalone BatchNorm after it),
concats of two branches, squeeze-excitation gates, max/avg pools, nearest upsampling, timm's
``BatchNormAct2d`` and torchvision's ``Conv2dNormActivation``, one conv+BN module called twice,
dropout as a module and as ``F.dropout(training=self.training)``, a hand-written drop-path that
branches on ``self.training``; 13 activations, each as a module, a function or a tensor method
where torch has one; BatchNorm with or without affine, running statistics, another eps or
momentum; a head of global pooling, Linear (-> BatchNorm1d -> activation) and Linear.

The promises, on each network (float64):
- ``convert`` returns, or raises one of the library's typed errors: no other exception;
- the model given is not changed (state and train/eval flags);
- every BatchNorm is converted or listed as left with a reason, each counted once;
- with none left: in train mode (dropout off) each sample alone gives its output in the batch,
  and train mode equals eval mode; forward finite, every trainable parameter gets a finite
  gradient;
- the module tree form computes exactly what ``convert(flat=True)`` computes, bit for bit;
- ``fold`` gives the eval outputs to rounding.

The default run draws 100 networks (hypothesis, derandomized: the same ones in every run);
``-m slow`` draws 2,000.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import normprop_fx  # noqa: E402
from normprop_fx import NormPropError, UntraceableModelError, conversion_report  # noqa: E402
from normprop_fx.fold import fold  # noqa: E402
from normprop_fx.model_check import dropout_off, floating_outputs, functional_dropout_off, relative_l2  # noqa: E402

C = 4  # channels everywhere: the grammar keeps the shape (N, C, H, W) between blocks (a strided block halves H, W)
SHAPE = (3, 8, 8)

#: activation -> (module factory, functional form, tensor method name or None)
ACTIVATIONS = {
    "relu": (nn.ReLU, F.relu, "relu"),
    "relu6": (nn.ReLU6, F.relu6, None),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1), None),
    "gelu": (nn.GELU, F.gelu, None),
    "silu": (nn.SiLU, F.silu, None),
    "hardswish": (nn.Hardswish, F.hardswish, None),
    "hardtanh": (nn.Hardtanh, F.hardtanh, None),
    "tanh": (nn.Tanh, torch.tanh, "tanh"),
    "sigmoid": (nn.Sigmoid, torch.sigmoid, "sigmoid"),
    "elu": (nn.ELU, F.elu, None),
    "mish": (nn.Mish, F.mish, None),
    "softplus": (nn.Softplus, F.softplus, None),
    "identity": (nn.Identity, lambda x: x, None),
}
FORMS = ("module", "function", "method")
BLOCKS = ("cba", "depthwise", "strided_depthwise", "pointwise_bias", "residual", "residual_bn", "concat", "se", "maxpool",
          "avgpool", "upsample", "timm_bnact", "tv_cna", "shared", "dropout", "functional_dropout", "drop_path")
BN_OPTIONS = ("default", "no_affine", "no_running_stats", "eps", "momentum_none")


class Act(nn.Module):
    """One activation in one call form (a module call, a function call or a tensor method)."""

    def __init__(self, name: str, form: str) -> None:
        super().__init__()
        factory, self.fn, self.method = ACTIVATIONS[name]
        self.form = form if (form != "method" or self.method) else "function"
        self.act = factory() if self.form == "module" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "module":
            return self.act(x)
        if self.form == "method":
            return getattr(x, self.method)()
        return self.fn(x)


def batchnorm(option: str, features: int = C, dims: int = 2) -> nn.Module:
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    if option == "no_affine":
        return cls(features, affine=False)
    if option == "no_running_stats":
        return cls(features, track_running_stats=False)
    if option == "eps":
        return cls(features, eps=1e-3)
    if option == "momentum_none":
        return cls(features, momentum=None)
    return cls(features)


class ConvBnAct(nn.Module):
    def __init__(self, act: str, form: str, bn: str, *, kernel: int = 3, groups: int = 1, bias: bool = False,
                 stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
        self.bn = batchnorm(bn)
        self.act = Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, act: str, form: str, bn: str, standalone_bn: bool) -> None:
        super().__init__()
        self.branch = nn.Sequential(ConvBnAct(act, form, bn), nn.Conv2d(C, C, 3, padding=1, bias=False), batchnorm(bn))
        self.after = batchnorm(bn) if standalone_bn else nn.Identity()
        self.act = Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.after(x + self.branch(x)))


class Concat(nn.Module):
    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.a, self.b = ConvBnAct(act, form, bn), ConvBnAct(act, form, bn, kernel=1)
        self.merge = nn.Conv2d(2 * C, C, 1, bias=False)
        self.bn = batchnorm(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.merge(torch.cat([self.a(x), self.b(x)], dim=1)))


class SqueezeExcite(nn.Module):
    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.body = ConvBnAct(act, form, bn)
        self.fc1, self.fc2 = nn.Conv2d(C, 2, 1), nn.Conv2d(2, C, 1)
        self.act = Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y * torch.sigmoid(self.fc2(self.act(self.fc1(y.mean((2, 3), keepdim=True)))))


class Pool(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, 1, 1) if kind == "maxpool" else nn.AvgPool2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class Upsample(nn.Module):
    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.body = ConvBnAct(act, form, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.body(F.interpolate(x, scale_factor=2.0, mode="nearest")), 2)


class Shared(nn.Module):
    """One conv+BN+activation module called twice (issue 20, finding 1)."""

    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.unit = ConvBnAct(act, form, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(self.unit(x))


class FunctionalDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.2, training=self.training)


class DropPath(nn.Module):
    """Hand-written, branching on self.training (issue 20, finding 3)."""

    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.body = ConvBnAct(act, form, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.training:
            y = y * (torch.rand_like(y[:, :1, :1, :1]) > 0.2).to(y.dtype) / 0.8
        return x + y


def make_block(kind: str, act: str, form: str, bn: str) -> nn.Module:
    if kind == "cba":
        return ConvBnAct(act, form, bn)
    if kind == "depthwise":
        return ConvBnAct(act, form, bn, groups=C)
    if kind == "strided_depthwise":  # (MobileNet's and EfficientNet's downsampling)
        return ConvBnAct(act, form, bn, groups=C, stride=2)
    if kind == "pointwise_bias":
        return ConvBnAct(act, form, bn, kernel=1, bias=True)
    if kind in ("residual", "residual_bn"):
        return Residual(act, form, bn, standalone_bn=kind == "residual_bn")
    if kind == "concat":
        return Concat(act, form, bn)
    if kind == "se":
        return SqueezeExcite(act, form, bn)
    if kind in ("maxpool", "avgpool"):
        return Pool(kind)
    if kind == "upsample":
        return Upsample(act, form, bn)
    if kind == "timm_bnact":
        from timm.layers import BatchNormAct2d

        return nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), BatchNormAct2d(C, act_layer=ACTIVATIONS[act][0]))
    if kind == "tv_cna":
        from torchvision.ops.misc import Conv2dNormActivation

        return Conv2dNormActivation(C, C, 3, activation_layer=ACTIVATIONS[act][0], inplace=None)
    if kind == "shared":
        return Shared(act, form, bn)
    if kind == "dropout":
        return nn.Dropout(0.2)
    if kind == "functional_dropout":
        return FunctionalDropout()
    if kind == "drop_path":
        return DropPath(act, form, bn)
    raise AssertionError(kind)


class FuzzNet(nn.Module):
    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        torch.manual_seed(recipe.seed)
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), batchnorm("default"), nn.ReLU())
        self.blocks = nn.Sequential(*(make_block(*b) for b in recipe.blocks))
        self.fc1 = nn.Linear(C, 6)
        self.head_bn = batchnorm(recipe.head_bn, 6, dims=1) if recipe.head_bn else nn.Identity()
        self.head_act = Act(*recipe.head_act)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc2(self.head_act(self.head_bn(self.fc1(x.mean((2, 3))))))


@dataclass(frozen=True)
class Recipe:
    seed: int
    blocks: tuple[tuple[str, str, str, str], ...]
    head_bn: str | None
    head_act: tuple[str, str]


blocks = st.tuples(st.sampled_from(BLOCKS), st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from(FORMS),
                   st.sampled_from(BN_OPTIONS))
recipes = st.builds(Recipe, st.integers(0, 2**16), st.lists(blocks, min_size=1, max_size=5).map(tuple),
                    st.one_of(st.none(), st.sampled_from(BN_OPTIONS)),
                    st.tuples(st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from(FORMS)))


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()})


def stochastic_off(model: nn.Module) -> nn.Module:
    """Dropout and drop-path in eval mode, the fuzzer's own drop-path too (dropout_off cannot know it)."""
    dropout_off(model)
    for m in model.modules():
        if isinstance(m, DropPath):
            m.eval()
    return model


def check_promises(recipe: Recipe) -> None:
    model = FuzzNet(recipe).double()
    model.train(recipe.seed % 2 == 0)  # converted in either mode
    state, modes = _state(model)
    example = torch.empty(2, *SHAPE, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = normprop_fx.convert(model, example_inputs=example)
        except (NormPropError, UntraceableModelError):
            return  # a typed error is a clear answer (its message is tested elsewhere)
        flat = normprop_fx.convert(model, example_inputs=example, flat=True)
    after, after_modes = _state(model)
    assert after_modes == modes and after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state), "the model given was changed"

    report = conversion_report(converted)
    found = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    left = {b.path for b in report.left}
    still = {n for n, m in converted.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert report.batchnorms_found == len(found) and {i.path for i in report.initializations} == found
    assert len(report.left) == len(left) and left <= found, "a BatchNorm left is counted once"
    assert still <= left, f"BatchNorms neither converted nor reported left: {sorted(still - left)}"
    assert all(b.reason for b in report.left)
    if report.left:
        return  # what is left is reported; the promises below are for a full conversion

    x = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(recipe.seed))
    with functional_dropout_off(), torch.no_grad():
        stochastic_off(converted.train())
        batch = converted(x)
        alone = torch.cat([converted(x[i:i + 1]) for i in range(len(x))])
        assert relative_l2(alone, batch) <= 1e-9, "batch dependent in train mode"
        assert relative_l2(converted.eval()(x), batch) <= 1e-9, "train mode differs from eval mode"
        assert torch.isfinite(batch).all()
        flat.eval()
        # to rounding: the tree's eager modules compute an attached correction inside their own
        # affine, the flat graph as a node (standardize.absorbable_correction)
        assert relative_l2(converted(x), flat(x)) <= 1e-12, "the module tree differs from the flat graph"
        assert relative_l2(fold(converted)(x), converted(x)) <= 1e-9, "fold differs from eval"
    converted.train()
    with functional_dropout_off():
        stochastic_off(converted)
        sum(t.square().mean() for t in floating_outputs(converted(x))).backward()
    trainable = [(n, p) for n, p in converted.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


COMMON = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow],
          "print_blob": True}


@settings(max_examples=100, **COMMON)
@given(recipes)
def test_every_promise_holds_on_random_networks(recipe):
    check_promises(recipe)


@pytest.mark.slow
@settings(max_examples=2000, **COMMON)
@given(recipes)
def test_every_promise_holds_on_random_networks_many(recipe):
    check_promises(recipe)


def test_the_grammar_builds_every_block_and_activation_form():
    """Every block kind, activation and call form builds and runs (the fuzzer draws from them all)."""
    for kind in BLOCKS:
        for act in ACTIVATIONS:
            for form in FORMS:
                block = make_block(kind, act, form, "default")
                side = 4 if kind.startswith("strided") else 8
                assert block(torch.randn(2, C, 8, 8)).shape == (2, C, side, side)
    assert copy.deepcopy(FuzzNet(Recipe(0, (("cba", "relu", "method", "eps"),), "default", ("gelu", "module"))))
