"""The Gaussian sample the corrections are calibrated on (passes/calibration_sample.py): its size
follows the shapes, not the example input's batch, and the constants it gives do not depend on the
draw (issue 20, finding 5: timm lcnet_050's late corrections moved by 16-34% between seeds)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import fx, nn

import normprop_fx
from normprop_fx.errors import InvalidOptionError
from normprop_fx.passes import calibration_sample
from normprop_fx.passes.input_shape import fake_shapes
from normprop_fx.passes.trace import trace
from normprop_fx.standardize import NEAR_CONSTANT_VARIANCE, standardizing_scale
from normprop_fx.statistics import correction_spread

timm = pytest.importorskip("timm")


def _se_net() -> nn.Module:
    """conv-BN-ReLU, an SE gate (whose product has estimated moments), conv-BN-ReLU, pool, head."""

    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), SE(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _spread(models: list[nn.Module]) -> float:
    """The largest relative spread of any correction constant over ``models``."""
    spread, where = correction_spread(models)
    assert where is not None, "the model has no correction to compare"
    return spread


def test_sample_size_does_not_follow_the_example_batch() -> None:
    model = _se_net()
    a = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 16, 16))
    b = normprop_fx.convert(model, example_inputs=torch.empty(7, 3, 16, 16))
    assert a.normprop_report.assumptions[-1] == b.normprop_report.assumptions[-1]
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    line = a.normprop_report.assumptions[-1]
    assert "Gaussian samples (seed 0;" in line and "normprop" not in line


def test_sample_size_rule() -> None:
    """8192 values per channel in the smallest map a NormProp layer reads (the second conv's
    input: 16x16 or 8x8), so 32 or 128 samples; a graph without NormProp layers gets the least."""
    model = _se_net()
    for side, samples in ((16, 32), (8, 128)):
        converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, side, side))
        assert f"calibrated on {samples} Gaussian samples" in converted.normprop_report.assumptions[-1]
        assert converted.normprop_report.calibration_samples == samples
    gm, _ = trace(model, (), None)
    plain = calibration_sample.calibration_sample_size(gm, [torch.empty(2, 3, 16, 16)])
    assert plain.samples == calibration_sample.MIN_SAMPLES and "no NormProp consumer" in plain.reason
    assert calibration_sample.calibration_sample_size(gm, [torch.empty(2, 3, 16, 16)], 5).samples == 5


def test_sample_size_is_bounded_by_the_values_a_forward_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration_sample, "SAMPLE_VALUES", 10)
    converted = normprop_fx.convert(_se_net(), example_inputs=torch.empty(2, 3, 16, 16))
    line = converted.normprop_report.assumptions[-1]
    assert f"calibrated on {calibration_sample.MIN_SAMPLES} Gaussian samples" in line and "fit in" in line


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_calibration_samples(bad: object) -> None:
    with pytest.raises(InvalidOptionError, match="calibration_samples"):
        normprop_fx.convert(_se_net(), calibration_samples=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [1.5, None, True])
def test_bad_calibration_seed(bad: object) -> None:
    with pytest.raises(InvalidOptionError, match="calibration_seed"):
        normprop_fx.convert(_se_net(), calibration_seed=bad)  # type: ignore[arg-type]


def test_fake_shapes_change_no_state() -> None:
    model = _se_net().train()
    gm, _ = trace(model, (), None)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    shapes = fake_shapes(gm, [(2, 3, 16, 16)], [torch.float32])
    assert (2, 4) in shapes.values()
    for key, value in gm.state_dict().items():
        assert torch.equal(value, before[key]), key  # num_batches_tracked too


def test_lcnet_constants_are_stable_across_seeds() -> None:
    """timm lcnet_050 at 224 px (the issue's model): the default sample gives constants within 5%
    over three seeds; a sample of 2, the old default (the example batch), does not."""
    torch.manual_seed(0)
    model = timm.create_model("lcnet_050", num_classes=10)
    convert = lambda seed, samples=None: normprop_fx.convert(  # noqa: E731
        model, gamma_init=1.0, calibration_seed=seed, calibration_samples=samples)
    assert _spread([convert(seed) for seed in range(3)]) < 0.05
    assert _spread([convert(seed, 2) for seed in range(3)]) > 0.05


def _dead_channel_net() -> nn.Module:
    """A plain conv (no BatchNorm, so its moments are estimated on the sample) whose channel 0 has
    bias -20, a hardswish (0 below -3), then conv-BN-ReLU: channel 0 is 0 on every Gaussian sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Hardswish(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[0].bias[0] = -20.0
    return model


def test_a_channel_constant_on_the_sample_gets_no_unbounded_gain() -> None:
    """A channel with variance 0 on the calibration sample got scale 1e6 (1/sqrt of the 1e-12
    clamp): on an input that makes it nonzero the NormProp layer's output was ~1e6 times its scale
    (timm efficientvit_b1 at 64 px on 2 samples went to inf that way). Now its variance is floored
    at NEAR_CONSTANT_VARIANCE of the median channel's, and the audit says so."""
    model = _dead_channel_net()
    converted = normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, 8, 8))
    correction = converted[2].input_correction
    scale = correction.scale.flatten()
    variance = scale.double() ** -2  # what each channel was standardized by; channel 0's is the floor
    assert float(scale[0]) == pytest.approx(float(NEAR_CONSTANT_VARIANCE * variance.median()) ** -0.5, rel=1e-4)
    assert scale[1:].max() < 10 * scale.median()  # the live channels keep their own scales
    reasons = [c.reason for c in converted.normprop_report.corrections]
    assert any("1 of 8 channels nearly constant on the calibration sample" in r for r in reasons), reasons

    # an input that wakes channel 0 up: the output stays on the scale of the live channels'
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        typical = converted(x).abs().max()
        w = model[0].weight[0, :, 0, 0]
        awake = x + (30.0 / w.square().sum() * w)[None, :, None, None]  # channel 0: w.x + 30 - 20
        assert model[1](model[0](awake))[:, 0].min() > 0
        assert converted(awake).abs().max() < 1e3 * typical


