"""Moment propagation on the Gaussian sample: what the structural rules cannot know (correlated
values under a pooling op, weight-dependent estimates) is measured there, and reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normprop_fx


class SmoothThenPool(nn.Module):
    """A conv whose positive 3x3 filters make neighbouring outputs strongly correlated, then an
    average pool over 4x4 windows, then a conv-BN-ReLU that needs a standardized input."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.smooth = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        with torch.no_grad():
            self.smooth.weight.uniform_(0.5, 1.0)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool = pool
        self.conv = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.smooth(x))))
        return torch.relu(self.bn2(self.conv(x)))


def _second_layer_std(pool: nn.Module) -> tuple[float, normprop_fx.ConversionReport]:
    torch.manual_seed(0)
    converted = normprop_fx.convert(SmoothThenPool(pool), gamma_init=1.0, example_inputs=torch.empty(2, 3, 32, 32))
    torch.manual_seed(1)
    stats = {s.path: s for s in normprop_fx.measure_layer_statistics(converted, torch.randn(8, 3, 32, 32))}
    return stats["conv"].std, normprop_fx.conversion_report(converted)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(4), nn.MaxPool2d(4)], ids=["avg", "max"])
def test_pooling_of_correlated_values_is_measured_on_the_sample(pool):
    std, report = _second_layer_std(pool)
    # Independent-value rules are far off here: var/16 for the average would leave the next
    # layer's output with std ~4 once corrected; the max of 16 correlated values is much
    # closer to its input than the max of 16 independent ones.
    assert 0.8 <= std <= 1.25
    (line,) = [op for op in report.estimated_ops if op.startswith("pool")]
    assert "Gaussian sample" in line


def test_average_pool_of_correlated_values_keeps_more_than_one_kth_of_the_variance():
    _, report = _second_layer_std(nn.AvgPool2d(4))
    (line,) = [op for op in report.estimated_ops if op.startswith("pool")]
    inflation = float(line.split("keeps x")[1].split(" ")[0])
    assert inflation > 4  # 16 strongly correlated values behave like fewer than 4 independent ones


def test_estimated_consumer_input_is_calibrated_and_reported():
    """A plain conv (no BN) in front of a conv-BN: its output's moments depend on the weights,
    so they are estimates; the sample calibrates them to unit variance and says so."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),  # no BN: plain weighted layer, then a probe-free activation
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
    )
    converted = normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, 16, 16))
    report = normprop_fx.conversion_report(converted)
    assert any(c.estimated for c in report.corrections)
    assert any(op.startswith("input of") and "scaled by that" in op for op in report.estimated_ops)
    torch.manual_seed(1)
    last = normprop_fx.measure_layer_statistics(converted, torch.randn(8, 3, 16, 16))[-1]
    assert 0.85 <= last.std <= 1.15


def test_propagation_leaves_the_model_as_it_was():
    """The sample run sets gamma 1 / beta 0 and eval mode for itself only."""
    torch.manual_seed(0)
    model = SmoothThenPool(nn.AvgPool2d(2)).train()
    converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 16, 16))
    assert converted.training and all(m.training for m in converted.modules())
    gammas = [m.gamma for m in converted.modules() if hasattr(m, "gamma")]
    assert gammas and all(torch.allclose(g, torch.full_like(g, 1 / 1.21), rtol=1e-3) for g in gammas)


def test_summary_lists_estimated_and_unknown_moments():
    torch.manual_seed(0)
    converted = normprop_fx.convert(SmoothThenPool(nn.AvgPool2d(4)), example_inputs=torch.empty(2, 3, 32, 32))
    text = normprop_fx.summary(converted)
    assert "measured on the Gaussian sample" in text or "Gaussian sample" in text
    report = normprop_fx.conversion_report(converted)
    assert report.unknown_moments == ()


class BlurThenConv(nn.Module):
    """timm's BlurPool2d form: a fixed depthwise low-pass filter called as
    ``F.conv2d(x, filt, stride=2, groups=C)``, its options by keyword, between two conv-BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.register_buffer("filt", (torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])) / 16).expand(16, 1, 3, 3).clone())
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=16)
        return self.bn2(self.conv2(x))


def test_functional_conv_with_keyword_options_has_moments():
    """A functional conv whose stride and groups are keywords gets its moments from the plain
    weighted-layer rule (they were unknown, so the next layer got no correction: std 0.38)."""
    torch.manual_seed(0)
    converted = normprop_fx.convert(BlurThenConv(), gamma_init=1.0, example_inputs=torch.empty(2, 3, 32, 32))
    report = normprop_fx.conversion_report(converted)
    assert report.unknown_moments == ()
    assert any(c.consumer == "conv2" for c in report.corrections)
    torch.manual_seed(1)
    stats = {s.path: s for s in normprop_fx.measure_layer_statistics(converted, torch.randn(16, 3, 32, 32))}
    assert 0.85 <= stats["conv2"].std <= 1.15


