"""NormProp layers (docs/method.md section 2-3, 7): weight normalization, hyper-parameters, init, dtypes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normprop_fx import (
    InvalidOptionError,
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropLinear,
    activation,
    activation_constants,
    normalized_weight,
)

NORMPROP_FOR = {nn.Conv1d: NormPropConv1d, nn.Conv2d: NormPropConv2d, nn.Conv3d: NormPropConv3d, nn.Linear: NormPropLinear}


def row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().double().flatten(1).norm(dim=1)


# ------------------------------------------------------------ normalized_weight


@pytest.mark.parametrize("shape", [(7, 13), (6, 3, 3, 3), (5, 2, 4), (4, 2, 3, 3, 2)])
def test_normalized_weight_rows_have_norm_gamma(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 3.0
    gamma = torch.rand(shape[0], generator=gen) * 2.0 + 0.1
    # eps=0: the exact definition gamma_i * W_i / ||W_i||
    nw = normalized_weight(w, gamma, eps=0.0)
    assert nw.shape == w.shape and nw.dtype == w.dtype
    torch.testing.assert_close(row_norms(nw), gamma.double(), rtol=1e-6, atol=0)
    # same direction as W
    cos = (nw.flatten(1) * w.flatten(1)).sum(1) / (row_norms(nw) * row_norms(w)).float()
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-6, atol=1e-6)
    # the default eps only perturbs this by eps / (2 ||W||^2)
    torch.testing.assert_close(row_norms(normalized_weight(w, gamma)), gamma.double(), rtol=1e-6, atol=0)


def test_normalized_weight_zero_rows_give_zeros_not_nan():
    w = torch.randn(4, 3, 3, 3)
    w[1] = 0.0
    w[3] = 0.0
    gamma = torch.full((4,), 0.8)
    nw = normalized_weight(w, gamma)
    assert torch.isfinite(nw).all()
    assert torch.equal(nw[1], torch.zeros_like(nw[1])) and torch.equal(nw[3], torch.zeros_like(nw[3]))
    torch.testing.assert_close(row_norms(nw[[0, 2]]), torch.full((2,), 0.8, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalized_weight_zero_row_gradients_finite(dtype):
    w = torch.randn(3, 2, 3, 3).to(dtype)
    w[0] = 0.0
    w = w.requires_grad_(True)
    gamma = torch.ones(3, dtype=dtype, requires_grad=True)
    nw = normalized_weight(w, gamma)
    (nw * torch.randn(nw.shape).to(dtype)).sum().backward()
    assert torch.isfinite(w.grad.float()).all()
    assert torch.isfinite(gamma.grad.float()).all()
    assert w.grad.float()[1:].abs().sum() > 0  # gradients really flow


def test_zero_filter_in_layer_has_finite_forward_and_gradients():
    layer = NormPropConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        layer.weight[2].zero_()
    x = torch.randn(2, 3, 8, 8)
    y = layer(x)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    for name in ("weight", "gamma", "beta"):
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all(), name
    # the zero filter's pre-activation is beta = 0: its output is the normalized f(0)
    c = activation_constants(activation("relu"))
    torch.testing.assert_close(y[:, 2], torch.full_like(y[:, 2], -c.mean / c.std))


# ------------------------------------------------------------ from_module


def reference_output(source: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """source's own forward (padding modes and all), float64, weight W/||W||, no bias."""
    ref = copy.deepcopy(source).double()
    with torch.no_grad():
        w = ref.weight
        w.div_(w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1))))
    ref.bias = None
    return ref(x.double())


