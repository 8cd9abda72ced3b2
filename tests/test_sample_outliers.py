"""A rare input that the network at init blows up is left out of the variances measured on the
calibration sample (normprop_fx.sample_outliers): isolated outliers only, never a heavy tail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normprop_fx
from normprop_fx.sample_outliers import OUTLIER_RATIO, outlying_samples


def _samples_with_scales(scales: torch.Tensor, channels: int = 8, side: int = 4) -> torch.Tensor:
    """Gaussian samples whose second moments are ``scales`` (one per sample), around mean 0."""
    torch.manual_seed(0)
    return torch.randn(len(scales), channels, side, side) * scales.sqrt().view(-1, 1, 1, 1)


def test_an_isolated_outlier_is_found():
    scales = torch.ones(47)
    scales[39] = 580.0
    found = outlying_samples(_samples_with_scales(scales))
    assert found is not None and found.count == 1 and not found.keep[39]
    assert 400 < found.ratio < 800
    assert "1 of 47 sample left out" in found.note()


@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.9])
def test_a_log_normal_spread_keeps_every_sample(sigma):
    """Very deep ReLU networks spread the samples' scales log-normally (resnet152: median 0.17 of
    the mean, the largest 70x the median): that is the network's own, and the mean must keep it."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        scales = torch.exp(sigma * torch.randn(47, generator=generator, dtype=torch.float64))
        assert outlying_samples(_samples_with_scales(scales)) is None


def test_a_mild_outlier_is_kept():
    scales = torch.ones(16)
    scales[3] = OUTLIER_RATIO * 0.5  # beyond the fence of a tight cluster, but under the ratio
    assert outlying_samples(_samples_with_scales(scales)) is None


def test_too_few_samples_say_nothing():
    scales = torch.ones(3)
    scales[0] = 1000.0
    assert outlying_samples(_samples_with_scales(scales)) is None


def test_the_center_defaults_to_something_one_outlier_cannot_move():
    """Per-channel means of 5 (a ReLU's output, uncentred): the outlier's channel means are far off,
    the others' second moments around the median mean stay at their variance."""
    scales = torch.ones(16)
    scales[0] = 100.0
    x = _samples_with_scales(scales) + 5.0
    found = outlying_samples(x)
    assert found is not None and found.count == 1 and not found.keep[0]


# --- in a conversion -----------------------------------------------------------------------------


@torch.fx.wrap
def _loudest_louder(x: torch.Tensor) -> torch.Tensor:
    """The sample of the largest norm in the batch, 30x: one rare input that the network blows up."""
    norms = x.flatten(1).norm(dim=1)
    factor = torch.where(norms == norms.max(), 30.0, 1.0)
    return x * factor.view(-1, *([1] * (x.dim() - 1)))


class LoudBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(_loudest_louder(x))))


class LoudModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block = LoudBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.bn1(self.conv1(x))))


@pytest.mark.parametrize("opaque", [False, True], ids=["in-graph", "opaque"])
def test_an_outlying_calibration_sample_does_not_shrink_the_others(opaque):
    """One calibration sample at 900x the others' second moment made the correction's variance
    ~57x theirs (16 samples): every other sample left the layer at std ~0.13."""
    torch.manual_seed(0)
    options = {"leaf_modules": [LoudBlock]} if opaque else {}
    converted = normprop_fx.convert(LoudModel(), gamma_init=1.0, example_inputs=torch.empty(2, 3, 8, 8),
                                    calibration_samples=16, **options).eval()
    report = normprop_fx.conversion_report(converted)
    lines = [c.reason for c in report.corrections] + list(report.estimated_ops)
    assert any("1 of 16 sample left out as outliers" in line for line in lines)
    outputs = {}
    layer = converted.get_submodule("block.bn" if opaque else "block.conv")
    layer.register_forward_hook(lambda m, i, o: outputs.__setitem__("y", o))
    torch.manual_seed(1)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        converted(x)
    y = outputs["y"]
    loud = y.flatten(1).norm(dim=1).argmax()
    bulk = torch.cat([y[:loud], y[loud + 1:]])
    assert 0.8 <= float(bulk.std()) <= 1.25