def _converted_stats(model: nn.Module, side: int = 8) -> tuple[normprop_fx.ConversionReport, dict]:
    """``model`` converted at gamma_init=1 on (2, 3, side, side), its report, and its NormProp
    layers' statistics over 64 N(0, I) samples, by path."""
    torch.manual_seed(0)
    converted = normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, side, side))
    torch.manual_seed(1)
    stats = normprop_fx.measure_layer_statistics(converted.eval(), torch.randn(64, 3, side, side))
    return normprop_fx.conversion_report(converted), {s.path: s for s in stats}


class ConstantBias(nn.Module):
    """A bias computed from a buffer alone (MaxViT's relative-position MLP over fixed
    coordinates): a constant with no batch dim, added to a scaled conv-BN output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.register_buffer("coords", torch.randn(8, 8, 2))
        self.mlp = nn.Linear(2, 8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = 4 * self.bn1(self.conv1(x)) + self.mlp(self.coords).permute(2, 0, 1)
        return self.bn2(self.conv2(h))


class IndexedChannels(nn.Module):
    """Channels picked by an integer buffer (torchvision MaxViT's relative-position index)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.register_buffer("order", torch.randperm(8))
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2((4 * self.bn1(self.conv1(x)))[:, self.order]))


@pytest.mark.parametrize("model", [ConstantBias, IndexedChannels], ids=["constant-mlp", "integer-index"])
def test_ops_on_constants_keep_the_moments_known(model):
    """An op that reads only constants is a constant (its value on the sample, exact), and an
    integer constant indexes by its value: before, both made the moments unknown, the next
    layer got no correction and its std was 3.6-3.7; in MaxViT that compounded over the blocks
    to std 1e10."""
    torch.manual_seed(0)
    report, stats = _converted_stats(model())
    assert report.unknown_moments == ()
    assert any(c.consumer == "conv2" for c in report.corrections)
    assert 0.85 <= stats["conv2"].std <= 1.15


class Unknowable(nn.Module):
    """A scaled conv-BN output through an op no rule takes (the test makes its probe fail too),
    then a conv-BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(_only_on_real_values(4 * self.bn1(self.conv1(x)))))


@torch.fx.wrap
def _only_on_real_values(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def test_unknown_moments_get_a_correction_measured_on_the_sample(monkeypatch):
    """Unknown moments are no reason to assume a standardized input: the consumer's input is
    standardized with the sample's own per-channel moments, and the report says so."""
    from normprop_fx.passes import propagate

    def no_probe(self, n, value, module):
        return None  # no moments: the op cannot be probed

    monkeypatch.setattr(propagate.MomentInterpreter, "_probe", no_probe)
    torch.manual_seed(0)
    report, stats = _converted_stats(Unknowable())
    assert any("moments unknown: measured on the Gaussian sample" in op for op in report.estimated_ops)
    assert 0.85 <= stats["conv2"].std <= 1.15


class UpsampledGate(nn.Module):
    """GhostNetV2/V3's DFC attention in small: a gate computed at half resolution and upsampled to
    the main map's size, read from its shape (``F.interpolate(size=(h, w))``: int-valued nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.gate = nn.Conv2d(3, 16, 1)  # no BN: a raw sigmoid gate, mean ~0.5
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        g = torch.sigmoid(self.gate(torch.nn.functional.avg_pool2d(x, 2)))
        out = out * torch.nn.functional.interpolate(g, size=(out.shape[-2], out.shape[-1]), mode="nearest")
        return torch.relu(self.bn2(self.conv2(out)))


def test_size_arguments_read_from_a_shape_do_not_make_moments_unknown():
    """The probe of interpolate(size=(h, w)) ignores the int nodes h and w; before, their missing
    moments made the gate product's moments unknown, silently, and conv2 got no correction
    (mean -0.35, std 0.51)."""
    torch.manual_seed(0)
    converted = normprop_fx.convert(UpsampledGate(), gamma_init=1.0, example_inputs=torch.empty(2, 3, 16, 16))
    report = normprop_fx.conversion_report(converted)
    assert report.unknown_moments == ()
    assert [c.consumer for c in report.corrections] == ["conv2"]
    torch.manual_seed(1)
    last = normprop_fx.measure_layer_statistics(converted.eval(), torch.randn(16, 3, 16, 16))[-1]
    assert 0.85 <= last.std <= 1.15 and abs(last.mean) < 0.1


class MaxGate(nn.Module):
    """``torch.max(x, dim=1).values * x``: max returns a named tuple, which no rule takes and the
    probe cannot give moments for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(torch.max(x, dim=1, keepdim=True).values * x))


