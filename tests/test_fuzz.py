"""The project's own architecture fuzzer (issue 20): random networks from a grammar of blocks,
every one converted, and every promise of the README checked on it.

The grammar: a stem conv, 1-5 blocks, a head. The blocks:
- conv-BN-activation (plain, depthwise, strided depthwise, 1x1 with a conv bias), residual blocks
  (activation after the add, or a standalone BatchNorm after it), concats of two branches,
  squeeze-excitation gates, max/avg pools, nearest upsampling, one conv+BN module called twice,
  two convs with one tied weight, dropout as a module and as ``F.dropout(training=self.training)``,
  a hand-written drop-path that branches on ``self.training``, control flow on a size (untraceable:
  converted with the ``leaf_modules=`` its error names);
- BatchNorm after every other kind of op: a concat, a pool, an activation, a gate product, an
  upsampling, another BatchNorm, and in pre-activation order (BN -> activation -> conv);
- Conv1d and Conv3d with their BatchNorms, LeViT's ``LinearNorm`` over tokens, a Linear over the last
  axis whose BatchNorm1d normalizes its rows;
- the libraries' own blocks: timm's ``BatchNormAct2d``, ``ConvNormAct``, depthwise-separable (also with
  TF 'same' padding at stride 2), inverted residual with SE, edge residual, ResNet basic (ECA,
  drop-path) and bottleneck (SE) blocks; torchvision's ``Conv2dNormActivation``,
  ``Conv3dNormActivation``, ResNet basic and strided bottleneck blocks, MobileNetV2/V3 inverted
  residuals, EfficientNet's MBConv and FusedMBConv, a ``FrozenBatchNorm2d``;
- 13 activations, each as a module, a function or a tensor method where torch has one; BatchNorm
  with or without affine, running statistics, another eps or momentum;
- a head of global pooling, Linear (-> BatchNorm1d -> activation, or torchvision's ``MLP``) and
  Linear, returning a tensor, a tuple or a dict (with the features).
A recipe may put the model and input in channels_last, give every BatchNorm a trained
checkpoint's statistics and affine (``randomize_batchnorms``) before conversion, and give the
model a second input with a stem of its own.

The promises, on each network (float64):
- ``convert`` returns, or raises one of the library's typed errors: no other exception;
- the model given is not changed (state and train/eval flags);
- every BatchNorm is converted or listed as left with a reason, each counted once; the trained
  ones (frozen, or with a checkpoint's statistics) are the ones the report calls trained;
- tied parameters stay tied, at their names;
- with none left: the converted model is of the user's class; in train mode (dropout off) each
  sample alone gives its output in the batch, and train mode equals eval mode; a trained network's
  eval outputs are the original's; forward finite, every trainable parameter gets a finite gradient;
- the module tree form computes what ``convert(flat=True)`` computes and what plain torch.fx
  traces of it, to rounding;
- ``fold`` gives the eval outputs to rounding; a deep copy and a ``torch.save``/``torch.load``
  round trip give them exactly.

The default run draws 100 networks (hypothesis, derandomized: the same ones in every run), and
checks each kind of block alone; ``-m slow`` draws 2,000.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import normprop_fx  # noqa: E402
from normprop_fx import NormPropError, UntraceableModelError, conversion_report  # noqa: E402
from normprop_fx.batchnorm_state import is_batchnorm, is_frozen  # noqa: E402
from normprop_fx.fold import fold  # noqa: E402
from normprop_fx.model_check import (  # noqa: E402
    dropout_off,
    floating_outputs,
    functional_dropout_off,
    kept_class,
    randomize_batchnorms,
    relative_l2,
)

C = 8  # channels everywhere (torchvision's MobileNetV3 and EfficientNet configs round to multiples of 8): the
# grammar keeps the shape (N, C, H, W) between blocks (a strided block halves H, W)
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
BLOCKS = (
    # conv-BN-activation and the usual blocks around it
    "cba", "depthwise", "strided_depthwise", "pointwise_bias", "residual", "residual_bn", "concat", "se", "maxpool",
    "avgpool", "upsample", "shared", "tied", "dropout", "functional_dropout", "drop_path", "shape_branch",
    # BatchNorm after every other kind of op
    "bn_after_cat", "bn_after_pool", "bn_after_act", "bn_after_gate", "bn_after_upsample", "double_bn", "preact",
    # other dimensionalities: Conv1d and Conv3d with their BatchNorms, Linear over tokens
    "conv1d", "conv3d", "linear_norm", "linear_last_axis",
    # the libraries' own building blocks
    "timm_bnact", "timm_cna", "timm_ds", "timm_ds_same", "timm_ir_se", "timm_edge", "timm_basic", "timm_bottleneck_se",
    "tv_cna", "tv_basic", "tv_bottleneck_down", "tv_mbv2", "tv_mbv3", "tv_mbconv", "tv_fused_mbconv", "tv_cna3d",
    "frozen_bn",
)
STRIDED = ("strided_depthwise", "timm_ds_same", "tv_bottleneck_down")
BN_OPTIONS = ("default", "no_affine", "no_running_stats", "eps", "momentum_none")


class Act(nn.Module):
    """One activation in one call form (a module call, a function call or a tensor method)."""

    def __init__(self, name: str, form: str) -> None:
        super().__init__()
        factory, _, self.method = ACTIVATIONS[name]
        self.name = name  # (the function is looked up when called: a lambda attribute would not pickle)
        self.form = form if (form != "method" or self.method) else "function"
        self.act = factory() if self.form == "module" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "module":
            return self.act(x)
        if self.form == "method":
            return getattr(x, self.method)()
        return ACTIVATIONS[self.name][1](x)


def batchnorm(option: str, features: int = C, dims: int = 2) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
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


class ShapeBranch(nn.Module):
    """Control flow on an input's size, which torch.fx cannot trace: convert raises its typed error,
    and with ``leaf_modules=[ShapeBranch]`` (what the error says to do) the BatchNorm inside is
    replaced in place (passes/opaque.py), and every promise holds again."""

    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.body = ConvBnAct(act, form, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if x.shape[-1] > 2:
            y = y + x
        return y


class Tied(nn.Module):
    """Two conv+BN+activation units whose convs share one weight (tied weights stay tied)."""

    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.a, self.b = ConvBnAct(act, form, bn), ConvBnAct(act, form, bn)
        self.b.conv.weight = self.a.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class BnAfterCat(nn.Module):
    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.a, self.b = ConvBnAct(act, form, bn), ConvBnAct(act, form, bn, groups=C)
        self.bn, self.act = batchnorm(bn, 2 * C), Act(act, form)
        self.merge = nn.Conv2d(2 * C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.act(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))


class BnAfter(nn.Module):
    """A BatchNorm (then an activation) after a pool, an activation, a gate or an upsampling:
    none has a conv in front of its BatchNorm."""

    def __init__(self, op: str, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.op, self.body = op, ConvBnAct(act, form, bn) if op in ("act", "gate") else None
        self.pool = nn.AvgPool2d(3, 1, 1) if op == "pool" else None
        self.gate = nn.Conv2d(C, C, 1) if op == "gate" else None
        self.inner = Act(act, form) if op == "act" else None
        self.bn, self.act = batchnorm(bn), Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "pool":
            y = self.pool(x)
        elif self.op == "act":
            y = self.inner(self.body(x))
        elif self.op == "gate":
            y = self.body(x)
            y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        else:  # upsample, and back down after the activation
            y = F.interpolate(x, scale_factor=2.0, mode="nearest")
        y = self.act(self.bn(y))
        return F.avg_pool2d(y, 2) if self.op == "upsample" else y


class DoubleBn(nn.Module):
    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn1, self.bn2, self.act = batchnorm(bn), batchnorm("default"), Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.bn1(self.conv(x))))


class PreAct(nn.Module):
    """Pre-activation residual (BN -> activation -> conv, as in PreAct ResNets and DenseNets)."""

    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.bn, self.act = batchnorm(bn), Act(act, form)
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.act(self.bn(x)))


class Conv1dBlock(nn.Module):
    """Conv1d -> BatchNorm1d -> activation over the flattened positions."""

    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.conv = nn.Conv1d(C, C, 3, padding=1, bias=False)
        self.bn, self.act = batchnorm(bn, dims=1), Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x.flatten(2)))).reshape(x.shape)


class Conv3dBlock(nn.Module):
    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        self.conv = nn.Conv3d(C, C, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn, self.act = batchnorm(bn, dims=3), Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x.unsqueeze(2)))).squeeze(2)


class LinearNormBlock(nn.Module):
    """timm LeViT's LinearNorm over the tokens (a BatchNorm1d over batch x tokens), then an activation."""

    def __init__(self, act: str, form: str, bn: str) -> None:
        super().__init__()
        from timm.models.levit import LinearNorm

        self.body, self.act = LinearNorm(C, C), Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return self.act(self.body(tokens)).transpose(1, 2).reshape(x.shape)


