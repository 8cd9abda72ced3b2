"""convert() on hand-built models: every pattern form, and every reason a BN is left."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import ConvNormAct, reference_normprop
from torch import nn

import normprop_fx
from normprop_fx import (
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropLinear,
    NormPropWarning,
)

GAMMA_RELU = 1.0 / math.sqrt(1.0 / (1.0 - 1.0 / math.pi))  # 1/1.2112, from the spec's derivation


def _conv2d(**kw):
    return nn.Conv2d(4, 8, 3, padding=1, bias=False, **kw)


def _converted_layer(gm, path="producer"):
    return gm.get_submodule(path)


def _no_batchnorm_left(gm):
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


class _ConvBn(nn.Module):
    """A Conv2d(4, 4, 3) and a BatchNorm2d(4); each test model writes its own forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


# (act as written in the model, the same act in float64 for the reference, expected activation string)
RELU_FORMS = {
    "module": (nn.ReLU(), F.relu),
    "module_inplace": (nn.ReLU(inplace=True), F.relu),
    "functional": (lambda x: F.relu(x), F.relu),
    "functional_inplace": (lambda x: F.relu(x, inplace=True), F.relu),
    "functional_inplace_": (lambda x: F.relu_(x), F.relu),
    "torch": (lambda x: torch.relu(x), F.relu),
    "torch_inplace": (lambda x: torch.relu_(x), F.relu),
    "method": (lambda x: x.relu(), F.relu),
    "method_inplace": (lambda x: x.relu_(), F.relu),
}


@pytest.mark.parametrize("form", sorted(RELU_FORMS))
def test_every_relu_form_is_fused_and_computes_normprop(form):
    torch.manual_seed(0)
    act, ref_act = RELU_FORMS[form]
    model = ConvNormAct(_conv2d(), nn.BatchNorm2d(8), act)
    gm = normprop_fx.convert(model, flat=True)
    report = normprop_fx.conversion_report(gm)
    assert report.converted == 1 and not report.left
    assert report.rewrites[0].activation == "relu"
    assert len(report.rewrites[0].original) == 3, "the activation node must be part of the rewrite"
    assert isinstance(_converted_layer(gm), NormPropConv2d)
    assert _no_batchnorm_left(gm)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    x = torch.randn(3, 4, 10, 10)
    torch.testing.assert_close(gm(x), reference_normprop(model.producer, x, ref_act, GAMMA_RELU), rtol=1e-4, atol=1e-5)


OTHER_ACTIVATIONS = {
    "relu6_module": (nn.ReLU6(), F.relu6, "relu6"),
    "relu6_functional": (lambda x: F.relu6(x), F.relu6, "relu6"),
    "leaky_module": (nn.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2), "leaky_relu(negative_slope=0.2)"),
    "leaky_positional": (lambda x: F.leaky_relu(x, 0.2, True), lambda x: F.leaky_relu(x, 0.2), "leaky_relu(negative_slope=0.2)"),
    "leaky_keyword": (lambda x: F.leaky_relu(x, negative_slope=0.3), lambda x: F.leaky_relu(x, 0.3), "leaky_relu(negative_slope=0.3)"),
    "silu_module": (nn.SiLU(), F.silu, "silu"),
    "silu_functional": (lambda x: F.silu(x, inplace=True), F.silu, "silu"),
    "gelu_module": (nn.GELU(), F.gelu, "gelu"),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"), "gelu(approximate='tanh')"),
    "hardswish_module": (nn.Hardswish(), F.hardswish, "hardswish"),
    "hardswish_functional": (lambda x: F.hardswish(x), F.hardswish, "hardswish"),
    "elu_module": (nn.ELU(alpha=0.5), lambda x: F.elu(x, 0.5), "elu(alpha=0.5)"),
    "elu_functional": (lambda x: F.elu(x), F.elu, "elu"),
    "tanh_module": (nn.Tanh(), torch.tanh, "tanh"),
    "tanh_torch": (lambda x: torch.tanh(x), torch.tanh, "tanh"),
    "tanh_F": (lambda x: F.tanh(x), torch.tanh, "tanh"),
    "tanh_method": (lambda x: x.tanh(), torch.tanh, "tanh"),
    "sigmoid_module": (nn.Sigmoid(), torch.sigmoid, "sigmoid"),
    "sigmoid_torch": (lambda x: torch.sigmoid(x), torch.sigmoid, "sigmoid"),
    "sigmoid_method": (lambda x: x.sigmoid_(), torch.sigmoid, "sigmoid"),
    "identity_module": (nn.Identity(), lambda x: x, "identity"),
    "mish_module": (nn.Mish(), F.mish, "mish"),
}


