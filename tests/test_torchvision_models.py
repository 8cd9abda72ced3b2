"""torchvision resnet18 and vgg11_bn, end to end (random weights, no download)."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from helpers import dropout_off
from torch import nn

import normprop_fx
from normprop_fx import NormPropLayer

MODELS = {"resnet18": 20, "vgg11_bn": 8}  # BatchNorm modules each one has
INPUT = (3, 64, 64)  # both end in adaptive pooling, so a small input exercises every layer quickly


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None)


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    name = request.param
    model = _build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, *INPUT, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        reference = model(x)
    converted = normprop_fx.convert(model)
    return name, model, before, x, reference, converted


def test_every_batchnorm_is_converted(case):
    name, model, _, _, _, converted = case
    report = normprop_fx.conversion_report(converted)
    assert report.batchnorms_found == MODELS[name]
    assert report.converted == MODELS[name] and report.left == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert sum(isinstance(m, NormPropLayer) for m in converted.modules()) == MODELS[name]


def test_output_shape_and_backward_reaches_every_parameter(case):
    _, _, _, x, reference, converted = case
    converted.train()
    converted.zero_grad()
    out = converted(x)
    assert out.shape == reference.shape
    out.square().mean().backward()
    for name, p in converted.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    gammas = [n for n, _ in converted.named_parameters() if n.endswith(".gamma")]
    assert len(gammas) == MODELS[case[0]]


def test_batch_independence_in_train_mode(case):
    _, _, _, x, _, converted = case
    dropout_off(converted.train())
    with torch.no_grad():
        batched = converted(x)
        for i in range(x.shape[0]):
            torch.testing.assert_close(converted(x[i : i + 1]), batched[i : i + 1], rtol=1e-4, atol=1e-5)


def test_train_mode_equals_eval_mode(case):
    _, _, _, x, _, converted = case
    with torch.no_grad():
        train_out = dropout_off(converted.train())(x)
        eval_out = converted.eval()(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


def test_original_model_is_untouched(case):
    _, model, before, x, reference, converted = case
    # train the converted model for a step: the original's tensors must not move
    converted.train()
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(x).square().mean().backward()
    opt.step()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert not any(isinstance(m, NormPropLayer) for m in model.modules())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_state_dict_round_trip(case):
    name, _, _, x, _, converted = case
    fresh = normprop_fx.convert(_build(name, seed=123))
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(x), converted.eval()(x))
    fresh.load_state_dict(converted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), converted.eval()(x), rtol=0, atol=0)


def test_whole_module_save_and_load_keeps_the_report(case):
    _, _, _, x, _, converted = case
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), converted.eval()(x), rtol=0, atol=0)
    assert normprop_fx.summary(loaded) == normprop_fx.summary(converted)
