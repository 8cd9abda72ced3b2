"""Edge cases from review: subclasses with their own forward, tied and computed weights,
Linear->BatchNorm1d on 3-D input, submodule modes, typed errors, deepcopy."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import ConvNormAct
from torch import nn

import normprop_fx


class PaddedConv(nn.Conv2d):
    """A Conv2d subclass whose forward differs from Conv2d's (like timm's Conv2dSame)."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1))) * 2


class SigmoidReLU(nn.ReLU):
    def forward(self, x):
        return torch.sigmoid(x)


def test_conv_subclass_with_own_forward_is_kept_and_its_bn_replaced_alone():
    model = ConvNormAct(PaddedConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    gm = normprop_fx.convert(model, leaf_modules=[PaddedConv], example_inputs=torch.empty(2, 3, 8, 8))
    report = normprop_fx.conversion_report(gm)
    (rewrite,) = report.rewrites
    assert rewrite.replacement == "NormPropAffine" and rewrite.activation == "relu"
    assert "PaddedConv subclasses Conv2d with a forward of its own" in rewrite.notes[0]
    assert isinstance(gm.get_submodule("producer"), PaddedConv)


@pytest.mark.parametrize("size", [16, 15])
def test_timm_conv2d_same_becomes_a_normprop_conv_with_same_padding(size):
    from timm.layers import Conv2dSame

    conv = Conv2dSame(3, 8, 3, stride=2)
    model = ConvNormAct(conv, nn.BatchNorm2d(8), None)
    gm = normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, size, size))
    (rewrite,) = normprop_fx.conversion_report(gm).rewrites
    assert rewrite.replacement == "NormPropConv2dSame"
    x = torch.randn(2, 3, size, size)
    reference = Conv2dSame(3, 8, 3, stride=2, bias=False)
    with torch.no_grad():
        reference.weight.copy_(conv.weight / conv.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    torch.testing.assert_close(gm(x), reference(x), rtol=1e-4, atol=1e-5)


def test_activation_subclass_with_own_forward_is_not_fused():
    model = ConvNormAct(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), SigmoidReLU())
    gm = normprop_fx.convert(model, leaf_modules=[SigmoidReLU])
    (rewrite,) = normprop_fx.conversion_report(gm).rewrites
    assert rewrite.activation == "identity"
    assert any("SigmoidReLU subclasses ReLU" in n for n in rewrite.notes)
    out = gm(torch.randn(2, 3, 8, 8))
    assert out.min() >= 0 and out.max() <= 1  # still a sigmoid


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.Identity])
def test_timm_batchnorm_act_is_one_unit_with_its_activation(act):
    from timm.layers import BatchNormAct2d

    model = ConvNormAct(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=act), None)
    gm = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 8, 8))
    report = normprop_fx.conversion_report(gm)
    (rewrite,) = report.rewrites
    expected = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.GELU: "gelu",
                nn.LeakyReLU: "leaky_relu", nn.Identity: "identity"}[act]
    assert rewrite.replacement == "NormPropConv2d" and rewrite.activation.startswith(expected)
    assert not report.left and not any(isinstance(m, BatchNormAct2d) for m in gm.modules())


@pytest.mark.parametrize("act, expected", [("gelu", "gelu"), ("gelu_tanh", "gelu(approximate='tanh')"),
                                           ("tanh", "tanh")])
def test_timm_own_activation_modules_are_fused_and_exact_when_trained(act, expected):
    """timm's get_act_layer('gelu') is timm's own GELU module, not nn.GELU (mobilenetv4_hybrid's
    BatchNormAct2d units): it is fused like nn.GELU, untrained and trained (then exactly)."""
    from timm.layers import BatchNormAct2d
    from timm.layers import activations as timm_act

    from normprop_fx.model_check import randomize_batchnorms

    torch.manual_seed(0)
    model = ConvNormAct(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4, act_layer=act), None)
    assert type(model.norm.act).__module__ == timm_act.__name__, "the test must exercise timm's own class"
    for trained in (False, True):
        if trained:  # in float64, where exact means to 1e-10
            model = randomize_batchnorms(model, torch.randn(8, 3, 8, 8)).double()
        converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 8, 8, dtype=next(model.parameters()).dtype))
        report = normprop_fx.conversion_report(converted)
        (rewrite,) = report.rewrites
        assert rewrite.activation == expected and not rewrite.notes, rewrite.notes
        assert type(converted) is ConvNormAct and report.module_tree.class_kept and not report.module_tree.rebuilt
        if trained:
            x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
            torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-10, atol=1e-10)