@pytest.mark.parametrize("form", sorted(OTHER_ACTIVATIONS))
def test_other_activations_with_their_parameters(form):
    torch.manual_seed(1)
    act, ref_act, expected = OTHER_ACTIVATIONS[form]
    model = ConvNormAct(_conv2d(), nn.BatchNorm2d(8), act)
    gm = normprop_fx.convert(model)
    (rewrite,) = normprop_fx.conversion_report(gm).rewrites
    assert rewrite.activation == expected
    gain = normprop_fx.activation_constants(_converted_layer(gm).activation.spec).jacobian_gain
    assert rewrite.gamma_init == pytest.approx(1.0 / gain)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(gm(x), reference_normprop(model.producer, x, ref_act, 1.0 / gain), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "producer,norm,shape,layer_type",
    [
        (nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), (2, 4, 12), NormPropConv1d),
        (nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 4, 12, 12), NormPropConv2d),
        (nn.Conv3d(4, 6, 3, padding=1, dilation=1), nn.BatchNorm3d(6), (2, 4, 5, 6, 6), NormPropConv3d),
        (nn.Linear(4, 6), nn.BatchNorm1d(6), (5, 4), NormPropLinear),
        (nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), (2, 8, 7, 7), NormPropConv2d),
        (nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.BatchNorm2d(8), (2, 8, 7, 7), NormPropConv2d),
        (nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"), nn.BatchNorm2d(6), (2, 4, 7, 7), NormPropConv2d),
        (nn.Conv1d(4, 6, 5, padding=2, padding_mode="circular"), nn.BatchNorm1d(6), (2, 4, 9), NormPropConv1d),
    ],
    ids=["conv1d", "conv2d_stride", "conv3d", "linear_bn1d", "grouped", "depthwise_dilated", "same_reflect", "circular"],
)
def test_layer_kinds_and_hyper_parameters(producer, norm, shape, layer_type):
    torch.manual_seed(2)
    model = ConvNormAct(producer, norm, nn.ReLU())
    gm = normprop_fx.convert(model)
    layer = _converted_layer(gm)
    assert type(layer) is layer_type
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "in_features", "out_features"):
        if hasattr(producer, attr):
            assert getattr(layer, attr) == getattr(producer, attr), attr
    x = torch.randn(*shape)
    torch.testing.assert_close(gm(x), reference_normprop(producer, x, F.relu, GAMMA_RELU), rtol=1e-4, atol=1e-5)


