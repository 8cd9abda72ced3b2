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
    # weights much larger than the output (until 2026-12-06 these normalized their output instead)
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


def _input_corrected(module: nn.Module, channels: int | None, *, mean: bool = True) -> nn.Module:
    """``module`` with a Standardize on its input: scalar (``channels`` None) or per channel
    (shape (channels, 1, 1)), off zero mean unless ``mean`` is False."""
    from normprop_fx.standardize import attach_input_correction

    g = torch.Generator().manual_seed(5)
    shape = () if channels is None else (channels, 1, 1)
    m = torch.randn(shape, generator=g) if mean else torch.zeros(shape)
    attach_input_correction(module, Standardize(m, torch.rand(shape, generator=g) + 0.5))
    return module


#: Modules with an input correction: where the eager form computes it in the layer's own affine
#: (1x1 convs, padding modes that copy values, a Linear, a standardized activation) and where it
#: cannot (zero padding, a per-channel correction of a grouped conv or of an activation).
CORRECTED_MODULES = [
    ("conv1x1-channels", lambda: _input_corrected(NormPropConv2d(5, 4, 1, activation="relu"), 5), (2, 5, 6, 6)),
    ("conv1x1-channels-no-mean", lambda: _input_corrected(NormPropConv2d(5, 4, 1, activation="silu"), 5, mean=False), (2, 5, 6, 6)),
    ("conv1x1-scalar-hardswish", lambda: _input_corrected(NormPropConv2d(5, 4, 1, activation="hardswish"), None), (2, 5, 6, 6)),
    ("conv3x3-reflect-channels", lambda: _input_corrected(NormPropConv2d(3, 4, 3, padding=1, padding_mode="reflect"), 3), (2, 3, 6, 6)),
    ("conv3x3-zero-padded-scalar", lambda: _input_corrected(NormPropConv2d(3, 4, 3, padding=1), None), (2, 3, 6, 6)),
    ("conv3x3-zero-padded-scale-only", lambda: _input_corrected(NormPropConv2d(3, 4, 3, padding=1), 3, mean=False), (2, 3, 6, 6)),
    ("conv3x3-valid-scalar", lambda: _input_corrected(NormPropConv2d(3, 4, 3, activation="relu6"), None), (2, 3, 6, 6)),
    ("conv1x1-grouped-channels", lambda: _input_corrected(NormPropConv2d(4, 4, 1, groups=2), 4), (2, 4, 5, 5)),
    ("conv1x1-grouped-scalar", lambda: _input_corrected(NormPropConv2d(4, 4, 1, groups=2), None), (2, 4, 5, 5)),
    ("linear-3d-relu-scalar", lambda: _input_corrected(NormPropLinear(6, 4), None), (2, 5, 6)),
    ("linear-scalar", lambda: _input_corrected(NormPropLinear(6, 4, activation="leaky_relu"), None), (5, 6)),
    ("conv1x1-trained-channels", lambda: _input_corrected(_trained_conv_1x1(), 3), (2, 3, 6, 6)),
    *[(f"activation-{a}-scalar", lambda a=a: _input_corrected(NormalizedActivation(a), None), (2, 3, 4, 4))
      for a in ("relu", "relu6", "leaky_relu", "silu", "tanh")],
    ("activation-relu-channels", lambda: _input_corrected(NormalizedActivation("relu"), 3), (2, 3, 4, 4)),
    ("activation-plain-scalar", lambda: _input_corrected(NormalizedActivation("relu", standardize=False), None), (2, 3, 4, 4)),
]


def _trained_conv_1x1() -> NormPropConv2d:
    layer = NormPropConv2d(3, 5, 1, activation="relu")
    layer.keep_batchnorm_function(batchnorm_state(trained_batchnorm(5)), None)
    return layer


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


@pytest.mark.parametrize(("name", "make", "shape"), MODULES + CORRECTED_MODULES, ids=[m[0] for m in MODULES + CORRECTED_MODULES])
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
                # an ``out=`` overload writes into a tensor that exists, as an in-place op does
                self.ops.append(func.overloadpacket.__name__ + ("_" if func._overloadname == "out" else ""))
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