def test_standardizing_scale() -> None:
    var = torch.tensor([1.0, 2.0, 0.5, 0.0, 1e-9])  # median 0.5
    scale, near_constant = standardizing_scale(var)
    assert near_constant == 2
    assert torch.allclose(scale[:3], var[:3].rsqrt())
    assert torch.allclose(scale[3:], torch.tensor(NEAR_CONSTANT_VARIANCE * 0.5).rsqrt().expand(2))
    scalar, count = standardizing_scale(torch.tensor(0.0))
    assert count == 0 and scalar.item() == pytest.approx(1e6)


# --- the sample grows where its samples' spread asks (passes.propagate._GrowingSample) -----------


class _GatedNet(nn.Module):
    """conv-BN-ReLU at 16x16, a stride-2 conv-BN-ReLU, an SE gate (whose product has estimated
    moments: the next conv's correction is measured on the sample), conv-BN-ReLU at 8x8, pool,
    head. With ``batch_read``, the batch size is read off the input at the start and used by the
    head's reshape: an int that changes with the sample, held across the whole graph."""

    def __init__(self, batch_read: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.batch_read = batch_read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0) if self.batch_read else -1
        x = self.stem(x)
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(self.body(x).mean((2, 3)).reshape(batch, 8))


def _grown_conversion(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """``model`` converted with a sample error so small that every measured correction asks the
    sample to grow as far as it may."""
    from normprop_fx.passes import propagate

    monkeypatch.setattr(propagate, "SAMPLE_ERROR", 1e-6)
    return normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, 16, 16))


