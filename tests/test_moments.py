"""Activation constants (docs/method.md sections 3-4): closed forms, quadrature, and Monte Carlo.

Every reference value is computed here from first principles (math.erf, autograd on a large
Gaussian sample); nothing is copied from the spec's table.
"""

from __future__ import annotations

import math

import pytest
import torch

from normprop_fx import (
    ACTIVATION_FUNCTIONS,
    NormalizedActivation,
    UnsupportedActivationError,
    activation,
    activation_constants,
    gaussian_moments,
)

ALL_ACTIVATIONS = sorted(ACTIVATION_FUNCTIONS)
MC_SAMPLES = 4_000_000
Z_SE = 5.0  # agreement required, in standard errors


def Phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def Q(x: float) -> float:
    """Standard normal upper tail, accurate far out (erfc, not 1 - Phi)."""
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def phi(x: float) -> float:
    """Standard normal density."""
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def constants_from(mean: float, second: float, deriv_second: float) -> tuple[float, float, float]:
    """(c_mean, c_std, jacobian_gain) from E[f], E[f^2], E[f'^2]."""
    std = math.sqrt(second - mean * mean)
    return mean, std, math.sqrt(deriv_second) / std


def assert_constants(spec, expected: tuple[float, float, float], tol: float = 1e-9) -> None:
    c = activation_constants(spec)
    mean, std, gain = expected
    assert abs(c.mean - mean) < tol, (spec, c.mean, mean)
    assert abs(c.std - std) < tol, (spec, c.std, std)
    assert abs(c.jacobian_gain - gain) < tol, (spec, c.jacobian_gain, gain)


# --------------------------------------------------------------------------- ReLU


def test_relu_constants_equal_closed_form():
    c = activation_constants(activation("relu"))
    mean = 1.0 / math.sqrt(2.0 * math.pi)
    std = math.sqrt((1.0 - 1.0 / math.pi) / 2.0)
    gain = 1.0 / math.sqrt(1.0 - 1.0 / math.pi)
    assert c.mean == pytest.approx(mean, rel=0, abs=1e-14)
    assert c.std == pytest.approx(std, rel=0, abs=1e-14)
    assert c.jacobian_gain == pytest.approx(gain, rel=0, abs=1e-14)
    # the paper's "1.21"
    assert abs(c.jacobian_gain - 1.2112) < 1e-4
    assert c.gamma_init == pytest.approx(1.0 / c.jacobian_gain, rel=1e-15)
    assert c.gamma_init == pytest.approx(math.sqrt(1.0 - 1.0 / math.pi), rel=1e-14)


def test_relu_quadrature_matches_closed_form():
    """gaussian_moments is the numerical path; activation_constants short-cuts ReLU."""
    c = activation_constants(activation("relu"))
    q = gaussian_moments(activation("relu"))
    assert abs(q.mean - c.mean) < 1e-10
    assert abs(q.std - c.std) < 1e-10
    assert abs(q.rms_derivative - math.sqrt(0.5)) < 1e-10
    assert abs(q.rms_derivative / q.std - c.jacobian_gain) < 1e-10


# ------------------------------------------------------------- other closed forms


@pytest.mark.parametrize("slope", [0.01, 0.2])
def test_leaky_relu_closed_form(slope):
    mean = (1.0 - slope) / math.sqrt(2.0 * math.pi)
    second = (1.0 + slope**2) / 2.0
    deriv_second = (1.0 + slope**2) / 2.0
    assert_constants(activation("leaky_relu", negative_slope=slope), constants_from(mean, second, deriv_second))


def test_leaky_relu_default_slope_is_001():
    assert activation_constants(activation("leaky_relu")) == activation_constants(
        activation("leaky_relu", negative_slope=0.01)
    )


def test_elu_closed_form():
    alpha = 1.0
    # E[z; z>0] = phi(0);  E[e^z; z<0] = e^(1/2) Phi(-1);  E[e^(2z); z<0] = e^2 Phi(-2)
    mean = 1.0 / math.sqrt(2.0 * math.pi) + alpha * (math.exp(0.5) * Phi(-1.0) - 0.5)
    second = 0.5 + alpha**2 * (math.exp(2.0) * Phi(-2.0) - 2.0 * math.exp(0.5) * Phi(-1.0) + 0.5)
    deriv_second = 0.5 + alpha**2 * math.exp(2.0) * Phi(-2.0)
    assert_constants(activation("elu", alpha=alpha), constants_from(mean, second, deriv_second))
    # celu with alpha=1 is elu
    assert_constants(activation("celu", alpha=1.0), constants_from(mean, second, deriv_second))


def test_identity_constants():
    c = activation_constants(activation("identity"))
    assert (c.mean, c.std, c.jacobian_gain, c.gamma_init) == (0.0, 1.0, 1.0, 1.0)
    # and the quadrature path agrees
    q = gaussian_moments(activation("identity"))
    assert abs(q.mean) < 1e-12 and abs(q.std - 1.0) < 1e-10 and abs(q.rms_derivative - 1.0) < 1e-10


