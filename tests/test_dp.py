"""DP-SGD on a converted model (Opacus, the ``dp`` extra): one private step gives every trainable
parameter a per-sample gradient, and each one is that sample's own gradient. Opacus has no grad
sampler for NormProp layers; it computes theirs with its functorch fallback (vmap over the
layer's forward), the Conv2d/Linear ones it knows with its hooks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprop_fx
from normprop_fx.model_check import randomize_batchnorms

opacus = pytest.importorskip("opacus")

import finetune  # noqa: E402  (tools/ is on pytest's pythonpath)
import train as train_tool  # noqa: E402


def _converted() -> nn.Module:
    torch.manual_seed(0)
    model = randomize_batchnorms(train_tool.SmallResNet((4, 8), num_classes=3), torch.randn(16, 1, 12, 12))
    return normprop_fx.convert(model, init="trained").train()


def test_one_private_step_gives_every_parameter_its_per_sample_gradient() -> None:
    model = _converted()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 12, 12, generator=g), torch.randint(0, 3, (64,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, loader = opacus.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True)
        torch.manual_seed(1)
        x, y = next(b for b in loader if len(b[1]) >= 4)
        F.cross_entropy(private(x), y).backward()  # mean: Opacus scales back to per-sample losses
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * 6 + 2  # weight, gamma, beta of 6 NormProp layers; the head's weight and bias
    for name, p in trainable:
        assert p.grad_sample is not None and p.grad_sample.shape == (len(y), *p.shape), name
    # each per-sample gradient is that sample's gradient alone (checked for two samples)
    twin = _converted()
    for i in (0, len(y) - 1):
        twin.zero_grad()
        F.cross_entropy(twin(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for (name, p), (_, q) in zip(trainable, twin.named_parameters(), strict=True):
            assert torch.allclose(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-6), name
    modes = finetune.grad_sample_modes(model)
    assert modes == {"NormPropConv2d": "functorch", "Linear": "hooks"}, modes
    optimizer.step()  # clipped, noised: every parameter moved, nothing non-finite
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), reference[name]), name