def test_timm_batchnorm_act_with_drop_block_keeps_it_before_the_activation():
    from timm.layers import BatchNormAct2d, DropBlock2d

    bn = BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=lambda: DropBlock2d(0.1, 3))
    # flat: the test reads the modules the passes put in the graph, in graph order
    gm = normprop_fx.convert(ConvNormAct(nn.Conv2d(3, 4, 3), bn, None), example_inputs=torch.empty(2, 3, 8, 8), flat=True)
    report = normprop_fx.conversion_report(gm)
    (rewrite,) = report.rewrites
    assert rewrite.activation == "identity" and any("DropBlock2d stays" in n for n in rewrite.notes)
    assert [type(m).__name__ for m in gm.children()] == ["NormPropConv2d", "DropBlock2d", "NormalizedActivation"]
    assert [a.original for a in report.normalized_activations] == ["norm_act (ReLU)"]


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.c2.weight = self.c1.weight
            self.b1, self.b2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.b2(self.c2(F.relu(self.b1(self.c1(x)))))

    model = Tied()
    gm = normprop_fx.convert(model)
    assert normprop_fx.conversion_report(gm).converted == 2
    assert gm.c1.weight is gm.c2.weight
    assert gm.c1.weight is not model.c1.weight  # a copy of the model, tied within itself
    assert sum(1 for _ in gm.parameters()) == 1 + 2 * 2  # one weight, two gammas, two betas


def test_parameters_read_directly_elsewhere_keep_the_conv():
    class BiasReader(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.bn(self.c(x))) + F.conv2d(x, self.c.weight, self.c.bias)

    report = normprop_fx.conversion_report(normprop_fx.convert(BiasReader(), example_inputs=torch.empty(2, 3, 8, 8)))
    (rewrite,) = report.rewrites
    assert rewrite.replacement == "NormPropAffine" and "used 3 times in the graph" in rewrite.notes[0]


@pytest.mark.parametrize("inplace", [False, True])
def test_parametrized_weight_is_copied_with_a_note(inplace):
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    model = ConvNormAct(conv, nn.BatchNorm2d(4), nn.ReLU())
    gm = normprop_fx.convert(model, inplace=inplace)
    (rewrite,) = normprop_fx.conversion_report(gm).rewrites
    assert any("is computed (parametrization or hook)" in n for n in rewrite.notes)
    layer = gm.get_submodule("producer")
    assert isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight.detach(), conv.weight.detach())


def test_linear_batchnorm1d_on_3d_input_is_refused_at_run_time():
    model = ConvNormAct(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())
    gm = normprop_fx.convert(model)
    assert gm(torch.randn(4, 16)).shape == (4, 8)
    with pytest.raises(normprop_fx.NormPropError, match="only for 2-D input"):
        gm(torch.randn(4, 8, 16))


def test_submodule_modes_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    model[3].eval()
    gm = normprop_fx.convert(model)
    assert gm.training and not gm.get_submodule("3").training
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), gm(x))  # dropout stays off, as the user set it
    shared = normprop_fx.convert(model, inplace=True)
    assert not model[3].training and not shared.get_submodule("3").training


@pytest.mark.parametrize(
    "act", [lambda x: F.hardtanh(x, 20.0, 30.0), nn.Softplus(beta=0)], ids=["constant_hardtanh", "softplus_beta0"]
)
def test_activation_without_usable_moments_is_a_note_not_a_crash(act):
    gm = normprop_fx.convert(ConvNormAct(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act))
    (rewrite,) = normprop_fx.conversion_report(gm).rewrites
    assert rewrite.activation == "identity" and "is not normalized" in rewrite.notes[-1]


def test_eps_must_be_finite_and_positive():
    model = ConvNormAct(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    for bad in (True, 0.0, -1e-8, float("inf"), float("nan"), "1e-8"):
        with pytest.raises(normprop_fx.InvalidOptionError):
            normprop_fx.convert(model, eps=bad)


def test_deepcopy_keeps_the_report():
    gm = normprop_fx.convert(ConvNormAct(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    twin = copy.deepcopy(gm)
    assert normprop_fx.summary(twin) == normprop_fx.summary(gm)
    assert twin.get_submodule("producer").weight is not gm.get_submodule("producer").weight


class _FunctionalDropoutHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ConvNormAct(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(x).mean((2, 3))
        return self.fc(F.dropout(x, p=0.5, training=self.training))  # traced as training=True


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "tree"])
def test_functional_dropout_follows_train_and_eval_after_conversion(flat):
    """The trace freezes F.dropout's training flag; the flat graph turns it back into a dropout
    module, the module tree keeps the user's own call; either way eval() is deterministic and
    there is no frozen-flag warning."""
    model = _FunctionalDropoutHead().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", normprop_fx.NormPropWarning)
        gm = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 8, 8), flat=flat)
    dropouts = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    if flat:
        assert len(dropouts) == 1 and dropouts[0].p == 0.5 and dropouts[0].training
    else:
        assert type(gm) is _FunctionalDropoutHead and not dropouts
    x = torch.randn(4, 3, 8, 8)
    gm.eval()
    torch.testing.assert_close(gm(x), gm(x))
    assert not normprop_fx.conversion_report(gm).warnings