class LinearLastAxis(nn.Module):
    """Linear over the last axis of (N, C, L) with out_features == C, then BatchNorm1d(C): the BatchNorm
    normalizes the Linear's rows, not its features (issue 20, finding 4)."""

    def __init__(self, act: str, form: str, bn: str, side: int) -> None:
        super().__init__()
        self.mix, self.back = nn.Linear(side * side, C), nn.Linear(C, side * side)
        self.bn, self.act = batchnorm(bn, dims=1), Act(act, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.act(self.bn(self.mix(x.flatten(2))))).reshape(x.shape)


def _timm_block(kind: str, act_layer: type) -> nn.Module:
    from timm.layers import BatchNormAct2d, ConvNormAct, get_attn
    from timm.layers import DropPath as TimmDropPath
    from timm.models import _efficientnet_blocks as eb
    from timm.models import resnet

    if kind == "timm_bnact":
        return nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), BatchNormAct2d(C, act_layer=act_layer))
    if kind == "timm_cna":
        return ConvNormAct(C, C, 3, act_layer=act_layer)
    if kind == "timm_ds":
        return eb.DepthwiseSeparableConv(C, C, act_layer=act_layer, pw_act=True, drop_path_rate=0.1)
    if kind == "timm_ds_same":  # TF 'same' padding, dynamic at stride 2 (timm's Conv2dSame)
        return eb.DepthwiseSeparableConv(C, C, stride=2, pad_type="same", act_layer=act_layer)
    if kind == "timm_ir_se":
        return eb.InvertedResidual(C, C, exp_ratio=2.0, act_layer=act_layer, drop_path_rate=0.1,
                                   se_layer=partial(eb.SqueezeExcite, rd_ratio=0.25, act_layer=act_layer))
    if kind == "timm_edge":
        return eb.EdgeResidual(C, C, exp_ratio=2.0, act_layer=act_layer)
    if kind == "timm_basic":
        return resnet.BasicBlock(C, C, act_layer=act_layer, attn_layer=get_attn("eca"), drop_path=TimmDropPath(0.1))
    if kind == "timm_bottleneck_se":
        return resnet.Bottleneck(C, C // 4, act_layer=act_layer, attn_layer=get_attn("se"))
    raise AssertionError(kind)


def _torchvision_block(kind: str, act_layer: type, bn: str) -> nn.Module:
    from torchvision.models import efficientnet, mobilenetv2, mobilenetv3, resnet
    from torchvision.ops.misc import Conv2dNormActivation, Conv3dNormActivation

    if kind == "tv_cna":
        return Conv2dNormActivation(C, C, 3, activation_layer=act_layer, inplace=None)
    if kind == "tv_cna3d":
        return _Lift3d(Conv3dNormActivation(C, C, (1, 3, 3), padding=(0, 1, 1), activation_layer=act_layer, inplace=None))
    if kind == "tv_basic":
        return resnet.BasicBlock(C, C)
    if kind == "tv_bottleneck_down":
        down = nn.Sequential(nn.Conv2d(C, C, 1, stride=2, bias=False), batchnorm(bn))
        return resnet.Bottleneck(C, C // 4, stride=2, downsample=down)
    if kind == "tv_mbv2":
        return mobilenetv2.InvertedResidual(C, C, 1, 2)
    if kind == "tv_mbv3":
        config = mobilenetv3.InvertedResidualConfig(C, 3, 2 * C, C, True, "HS", 1, 1, 1.0)
        return mobilenetv3.InvertedResidual(config, partial(nn.BatchNorm2d, eps=0.001, momentum=0.01))
    if kind == "tv_mbconv":
        return efficientnet.MBConv(efficientnet.MBConvConfig(2, 3, 1, C, C, 1), 0.2, nn.BatchNorm2d)
    if kind == "tv_fused_mbconv":
        return efficientnet.FusedMBConv(efficientnet.FusedMBConvConfig(2, 3, 1, C, C, 1), 0.2, nn.BatchNorm2d)
    raise AssertionError(kind)


class _Lift3d(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.unsqueeze(2)).squeeze(2)


def _act_layer(act: str) -> Callable[..., nn.Module]:
    """The activation as a module factory for the libraries' ``act_layer`` arguments, which some
    call with ``inplace=`` (kept where the module takes it, as timm's ``create_act_layer`` does)."""
    factory = ACTIVATIONS[act][0]

    def make(inplace: bool | None = None) -> nn.Module:
        if inplace is not None:
            try:
                return factory(inplace=inplace)
            except TypeError:
                pass
        return factory()

    return make


#: conv-BN-activation variants, as ConvBnAct's keyword arguments
_CONV_BN_ACT = {"cba": {}, "depthwise": {"groups": C},
                "strided_depthwise": {"groups": C, "stride": 2},  # (MobileNet's and EfficientNet's downsampling)
                "pointwise_bias": {"kernel": 1, "bias": True}}
#: the blocks built as ``cls(act, form, bn)``
_ACT_FORM_BN = {"concat": Concat, "se": SqueezeExcite, "upsample": Upsample, "shared": Shared, "tied": Tied,
                "shape_branch": ShapeBranch, "drop_path": DropPath, "bn_after_cat": BnAfterCat, "double_bn": DoubleBn,
                "preact": PreAct, "conv1d": Conv1dBlock, "conv3d": Conv3dBlock, "linear_norm": LinearNormBlock}


def make_block(kind: str, act: str, form: str, bn: str, side: int = SHAPE[-1]) -> nn.Module:
    """One block of the grammar, for an input of C channels and ``side`` x ``side`` positions."""
    if kind in _CONV_BN_ACT:
        return ConvBnAct(act, form, bn, **_CONV_BN_ACT[kind])
    if kind in _ACT_FORM_BN:
        return _ACT_FORM_BN[kind](act, form, bn)
    if kind in ("residual", "residual_bn"):
        return Residual(act, form, bn, standalone_bn=kind == "residual_bn")
    if kind in ("maxpool", "avgpool"):
        return Pool(kind)
    if kind == "dropout":
        return nn.Dropout(0.2)
    if kind == "functional_dropout":
        return FunctionalDropout()
    if kind.startswith("bn_after_"):
        return BnAfter(kind.removeprefix("bn_after_"), act, form, bn)
    if kind == "linear_last_axis":
        return LinearLastAxis(act, form, bn, side)
    if kind.startswith("timm_"):
        return _timm_block(kind, _act_layer(act))
    if kind.startswith("tv_"):
        return _torchvision_block(kind, _act_layer(act), bn)
    if kind == "frozen_bn":  # a frozen BatchNorm (a detection backbone's): trained by definition
        from torchvision.ops.misc import FrozenBatchNorm2d

        return nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), FrozenBatchNorm2d(C), Act(act, form))
    raise AssertionError(kind)


