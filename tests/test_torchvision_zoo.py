"""Slow: every torchvision classification model through convert(). Run with `pytest -m slow`."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from helpers import dropout_off
from torch import nn

import normprop_fx

NAMES = sorted(torchvision.models.list_models(module=torchvision.models))


def _input_size(name: str) -> int:
    if name == "inception_v3":
        return 299
    if name.startswith(("vit_", "swin", "maxvit")):
        return 224  # fixed position embeddings / window sizes
    return 96


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torchvision_model(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    size = _input_size(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", normprop_fx.NormPropWarning)
        # the input shape the model is run with below (inception_v3's aux head needs 299, not the
        # default 224 that convert() assumes without example_inputs)
        converted = normprop_fx.convert(model, example_inputs=torch.randn(1, 3, size, size))
    report = normprop_fx.conversion_report(converted)
    remaining = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert report.converted + len(report.left) == report.batchnorms_found
    assert remaining == len(report.left), "every BatchNorm still in the model must be reported"

    x = torch.randn(2, 3, size, size)
    dropout_off(converted.train())
    logits = _logits(converted(x))
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in converted.parameters() if p.grad is not None)
    if report.batchnorms_found and not report.left:
        # float64: without the propagation pass, deep residual models grow their activations
        # enough (up to ~1e13) for float32 summation-order noise to be amplified past any
        # sensible tolerance; in float64 a batch-dependent op still shows at full size.
        converted.double()
        x = x.double()
        with torch.no_grad():
            batched, single = (_logits(converted(v)) for v in (x, x[:1]))
        scale = batched.abs().max().item()
        torch.testing.assert_close(single, batched[:1], rtol=1e-7, atol=1e-7 * max(scale, 1.0))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out
