"""Piecewise-linear normalized activations differentiate through their output
(normprop_fx/piecewise_linear.py): same values and gradients as plain autograd."""

from __future__ import annotations

import contextlib

import pytest
import torch

from normprop_fx import NormalizedActivation
from normprop_fx.activation_functions import activation
from normprop_fx.eager import compiled_form
from normprop_fx.piecewise_linear import PIECEWISE_LINEAR, normalized_piecewise_linear

SPECS = [
    activation("relu"),
    activation("leaky_relu", negative_slope=0.2),
    activation("relu6"),
    activation("hardtanh", min_val=-0.5, max_val=2.0),
]


def test_every_piecewise_linear_activation_is_covered():
    assert {spec.name for spec in SPECS} == PIECEWISE_LINEAR


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_values_and_gradients_match_plain_autograd(spec):
    torch.manual_seed(0)
    # Spread over every piece, kinks excluded (the subgradient there is a convention).
    u = (torch.randn(4, 8, 5, 5, dtype=torch.float64) * 4).requires_grad_()
    grad = torch.randn_like(u)
    scale, shift = 1.7, -0.6
    y = normalized_piecewise_linear(u, spec, scale, shift)
    (du,) = torch.autograd.grad(y, u, grad)
    u_ref = u.detach().clone().requires_grad_()
    y_ref = spec(u_ref) * scale + shift
    (du_ref,) = torch.autograd.grad(y_ref, u_ref, grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(du, du_ref)
    assert torch.autograd.gradcheck(lambda t: normalized_piecewise_linear(t, spec, scale, shift), (u,))


@pytest.mark.parametrize(("form", "backward"), [(compiled_form, "_NormalizedPiecewiseLinearBackward"),
                                                 (contextlib.nullcontext, "_ClampInPlaceBackward")])
def test_normalized_activation_uses_it_compiled_and_keeps_its_gradient(form, backward):
    # compiled, the output-gradient Function; eager, one clamp, in place on the affine's fresh
    # output under autograd (normprop_fx/eager.py, clamp_fresh)
    act = NormalizedActivation("relu")
    u = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    with form():
        y = act(u)
    assert type(y.grad_fn).__name__ == backward
    (du,) = torch.autograd.grad(y.sum(), u)
    torch.testing.assert_close(du, (u > 0).to(u.dtype) / act.std)


def test_a_nonpositive_scale_is_refused():
    with pytest.raises(ValueError, match="positive"):
        normalized_piecewise_linear(torch.zeros(3), activation("relu"), -1.0, 0.0)


def test_per_sample_gradients_with_torch_func():
    spec = activation("relu")
    u = torch.randn(5, 7, dtype=torch.float64)

    def loss(row: torch.Tensor) -> torch.Tensor:
        return (normalized_piecewise_linear(row, spec, 1.5, -0.5) ** 2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss))(u)
    expected = 2 * (torch.relu(u) * 1.5 - 0.5) * 1.5 * (u > 0)
    torch.testing.assert_close(per_sample, expected)
