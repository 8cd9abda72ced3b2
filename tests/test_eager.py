"""The eager form of NormProp modules (normprop_fx/eager.py): the same function as the compiled
form, outputs and gradients, in fewer passes over the activations.

The compiled form is what tests/test_compile.py checks under torch.compile; here it runs in eager
mode too (``compiled_form()``) as the reference. Float64, so that "equal" means equal to rounding.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normprop_fx
from normprop_fx import NormalizedActivation, NormPropAffine, NormPropConv1d, NormPropConv2d, NormPropConv3d, NormPropLinear, Standardize
from normprop_fx.batchnorm_state import batchnorm_state
from normprop_fx.eager import compiled_form, is_compiling

from helpers import trained_batchnorm

ACTIVATIONS = ["relu", "relu6", "hardtanh", "leaky_relu", "silu", "hardswish", "gelu", "identity", "tanh"]


def _corrected(act: NormalizedActivation) -> NormalizedActivation:
    act.absorb_correction(torch.tensor(0.2), torch.tensor(1.3))
    return act


def _trained_conv() -> NormPropConv2d:
    layer = NormPropConv2d(3, 5, 3, padding=1, activation="relu")
    layer.keep_batchnorm_function(batchnorm_state(trained_batchnorm(5)), None)
    return layer


def _trained_affine() -> NormPropAffine:
    affine = NormPropAffine(3, activation="relu6")
    affine.keep_batchnorm_function(batchnorm_state(trained_batchnorm(3, affine=False)))
    return affine


#: (id, factory, input shape)
MODULES = [
    *[(f"conv2d-{a}", lambda a=a: NormPropConv2d(3, 5, 3, padding=1, activation=a), (2, 3, 7, 7)) for a in ACTIVATIONS],
    *[(f"linear-{a}", lambda a=a: NormPropLinear(6, 4, activation=a), (5, 6)) for a in ("relu", "leaky_relu", "silu")],
    ("conv1d-reflect-relu6", lambda: NormPropConv1d(3, 4, 3, padding=1, padding_mode="reflect", activation="relu6"), (2, 3, 9)),
    ("conv3d-grouped-relu", lambda: NormPropConv3d(4, 4, 3, groups=2, activation="relu"), (1, 4, 5, 5, 5)),
    ("conv2d-trained", _trained_conv, (2, 3, 6, 6)),
    # weights much larger than the output: normalized on the output (layers.py, _normalize_output)
    ("conv2d-deep-relu", lambda: NormPropConv2d(64, 64, 3, padding=1), (1, 64, 3, 3)),
    ("conv2d-deep-strided-silu", lambda: NormPropConv2d(32, 64, 3, stride=2, activation="silu"), (2, 32, 5, 5)),
    ("conv2d-deep-same-leaky", lambda: NormPropConv2d(32, 32, 3, padding="same", activation="leaky_relu"), (1, 32, 2, 2)),
    ("linear-wide-relu6", lambda: NormPropLinear(2048, 128, activation="relu6"), (2, 2048)),
    *[(f"activation-{a}", lambda a=a: NormalizedActivation(a), (4, 3, 5)) for a in ("relu", "relu6", "leaky_relu", "silu")],
    ("activation-relu-corrected", lambda: _corrected(NormalizedActivation("relu")), (4, 7)),
    ("activation-hardtanh-corrected", lambda: _corrected(NormalizedActivation("hardtanh")), (4, 7)),
    ("activation-leaky-corrected", lambda: _corrected(NormalizedActivation("leaky_relu")), (4, 7)),
    ("activation-plain", lambda: NormalizedActivation("relu", standardize=False), (4, 7)),
    ("affine-relu", lambda: NormPropAffine(3, activation="relu"), (2, 3, 4, 4)),
    ("affine-silu", lambda: NormPropAffine(3, activation="silu"), (2, 3, 4, 4)),
    ("affine-trained-relu6", _trained_affine, (2, 3, 4, 4)),
    ("standardize-scalar", lambda: Standardize(torch.tensor(0.4), torch.tensor(1.5)), (2, 3, 4)),
    ("standardize-channels", lambda: Standardize(torch.rand(3, 1, 1) - 0.5, torch.rand(3, 1, 1) + 0.5), (2, 3, 4, 4)),
]


def _randomized(module: nn.Module) -> nn.Module:
    """gamma and beta moved off their initial values (beta off zero, so the shift matters)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _forward_backward(module: nn.Module, x: torch.Tensor, form: contextlib.AbstractContextManager) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    with form:
        y = module(x)
    leaves = [x, *(p for p in module.parameters() if p.requires_grad)]
    cotangent = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    return [y.detach(), *torch.autograd.grad(y, leaves, cotangent)]