def _grown_sample(start: int, grown: int, seed: int = 0) -> torch.Tensor:
    """The Gaussian sample as propagation draws it: ``start`` samples, then the new ones in pieces
    of a quarter of ``start``, from one generator seeded with ``seed``."""
    from normprop_fx.passes.propagate import REPLAY_PIECES

    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn((start, 3, 16, 16), generator=generator, dtype=torch.float64)]
    piece = max(1, start // REPLAY_PIECES)
    for first in range(start, grown, piece):
        parts.append(torch.randn((min(piece, grown - first), 3, 16, 16), generator=generator, dtype=torch.float64))
    return torch.cat(parts).float()


def test_a_grown_correction_is_the_statistic_of_every_sample_at_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body conv's correction is measured after the sample grew from 128 to 256 (the 8x8 maps
    from there on hold a quarter of the 16x16 ones'). The new samples ran through the stem and the
    gate as the converted model runs them: on the whole grown sample, the converted model's input
    to that correction has exactly the mean square the correction was scaled to, and the first
    128 samples alone have another."""
    converted = _grown_conversion(_GatedNet(), monkeypatch)
    report = converted.normprop_report
    assert report.calibration_samples == 256
    assert "grown from 128 as the samples' spread asked, before 1 corrections" in report.assumptions[-1]
    correction = converted.body[0].input_correction
    assert "calibrated on the Gaussian sample" in correction.reason
    seen: list[torch.Tensor] = []
    correction.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().double()))
    with torch.no_grad():
        converted.eval()(_grown_sample(128, 256))
    (x,) = seen
    nominal = float((correction.scale.double() ** -2).mean())  # the variance it standardizes by, over channels

    def mean_square(values: torch.Tensor) -> float:
        return float(((values - correction.mean.double()) ** 2).mean((0, 2, 3)).mean())

    assert mean_square(x) == pytest.approx(nominal, rel=1e-5)
    assert abs(mean_square(x[:128]) / nominal - 1) > 1e-3  # the test tells the samples apart


def test_the_sample_does_not_grow_while_an_int_read_off_the_batch_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """``x.size(0)`` read at the start and used by the head's reshape changes with the sample:
    growing would leave it at the old size (the reshape fails, or silently mixes samples). So the
    sample stays as it is, the conversion works, and the report says so by not saying it grew."""
    converted = _grown_conversion(_GatedNet(batch_read=True), monkeypatch)
    assert converted.normprop_report.calibration_samples == 128
    assert "grown" not in converted.normprop_report.assumptions[-1]
    assert converted(torch.randn(3, 3, 16, 16)).shape == (3, 4)


def _planned(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> tuple[fx.GraphModule, calibration_sample.CalibrationSample]:
    """The graph moment propagation runs on (converted layers in place) and the sample planned for it."""
    module = sys.modules["normprop_fx.convert"]
    plan = module.calibration_sample_size
    found = {}

    def spy(gm: fx.GraphModule, inputs: list[torch.Tensor], requested: int | None = None) -> calibration_sample.CalibrationSample:
        found["gm"], found["sample"] = gm, plan(gm, inputs, requested)
        return found["sample"]

    monkeypatch.setattr(module, "calibration_sample_size", spy)
    normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 16, 16))
    return found["gm"], found["sample"]


def test_growth_stays_within_the_memory_and_time_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample grows to at most GROWTH_TIME x what SAMPLE_VALUES allows, and, before a node, to
    at most the size whose largest value held from there on is half the largest at the start."""
    gm, sample = _planned(_GatedNet(batch_read=True), monkeypatch)
    growth = sample.growth
    assert sample.samples == 128 and growth is not None and growth.cap == calibration_sample.MAX_SAMPLES
    assert growth.limits["x"] == 64  # before anything runs, the 16x16x8 maps are ahead: half of 128
    assert growth.limits["body_0"] == 256  # 8x8 maps from there on, a quarter of the size (capped)
    assert {"x", "stem_0", "body_0", "mul"} <= growth.batch_major
    assert "size" not in growth.batch_major | growth.batch_free  # the int read off the batch
    computed = sum(math.prod(s) for s in fake_shapes(gm, [(2, 3, 16, 16)], [torch.float32]).values()) // 2
    monkeypatch.setattr(calibration_sample, "SAMPLE_VALUES", 20 * computed)
    capped = calibration_sample.calibration_sample_size(gm, [torch.empty(2, 3, 16, 16)])
    assert capped.samples == 20 and capped.growth is not None and capped.growth.cap == 80


def test_largest_held_counts_values_still_needed() -> None:
    """A skip connection holds its large input across the small values computed in between."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    small = graph.call_function(torch.relu, (x,))
    smaller = graph.call_function(torch.sigmoid, (small,))
    out = graph.call_function(torch.add, (x, smaller))
    graph.output(out)
    nodes = list(graph.nodes)
    sizes = dict(zip(nodes, (100, 10, 1, 5, 0)))
    assert calibration_sample._largest_held(nodes, sizes) == [100, 100, 100, 100, 5]


def test_structural_ratio_is_continuous() -> None:
    """A structural correction takes none of the sample's ratio within the tolerance, all of it
    past twice the tolerance (in log scale), and a ramp in between: no jump at the tolerance,
    where calibration seeds on either side of it gave constants 10% apart."""
    from normprop_fx.passes.propagate import STRUCTURAL_TOLERANCE, structural_ratio

    edge = 1 + STRUCTURAL_TOLERANCE
    assert structural_ratio(1.0) == structural_ratio(edge) == structural_ratio(1 / edge) == 1.0
    assert structural_ratio(edge**2) == pytest.approx(edge**2) and structural_ratio(1.5) == pytest.approx(1.5)
    assert structural_ratio(edge**-2.5) == pytest.approx(edge**-2.5)
    ratios = torch.linspace(0.7, 1.4, 2001).tolist()
    taken = [structural_ratio(r) for r in ratios]
    assert all(b >= a for a, b in zip(taken, taken[1:]))  # monotone
    assert max(abs(math.log(b / a)) for a, b in zip(taken, taken[1:])) < 2.5 * max(
        abs(math.log(b / a)) for a, b in zip(ratios, ratios[1:]))  # no jump: slope at most 2


def test_a_replay_that_fails_leaves_the_sample_as_it_is_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Growing runs new samples through the graph so far; should an op refuse them, the conversion
    goes on with the sample it has, and the report's calibration line says where and why."""
    from normprop_fx.passes import propagate

    def refuse(self: object, stop: fx.Node, inputs: list, wanted: set) -> dict:
        raise RuntimeError("no new samples here")

    monkeypatch.setattr(propagate._Replay, "values_before", refuse)
    converted = _grown_conversion(_GatedNet(), monkeypatch)
    line = converted.normprop_report.assumptions[-1]
    assert converted.normprop_report.calibration_samples == 128 and "grown" not in line
    assert "the sample could not grow before body.0" in line and "RuntimeError: no new samples here" in line, line


def test_the_reported_precision_is_how_far_the_seeds_move_the_constant() -> None:
    """``ConversionReport.calibration_precision`` names the least precise correction the sample
    set and the relative standard error of the mean square it divides by (the samples' own
    coefficient of variation / sqrt(samples)). Over 16 calibration seeds of a fixed size the
    correction's variance (its scale^-2 averaged over channels, which is that mean square) moves
    by about that much: the relative standard deviation over the seeds is within a factor of 1.6
    of the reported error (16 seeds estimate a standard deviation to ~18%); a report off by
    sqrt(samples), or giving the spread of single samples, is off by 2.8x or more."""
    model = _se_net()
    variances, errors = [], []
    for seed in range(16):
        converted = normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, 16, 16),
                                        calibration_samples=8, calibration_seed=seed)
        precision = converted.normprop_report.calibration_precision
        assert precision is not None and precision.samples == 8
        assert precision.consumer == "4 (NormPropConv2d)"  # the conv after the SE gate's product
        assert precision.scale_error == pytest.approx(precision.error / 2)
        assert precision.wanted == math.ceil((precision.spread / 0.015) ** 2)
        errors.append(precision.error)
        variances.append(float((converted[4].input_correction.scale.double() ** -2).mean()))
    measured = torch.tensor(variances, dtype=torch.float64)
    ratio = float(measured.std() / measured.mean()) / (sum(errors) / len(errors))
    assert abs(math.log(ratio)) < math.log(1.6), ratio  # within a factor of 1.6 either way
    text = normprop_fx.summary(converted)
    assert f"Calibration precision: the least precise correction the Gaussian sample set is 4 (NormPropConv2d)'s: its 8 samples'" in text
    assert f"~{precision.wanted} samples would make it" in text