def test_conv_bias_is_dropped_and_reported():
    model = ConvNormAct(nn.Conv2d(4, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU())
    gm = normprop_fx.convert(model)
    layer = _converted_layer(gm)
    assert "bias" not in dict(layer.named_parameters())
    assert any("bias of producer dropped" in n for n in normprop_fx.conversion_report(gm).rewrites[0].notes)
    assert "bias of producer dropped" in normprop_fx.summary(gm)


def test_batchnorm_without_affine_gives_fixed_gamma_beta():
    model = ConvNormAct(_conv2d(), nn.BatchNorm2d(8, affine=False), nn.ReLU())
    gm = normprop_fx.convert(model)
    layer = _converted_layer(gm)
    params = dict(layer.named_parameters())
    assert "gamma" not in params and "beta" not in params and "weight" in params
    assert {"producer.gamma", "producer.beta"} <= set(gm.state_dict())
    assert "affine=False" in normprop_fx.summary(gm)


def test_conv_without_activation_feeding_an_add():
    class Residual(_ConvBn):
        def forward(self, x):
            return F.relu(self.bn(self.conv(x)) + x)

    gm = normprop_fx.convert(Residual(), example_inputs=torch.empty(2, 4, 8, 8))
    report = normprop_fx.conversion_report(gm)
    (rewrite,) = report.rewrites
    assert rewrite.activation == "identity" and rewrite.gamma_init == 1.0
    assert _no_batchnorm_left(gm)
    # The ReLU after the add is normalized on its own, behind a 1/sqrt(2) correction (spec 6).
    (standalone,) = report.normalized_activations
    assert standalone.activation == "relu"
    (correction,) = report.corrections
    assert correction.consumer == standalone.path and float(correction.scale) == pytest.approx(2**-0.5, rel=1e-4)
    x = torch.randn(2, 4, 8, 8)
    u = reference_normprop(gm.get_submodule("conv"), x, lambda t: t, 1.0)
    constants = normprop_fx.activation_constants(normprop_fx.activation("relu"))
    expected = (F.relu((u + x) * 2**-0.5) - constants.mean) / constants.std
    torch.testing.assert_close(gm(x), expected, rtol=1e-4, atol=1e-5)


def test_conv_with_two_users_keeps_the_conv_and_replaces_the_bn_alone():
    class TwoUsers(_ConvBn):
        def forward(self, x):
            y = self.conv(x)
            return F.relu(self.bn(y)) + y

    gm = normprop_fx.convert(TwoUsers(), example_inputs=torch.empty(2, 4, 8, 8))
    report = normprop_fx.conversion_report(gm)
    (rewrite,) = report.rewrites
    assert not report.left and rewrite.path == "bn" and rewrite.replacement == "NormPropAffine"
    assert "2 users" in rewrite.notes[0] and rewrite.activation == "relu"
    assert isinstance(gm.get_submodule("bn"), normprop_fx.NormPropAffine) and isinstance(gm.get_submodule("conv"), nn.Conv2d)
    # the plain conv's output is not standardized: a correction, estimated from its weights
    (correction,) = [c for c in report.corrections if c.consumer == "bn"]
    assert correction.estimated and "(calibrated on the Gaussian sample: x" in correction.reason
    assert "left: 0" in normprop_fx.summary(gm)


def test_batchnorm_with_two_users_converts_without_fusing_the_activation():
    class TwoUsers(_ConvBn):
        def forward(self, x):
            y = self.bn(self.conv(x))
            return torch.relu(y) * y

    model = TwoUsers()
    gm = normprop_fx.convert(model)
    report = normprop_fx.conversion_report(gm)
    (rewrite,) = report.rewrites
    assert not report.left and rewrite.activation == "identity"
    # relu(u) reads a standardized value, so it is normalized on its own
    assert [a.original for a in report.normalized_activations] == ["torch.relu"]
    assert "BatchNorm output has 2 users" in rewrite.notes[-1] and "no activation fused" in rewrite.notes[-1]
    # both users read the NormProp output: relu_n(u) * u with u = conv(x, W/||W||) + beta
    x = torch.randn(2, 4, 6, 6)
    u = reference_normprop(model.conv, x, lambda t: t, 1.0)
    constants = normprop_fx.activation_constants(normprop_fx.activation("relu"))
    torch.testing.assert_close(gm(x), (torch.relu(u) - constants.mean) / constants.std * u, rtol=1e-4, atol=1e-5)


def test_shared_conv_called_twice_keeps_the_conv_and_replaces_the_bns():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x))

    report = normprop_fx.conversion_report(normprop_fx.convert(Shared(), example_inputs=torch.empty(2, 4, 8, 8)))
    assert report.converted == 2 and not report.left
    assert all(r.replacement == "NormPropAffine" and "used 2 times in the graph" in r.notes[0] for r in report.rewrites)


def test_batchnorm_with_no_conv_in_front_becomes_an_affine():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))
    gm = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 8, 8))
    report = normprop_fx.conversion_report(gm)
    (rewrite,) = report.rewrites
    assert rewrite.replacement == "NormPropAffine" and "no Conv/Linear in front (input: the input 'input')" in rewrite.notes[0]
    assert not report.corrections  # the model input is standardized by assumption
    x = torch.randn(2, 3, 8, 8)
    gamma = gm.get_submodule("0").gamma.view(1, -1, 1, 1)
    torch.testing.assert_close(gm(x), model[1](x * gamma))