class FuzzNet(nn.Module):
    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        torch.manual_seed(recipe.seed)
        self.outputs = recipe.outputs
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), batchnorm("default"), nn.ReLU())
        # a second input, through a stem of its own, added to the first's
        self.aux_stem = ConvBnAct("relu", "function", "default") if recipe.inputs == 2 else None
        side, blocks = SHAPE[-1], []
        for kind, *rest in recipe.blocks:
            blocks.append(make_block(kind, *rest, side=side))
            side = (side + 1) // 2 if kind in STRIDED else side
        self.blocks = nn.Sequential(*blocks)
        if recipe.head_bn == "mlp":  # torchvision's MLP: Linear -> BatchNorm1d -> activation, twice
            from torchvision.ops import MLP

            self.fc1 = MLP(C, [6, 6], norm_layer=nn.BatchNorm1d, activation_layer=_act_layer(recipe.head_act[0]))
            self.head_bn, self.head_act = nn.Identity(), nn.Identity()
        else:
            self.fc1 = nn.Linear(C, 6)
            self.head_bn = batchnorm(recipe.head_bn, 6, dims=1) if recipe.head_bn else nn.Identity()
            self.head_act = Act(*recipe.head_act)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> Any:
        x = self.stem(x)
        if self.aux_stem is not None:
            x = x + self.aux_stem(aux)
        features = self.blocks(x)
        logits = self.fc2(self.head_act(self.head_bn(self.fc1(features.mean((2, 3))))))
        if self.outputs == "tuple":
            return logits, features
        if self.outputs == "dict":
            return {"logits": logits, "features": features}
        return logits