@pytest.mark.parametrize(("make", "absorbed"), [
    (lambda: _input_corrected(NormPropConv2d(8, 8, 1), 8), True),
    (lambda: _input_corrected(NormPropConv2d(8, 8, 1, activation="silu"), None), True),
    (lambda: _input_corrected(NormPropConv2d(8, 8, 3, padding=1, padding_mode="replicate"), 8), True),
    (lambda: _input_corrected(NormPropConv2d(8, 8, 3, padding=1), None), False),
    (lambda: _input_corrected(NormPropConv2d(8, 8, 3, padding=1), 8, mean=False), True),
    (lambda: _input_corrected(NormPropConv2d(8, 8, 1, groups=2), 8), False),
], ids=["1x1-channels", "1x1-scalar", "replicate-channels", "zero-padded", "zero-padded-scale-only", "grouped-channels"])
def test_an_input_correction_costs_no_activation_pass_where_the_layer_can_absorb_it(make, absorbed):
    """Where no zero padding follows it (or it only scales), the eager form computes a layer's
    input correction in its normalized weight and bias: the layer makes the passes of the same
    layer without the correction, forward and backward. Elsewhere it costs its pass (forward and
    backward)."""
    from normprop_fx.standardize import INPUT_CORRECTION

    x = torch.randn(4, 8, 16, 16)
    layer = _randomized(make())
    passes = _activation_passes(layer, x)
    correction = layer._modules.pop(INPUT_CORRECTION)
    without = _activation_passes(layer, x)
    layer.add_module(INPUT_CORRECTION, correction)
    assert (len(passes) == len(without)) is absorbed, (passes, without)


@pytest.mark.parametrize("act", ["relu", "relu6", "leaky_relu"])
def test_a_scalar_input_correction_of_an_activation_is_one_affine_with_its_normalization(act):
    """A standalone normalized activation with a scalar input correction (a residual sum's
    correction) computes the correction and its own input affine as one pass. (SiLU and the
    like have no input affine to merge it into: the correction is their one extra pass.)"""
    from normprop_fx.standardize import INPUT_CORRECTION

    x = torch.randn(4, 8, 16, 16)
    activation = _input_corrected(NormalizedActivation(act), None)
    passes = _activation_passes(activation, x)
    correction = activation._modules.pop(INPUT_CORRECTION)
    without = _activation_passes(activation, x)
    assert len(passes) == len(without), (passes, without)
    with compiled_form():
        activation.add_module(INPUT_CORRECTION, correction)
        assert len(_activation_passes(activation, x)) > len(without)


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
    ("relu", nn.ReLU(inplace=True), True),
    ("relu6", nn.ReLU6(inplace=True), False),
    ("silu", nn.SiLU(inplace=True), False),
    ("silu", nn.SiLU(), True),
    ("hardswish", nn.Hardswish(), True),
    ("gelu", nn.GELU(), True),
])
def test_eager_normprop_conv_allocates_as_many_activation_tensors_as_a_plain_conv_and_activation(act, plain_act, grad):
    """The clamp overwrites the conv's output, as ReLU(inplace=True) after a BatchNorm does, in
    training too (eager._ClampInPlace: the native in-place clamp would have autograd clone its
    input), and the normalization after any other activation overwrites the activation's
    output: on CPU a new activation-sized tensor costs more than the pass that fills it."""
    x = torch.randn(4, 8, 16, 16)
    plain = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), plain_act)
    normprop = _randomized(NormPropConv2d(8, 8, 3, padding=1, activation=act))
    expected = _new_activation_tensors(plain, x, grad=grad)
    assert _new_activation_tensors(normprop, x, grad=grad) == expected
    with compiled_form():
        assert len(_new_activation_tensors(normprop, x, grad=grad)) > len(expected)


