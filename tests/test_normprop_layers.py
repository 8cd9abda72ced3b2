"""NormProp layers: weight normalization, hyper-parameters, init, dtypes, batch independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprop_fx
from normprop_fx import NormPropConv1d, NormPropConv2d, NormPropConv3d, NormPropLinear, normalized_weight


@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 3, 3), (4, 2, 5), (4, 2, 2, 2, 2)])
def test_rows_have_norm_gamma_and_zero_rows_stay_finite(shape):
    w = torch.randn(*shape)
    w[1] = 0
    gamma = torch.rand(shape[0]) + 0.5
    gamma.requires_grad_(True)
    w.requires_grad_(True)
    v = normalized_weight(w, gamma)
    norms = v.detach().flatten(1).norm(dim=1)
    expected = gamma.detach().clone()
    expected[1] = 0
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=1e-6)
    v.square().sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(gamma.grad).all()


CONVS = [
    (nn.Conv1d(4, 6, 3, stride=2, padding=1), NormPropConv1d, (2, 4, 11)),
    (nn.Conv2d(4, 6, 3, padding="same", dilation=2), NormPropConv2d, (2, 4, 9, 9)),
    (nn.Conv2d(4, 6, 3, padding="valid"), NormPropConv2d, (2, 4, 9, 9)),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6), NormPropConv2d, (2, 6, 8, 8)),
    (nn.Conv2d(4, 8, (3, 1), stride=(2, 1), padding=(1, 0), groups=2), NormPropConv2d, (2, 4, 8, 8)),
    (nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate"), NormPropConv3d, (1, 2, 4, 5, 5)),
] + [(nn.Conv2d(4, 6, 3, padding=1, padding_mode=m), NormPropConv2d, (2, 4, 7, 7)) for m in ("reflect", "circular")]


@pytest.mark.parametrize("conv,cls,shape", CONVS, ids=lambda v: getattr(v, "__name__", None) or str(v)[:40])
def test_from_module_keeps_every_hyper_parameter(conv, cls, shape):
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    layer = cls.from_module(conv, activation="identity", gamma_init=1.0)
    assert layer.weight is not conv.weight and layer.weight.data_ptr() != conv.weight.data_ptr()
    x = torch.randn(*shape)
    with torch.no_grad():
        unit = conv.weight / conv.weight.flatten(1).norm(dim=1).reshape(-1, *([1] * (conv.weight.dim() - 1)))
        expected = conv._conv_forward(x, unit, None)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    for k, v in conv.state_dict().items():
        assert torch.equal(v, before[k])


def test_linear_from_module_and_standardized_output():
    torch.manual_seed(0)
    linear = nn.Linear(1024, 1024)
    layer = NormPropLinear.from_module(linear, activation="relu", gamma_init=1.0)
    assert "bias" not in dict(layer.named_parameters())
    out = layer(torch.randn(4096, 1024))
    assert abs(out.mean().item()) < 0.05 and abs(out.std().item() - 1) < 0.05


def test_paper_gamma_init_is_the_inverse_jacobian_gain():
    layer = NormPropConv2d(3, 4, 3)
    gain = normprop_fx.activation_constants(normprop_fx.activation("relu")).jacobian_gain
    torch.testing.assert_close(layer.gamma, torch.full((4,), 1 / gain))
    assert torch.equal(layer.beta, torch.zeros(4))
    assert NormPropLinear(3, 4, activation="tanh").gamma_init == pytest.approx(
        1 / normprop_fx.activation_constants(normprop_fx.activation("tanh")).jacobian_gain
    )


def test_affine_false_makes_gamma_beta_buffers():
    layer = NormPropLinear(3, 4, affine=False)
    assert set(dict(layer.named_parameters())) == {"weight"}
    assert {"gamma", "beta", "weight"} == set(layer.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_even_for_zero_filters(dtype):
    for layer, x in ((NormPropConv2d(3, 4, 3, padding=1), torch.randn(2, 3, 8, 8)),
                     (NormPropLinear(16, 4), torch.randn(2, 16))):
        with torch.no_grad():
            layer.weight[0].zero_()
        layer = layer.to(dtype)
        x = x.to(dtype).requires_grad_(True)
        out = layer(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        out.float().sum().backward()
        assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()


def test_bf16_autocast():
    layer = NormPropConv2d(3, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.gamma.grad).all()


def test_batch_independence_and_train_equals_eval():
    layer = NormPropConv2d(3, 5, 3, activation="silu")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        batched = layer.train()(x)
        for i in range(4):
            torch.testing.assert_close(layer(x[i : i + 1]), batched[i : i + 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.eval()(x), batched, rtol=0, atol=0)


def test_invalid_options():
    for bad in ("foo", 0, -1, float("nan"), float("inf")):
        with pytest.raises(normprop_fx.InvalidOptionError):
            NormPropLinear(3, 4, gamma_init=bad)
    with pytest.raises(normprop_fx.InvalidOptionError, match="divisible by groups"):
        NormPropConv2d(3, 4, 3, groups=2)
    with pytest.raises(normprop_fx.InvalidOptionError, match="padding_mode"):
        NormPropConv2d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(normprop_fx.UnsupportedActivationError):
        NormPropLinear(3, 4, activation="swishy")


def test_functional_equivalence_of_scaling_the_weight():
    """conv(x, W * s) == s * conv(x, W) for a per-output-channel s: the basis of the O(#weights) form."""
    x, w, s = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.rand(4) + 0.5
    torch.testing.assert_close(F.conv2d(x, w * s.view(-1, 1, 1, 1)), F.conv2d(x, w) * s.view(1, -1, 1, 1))