@dataclass(frozen=True)
class Recipe:
    seed: int
    blocks: tuple[tuple[str, str, str, str], ...]
    head_bn: str | None  # a BN_OPTIONS entry, None (no BatchNorm in the head) or "mlp"
    head_act: tuple[str, str]
    outputs: str = "tensor"  # "tensor", "tuple" (logits, features) or "dict"
    channels_last: bool = False  # model and input in channels_last memory format
    trained: bool = False  # every BatchNorm given trained statistics and affine before conversion
    inputs: int = 1  # 2: a second input (N, C, 8, 8) through a stem of its own


blocks = st.tuples(st.sampled_from(BLOCKS), st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from(FORMS),
                   st.sampled_from(BN_OPTIONS))
recipes = st.builds(Recipe, st.integers(0, 2**16), st.lists(blocks, min_size=1, max_size=5).map(tuple),
                    st.one_of(st.none(), st.sampled_from((*BN_OPTIONS, "mlp"))),
                    st.tuples(st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from(FORMS)),
                    st.sampled_from(("tensor", "tuple", "dict")), st.booleans(), st.booleans(), st.sampled_from((1, 2)))


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()})


def stochastic_off(model: nn.Module) -> nn.Module:
    """Dropout and drop-path in eval mode, the fuzzer's own drop-path too (dropout_off cannot know it)."""
    dropout_off(model)
    for m in model.modules():
        if isinstance(m, DropPath):
            m.eval()
    return model