@pytest.mark.parametrize(("name", "make", "shape"), MODULES, ids=[m[0] for m in MODULES])
def test_eager_form_equals_compiled_form(name, make, shape):
    torch.manual_seed(0)
    module = _randomized(make()).double()
    x = torch.randn(shape, dtype=torch.float64)
    eager = _forward_backward(module, x, contextlib.nullcontext())
    compiled = _forward_backward(module, x, compiled_form())
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(e, c, rtol=1e-12, atol=1e-12)


def test_compiled_form_context_restores_the_flag():
    assert not is_compiling()
    with compiled_form():
        assert is_compiling()
        with compiled_form():
            assert is_compiling()
        assert is_compiling()
    assert not is_compiling()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_converted_zoo_model_eager_equals_compiled_form(name):
    torch.manual_seed(0)
    converted = _randomized(normprop_fx.convert(getattr(torchvision.models, name)(num_classes=10))).double().train()
    for m in converted.modules():  # dropout would draw other masks in the two runs
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    eager = _forward_backward(converted, x, contextlib.nullcontext())
    compiled = _forward_backward(converted, x, compiled_form())
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(e, c, rtol=1e-9, atol=1e-11)


class _ActivationSizedOps(TorchDispatchMode):
    """Counts the aten ops that write a tensor of at least ``size`` elements: the passes over
    the activations (weights here are far smaller)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("detach", "view", "alias"):
            return out  # no pass over the data
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.size:
                self.ops.append(func.overloadpacket.__name__)
                break
        return out


def _activation_passes(module: nn.Module, x: torch.Tensor) -> list[str]:
    x = x.detach().requires_grad_()
    cotangent = torch.ones(x.shape[0], 8, *x.shape[2:])
    counter = _ActivationSizedOps(x.numel())
    with counter:
        module(x).backward(cotangent)
    return counter.ops


@pytest.mark.parametrize("act", ["relu", "relu6", "hardtanh"])
def test_eager_normprop_conv_makes_as_many_activation_passes_as_a_plain_conv_and_activation(act):
    """A NormProp conv with a normalized clamp-family activation is one conv and one clamp,
    forward and backward: the passes of the plain conv + activation it replaces (the compiled
    form, in eager mode, adds the affine's passes)."""
    x = torch.randn(4, 8, 16, 16)
    plain = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardtanh": nn.Hardtanh()}[act])
    normprop = NormPropConv2d(8, 8, 3, padding=1, activation=act)
    expected = _activation_passes(plain, x)
    assert len(_activation_passes(normprop, x)) == len(expected), (_activation_passes(normprop, x), expected)
    with compiled_form():
        assert len(_activation_passes(normprop, x)) > len(expected)


def _new_activation_tensors(module: nn.Module, x: torch.Tensor, *, grad: bool) -> list[str]:
    """The ops of a forward that write a new activation-sized tensor (in-place ops, whose
    names end in ``_``, write into one that exists)."""
    counter = _ActivationSizedOps(x.numel())
    x = x.detach().requires_grad_(grad)
    with counter, torch.set_grad_enabled(grad):
        module(x)
    return [op for op in counter.ops if not op.endswith("_")]


@pytest.mark.parametrize(("act", "plain_act", "grad"), [
    ("relu", nn.ReLU(inplace=True), False),
    ("relu6", nn.ReLU6(inplace=True), False),
    ("silu", nn.SiLU(inplace=True), False),
    ("silu", nn.SiLU(), True),
    ("hardswish", nn.Hardswish(), True),
    ("gelu", nn.GELU(), True),
])
def test_eager_normprop_conv_allocates_as_many_activation_tensors_as_a_plain_conv_and_activation(act, plain_act, grad):
    """The clamp overwrites the conv's output when no gradient is recorded (inference), as
    ReLU(inplace=True) after a BatchNorm does, and the normalization after any other activation
    overwrites the activation's output, in training too: on CPU a new activation-sized tensor
    costs more than the pass that fills it. (In training a clamp stays out of place: autograd
    would clone its input.)"""
    x = torch.randn(4, 8, 16, 16)
    plain = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), plain_act)
    normprop = _randomized(NormPropConv2d(8, 8, 3, padding=1, activation=act))
    expected = _new_activation_tensors(plain, x, grad=grad)
    assert _new_activation_tensors(normprop, x, grad=grad) == expected
    with compiled_form():
        assert len(_new_activation_tensors(normprop, x, grad=grad)) > len(expected)


