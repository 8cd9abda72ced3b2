"""The NormProp constants: closed forms, symmetry, and large Monte Carlo samples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import normprop_fx
from normprop_fx import ACTIVATION_FUNCTIONS, NormalizedActivation, activation, activation_constants, gaussian_moments


def Phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def test_relu_closed_form_and_quadrature_agree():
    c = activation_constants(activation("relu"))
    assert c.mean == pytest.approx(1 / math.sqrt(2 * math.pi), abs=1e-15)
    assert c.std == pytest.approx(math.sqrt((1 - 1 / math.pi) / 2), abs=1e-15)
    assert c.jacobian_gain == pytest.approx(1 / math.sqrt(1 - 1 / math.pi), abs=1e-15)
    assert c.gamma_init == pytest.approx(1 / c.jacobian_gain)
    assert round(c.jacobian_gain, 2) == 1.21  # the paper's 1.21
    q = gaussian_moments(activation("relu"))  # the numerical path, bypassing the closed form
    assert q.mean == pytest.approx(c.mean, abs=1e-12)
    assert q.std == pytest.approx(c.std, abs=1e-12)
    assert q.rms_derivative / q.std == pytest.approx(c.jacobian_gain, abs=1e-12)


@pytest.mark.parametrize("a", [0.01, 0.2])
def test_leaky_relu_closed_form(a):
    c = activation_constants(activation("leaky_relu", negative_slope=a))
    mean = (1 - a) / math.sqrt(2 * math.pi)
    second = (1 + a * a) / 2
    std = math.sqrt(second - mean * mean)
    assert c.mean == pytest.approx(mean, abs=1e-12)
    assert c.std == pytest.approx(std, abs=1e-12)
    assert c.jacobian_gain == pytest.approx(math.sqrt((1 + a * a) / 2) / std, abs=1e-12)


def test_elu_closed_form():
    # E[e^z - 1; z < 0] = e^(1/2) Phi(-1) - 1/2
    c = activation_constants(activation("elu"))
    assert c.mean == pytest.approx(1 / math.sqrt(2 * math.pi) + math.exp(0.5) * Phi(-1) - 0.5, abs=1e-12)
    # E[f'^2] = 1/2 + E[e^{2z}; z < 0] = 1/2 + e^2 Phi(-2)
    assert c.jacobian_gain * c.std == pytest.approx(math.sqrt(0.5 + math.exp(2) * Phi(-2)), abs=1e-12)


def test_identity_symmetry_and_hardtanh():
    assert activation_constants(activation("identity")) == normprop_fx.ActivationConstants(0.0, 1.0, 1.0)
    assert activation_constants(activation("tanh")).mean == pytest.approx(0.0, abs=1e-14)
    assert activation_constants(activation("sigmoid")).mean == pytest.approx(0.5, abs=1e-14)
    h = activation_constants(activation("hardtanh"))
    assert h.jacobian_gain * h.std == pytest.approx(math.sqrt(Phi(1) - Phi(-1)), abs=1e-12)
    relu, relu6 = activation_constants(activation("relu")), activation_constants(activation("relu6"))
    assert relu6.mean == pytest.approx(relu.mean, abs=1e-8) and relu6.mean < relu.mean


def test_relu_on_a_shifted_gaussian_is_a_rectified_gaussian():
    for m, s in [(0.5, 2.0), (-1.0, 0.5), (3.0, 1.5)]:
        q = gaussian_moments(activation("relu"), mean=m, std=s)
        mean = m * Phi(m / s) + s * phi(m / s)
        second = (m * m + s * s) * Phi(m / s) + m * s * phi(m / s)
        assert q.mean == pytest.approx(mean, abs=1e-11)
        assert q.std == pytest.approx(math.sqrt(second - mean * mean), abs=1e-11)
        assert q.rms_derivative == pytest.approx(math.sqrt(Phi(m / s)), abs=1e-11)


SAMPLES = 4_000_000


@pytest.fixture(scope="module")
def z():
    return torch.randn(SAMPLES, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(ACTIVATION_FUNCTIONS))
def test_monte_carlo_agrees_within_five_standard_errors(name, z):
    spec = activation(name)
    c = activation_constants(spec)
    x = z.clone().requires_grad_(True)
    y = spec(x)
    (dy,) = torch.autograd.grad(y.sum(), x) if y.requires_grad else (torch.ones_like(x),)
    y = y.detach()
    n = SAMPLES
    mean = y.mean().item()
    var = y.var().item()
    se_mean = math.sqrt(var / n)
    assert abs(mean - c.mean) < 5 * se_mean
    # standard error of the sample variance: sqrt((mu4 - var^2) / n)
    mu4 = ((y - mean) ** 4).mean().item()
    se_var = math.sqrt(max(mu4 - var * var, 1e-30) / n)
    assert abs(var - c.std**2) < 5 * se_var + 1e-12
    d2 = dy * dy
    se_d2 = math.sqrt(d2.var().item() / n)
    assert abs(d2.mean().item() - (c.jacobian_gain * c.std) ** 2) < 5 * se_d2 + 1e-12


def test_parameters_change_the_constants_and_bad_specs_are_refused():
    base = activation_constants(activation("gelu"))
    assert activation_constants(activation("gelu", approximate="tanh")).mean != base.mean
    assert activation_constants(activation("softplus", beta=2.0)).mean != activation_constants(activation("softplus")).mean
    assert activation("leaky_relu", negative_slope=0.2) != activation("leaky_relu")
    for bad in (lambda: activation("swishy"), lambda: activation("relu", slope=1.0),
                lambda: activation("leaky_relu", negative_slope="0.2"), lambda: activation("gelu", approximate="fast")):
        with pytest.raises(normprop_fx.UnsupportedActivationError):
            bad()


@pytest.mark.parametrize("name", sorted(ACTIVATION_FUNCTIONS))
def test_normalized_activation_standardizes(name):
    u = torch.randn(1_000_000, generator=torch.Generator().manual_seed(1))
    o = NormalizedActivation(activation(name))(u).double()
    se = 1 / math.sqrt(u.numel())
    assert abs(o.mean().item()) < 5 * se
    # the sample std has standard error sqrt((kurtosis - 1) / 4n), at most 2/sqrt(n) for these activations
    assert abs(o.std().item() - 1) < 5 * 2 * se


def test_relu_normalized_activation_is_the_spec_formula():
    u = torch.linspace(-3, 3, 101)
    expected = (F.relu(u) - 1 / math.sqrt(2 * math.pi)) / math.sqrt((1 - 1 / math.pi) / 2)
    torch.testing.assert_close(NormalizedActivation("relu")(u), expected)