def _per_sample(model: nn.Module, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The model's floating outputs with each sample run alone, concatenated in the batch's order."""
    outputs = [floating_outputs(model(*(x[i:i + 1] for x in xs))) for i in range(len(xs[0]))]
    return [torch.cat(parts) for parts in zip(*outputs, strict=True)]


def _tied(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that is reachable under several names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _traced_again(model: nn.Module, leaves: list[type] | None) -> torch.fx.GraphModule:
    """Plain torch.fx, the user's untraceable modules kept as leaves as they must be for any trace."""

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return isinstance(m, tuple(leaves or ())) or super().is_leaf_module(m, qualified_name)

    return torch.fx.GraphModule(model, Tracer().trace(model))


def _flat_tensor(out: Any) -> torch.Tensor:
    return torch.cat([t.flatten() for t in floating_outputs(out)])


def _input(recipe: Recipe, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The model's inputs: N(0, I), seeded, in the recipe's memory format."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [SHAPE, (C, *SHAPE[1:])][:recipe.inputs]
    xs = tuple(torch.randn(batch, *shape, dtype=torch.float64, generator=generator) for shape in shapes)
    return tuple(x.contiguous(memory_format=torch.channels_last) for x in xs) if recipe.channels_last else xs


def check_promises(recipe: Recipe) -> None:
    model = FuzzNet(recipe).double()
    if recipe.channels_last:  # the 4-d weights (Module.to refuses a model with Conv3d weights)
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    xs = _input(recipe, 3, recipe.seed)
    if recipe.trained:  # a checkpoint's statistics; then the eval outputs that the conversion must keep
        randomize_batchnorms(model, _input(recipe, 16, recipe.seed + 1), recipe.seed)
        with torch.no_grad():
            expected = model.eval()(*xs)
    model.train(recipe.seed % 2 == 0)  # converted in either mode
    state, modes = _state(model)
    example = tuple(x.zero_() for x in _input(recipe, 2, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leaves = [ShapeBranch] if any(isinstance(m, ShapeBranch) for m in model.modules()) else None
        if leaves:  # untraceable as it is: the typed error, then what the error message says to do
            says = "leaf_modules=.*A BatchNorm inside a leaf module is replaced in place"
            with pytest.raises(UntraceableModelError, match=says):
                normprop_fx.convert(model, example_inputs=example)
        try:
            converted = normprop_fx.convert(model, example_inputs=example, leaf_modules=leaves or ())
        except (NormPropError, UntraceableModelError):
            return  # a typed error is a clear answer (its message is tested elsewhere)
        flat = normprop_fx.convert(model, example_inputs=example, flat=True, leaf_modules=leaves or ())
    after, after_modes = _state(model)
    assert after_modes == modes and after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state), "the model given was changed"

    report = conversion_report(converted)
    batchnorms = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
    left = {b.path for b in report.left}
    still = {n for n, m in converted.named_modules() if is_batchnorm(m)}
    assert report.batchnorms_found == len(batchnorms) and {i.path for i in report.initializations} == set(batchnorms)
    assert len(report.left) == len(left) and left <= set(batchnorms), "a BatchNorm left is counted once"
    assert still <= left, f"BatchNorms neither converted nor reported left: {sorted(still - left)}"
    assert all(b.reason for b in report.left)
    # trained: a frozen BatchNorm always; another when the checkpoint gave it running statistics
    trained = {n for n, m in batchnorms.items()
               if is_frozen(m) or (recipe.trained and getattr(m, "running_mean", None) is not None)}
    assert {i.path for i in report.initializations if i.trained} == trained, "trained BatchNorms misjudged"
    kept = dict(converted.named_parameters(remove_duplicate=False))
    for group in _tied(model):
        assert all(name in kept for name in group), f"tied parameters lost: {group}"
        assert len({id(kept[name]) for name in group}) == 1, f"tied parameters untied: {group}"
    if report.left:
        return  # what is left is reported; the promises below are for a full conversion

    assert kept_class(model, converted), "the converted model is not of the user's class"
    with functional_dropout_off(), torch.no_grad():
        stochastic_off(converted.train())
        batch = converted(*xs)
        assert relative_l2(_per_sample(converted, xs), batch) <= 1e-9, "batch dependent in train mode"
        evaluated = converted.eval()(*xs)
        assert relative_l2(evaluated, batch) <= 1e-9, "train mode differs from eval mode"
        assert all(torch.isfinite(t).all() for t in floating_outputs(batch))
        if recipe.trained and trained == set(batchnorms):
            assert relative_l2(evaluated, expected) <= 1e-10, "the trained network's function was not kept"
        flat.eval()
        # to rounding: the tree's eager modules compute an attached correction inside their own
        # affine, the flat graph as a node (standardize.absorbable_correction)
        assert relative_l2(evaluated, flat(*xs)) <= 1e-12, "the module tree differs from the flat graph"
        assert relative_l2(_traced_again(converted, leaves)(*xs), evaluated) <= 1e-12, "traced again, it differs"
        assert relative_l2(fold(converted)(*xs), evaluated) <= 1e-9, "fold differs from eval"
        saved = io.BytesIO()
        torch.save(converted, saved)
        saved.seek(0)
        for copied in (copy.deepcopy(converted), torch.load(saved, weights_only=False)):
            assert torch.equal(_flat_tensor(copied.eval()(*xs)), _flat_tensor(evaluated)), "a copy computes otherwise"
    converted.train()
    with functional_dropout_off():
        stochastic_off(converted)
        sum(t.square().mean() for t in floating_outputs(converted(*xs))).backward()
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
                side = 4 if kind in STRIDED else 8
                assert block(torch.randn(2, C, 8, 8)).shape == (2, C, side, side), kind
    assert copy.deepcopy(FuzzNet(Recipe(0, (("cba", "relu", "method", "eps"),), "default", ("gelu", "module"))))


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=BLOCKS)
def test_every_block_kind_converts_fully_and_keeps_every_promise(index):
    """Each kind of block alone converts with no BatchNorm left, so the random draws of the tests
    above check every promise on it, not only the typed-error and report promises; in turn
    channels_last, trained statistics and tuple outputs."""
    recipe = Recipe(index, ((BLOCKS[index], "silu", "module", "default"),), "default", ("relu", "module"), "tuple",
                    channels_last=index % 3 == 0, trained=index % 2 == 0)
    model = FuzzNet(recipe).double()
    leaves = [ShapeBranch] if BLOCKS[index] == "shape_branch" else ()  # untraceable by design
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = normprop_fx.convert(model, example_inputs=torch.empty(2, *SHAPE, dtype=torch.float64),
                                        leaf_modules=leaves)
    left = [b.path for b in conversion_report(converted).left]
    assert not left, left
    check_promises(recipe)
