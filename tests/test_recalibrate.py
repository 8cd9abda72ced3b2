"""normprop_fx.recalibrate (docs/method.md section 8, "Recalibration on new data"): after it, every
exactly converted layer's pre-activation has, on the data it saw, the per-channel mean t and std |g|
of the BatchNorm it replaced; on the BatchNorm's own data it changes nothing; bad input is refused."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprop_fx
from normprop_fx import NormPropLayer, NormPropLinear, RecalibrationError
from normprop_fx.batchnorm_state import batchnorm_state
from normprop_fx.model_check import randomize_batchnorms, relative_l2

recalibrate_module = importlib.import_module("normprop_fx.recalibrate")


class Reordered(nn.Module):
    """Conv-BN-ReLU, a residual conv-BN, Linear-BN1d-ReLU, a head: registered in the reverse of
    the order forward calls them, so registration order is the wrong order to recalibrate in."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.fc_bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(8, 6)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.drop = nn.Dropout(0.5)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(self.drop(y))) + y)
        y = F.relu(self.fc_bn(self.fc(y.mean((2, 3)))))
        return self.head(y)


def _data(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _trained_converted(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = randomize_batchnorms(Reordered(), _data(32, 100 + seed), seed)
    return model, normprop_fx.convert(model, init="trained")


def _pre_activation_moments(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: float64 per-channel mean and population std of its pre-activation on ``x`` (eval mode)."""
    captured: dict[str, torch.Tensor] = {}
    layers = {p: m for p, m in model.named_modules() if isinstance(m, NormPropLayer)}
    handles = [m.activation.register_forward_pre_hook(lambda _m, a, p=p: captured.__setitem__(p, a[0].double()))
               for p, m in layers.items()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    moments = {}
    for p, u in captured.items():
        u = u.movedim(u.dim() - 1 if isinstance(layers[p], NormPropLinear) else 1, -1).reshape(-1, u.shape[1])
        moments[p] = (u.mean(0), u.std(0, unbiased=False))
    return moments


def _moment_errors(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Per layer: max |mean - t| / max|g| and max relative |std - |g|| against the BatchNorm's intent."""
    layers = {p: m for p, m in model.named_modules() if isinstance(m, NormPropLayer)}
    errors = {}
    for p, (mean, std) in _pre_activation_moments(model, x).items():
        g, t = layers[p].batchnorm_affine
        errors[p] = ((mean - t).abs().max().item() / g.abs().max().item(),
                     ((std - g.abs()) / g.abs()).abs().max().item())
    return errors


def test_every_layer_gets_the_moments_its_batchnorm_intended_on_the_data_it_saw() -> None:
    _, converted = _trained_converted()
    x = _data(96, 1, shift=0.7, scale=1.8)  # another domain: the checkpoint's statistics are off
    before = _moment_errors(converted, x)
    assert max(max(e) for e in before.values()) > 0.1  # the test data really is off before
    report = normprop_fx.recalibrate(converted, list(x.split(32)))
    assert [r.path for r in report] == ["conv1", "conv2", "fc"]  # forward order, not registration order
    assert all(r.images == 96 and r.constant_channels == 0 for r in report)
    after = _moment_errors(converted, x)
    assert after.keys() == before.keys()
    for path, (mean_error, std_error) in after.items():
        assert mean_error < 1e-5 and std_error < 1e-5, (path, mean_error, std_error)


def test_recalibrating_in_registration_order_would_miss_the_moments(monkeypatch) -> None:
    """The test above can fail: recalibrate conv1 last, after the layers it feeds (as any order not
    taken from a forward pass can, e.g. the user's registration order), and the later layers'
    moments are off."""
    _, converted = _trained_converted()
    x = _data(96, 1, shift=0.7, scale=1.8)
    forward_order = recalibrate_module._forward_order
    monkeypatch.setattr(recalibrate_module, "_forward_order", lambda *args: forward_order(*args)[::-1])
    normprop_fx.recalibrate(converted, [x])
    errors = _moment_errors(converted, x)
    assert max(errors["conv2"] + errors["fc"]) > 1e-2 and max(errors["conv1"]) < 1e-5


def test_on_the_batchnorms_own_data_nothing_changes_and_elsewhere_it_does() -> None:
    torch.manual_seed(0)
    own = _data(64, 2)
    model = randomize_batchnorms(Reordered(), own)
    for m in model.modules():  # running statistics = the exact statistics of ``own`` (one batch)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            m.eps = 1e-12  # else the BatchNorm's output std is |g| sqrt(var / (var + eps)), not |g|
    with torch.no_grad():
        model.train()
        model.drop.eval()  # the statistics of the eval-mode function
        model(own)
    for m in model.modules():  # BatchNorm keeps the unbiased variance; the data's is the population one
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = len(own) * (100 if isinstance(m, nn.BatchNorm2d) else 1)
            m.running_var.mul_((n - 1) / n)
    model.eval()
    converted = normprop_fx.convert(model, init="trained")
    same = copy.deepcopy(converted)
    normprop_fx.recalibrate(same, own.split(16))
    for (name, a), (_, b) in zip(converted.named_parameters(), same.named_parameters(), strict=True):
        assert relative_l2(b.detach(), a.detach()) < 1e-5, name
    with torch.no_grad():
        assert relative_l2(same(own), converted(own)) < 1e-5
    moved = copy.deepcopy(converted)
    normprop_fx.recalibrate(moved, [_data(64, 3, shift=0.5, scale=1.5)])
    with torch.no_grad():
        assert relative_l2(moved(own), converted(own)) > 0.05


def test_changes_gamma_and_beta_in_place_only_and_keeps_train_mode() -> None:
    _, converted = _trained_converted()
    converted.train()
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    weights = {p: m.weight for p, m in converted.named_modules() if isinstance(m, NormPropLayer)}
    normprop_fx.recalibrate(converted, [(_data(40, 4, shift=1.0), torch.zeros(40))])  # (inputs, labels) batches
    assert converted.training and all(m.training for m in converted.modules())
    changed = {k for k, v in converted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith((".gamma", ".beta")) for k in changed), changed
    assert all(m.weight is weights[p] for p, m in converted.named_modules() if isinstance(m, NormPropLayer))
    # measured with dropout off: recalibrating a copy again on the same data gives the same result
    again = copy.deepcopy(converted)
    normprop_fx.recalibrate(again, [_data(40, 4, shift=1.0)])
    normprop_fx.recalibrate(converted, [_data(40, 4, shift=1.0)])
    for (k, a), (_, b) in zip(converted.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_bad_input_gets_a_clear_error() -> None:
    _, converted = _trained_converted()
    with pytest.raises(RecalibrationError, match="no NormProp layers"):
        normprop_fx.recalibrate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), [_data(4, 0)])
    untrained = normprop_fx.convert(Reordered(), init="normprop", example_inputs=torch.empty(2, 3, 10, 10))
    with pytest.raises(RecalibrationError, match="init='trained'.*conv1"):
        normprop_fx.recalibrate(untrained, [_data(4, 0)])
    with pytest.raises(RecalibrationError, match="batches are empty"):
        normprop_fx.recalibrate(converted, [])
    with pytest.raises(RecalibrationError, match="batches are empty"):
        normprop_fx.recalibrate(converted, [torch.empty(0, 3, 10, 10)])
    bad = _data(8, 0)
    bad[3, 0, 2, 2] = float("nan")
    reference = copy.deepcopy(converted.state_dict())
    with pytest.raises(RecalibrationError, match="conv1: non-finite statistics"):
        normprop_fx.recalibrate(converted, [bad])
    with pytest.raises(RecalibrationError, match="a tensor or"):
        normprop_fx.recalibrate(converted, [{"x": _data(4, 0)}])
    for k, v in converted.state_dict().items():  # refused before anything was changed
        assert torch.equal(v, reference[k]), k


def test_a_layer_called_twice_is_refused() -> None:
    conv, bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3).eval()
    layer = normprop_fx.NormPropConv2d.from_module(conv)
    layer.keep_batchnorm_function(batchnorm_state(bn), conv.bias)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(x))

    with pytest.raises(RecalibrationError, match="more than once per forward pass cannot be given one set of moments: layer"):
        normprop_fx.recalibrate(Twice(), [_data(8, 1)])
    unreached = nn.ModuleDict({"used": Twice(), "unused": copy.deepcopy(layer)})
    unreached.forward = lambda x: unreached["used"].layer(x)
    with pytest.raises(RecalibrationError, match="never reached.*unused"):
        normprop_fx.recalibrate(unreached, [_data(8, 1)])