def test_unsupported_activation_after_bn_is_noted_and_left_in_place():
    model = ConvNormAct(_conv2d(), nn.BatchNorm2d(8), nn.PReLU())
    gm = normprop_fx.convert(model)
    (rewrite,) = normprop_fx.conversion_report(gm).rewrites
    assert rewrite.activation == "identity"
    assert any("PReLU" in n and "not normalized" in n for n in rewrite.notes)
    assert isinstance(gm.get_submodule("act"), nn.PReLU)


def test_dynamic_activation_parameter_is_not_folded():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = _conv2d(), nn.BatchNorm2d(8)

        def forward(self, x, slope):
            return F.leaky_relu(self.bn(self.conv(x)), slope)

    # slope is a graph input, so the activation is not a constant function: Conv->BN only.
    gm = normprop_fx.convert(Dynamic(), example_inputs=(torch.empty(2, 4, 8, 8), torch.empty(())))
    (rewrite,) = normprop_fx.conversion_report(gm).rewrites
    assert rewrite.activation == "identity" and "computed at run time" in rewrite.notes[0]


def test_mismatched_batchnorm_type_is_not_fused():
    model = ConvNormAct(nn.Conv1d(4, 8, 3), nn.BatchNorm2d(8), None)
    report = normprop_fx.conversion_report(normprop_fx.convert(model, example_inputs=torch.empty(2, 4, 16)))
    (rewrite,) = report.rewrites
    assert rewrite.replacement == "NormPropAffine" and "does not normalize the outputs of a Conv1d" in rewrite.notes[0]


class _Untraceable(_ConvBn):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(x))
        return x


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvNormAct(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Identity(), _Untraceable())

    def forward(self, x):
        return self.body(self.stem(x))


def test_untraceable_module_error_names_it_and_the_fix():
    with pytest.raises(normprop_fx.UntraceableModelError) as info:
        normprop_fx.convert(_Net())
    message = str(info.value)
    assert info.value.module_path == "body.1"
    assert "'body.1' (_Untraceable)" in message and "leaf_modules=['body.1']" in message


@pytest.mark.parametrize("leaf", ["body.1", _Untraceable])
def test_leaf_modules_make_it_traceable_and_replace_hidden_batchnorms(leaf):
    gm = normprop_fx.convert(_Net(), leaf_modules=[leaf], example_inputs=torch.empty(2, 3, 8, 8))
    report = normprop_fx.conversion_report(gm)
    assert report.converted == 2 and report.batchnorms_found == 2 and not report.left
    opaque = next(r for r in report.rewrites if r.path == "body.1.bn")
    assert opaque.replacement == "OpaqueNormPropAffine" and "inside leaf module 'body.1'" in opaque.notes[0]
    assert report.leaf_modules == ("body.1",)
    assert gm(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())


class _ConvBnReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_batchnorm_inside_a_leaf_gets_a_correction_measured_on_the_sample():
    """Nothing structural is known inside an opaque module: the replaced BN's input correction is
    measured on the Gaussian sample, reported as estimated, and standardizes fresh N(0, I) input."""
    torch.manual_seed(0)
    model = nn.Sequential(ConvNormAct(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), _ConvBnReLU())
    with torch.no_grad():
        model[1].conv.bias.fill_(3.0)  # a large offset only a measured correction removes
    gm = normprop_fx.convert(model, leaf_modules=[_ConvBnReLU], gamma_init=1.0, example_inputs=torch.empty(4, 3, 16, 16))
    report = normprop_fx.conversion_report(gm)
    (correction,) = [c for c in report.corrections if c.path == "1.bn.correction"]
    assert correction.estimated and "measured on the Gaussian sample" in correction.reason
    seen = {}
    gm.get_submodule("1.bn.affine").register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    torch.manual_seed(1)
    with torch.no_grad():
        gm(torch.randn(8, 3, 16, 16))
    x = seen["x"]
    assert abs(x.mean().item()) < 0.1 and 0.85 < x.std().item() < 1.15
    single = gm(torch.randn(1, 3, 16, 16))  # batch size 1 works: no batch statistics anywhere
    assert torch.isfinite(single).all()