def test_an_activation_whose_backward_reads_its_output_is_not_overwritten_in_training():
    """tanh's backward reads its output: with a gradient recorded the normalization goes into a
    new tensor, and the gradient is the compiled form's."""
    torch.manual_seed(0)
    layer = _randomized(NormPropConv2d(3, 4, 3, padding=1, activation="tanh")).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x)
    with compiled_form():
        (expected,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert _new_activation_tensors(layer, x, grad=False) == ["convolution", "tanh"]


@pytest.mark.parametrize("make", [lambda: NormPropConv2d(3, 4, 3, padding=1), lambda: NormPropLinear(6, 4, activation="relu6"),
                                  lambda: NormPropAffine(3, activation="relu")], ids=["conv", "linear", "affine"])
def test_a_hook_on_the_activation_sees_its_input_as_in_the_compiled_form(make):
    """With a hook on its activation, a layer calls the activation as a module (the hook fires and
    sees the activation's own input, which normprop_fx.recalibrate measures), and computes the same."""
    torch.manual_seed(0)
    module = _randomized(make()).double()
    x = torch.randn((2, 3, 5, 5) if not isinstance(module, NormPropLinear) else (2, 6), dtype=torch.float64)
    seen = []
    with compiled_form():
        handle = module.activation.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
        expected = module(x)
    eager_plain = module(x)  # hooked: the module path
    handle.remove()
    eager_fast = module(x)  # no hook: the folded path
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eager_plain, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eager_fast, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("make", "shape", "on_output"), [
    (lambda: NormPropConv2d(64, 64, 3, padding=1), (1, 64, 3, 3), True),
    (lambda: NormPropConv2d(64, 64, 3, padding=1), (1, 64, 32, 32), False),
    (lambda: NormPropConv2d(64, 64, 3, padding=1), (64, 3, 3), True),  # unbatched
    (lambda: NormPropLinear(2048, 128), (2, 2048), True),
    (lambda: NormPropLinear(8, 8), (32, 8), False),
], ids=["deep-conv", "early-conv", "unbatched-conv", "wide-linear", "narrow-linear"])
def test_the_cheaper_side_is_normalized(make, shape, on_output):
    """The output form where the weight has 3x more elements than the output of a batch of
    FORM_BATCH, else the weight form; both are the same function
    (test_eager_form_equals_compiled_form)."""
    layer = make()
    x = torch.randn(shape)
    numel = layer(x).numel()
    assert layer._normalize_output(x, getattr(layer, "padding", None)) is on_output
    if isinstance(layer, NormPropConv2d):
        assert layer._output_numel(x, layer.padding) == numel


@pytest.mark.parametrize("batch", [1, 2, 4, 16, 64])
def test_the_side_does_not_depend_on_the_batch(batch):
    """A sample computes the same operations in any batch: the choice follows one sample's output
    (a DDP/FSDP rank's half batch and one process's whole batch take the same form)."""
    layer = NormPropConv2d(64, 64, 3, padding=1)
    for size, on_output in ((3, True), (16, False)):
        assert layer._normalize_output(torch.randn(batch, 64, size, size), layer.padding) is on_output
