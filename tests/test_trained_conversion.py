"""Exact conversion of trained networks (docs/method.md section 8): a trained BatchNorm's replacement computes
its eval-mode function, FrozenBatchNorms included, and the default init chooses per BatchNorm.

Trained weights cannot be downloaded here: the tests give BatchNorms trained-looking statistics and
affines themselves (``randomize_batchnorms``: statistics measured on the BatchNorm's own input,
perturbed; random affine), or set them by hand.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import build_zoo_model
from torch.fx.experimental.optimization import fuse

import normprop_fx
from normprop_fx import NormPropWarning, conversion_report
from normprop_fx.fold import ConstantAffine
from normprop_fx.model_check import (
    ROUNDING_FLOOR_FACTOR,
    TRAINED_RTOL_FLOAT32,
    CALIBRATION_BATCH,
    MAX_CALIBRATION_BATCH,
    TRAINED_RTOL_FLOAT64,
    calibration_batch_size,
    check_model,
    check_trained_conversion,
    randomize_batchnorms,
    relative_l2,
)

# --- the targets on 13 zoo models ---------------------------------------------------------------

TARGET_MODELS = [
    ("torchvision", "resnet18", 64),
    ("torchvision", "resnet50", 64),
    ("torchvision", "densenet121", 64),
    ("torchvision", "mobilenet_v3_large", 64),
    ("torchvision", "efficientnet_b0", 64),
    ("torchvision", "inception_v3", 96),
    ("torchvision", "regnet_y_800mf", 64),
    ("timm", "resnet50d", 64),
    ("timm", "efficientnet_b0", 64),
    ("timm", "mobilenetv3_large_100", 64),
    ("timm", "rexnet_100", 64),
    ("timm", "dla34", 64),
    ("timm", "cspresnet50", 64),
]


@pytest.mark.parametrize(("source", "name", "size"), TARGET_MODELS, ids=[f"{s}:{n}" for s, n, _ in TARGET_MODELS])
def test_trained_model_converts_exactly(source: str, name: str, size: int) -> None:
    """Eval outputs equal the randomized original's: relative L2 <= 1e-10 in float64, and in float32
    <= 1e-5 or, where the original's own float32 forward is already that far from its float64 one,
    within ROUNDING_FLOOR_FACTOR (3) times that rounding floor. Train mode equals eval mode. Every BatchNorm kept."""
    check = check_trained_conversion(build_zoo_model(source, name), (3, size, size), name=f"{source}:{name}")
    assert not check.failures, check.failures
    assert check.kept_trained == check.batchnorms_found > 0
    assert check.error_float64 <= TRAINED_RTOL_FLOAT64, check
    assert check.error_float32 <= TRAINED_RTOL_FLOAT32 or check.converted_rounding <= (
        ROUNDING_FLOOR_FACTOR * check.original_rounding
    ), check
    assert check.train_eval_difference <= TRAINED_RTOL_FLOAT32, check
    assert check.passed


@pytest.mark.parametrize(("source", "name", "size"), TARGET_MODELS[::3], ids=[f"{s}:{n}" for s, n, _ in TARGET_MODELS[::3]])
def test_trained_conversion_is_batch_independent_with_gradients(source: str, name: str, size: int) -> None:
    """After exact conversion: forward and backward finite, a gradient to every gamma, beta and
    weight, each sample alone gives its output in the batch (train mode, float64)."""
    model = randomize_batchnorms(build_zoo_model(source, name), torch.randn(8, 3, size, size))
    check = check_model(model, (3, size, size), statistics_batch_size=1)
    assert check.converted == check.batchnorms_found and check.left == 0
    assert check.forward_ok and check.backward_ok and check.batch_independent, check.failures


def test_calibration_batch_gives_every_batchnorm_enough_values_per_channel() -> None:
    """16 samples where every BatchNorm sees >= 256 values a sample (16x16); a 10x10 map needs 41
    (4096 values); a BatchNorm1d (1 value a sample) gets the cap; no BatchNorm: the floor."""
    def net(size: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(size), nn.BatchNorm2d(4))
    assert calibration_batch_size(net(16), (3, 32, 32)) == CALIBRATION_BATCH
    assert calibration_batch_size(net(10), (3, 32, 32)) == 41
    assert calibration_batch_size(net(2), (3, 32, 32)) == MAX_CALIBRATION_BATCH
    assert calibration_batch_size(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)),
                                  (3, 2, 2)) == MAX_CALIBRATION_BATCH
    assert calibration_batch_size(nn.Conv2d(3, 4, 1), (3, 8, 8)) == CALIBRATION_BATCH


@pytest.mark.slow
def test_deep_efficientnet_at_64_pixels_is_not_chaotic_after_randomization() -> None:
    """With 16 calibration samples timm's randomized efficientnet_b8 at 64 px rounded 4.7e-2 away from
    its float64 self and its conversion missed float64 1e-10; with the calibration batch it is a
    network a trained one resembles (8e-6-2.5e-5 measured) and converts exactly."""
    check = check_trained_conversion(build_zoo_model("timm", "efficientnet_b8"), (3, 64, 64), name="efficientnet_b8")
    assert check.calibration_batch == 64
    assert check.original_rounding < 1e-4, check
    assert check.passed, check


# --- small models: every form of BatchNorm ------------------------------------------------------


def _conv_bn_relu(bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _trained(model: nn.Module, shape: tuple[int, ...] = (8, 3, 12, 12), seed: int = 0) -> nn.Module:
    return randomize_batchnorms(model, torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), seed)


def _assert_exact(original: nn.Module, converted: nn.Module, x: torch.Tensor, tol: float = TRAINED_RTOL_FLOAT32) -> None:
    with torch.no_grad():
        expected = original.eval()(x)
        assert relative_l2(converted.eval()(x), expected) <= tol
        assert relative_l2(converted.train()(x), expected) <= tol


def _assert_exact_to_rounding(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """A zoo-sized network's criterion, as ``test_trained_model_converts_exactly``'s: a float64 copy
    converts to 1e-10 of the float64 original; in float32 (eval, and train equal to eval) the
    conversion is within 1e-5 of the original or, where the original's own float32 rounding is
    already that large (a deep depthwise + SE network on another CPU's kernels: 1.3e-5 measured on
    an AMD EPYC), within ROUNDING_FLOOR_FACTOR times it of the float64 outputs."""
    original64 = copy.deepcopy(original).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted64 = normprop_fx.convert(original64, example_inputs=x.double())
    with torch.no_grad():
        expected64 = original64.eval()(x.double())
        assert relative_l2(converted64.eval()(x.double()), expected64) <= TRAINED_RTOL_FLOAT64
        expected32 = original.eval()(x)
        floor = ROUNDING_FLOOR_FACTOR * relative_l2(expected32, expected64)
        for mode in (converted.eval(), converted.train()):
            out = mode(x)
            assert relative_l2(out, expected32) <= TRAINED_RTOL_FLOAT32 or relative_l2(out, expected64) <= floor


def test_conv_bias_and_linear_bn_are_exact_and_the_audit_says_trained() -> None:
    model = _trained(_conv_bn_relu(bias=True))
    converted = normprop_fx.convert(model)
    _assert_exact(model, converted, torch.randn(4, 3, 12, 12))
    report = conversion_report(converted)
    assert report.init == "auto" and [i.init for i in report.initializations] == ["trained"] * 3
    assert not report.corrections and not report.normalized_activations
    text = normprop_fx.summary(converted)
    assert "Initialization: 3 of 3 BatchNorms keep their trained function exactly" in text
    assert "1000 batches tracked" in text and "bias of 0 folded into beta" in text


def test_untrained_model_gets_the_paper_init_as_before() -> None:
    torch.manual_seed(0)
    model = _conv_bn_relu()
    auto = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 12, 12))
    paper = normprop_fx.convert(model, init="normprop", example_inputs=torch.empty(2, 3, 12, 12))
    assert all(not i.trained for i in conversion_report(auto).initializations)
    for (k, a), (_, b) in zip(auto.state_dict().items(), paper.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert conversion_report(auto).corrections  # the propagation ran as it always did


def test_constructor_zero_init_of_a_residual_bn_does_not_count_as_trained() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False)  # zero-inits each block's last BN weight
    report = conversion_report(normprop_fx.convert(model))
    assert not any(i.trained for i in report.initializations)
    assert any("zero-init" in i.reason for i in report.initializations)


def test_init_normprop_on_a_trained_model_warns_that_the_function_is_discarded() -> None:
    model = _trained(_conv_bn_relu())
    with pytest.warns(NormPropWarning, match="discards the trained function of 3 of 3"):
        converted = normprop_fx.convert(model, init="normprop", example_inputs=torch.empty(2, 3, 12, 12))
    assert all(not i.trained and "discarded" in i.reason for i in conversion_report(converted).initializations)
    with torch.no_grad():
        x = torch.randn(4, 3, 12, 12)
        assert relative_l2(converted.eval()(x), model.eval()(x)) > 0.1


def test_bad_init_option_is_refused() -> None:
    with pytest.raises(normprop_fx.InvalidOptionError, match="init must be one of"):
        normprop_fx.convert(_conv_bn_relu(), init="pretrained")


def test_mixed_model_keeps_the_trained_part_and_initializes_the_new_head() -> None:
    """A trained backbone with a new, untrained BN head: the backbone's layers keep their function
    (no correction, no normalized activation in front of them), the head gets the paper's init
    with a correction calibrated on the trained features; a warning says the model is mixed."""
    backbone = _trained(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)))
    head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6),
                         nn.ReLU(), nn.Linear(6, 3))
    model = nn.Sequential(backbone, head).eval()
    with pytest.warns(NormPropWarning, match="mixes trained and untrained BatchNorms: 2 keep"):
        converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 12, 12))
    report = conversion_report(converted)
    assert [i.init for i in report.initializations] == ["trained", "trained", "normprop"]
    assert [c.consumer for c in report.corrections] == ["1.3"]
    assert converted.get_submodule("0.3").activation.standardize is False
    assert converted.get_submodule("1.3").activation.standardize is True
    captured = []
    converted.get_submodule("0.3").register_forward_hook(lambda m, a, o: captured.append(o))
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        converted.eval()(x)
        assert relative_l2(captured[0], F.relu(backbone.eval()(x))) <= 1e-6  # the head's ReLU is fused


def test_frozen_batchnorm_resnet_is_found_converted_and_exact() -> None:
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = _trained(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), (8, 3, 64, 64))
    converted = normprop_fx.convert(model)
    report = conversion_report(converted)
    assert report.batchnorms_found == report.converted == 20 and not report.left
    assert all(i.reason == "a frozen BatchNorm: always trained" for i in report.initializations)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in converted.modules())
    _assert_exact_to_rounding(model, converted, torch.randn(2, 3, 64, 64))
    params = dict(converted.named_parameters())
    assert params["conv1.gamma"].requires_grad and params["layer4.1.conv2.beta"].requires_grad  # trainable now


def test_timm_frozen_batchnorm_act_is_converted_exactly() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import freeze_batch_norm_2d
    from timm.layers.norm_act import FrozenBatchNormAct2d

    torch.manual_seed(0)
    model = freeze_batch_norm_2d(_trained(timm.create_model("efficientnet_b0", pretrained=False), (8, 3, 64, 64)))
    assert any(isinstance(m, FrozenBatchNormAct2d) for m in model.modules())
    converted = normprop_fx.convert(model)
    report = conversion_report(converted)
    assert report.batchnorms_found == report.converted > 0 and not report.left
    _assert_exact_to_rounding(model, converted, torch.randn(2, 3, 64, 64))


def test_frozen_parts_stay_frozen() -> None:
    """gamma/beta follow the BN's affine; a frozen BN's follow its conv's weight."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), FrozenBatchNorm2d(4),
                          nn.Conv2d(4, 4, 3), FrozenBatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    model = _trained(model)
    converted = normprop_fx.convert(model)
    flags = {n: p.requires_grad for n, p in converted.named_parameters()}
    assert flags["0.gamma"] is False and flags["0.beta"] is True
    assert flags["2.gamma"] is False and flags["2.beta"] is False
    assert flags["4.gamma"] is True and flags["4.beta"] is True