def test_untraceable_top_level_forward():
    model = _Untraceable()
    with pytest.raises(normprop_fx.UntraceableModelError, match="forward of _Untraceable itself"):
        normprop_fx.convert(model)


def test_bad_options_are_typed_errors():
    model = ConvNormAct(_conv2d(), nn.BatchNorm2d(8), nn.ReLU())
    for bad in ("fan_in", 0, -1.0, float("nan"), True):
        with pytest.raises(normprop_fx.InvalidOptionError):
            normprop_fx.convert(model, gamma_init=bad)
    with pytest.raises(normprop_fx.InvalidOptionError, match="no submodule 'nope'"):
        normprop_fx.convert(model, leaf_modules=["nope"])
    with pytest.raises(normprop_fx.InvalidOptionError):
        normprop_fx.convert(model, leaf_modules=[42])
    with pytest.raises(normprop_fx.InvalidOptionError):
        normprop_fx.convert(lambda x: x)
    with pytest.raises(normprop_fx.NormPropError, match="no conversion report"):
        normprop_fx.summary(model)


def test_lazy_model_asks_for_a_forward_first():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4))
    with pytest.raises(normprop_fx.NormPropError, match="run one forward pass"):
        normprop_fx.convert(model)


def test_model_without_batchnorm_warns_and_says_so():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.warns(NormPropWarning, match="no BatchNorm"):
        gm = normprop_fx.convert(model)
    assert "has no BatchNorm module: nothing to convert" in normprop_fx.summary(gm)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


def test_gamma_init_number_is_used_everywhere():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    gm = normprop_fx.convert(model, gamma_init=1.0)
    for rewrite in normprop_fx.conversion_report(gm).rewrites:
        assert rewrite.gamma_init == 1.0
    for layer in (gm.get_submodule("0"), gm.get_submodule("3")):
        assert torch.equal(layer.gamma, torch.ones(4)) and torch.equal(layer.beta, torch.zeros(4))


def test_inplace_shares_weights_and_default_does_not():
    model = ConvNormAct(_conv2d(), nn.BatchNorm2d(8), nn.ReLU())
    copied = normprop_fx.convert(model)
    assert copied.get_submodule("producer").weight is not model.producer.weight
    shared = normprop_fx.convert(model, inplace=True)
    assert shared.get_submodule("producer").weight is model.producer.weight


def test_fp16_and_bf16_models_convert_and_run():
    for dtype in (torch.bfloat16, torch.float16):
        model = ConvNormAct(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU()).to(dtype)
        gm = normprop_fx.convert(model)
        layer = gm.get_submodule("producer")
        assert layer.weight.dtype == layer.gamma.dtype == dtype
        out = gm(torch.randn(4, 16, dtype=dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_stochastic_depth_keeps_its_train_eval_switch():
    from torchvision.ops import StochasticDepth

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), StochasticDepth(0.5, "row"))
    gm = normprop_fx.convert(model, flat=True)
    assert "3" in {n.target for n in gm.graph.nodes if n.op == "call_module"}, "StochasticDepth must stay a module"
    x = torch.randn(64, 3, 6, 6)
    gm.eval()
    torch.testing.assert_close(gm(x), gm(x))  # eval: deterministic
    gm.train()
    dropped = (gm(x).flatten(1).abs().sum(1) == 0).sum()
    assert 0 < dropped < 64  # train: some rows dropped


def test_frozen_training_flag_is_warned_and_reported():
    """F.dropout gets its mode switch back as a module (test_convert_edge_cases); any other call
    whose training flag the trace froze, here F.rrelu, is a warning."""

    class CustomDrop(nn.Module):
        def forward(self, x):
            return F.rrelu(x, training=self.training)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), CustomDrop())
    with pytest.warns(NormPropWarning, match="training=True"):
        gm = normprop_fx.convert(model)
    assert "Warning: " in normprop_fx.summary(gm) and "module '2'" in normprop_fx.summary(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normprop_fx.convert(model, leaf_modules=[CustomDrop])  # the fix the message gives