CONV_CASES = [
    # (conv class, kwargs, input spatial shape)
    (nn.Conv1d, {"in_channels": 4, "out_channels": 6, "kernel_size": 3}, (17,)),
    (nn.Conv1d, {"in_channels": 4, "out_channels": 6, "kernel_size": 4, "stride": 3, "padding": 2, "dilation": 2}, (23,)),
    (nn.Conv1d, {"in_channels": 4, "out_channels": 6, "kernel_size": 4, "padding": "same", "dilation": 3}, (19,)),
    (nn.Conv1d, {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 2, "padding_mode": "circular", "groups": 2}, (16,)),
    (nn.Conv1d, {"in_channels": 4, "out_channels": 4, "kernel_size": 5, "padding": "same", "padding_mode": "reflect", "groups": 4}, (16,)),
    (nn.Conv2d, {"in_channels": 3, "out_channels": 5, "kernel_size": 3}, (9, 11)),
    (nn.Conv2d, {"in_channels": 3, "out_channels": 5, "kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}, (12, 10)),
    (nn.Conv2d, {"in_channels": 3, "out_channels": 5, "kernel_size": (4, 2), "padding": "same"}, (9, 10)),
    (nn.Conv2d, {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "padding": "valid", "stride": 2}, (9, 10)),
    (nn.Conv2d, {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, "padding_mode": "reflect", "groups": 2}, (8, 8)),
    (nn.Conv2d, {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": (2, 1), "padding_mode": "replicate"}, (8, 9)),
    (nn.Conv2d, {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": (1, 2), "padding_mode": "circular", "stride": 2}, (8, 9)),
    (nn.Conv2d, {"in_channels": 4, "out_channels": 6, "kernel_size": (2, 4), "padding": "same", "padding_mode": "replicate", "dilation": (2, 1)}, (8, 9)),
    # depthwise, channel multiplier 2
    (nn.Conv2d, {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 1, "groups": 4}, (8, 8)),
    (nn.Conv2d, {"in_channels": 4, "out_channels": 4, "kernel_size": 5, "stride": 2, "padding": 2, "groups": 4, "padding_mode": "reflect"}, (11, 11)),
    (nn.Conv3d, {"in_channels": 2, "out_channels": 4, "kernel_size": 3}, (5, 6, 7)),
    (nn.Conv3d, {"in_channels": 2, "out_channels": 4, "kernel_size": (1, 3, 2), "stride": (1, 2, 1), "padding": (0, 1, 1), "dilation": (1, 1, 2)}, (4, 7, 8)),
    (nn.Conv3d, {"in_channels": 4, "out_channels": 4, "kernel_size": 2, "padding": "same", "padding_mode": "circular", "groups": 4}, (4, 5, 6)),
    (nn.Conv3d, {"in_channels": 2, "out_channels": 4, "kernel_size": 3, "padding": 1, "padding_mode": "replicate", "groups": 2}, (4, 5, 5)),
]


def _case_id(case) -> str:
    cls, kw, _ = case
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k not in ("in_channels", "out_channels"))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("case", CONV_CASES, ids=[_case_id(c) for c in CONV_CASES])
def test_conv_from_module_reproduces_source(case):
    cls, kwargs, spatial = case
    torch.manual_seed(0)
    source = cls(**kwargs, bias=True)
    with torch.no_grad():
        source.bias.uniform_(1.0, 2.0)  # a bias that would show if it leaked through
    before = {k: v.clone() for k, v in source.state_dict().items()}
    attrs = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    attrs_before = {a: getattr(source, a) for a in attrs}

    layer = NORMPROP_FOR[cls].from_module(source, activation="identity", gamma_init=1.0)
    assert type(layer) is NORMPROP_FOR[cls]
    for a in attrs:
        assert getattr(layer, a) == getattr(source, a), a

    # the weight is a copy
    assert layer.weight is not source.weight
    assert layer.weight.data_ptr() != source.weight.data_ptr()
    assert torch.equal(layer.weight, source.weight)

    x = torch.randn(2, kwargs["in_channels"], *spatial)
    out = layer(x)
    expected = reference_output(source, x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

    # the source module is unchanged (values and hyper-parameters), also after training the copy
    out.square().sum().backward()
    with torch.no_grad():
        layer.weight.add_(1.0)
    for k, v in source.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {a: getattr(source, a) for a in attrs} == attrs_before
    assert source.weight.grad is None


def test_linear_from_module_reproduces_source():
    torch.manual_seed(0)
    source = nn.Linear(20, 7)
    with torch.no_grad():
        source.bias.fill_(3.0)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    layer = NormPropLinear.from_module(source, activation="identity", gamma_init=1.0)
    assert (layer.in_features, layer.out_features) == (20, 7)
    assert layer.weight is not source.weight and layer.weight.data_ptr() != source.weight.data_ptr()
    x = torch.randn(3, 5, 20)  # extra leading dims like nn.Linear
    torch.testing.assert_close(layer(x).double(), reference_output(source, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    for k, v in source.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_from_module_with_activation_and_gamma():
    """gamma scales the unit-norm pre-activation; the normalized activation follows."""
    torch.manual_seed(1)
    source = nn.Conv2d(3, 4, 3, padding=1)
    layer = NormPropConv2d.from_module(source, activation="silu", gamma_init=0.7)
    with torch.no_grad():
        layer.beta.copy_(torch.tensor([0.0, 0.5, -0.5, 1.0]))
    x = torch.randn(2, 3, 6, 6)
    c = activation_constants(activation("silu"))
    u = 0.7 * reference_output(source, x) + layer.beta.double().reshape(1, -1, 1, 1)
    expected = (F.silu(u) - c.mean) / c.std
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ initialization


def test_gamma_one_relu_linear_is_standardized():
    torch.manual_seed(0)
    layer = NormPropLinear(1024, 1024, activation="relu", gamma_init=1)
    assert torch.equal(layer.gamma, torch.ones(1024)) and torch.equal(layer.beta, torch.zeros(1024))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 1024, generator=gen)
    with torch.no_grad():
        y = layer(x).double()
    assert abs(float(y.mean())) < 0.05, float(y.mean())
    assert abs(float(y.std()) - 1.0) < 0.05, float(y.std())
    # and per unit too (looser: 2048 samples per unit)
    assert float(y.mean(0).abs().max()) < 0.15
    assert float((y.std(0) - 1).abs().max()) < 0.15


def test_gamma_paper_is_inverse_jacobian_gain():
    expected = 1.0 / activation_constants(activation("relu")).jacobian_gain
    assert abs(expected - 1 / 1.2112) < 1e-4
    for layer in (NormPropLinear(8, 5), NormPropConv2d(3, 6, 3, gamma_init="paper")):
        assert layer.gamma_init == pytest.approx(expected, rel=1e-15)
        torch.testing.assert_close(layer.gamma, torch.full_like(layer.gamma, expected), rtol=1e-7, atol=0)
        assert torch.equal(layer.beta, torch.zeros_like(layer.beta))
    # follows the activation
    silu = NormPropLinear(8, 5, activation="silu")
    torch.testing.assert_close(
        silu.gamma, torch.full((5,), activation_constants(activation("silu")).gamma_init), rtol=1e-7, atol=0
    )


def test_affine_false_keeps_gamma_beta_as_buffers():
    for layer in (NormPropLinear(6, 4, affine=False, gamma_init=0.5), NormPropConv2d(3, 4, 3, affine=False, gamma_init=0.5)):
        params = dict(layer.named_parameters())
        buffers = dict(layer.named_buffers())
        assert set(params) == {"weight"}
        assert {"gamma", "beta"} <= set(buffers)
        assert not layer.gamma.requires_grad and not layer.beta.requires_grad
        state = layer.state_dict()
        assert {"weight", "gamma", "beta"} <= set(state)
        assert torch.equal(state["gamma"], torch.full((4,), 0.5))
        assert torch.equal(state["beta"], torch.zeros(4))
    # with affine=True they are parameters
    layer = NormPropLinear(6, 4)
    assert {"weight", "gamma", "beta"} == set(dict(layer.named_parameters()))


# ------------------------------------------------------------ low precision


# Checked on this torch (2.15 CPU): F.conv2d forward and backward run in float16 on CPU, so
# fp16 is tested for the conv too (no bf16-only fallback needed). The test asserts it.
def test_cpu_fp16_conv_kernel_exists():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float16, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float16, requires_grad=True)
    F.conv2d(x, w).sum().backward()
    assert x.grad.dtype == torch.float16 and w.grad.dtype == torch.float16


def _low_precision_layers():
    torch.manual_seed(0)
    return [
        (NormPropConv2d(3, 8, 3, padding=1), (4, 3, 10, 10)),
        (NormPropConv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect", activation="silu"), (4, 4, 10, 10)),
        (NormPropLinear(32, 16), (4, 32)),
        (NormPropLinear(32, 16, activation="gelu"), (4, 32)),
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_backward_finite(dtype):
    for layer, shape in _low_precision_layers():
        ref = layer(torch.zeros(shape))  # shape check in fp32
        layer = layer.to(dtype)
        assert layer.weight.dtype == dtype and layer.gamma.dtype == dtype
        x = torch.randn(shape).to(dtype).requires_grad_(True)
        y = layer(x)
        assert y.dtype == dtype and y.shape == ref.shape
        assert torch.isfinite(y).all()
        y.float().square().mean().backward()
        for name in ("weight", "gamma", "beta"):
            grad = getattr(layer, name).grad
            assert grad is not None and grad.dtype == dtype and torch.isfinite(grad).all(), (type(layer), name)
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_fp32(dtype):
    torch.manual_seed(0)
    layer = NormPropConv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    expected = layer(x)
    out = copy.deepcopy(layer).to(dtype)(x.to(dtype)).float()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_autocast_bfloat16_finite():
    for layer, shape in _low_precision_layers():
        x = torch.randn(shape, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16  # autocast really took the conv/linear to bf16
        assert torch.isfinite(y).all()
        y.float().square().mean().backward()
        for name in ("weight", "gamma", "beta"):
            grad = getattr(layer, name).grad
            assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("factory", [lambda: NormPropConv2d(3, 4, 3), lambda: NormPropLinear(12, 4)])
def test_all_zero_weight_fp16_is_finite(factory):
    layer = factory().half()
    with torch.no_grad():
        layer.weight.zero_()
    shape = (2, 3, 6, 6) if isinstance(layer, NormPropConv2d) else (2, 12)
    x = torch.randn(shape).half().requires_grad_(True)
    y = layer(x)
    assert torch.isfinite(y).all()
    c = activation_constants(activation("relu"))
    torch.testing.assert_close(y.float(), torch.full(y.shape, -c.mean / c.std), rtol=1e-3, atol=1e-3)
    y.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.gamma.grad).all()


def test_fp16_large_weights_do_not_overflow_the_norm():
    """sum of squares of a 27-value filter of 200s is ~1e6, past fp16's 65504."""
    layer = NormPropConv2d(3, 4, 3, activation="identity", gamma_init=1.0).half()
    with torch.no_grad():
        layer.weight.fill_(200.0)
    x = torch.randn(1, 3, 5, 5).half()
    y = layer(x)
    assert torch.isfinite(y).all()
    expected = F.conv2d(x.float(), torch.full((4, 3, 3, 3), 1 / math.sqrt(27.0)))
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------ batch independence


@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: NormPropConv2d(3, 6, 3, padding=1, stride=2), (5, 3, 9, 9)),
        (lambda: NormPropConv1d(3, 6, 3, padding="same", padding_mode="reflect"), (5, 3, 12)),
        (lambda: NormPropConv3d(2, 4, 3, padding=1), (3, 2, 4, 5, 5)),
        (lambda: NormPropLinear(16, 8, activation="gelu"), (5, 16)),
    ],
)
def test_batch_independence_and_train_eval_equal(factory, shape):
    torch.manual_seed(0)
    layer = factory()
    with torch.no_grad():
        layer.beta.uniform_(-0.5, 0.5)
        layer.gamma.uniform_(0.5, 1.5)
    layer.train()
    x = torch.randn(shape)
    batch = layer(x)
    for i in range(shape[0]):
        alone = layer(x[i : i + 1])
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-6, atol=1e-6)
    # changing the other samples does not change sample 0
    x2 = x.clone()
    x2[1:] = x2[1:] * 10 + 3
    torch.testing.assert_close(layer(x2)[0], batch[0], rtol=1e-6, atol=1e-6)
    layer.eval()
    assert torch.equal(layer(x), batch)


# ------------------------------------------------------------ invalid options


@pytest.mark.parametrize("gamma_init", ["foo", "", 0, 0.0, -1, -0.5, math.nan, math.inf, True, None, [1.0]])
def test_invalid_gamma_init_rejected(gamma_init):
    with pytest.raises(InvalidOptionError):
        NormPropLinear(4, 4, gamma_init=gamma_init)
    with pytest.raises(InvalidOptionError):
        NormPropConv2d(4, 4, 3, gamma_init=gamma_init)


@pytest.mark.parametrize(
    "cls, args, kwargs",
    [
        (NormPropConv2d, (6, 4, 3), {"groups": 4}),  # in_channels not divisible
        (NormPropConv2d, (4, 6, 3), {"groups": 4}),  # out_channels not divisible
        (NormPropConv1d, (3, 3, 3), {"groups": 2}),
        (NormPropConv3d, (4, 6, 3), {"groups": 4}),
        (NormPropConv2d, (4, 4, 3), {"padding_mode": "mirror"}),
    ],
)
def test_invalid_conv_options_rejected(cls, args, kwargs):
    with pytest.raises(InvalidOptionError):
        cls(*args, **kwargs)


def test_valid_gamma_inits_accepted():
    assert NormPropLinear(4, 4, gamma_init=2).gamma_init == 2.0
    assert NormPropLinear(4, 4, gamma_init=1e-3).gamma_init == 1e-3


def test_float64_weights_are_normalized_in_float64():
    w = torch.randn(4, 1000, dtype=torch.float64)
    v = normalized_weight(w, torch.ones(4, dtype=torch.float64), eps=0.0)
    assert v.dtype == torch.float64
    assert (v.norm(dim=1) - 1).abs().max() < 1e-12


def test_small_norm_filters_are_still_normalized():
    """eps must not shrink filters of small but real norm (pretrained, weight-decayed weights)."""
    w = torch.randn(8, 27)
    w = 1e-3 * w / w.norm(dim=1, keepdim=True)
    v = normalized_weight(w, torch.ones(8))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(8), rtol=5e-3, atol=0)