def test_batchnorm_without_conv_is_standardized_by_its_running_statistics() -> None:
    """Pre-activation order: BN -> ReLU -> conv, and a BN after an add: NormPropAffine with the
    running statistics as constant buffers and (g, t) as its trainable gamma/beta."""

    class PreAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn0 = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(F.relu(self.bn0(x)))
            return F.relu(self.bn1(y + x))

    model = _trained(PreAct())
    converted = normprop_fx.convert(model)
    _assert_exact(model, converted, torch.randn(4, 3, 12, 12))
    affine = converted.get_submodule("bn0")
    assert isinstance(affine, normprop_fx.NormPropAffine)
    assert torch.equal(affine.gamma.detach(), model.bn0.weight.detach())
    assert torch.allclose(affine.input_mean, model.bn0.running_mean)
    assert "bn0.input_mean" in converted.state_dict() and "bn0.input_scale" in converted.state_dict()


def test_trained_batchnorm_inside_a_leaf_module_keeps_its_function() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(self.conv(x)))

    model = _trained(nn.Sequential(Block(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    converted = normprop_fx.convert(model, leaf_modules=["0"])
    report = conversion_report(converted)
    assert report.converted == 2 and not report.left and not report.corrections
    inside = next(r for r in report.rewrites if r.path == "0.bn")
    assert inside.replacement == "OpaqueNormPropAffine" and "keeps its trained function" in inside.notes[0]
    _assert_exact(model, converted, torch.randn(4, 3, 12, 12))


def test_track_running_stats_false_gets_the_paper_init_with_its_reason() -> None:
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    with pytest.warns(NormPropWarning, match="cannot apply to 1 BatchNorms with track_running_stats=False"):
        converted = normprop_fx.convert(model, init="trained", example_inputs=torch.empty(2, 3, 12, 12))
    inits = conversion_report(converted).initializations
    assert [i.init for i in inits] == ["normprop", "trained"]
    assert "no eval-mode function to keep" in inits[0].reason and "affine is not kept" in inits[0].reason


def test_shape_check_statistics_are_flagged() -> None:
    """A fresh model that ran a few train-mode forward passes counts as trained by its moved
    statistics; the report says its affines are untouched and how to get the paper's init."""
    torch.manual_seed(0)
    model = _conv_bn_relu()
    model.train()(torch.randn(4, 3, 12, 12))
    with pytest.warns(NormPropWarning, match="shape check"):
        converted = normprop_fx.convert(model)
    assert all(i.trained and i.statistics_only for i in conversion_report(converted).initializations)


def test_init_trained_keeps_even_an_untrained_batchnorm() -> None:
    torch.manual_seed(0)
    model = _conv_bn_relu().eval()
    converted = normprop_fx.convert(model, init="trained")
    assert all(i.trained for i in conversion_report(converted).initializations)
    _assert_exact(model, converted, torch.randn(4, 3, 12, 12))


def test_zero_norm_filter_and_fp16_overflow() -> None:
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[0].weight[1].zero_()
    _assert_exact(model, normprop_fx.convert(model), torch.randn(2, 3, 8, 8))
    big = copy.deepcopy(model).half()
    with torch.no_grad():
        big[0].weight.mul_(2000)
        big[1].running_var.fill_(1e-6)
    with pytest.raises(normprop_fx.NormPropError, match="float16 cannot hold"):
        normprop_fx.convert(big)


def test_fold_of_a_trained_conversion_is_the_bn_folded_original() -> None:
    """fold equals torch.fx's Conv-BN fusion of the original (and its eval outputs) to rounding,
    and a trained ReLU network folds to plain conv + ReLU: no constant affine is left."""
    torchvision = pytest.importorskip("torchvision")
    for name in ("resnet18", "mobilenet_v3_large", "densenet121"):
        torch.manual_seed(0)
        model = _trained(torchvision.models.get_model(name, weights=None), (8, 3, 64, 64)).eval()
        folded = normprop_fx.fold(normprop_fx.convert(model))
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            reference = fuse(copy.deepcopy(model))(x)
            assert relative_l2(folded(x), reference) <= 1e-5, name
            assert relative_l2(folded(x), model(x)) <= 1e-5, name
        if name == "resnet18":
            assert not any(isinstance(m, ConstantAffine) for m in folded.modules())


def test_state_dict_round_trip_of_a_trained_conversion() -> None:
    model = _trained(_conv_bn_relu())
    converted = normprop_fx.convert(model)
    again = normprop_fx.convert(_trained(_conv_bn_relu(), seed=1))
    again.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), converted.eval()(x))


def test_model_is_not_changed() -> None:
    model = _trained(_conv_bn_relu())
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        normprop_fx.convert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_standalone_activation_feeding_a_trained_layer_stays_raw() -> None:
    """relu(input) -> trained conv/BN, and an untrained head: the propagation runs (for the head),
    but the ReLU that the trained layer reads is not normalized, though its input is standard."""

    class InputReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc1 = nn.Linear(4, 4)
            self.bn1d = nn.BatchNorm1d(4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(F.relu(x))).mean((2, 3))
            return self.fc2(F.relu(self.bn1d(self.fc1(y))))

    torch.manual_seed(0)
    model = InputReLU()
    _trained(nn.Sequential(model.conv, model.bn), (8, 3, 10, 10))  # the backbone is trained, the head is not
    with pytest.warns(NormPropWarning, match="mixes trained and untrained"):
        converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 10, 10))
    report = conversion_report(converted)
    assert [i.init for i in report.initializations] == ["trained", "normprop"]
    assert not report.normalized_activations
    captured = []
    converted.get_submodule("conv").register_forward_hook(lambda m, a, o: captured.append(o))
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        converted(x)
        assert relative_l2(captured[0], model.eval().bn(model.conv(F.relu(x)))) <= 1e-6