def test_moments_that_go_unknown_without_an_error_are_reported():
    """Where a value's moments become unknown with no exception, the report names the op (it
    said nothing), and the next layer's input is standardized on the sample."""
    torch.manual_seed(0)
    report, stats = _converted_stats(MaxGate())
    assert any("moments unknown" in line for line in report.unknown_moments)
    assert 0.8 <= stats["conv2"].std <= 1.25


class TokenMix(nn.Module):
    """Kept opaque (a leaf module): every token of a sample mixed alike (attention at init
    averages the tokens), hardswish, Linear + BatchNorm1d over the tokens."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c, bias=False)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(torch.nn.functional.hardswish(x.mean(1, keepdim=True).expand_as(x)))
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class TokenMixer(nn.Module):
    def __init__(self, c: int = 64, depth: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.mix = nn.ModuleList(TokenMix(c) for _ in range(depth))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        for m in self.mix:
            x = x + m(x)
        return self.head(x.mean(1))


def test_opaque_corrections_are_stable_across_calibration_seeds():
    """An opaque module's BatchNorm measures its correction on the sample. Its tokens are nearly
    alike within a sample, so a per-channel variance rests on ~16 values: +-30% noise per channel,
    and 1/sqrt(var) turns it into a bias that compounds over the blocks (constants moved by 144%
    between seeds, the last layer at std 1.8-2.3). One variance for all channels, and per-channel
    means kept only as far as the sample tells them from noise (LeViT's attention BNs)."""
    torch.manual_seed(0)
    model = TokenMixer()
    torch.manual_seed(1)
    test = torch.randn(64, 3, 16, 16)
    converted = [normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, 16, 16), leaf_modules=[TokenMix],
                                     calibration_samples=16, calibration_seed=seed).eval() for seed in range(3)]
    spread, _ = normprop_fx.statistics.correction_spread(converted)
    assert spread < 0.4
    for c in converted:
        assert normprop_fx.measure_layer_statistics(c, test)[-1].std < 1.75


class GatedBlock(nn.Module):
    """GhostNetV2/V3's DFC attention in small: a conv-BN at half resolution, a sigmoid, upsampled
    to the main branch's size, gating it; a residual stack of these."""

    def __init__(self, c: int, unit: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.short = nn.Conv2d(c, c, 1, bias=False)
        # the gate's BN with a separate nn.Sigmoid, or timm's BatchNormAct2d unit with the sigmoid inside
        if unit:
            from timm.layers import BatchNormAct2d
            self.short_bn, self.gate = BatchNormAct2d(c, act_layer=nn.Sigmoid), nn.Identity()
        else:
            self.short_bn, self.gate = nn.BatchNorm2d(c), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.conv(x)))
        g = self.gate(self.short_bn(self.short(torch.nn.functional.avg_pool2d(x, 2))))
        return x + out * torch.nn.functional.interpolate(g, size=(out.shape[-2], out.shape[-1]), mode="nearest")


@pytest.mark.parametrize("unit", [False, True], ids=["sigmoid-module", "batchnormact-unit"])
def test_a_sigmoid_gate_stays_raw(unit):
    """A (0, 1) activation whose output only multiplies other values is a gate: it stays raw on
    the standardized output (normalized, it was ~1.2x its input and each product quadratic in the
    sample's scale). The gated stack keeps every layer within the statistics bounds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          *(GatedBlock(16, unit) for _ in range(6)), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
    converted = normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, 16, 16))
    report = normprop_fx.conversion_report(converted)
    assert sum("is a gate" in note for r in report.rewrites for note in r.notes) == 6
    gate_layer = converted[3].short
    assert gate_layer.activation.spec.is_identity
    torch.manual_seed(1)
    x = torch.randn(64, 3, 16, 16)
    seen = []
    sigmoid = converted[3].short_bn_act if unit else converted[3].gate  # the unit's activation stays after the layer
    hook = sigmoid.register_forward_hook(lambda m, a, o: seen.append(o))
    stats = normprop_fx.measure_layer_statistics(converted.eval(), x)
    hook.remove()
    assert 0.0 < float(seen[0].min()) and float(seen[0].max()) < 1.0  # the raw sigmoid
    assert all(0.7 <= s.std <= 1.4 and abs(s.mean) < 0.3 for s in stats)