class _TorchDropoutHead(nn.Module):
    """``torch.dropout``/``torch.feature_dropout`` with the flag positional (and named ``train``)."""

    def __init__(self, fn):
        super().__init__()
        self.body = ConvNormAct(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fn = fn

    def forward(self, x):
        return self.fn(self.body(x), 0.5, self.training)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "tree"])
@pytest.mark.parametrize("fn", [torch.dropout, torch.feature_dropout], ids=["dropout", "feature_dropout"])
@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_torch_dropout_with_a_positional_flag_follows_train_and_eval(fn, traced_in, flat):
    torch.manual_seed(0)  # the dropped share is checked below
    model = _TorchDropoutHead(fn)
    model.train(traced_in == "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error", normprop_fx.NormPropWarning)
        gm = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 8, 8), flat=flat)
    dropouts = [m for m in gm.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if flat:  # the graph's module for the frozen call
        assert len(dropouts) == 1 and dropouts[0].p == 0.5
    else:  # the user's own call, in the user's forward
        assert type(gm) is _TorchDropoutHead and not dropouts
    x = torch.randn(8, 3, 8, 8)
    gm.eval()
    reference = gm(x)
    torch.testing.assert_close(gm(x), reference)  # eval: no dropout, whatever mode it was traced in
    out = gm.train()(x)
    dropped = (out == 0) & (reference != 0)
    torch.testing.assert_close(out[~dropped], 2 * reference[~dropped])  # kept values scaled by 1/(1-p)
    assert 0.3 < dropped.sum() / (reference != 0).sum() < 0.7
    channel_dropped = (out.flatten(2) == 0).all(2) & (reference.flatten(2) != 0).any(2)
    if fn is torch.feature_dropout:  # whole channels, each sample its own
        assert torch.equal(dropped.flatten(2).any(2), channel_dropped)
    else:  # single values
        assert not channel_dropped.any()


def test_a_positional_frozen_training_flag_is_warned():
    class InstanceStandardize(nn.Module):  # a hand-written norm: torch.batch_norm, the flag positional
        def forward(self, x):
            return torch.batch_norm(x, None, None, None, None, self.training, 0.1, 1e-5, False)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), InstanceStandardize())
    with pytest.warns(normprop_fx.NormPropWarning, match="training=True"):
        normprop_fx.convert(model)


class _LastAxisLinear(nn.Module):
    def __init__(self, out_features: int = 4):
        super().__init__()
        self.fc = nn.Linear(6, out_features)
        self.bn = nn.BatchNorm1d(4)
        self.act = nn.ReLU()

    def forward(self, x):  # x: (N, 4, 6)
        return self.act(self.bn(self.fc(x)))


@pytest.mark.parametrize("out_features", [4, 5], ids=["out==C", "out!=C"])
def test_linear_over_the_last_axis_then_batchnorm1d_is_not_fused_and_converts(out_features):
    """Issue 20, finding 4: Linear over the last axis of (N, C, L), then BatchNorm1d(C). With
    out_features == C it used to be fused on the feature count and refused during propagation; the
    shapes of the example input now say that the BatchNorm normalizes dim 1 there, so it becomes a
    NormPropAffine, as with out_features != C, with the reason in the audit."""
    converted = normprop_fx.convert(_LastAxisLinear(out_features), example_inputs=torch.empty(2, 4, 6))
    assert type(converted.fc) is nn.Linear and isinstance(converted.bn, normprop_fx.NormPropAffine)
    report = normprop_fx.conversion_report(converted)
    assert report.batchnorms_found == 1 and not report.left
    if out_features == 4:
        (rewrite,) = report.rewrites
        assert any("gets 3-D input (2, 4, 6)" in note for note in rewrite.notes), rewrite.notes
    x = torch.randn(3, 4, 6)
    converted.train()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), torch.cat([converted(x[i:i + 1]) for i in range(3)]))


def test_linear_then_batchnorm1d_on_2d_input_is_still_fused():
    converted = normprop_fx.convert(_LastAxisLinear(4), example_inputs=torch.empty(2, 6))
    assert isinstance(converted.fc, normprop_fx.NormPropLinear) and converted.fc.required_input_dim == 2
    with pytest.raises(normprop_fx.NormPropError, match="only for 2-D input"):
        converted(torch.randn(2, 4, 6))  # the run-time check stays, for input the example did not show