@pytest.mark.parametrize("act", ["relu6", "hardtanh"])
def test_a_bounded_clamp_allocates_less_in_training_than_the_native_in_place_one(act):
    """nn.ReLU6(inplace=True) in training makes autograd clone its input; the NormProp layer's
    clamp writes into its conv output and allocates nothing."""
    x = torch.randn(4, 8, 16, 16)
    plain = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), {"relu6": nn.ReLU6(inplace=True), "hardtanh": nn.Hardtanh(inplace=True)}[act])
    normprop = _randomized(NormPropConv2d(8, 8, 3, padding=1, activation=act))
    assert _new_activation_tensors(normprop, x, grad=True) == ["convolution"]
    assert _new_activation_tensors(plain, x, grad=True) == ["convolution", "clone"]


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_the_in_place_clamp_stays_out_of_place_under_tracers_and_transforms():
    """torch.func (jvp, vmap(grad)) and torch.jit.trace get the native out-of-place clamp: the
    in-place one is a Python autograd.Function (eager._ClampInPlace)."""
    layer = _randomized(NormPropConv2d(3, 4, 3, padding=1)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    params = dict(layer.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    def f(p):  # noqa: ANN001, ANN202
        return torch.func.functional_call(layer, p, (x,))

    _, jvp_out = torch.func.jvp(f, (params,), (tangents,))
    h = 1e-6
    with torch.no_grad():
        plus = f({k: v + h * tangents[k] for k, v in params.items()})
        minus = f({k: v - h * tangents[k] for k, v in params.items()})
    torch.testing.assert_close(jvp_out, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-6)
    per_sample = torch.func.vmap(torch.func.grad(lambda p, s: torch.func.functional_call(layer, p, (s[None],)).sum()),
                                 in_dims=(None, 0))(params, x)
    assert per_sample["weight"].shape == (2, *layer.weight.shape)
    traced = torch.jit.trace(layer, x, check_trace=False)
    assert "prim::PythonOp" not in str(traced.graph)


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


def _plain_normalized_rows(w: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """``gamma_i * w_i / sqrt(||w_i||^2 + eps)`` in plain ops, differentiated by autograd."""
    norm = (w.reshape(w.shape[0], -1).square().sum(1) + eps).sqrt()
    return w * (gamma / norm).reshape(-1, *([1] * (w.dim() - 1)))


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7), (4, 3, 5)], ids=["conv2d", "linear", "conv1d"])
def test_weight_normalization_backward_is_fused_and_exact(shape, dtype):
    """A first-order CPU backward of the weight normalization is ATen's fused weight-norm
    backward (weight_norm._fused_backward), given the norms with eps: the gradients of the plain
    formula to rounding, also for a zero filter and a filter of norm 1e-5 (where eps matters)."""
    from normprop_fx.weight_norm import normalized_rows

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g, dtype=dtype)
    w0[1] = 0.0
    w0[2] *= 1e-5
    gamma0 = torch.rand(shape[0], generator=g, dtype=dtype) + 0.5
    grad_out = torch.randn(shape, generator=g, dtype=dtype)
    grads = []
    for fn in (normalized_rows, _plain_normalized_rows):
        w, gamma = w0.clone().requires_grad_(), gamma0.clone().requires_grad_()
        out = fn(w, gamma, 1e-8)
        counter = _CountOps()
        with counter:
            out.backward(grad_out)
        grads.append((out.detach(), w.grad, gamma.grad, counter.names))
    (out, gw, gg, ops), (ref_out, ref_gw, ref_gg, ref_ops) = grads
    assert "aten._weight_norm_interface_backward" in ops and "aten._weight_norm_interface_backward" not in ref_ops
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(gg, ref_gg, **tol)
    # the zero filter's gradient is scaled by 1/sqrt(eps) = 1e4: compare relative to each row's size
    for row in range(shape[0]):
        scale = ref_gw[row].abs().max()
        torch.testing.assert_close(gw[row] / scale, ref_gw[row] / scale, **tol)


def test_weight_normalization_backward_unfused_where_it_must_be():
    """A differentiable backward (create_graph: double backward) and a torch.func transform
    (vmap over per-sample gradients) take the plain ops, and still give the plain formula's
    derivatives."""
    from normprop_fx.weight_norm import normalized_rows

    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(4, generator=g, dtype=torch.float64, requires_grad=True)
    counter = _CountOps()
    with counter:
        (gw,) = torch.autograd.grad(normalized_rows(w, gamma, 1e-8).square().sum(), w, create_graph=True)
    assert "aten._weight_norm_interface_backward" not in counter.names
    (ref_gw,) = torch.autograd.grad(_plain_normalized_rows(w, gamma, 1e-8).square().sum(), w, create_graph=True)
    torch.testing.assert_close(gw, ref_gw)
    torch.testing.assert_close(torch.autograd.grad(gw.sum(), w)[0], torch.autograd.grad(ref_gw.sum(), w)[0])

    x = torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64)

    def loss(weight: torch.Tensor, sample: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001
        return torch.nn.functional.conv2d(sample[None], fn(weight, gamma.detach(), 1e-8)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(w.detach(), x, normalized_rows)
    expected = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(w.detach(), x, _plain_normalized_rows)
    torch.testing.assert_close(per_sample, expected)