def test_gelu_mean_closed_form():
    # E[z Phi(z)] = E[phi(z)] = 1 / (2 sqrt(pi)) (Stein's lemma)
    c = activation_constants(activation("gelu"))
    assert abs(c.mean - 1.0 / (2.0 * math.sqrt(math.pi))) < 1e-9


def test_tanh_and_sigmoid_means_by_symmetry():
    assert abs(activation_constants(activation("tanh")).mean) < 1e-9
    assert abs(activation_constants(activation("sigmoid")).mean - 0.5) < 1e-9


def test_sigmoid_is_rescaled_tanh_of_half_input():
    """sigmoid(z) = (1 + tanh(z/2)) / 2, so its moments are tanh's on N(0, 1/4), halved."""
    s = activation_constants(activation("sigmoid"))
    t = gaussian_moments(activation("tanh"), mean=0.0, std=0.5)
    assert abs(s.std - t.std / 2.0) < 1e-9
    # d/dz sigmoid(z) = tanh'(z/2) / 4 and tanh'(x) at x = z/2 is what t.rms_derivative averages
    assert abs(s.jacobian_gain - (t.rms_derivative / 4.0) / (t.std / 2.0)) < 1e-9


def test_hardtanh_derivative_mean_square_is_mass_inside():
    p_inside = math.erf(1.0 / math.sqrt(2.0))  # P(|z| < 1)
    q = gaussian_moments(activation("hardtanh", min_val=-1.0, max_val=1.0))
    assert abs(q.rms_derivative**2 - p_inside) < 1e-9
    # E[f^2] = E[z^2; |z|<1] + P(|z|>1) = p_inside - 2 phi(1) + (1 - p_inside)
    second = 1.0 - 2.0 * phi(1.0)
    c = activation_constants(activation("hardtanh"))
    assert abs(c.mean) < 1e-9
    assert abs(c.std - math.sqrt(second)) < 1e-9
    assert abs(c.jacobian_gain - math.sqrt(p_inside) / math.sqrt(second)) < 1e-9


def test_relu6_is_relu_up_to_mass_above_six():
    relu = activation_constants(activation("relu"))
    relu6 = activation_constants(activation("relu6"))
    q6 = Q(6.0)
    # exact: E[min(relu(z), 6)] = phi(0) - phi(6) + 6 Q(6)
    mean = phi(0.0) - phi(6.0) + 6.0 * q6
    # E[min(relu(z), 6)^2] = E[z^2; 0<z<6] + 36 Q(6) = 1/2 - Q(6) - 6 phi(6) + 36 Q(6)
    second = 0.5 - q6 - 6.0 * phi(6.0) + 36.0 * q6
    deriv_second = 0.5 - q6
    assert_constants(activation("relu6"), constants_from(mean, second, deriv_second), tol=1e-12)
    # and that is within ~1e-9 of relu, but not identical (the cap is really applied)
    assert abs(relu6.mean - relu.mean) < 1e-8
    assert abs(relu6.std - relu.std) < 1e-8
    assert abs(relu6.jacobian_gain - relu.jacobian_gain) < 1e-8
    assert relu6.mean < relu.mean


# ----------------------------------------------------------------- Monte Carlo