class _Opaque(nn.Module):
    """A conv-BN-ReLU that torch.fx keeps opaque (a leaf): its BatchNorm's correction is measured
    on the sample inside it (OpaqueNormPropAffine). ``fold`` > 1 folds the channels into dim 0
    first, as attention folds heads into the batch: then dim 0 is no longer the sample."""

    def __init__(self, fold: int = 1) -> None:
        super().__init__()
        self.fold = fold
        self.conv, self.bn = nn.Conv2d(8 // fold, 8 // fold, 3, padding=1), nn.BatchNorm2d(8 // fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = torch.relu(self.bn(self.conv(x.reshape(n * self.fold, c // self.fold, h, w))))
        return y.reshape(n, c, h, w)


def test_an_opaque_modules_measured_correction_counts_when_measured_on_whole_samples() -> None:
    """The precision covers the corrections opaque modules measure for themselves, where their
    input's dim 0 is the sample; one that folds channels into dim 0 is measured on slices of
    samples, whose spread says nothing of the samples', and is left out."""
    for fold, counted in ((1, True), (2, False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _Opaque(fold),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        converted = normprop_fx.convert(model, gamma_init=1.0, leaf_modules=[_Opaque],
                                        example_inputs=torch.empty(2, 3, 16, 16), calibration_samples=8)
        assert type(converted[3].bn).__name__ == "OpaqueNormPropAffine" and converted[3].bn.measured
        assert converted[3].bn.slice_squares is None  # taken by the propagation, not kept in the model
        precision = converted.normprop_report.calibration_precision
        if counted:
            assert precision is not None and precision.consumer == "3.bn.affine (NormPropAffine)"
            assert precision.samples == 8 and 0 < precision.error < 1
        else:
            assert precision is None  # no correction in the graph is measured on the sample either


def test_the_seed_spread_counts_corrections_absorbed_into_activations() -> None:
    """A scalar correction merged into the normalized activation before it (passes.absorb_corrections)
    leaves no Standardize where that activation has no other reader; ``correction_scales`` (and so
    the seed spread of the statistics sweep) still sees its constant."""
    import torchvision

    from normprop_fx.normalized_activation import NormalizedActivation
    from normprop_fx.statistics import correction_scales

    torch.manual_seed(0)
    converted = normprop_fx.convert(torchvision.models.resnet18(), example_inputs=torch.empty(2, 3, 64, 64))
    absorbed = {p: m for p, m in converted.named_modules() if isinstance(m, NormalizedActivation) and m.has_correction}
    assert absorbed, "resnet18 has corrections absorbed into its activations"
    scales = correction_scales(converted)
    for path, m in absorbed.items():
        assert torch.equal(scales[f"{path}.correction_scale"], m.correction_scale.double().flatten())
    other = {k: v.clone() for k, v in scales.items()}
    path = next(iter(absorbed))
    other[f"{path}.correction_scale"] *= 1.5
    assert correction_spread([scales, other]) == (pytest.approx(0.4), f"{path}.correction_scale")