@pytest.fixture(scope="module")
def gaussian_sample() -> torch.Tensor:
    gen = torch.Generator().manual_seed(20160301)
    return torch.randn(MC_SAMPLES, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("name", ALL_ACTIVATIONS)
def test_monte_carlo_agrees_with_constants(name, gaussian_sample):
    """Sample mean, std and rms(f')/std of f on 4e6 N(0,1) draws, each within 5 standard errors.

    Standard errors by the delta method from per-sample influence values:
      mean: f - m;  std: ((f - m)^2 - v) / (2 s);
      gain g = sqrt(D / v): g * (d/(2D) - w/(2v)) with d = f'^2 - D, w = (f - m)^2 - v.
    """
    spec = activation(name)
    c = activation_constants(spec)
    z = gaussian_sample.clone().requires_grad_(True)
    y = spec(z)
    (dy,) = torch.autograd.grad(y.sum(), z, allow_unused=True)
    y = y.detach()
    dy = torch.zeros_like(y) if dy is None else dy
    n = y.numel()

    m = y.mean()
    centered_sq = (y - m) ** 2
    v = centered_sq.mean()
    s = v.sqrt()
    d2 = dy * dy
    D = d2.mean()
    gain = (D / v).sqrt()

    infl_mean = y - m
    infl_std = (centered_sq - v) / (2 * s)
    infl_gain = gain * ((d2 - D) / (2 * D) - (centered_sq - v) / (2 * v))
    se_mean = float(infl_mean.std()) / math.sqrt(n)
    se_std = float(infl_std.std()) / math.sqrt(n)
    se_gain = float(infl_gain.std()) / math.sqrt(n)

    assert se_mean > 0 and se_std > 0
    assert abs(float(m) - c.mean) <= Z_SE * se_mean, (name, float(m), c.mean, se_mean)
    assert abs(float(s) - c.std) <= Z_SE * se_std, (name, float(s), c.std, se_std)
    if name == "identity":
        # f' = 1 everywhere: the gain estimate is 1/s, its error all from s
        assert float(D) == 1.0
    assert abs(float(gain) - c.jacobian_gain) <= Z_SE * max(se_gain, 1e-12), (
        name, float(gain), c.jacobian_gain, se_gain,
    )


# ---------------------------------------------------------- non-default params


@pytest.mark.parametrize(
    "default, other",
    [
        (activation("gelu"), activation("gelu", approximate="tanh")),
        (activation("softplus"), activation("softplus", beta=2.0)),
        (activation("leaky_relu"), activation("leaky_relu", negative_slope=0.2)),
    ],
)
def test_non_default_parameters_change_constants(default, other):
    assert default != other
    a, b = activation_constants(default), activation_constants(other)
    # differences well above the quadrature's ~1e-12 accuracy
    assert abs(a.mean - b.mean) > 1e-6
    assert abs(a.jacobian_gain - b.jacobian_gain) > 1e-6


def test_softplus_beta_is_applied():
    # softplus(z; beta=2) = softplus(2 z) / 2: same as beta=1 on N(0, 4), halved
    c = activation_constants(activation("softplus", beta=2.0))
    q = gaussian_moments(activation("softplus"), mean=0.0, std=2.0)
    assert abs(c.mean - q.mean / 2.0) < 1e-9
    assert abs(c.std - q.std / 2.0) < 1e-9


def test_integer_parameter_is_accepted_as_float():
    assert activation("elu", alpha=1) == activation("elu", alpha=1.0)
    assert activation("elu") == activation("elu", alpha=1.0)


@pytest.mark.parametrize(
    "name, params",
    [
        ("swish_of_doom", {}),
        ("ReLU", {}),  # names are the functional names, case-sensitive
        ("relu", {"inplace": True}),
        ("leaky_relu", {"slope": 0.2}),
        ("leaky_relu", {"negative_slope": "0.2"}),
        ("leaky_relu", {"negative_slope": None}),
        ("leaky_relu", {"negative_slope": True}),
        ("elu", {"alpha": torch.tensor(1.0)}),
        ("softplus", {"beta": [2.0]}),
        ("gelu", {"approximate": "sigmoid"}),
        ("gelu", {"approximate": 1}),
    ],
)
def test_activation_rejects_bad_names_and_params(name, params):
    with pytest.raises(UnsupportedActivationError):
        activation(name, **params)


# ------------------------------------------------------ shifted/scaled Gaussians


@pytest.mark.parametrize("m, s", [(0.7, 1.3), (-1.5, 0.5), (0.0, 3.0)])
def test_relu_on_general_gaussian_matches_rectified_gaussian(m, s):
    q = gaussian_moments(activation("relu"), mean=m, std=s)
    a = m / s
    mean = m * Phi(a) + s * phi(a)
    second = (m * m + s * s) * Phi(a) + m * s * phi(a)
    assert abs(q.mean - mean) < 1e-9
    assert abs(q.std - math.sqrt(second - mean * mean)) < 1e-9
    assert abs(q.rms_derivative - math.sqrt(Phi(a))) < 1e-9


def test_gaussian_moments_rejects_bad_std():
    for m, s in [(0.0, 0.0), (0.0, -1.0), (0.0, math.nan), (math.inf, 1.0)]:
        with pytest.raises(ValueError):
            gaussian_moments(activation("relu"), mean=m, std=s)


# ------------------------------------------------------ NormalizedActivation


@pytest.fixture(scope="module")
def float32_sample() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1603_01431)
    return torch.randn(1_000_000, generator=gen)


@pytest.mark.parametrize("name", ALL_ACTIVATIONS)
def test_normalized_activation_standardizes(name, float32_sample):
    layer = NormalizedActivation(name)
    out = layer(float32_sample)
    assert out.dtype == torch.float32 and out.shape == float32_sample.shape
    o = out.double()
    n = o.numel()
    m, s = o.mean(), o.std()
    se_mean = float(s) / math.sqrt(n)
    se_std = float(((o - m) ** 2).std()) / (2 * float(s)) / math.sqrt(n)
    assert abs(float(m)) <= Z_SE * se_mean, (name, float(m), se_mean)
    assert abs(float(s) - 1.0) <= Z_SE * se_std, (name, float(s), se_std)


def test_normalized_activation_is_the_documented_formula():
    spec = activation("silu")
    c = activation_constants(spec)
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    expected = (torch.nn.functional.silu(x) - c.mean) / c.std
    torch.testing.assert_close(NormalizedActivation(spec)(x), expected, rtol=1e-12, atol=1e-12)
    # a spec and its name give the same module
    assert NormalizedActivation("silu").spec == spec
