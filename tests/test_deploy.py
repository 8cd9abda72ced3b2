"""Deployment paths and function transforms, on converted AND folded models (issue 19).

Each test runs one path and compares its outputs numerically with the eager model:

- files: ``torch.jit.trace`` + save + load, the legacy ONNX exporter (``dynamo=False``) and the
  dynamo one (``dynamo=True``), each run in onnxruntime with default session options;
  ``torch.export.export``; ``torch.jit.script`` of the folded model;
- torch.func: ``jvp`` and ``hessian`` (against central finite differences in float64, w.r.t.
  the input and w.r.t. parameters through ``functional_call``), per-sample gradients
  ``vmap(grad(...))`` (against one backward pass per sample).

Models, small so that the file runs in about 40 s on 2 cores: torchvision's ResNet of BasicBlocks
at half resnet18's depth (ReLU: convs and clamps, residual adds), mobilenet_v3_small's first five
blocks (hardswish, SE gates, depthwise convs), both at 32x32, and a tiny pre-activation block (a
BatchNorm after a residual add: NormPropAffine, a per-channel input correction, per-channel
constant affines in the folded form); the full resnet18 and mobilenet_v3_small run the same tests
under ``pytest -m slow``. A tiny Conv-BN-SiLU + Linear-BN1d-ReLU network, in float64, is the
torch.func model. NormProp gamma/beta are moved off their initial values so that every constant
matters. The ONNX tests skip when onnx, onnxruntime or onnxscript is missing
(``pip install -e ".[onnx]"``; the test extra installs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap
from torchvision.models import mobilenetv3, resnet

import normprop_fx

pytestmark = [  # torch's own notices about the paths under test
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),  # (inside the legacy exporter)
    # (scripting a GraphModule: torch.fx's own GraphModule.__init__ annotates its attributes)
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations:UserWarning"),
]

#: Max abs error allowed, relative to the largest output magnitude (float32 paths).
RTOL = 1e-5


def randomize_gamma_beta(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every NormProp gamma (x U(0.5, 1.5)) and beta (+ N(0, 0.3^2)) off its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.mul_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g).to(p))
            elif name.endswith("beta"):
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p))
    return model


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    actual, expected = torch.as_tensor(actual).detach(), expected.detach()
    assert actual.shape == expected.shape
    err, scale = (actual.to(expected) - expected).abs().max().item(), expected.abs().max().item()
    assert scale > 0
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} x output scale {scale:.3g}"


class PreActivation(nn.Module):
    """A BatchNorm after a residual add (no conv in front: NormPropAffine with a per-channel input
    correction), then a Conv-BN-ReLU6 layer and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(x + self.conv(x)))
        y = F.relu6(self.bn2(self.conv2(y)))
        return self.head(y.mean((2, 3)))


def mobilenet_v3_small_5() -> nn.Module:
    """torchvision's mobilenet_v3_small with its first five inverted-residual blocks (SE gates with
    ReLU and with hardswish, depthwise convs, residuals), its last conv and its classifier."""
    setting, last_channel = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small")
    return mobilenetv3.MobileNetV3(setting[:5], last_channel, num_classes=10)


#: name -> (model factory, input shape); the full networks are the slow cases below.
DEPLOY_MODELS = {
    # resnet18's structure at half its depth (one BasicBlock per stage, downsampling ones included)
    "resnet10": (lambda: resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v3_small_5": (mobilenet_v3_small_5, (2, 3, 32, 32)),
    "preact": (PreActivation, (2, 4, 8, 8)),
}
SLOW_MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 32, 32)),
}
_cache: dict[str, tuple[nn.Module, nn.Module, torch.Tensor]] = {}


def deploy_models(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(converted in eval mode, folded, input), built once per model."""
    if name not in _cache:
        factory, shape = {**DEPLOY_MODELS, **SLOW_MODELS}[name]
        torch.manual_seed(0)
        x = torch.randn(shape)
        converted = randomize_gamma_beta(normprop_fx.convert(factory(), example_inputs=x)).eval()
        _cache[name] = (converted, normprop_fx.fold(converted), x)
    return _cache[name]


CASES = [
    *[pytest.param((m, form), id=f"{m}-{form}") for m in DEPLOY_MODELS for form in ("converted", "folded")],
    *[pytest.param((m, form), id=f"{m}-{form}", marks=pytest.mark.slow) for m in SLOW_MODELS for form in ("converted", "folded")],
]


@pytest.fixture(params=CASES)
def deployed(request: pytest.FixtureRequest) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, input, its eager output) for each model, converted and folded."""
    name, form = request.param
    converted, folded, x = deploy_models(name)
    model = converted if form == "converted" else folded
    with torch.no_grad():
        expected = model(x)
    return model, x, expected


def other(batch: torch.Tensor) -> torch.Tensor:
    """The batch in reverse order: the file is run on a batch other than the one it was traced
    with (so a path that froze its example input fails), and a NormProp network computes each
    sample on its own, so the expected output is the eager one reversed."""
    return batch.flip(0)


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (pip install -e '.[onnx]')")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # default session options
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)


def need_onnx(*modules: str) -> None:
    for module in ("onnx", "onnxruntime", *modules):
        pytest.importorskip(module, reason=f"the ONNX tests need {module} (pip install -e '.[onnx]')")


# --- files: TorchScript, ONNX, torch.export ----------------------------------------------------


def test_jit_trace_save_load(deployed, tmp_path: Path) -> None:
    model, x, expected = deployed
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)  # (checked below, numerically)
    torch.jit.save(traced, tmp_path / "model.pt")
    loaded = torch.jit.load(tmp_path / "model.pt")
    with torch.no_grad():
        assert_close_to_scale(loaded(other(x)), other(expected))


def test_onnx_legacy_exporter(deployed, tmp_path: Path) -> None:
    need_onnx()
    model, x, expected = deployed
    torch.onnx.export(model, (x,), tmp_path / "model.onnx", dynamo=False)
    assert_close_to_scale(run_onnx(tmp_path / "model.onnx", other(x)), other(expected))


def test_onnx_dynamo_exporter(deployed, tmp_path: Path) -> None:
    need_onnx("onnxscript")
    model, x, expected = deployed
    torch.onnx.export(model, (x,), tmp_path / "model.onnx", dynamo=True, verbose=False)
    assert_close_to_scale(run_onnx(tmp_path / "model.onnx", other(x)), other(expected))


class TwoLayers(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


@pytest.mark.parametrize("constant_folding", [True, False])
def test_onnx_legacy_exporter_fresh_conversion(tmp_path: Path, constant_folding: bool) -> None:
    """A conversion fresh from convert() (every gamma at its initial value): onnxruntime used to
    reject its legacy export ("Node input 'onnx::Mul_554' is not a graph input, initializer, or
    output of a previous node"), with default session options. The exporter wrote the traced
    rsqrt of the weight norm as Div(1, Sqrt), and onnxruntime's DivMulFusion rewrote
    ``Div(1, s) * gamma`` into a Div reading the output of a node it removed as well: the Identity
    through which the exporter reads parameters of equal value, or (without constant folding) the
    no-op Cast of gamma. The traced form divides by the norm instead (weight_norm.normalized_rows).
    (The randomized gammas of the tests above have no equal values, so they did not fail.)"""
    need_onnx()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = normprop_fx.convert(TwoLayers(), example_inputs=x).eval()
    with torch.no_grad():
        expected = model(x)
    torch.onnx.export(model, (x,), tmp_path / "model.onnx", dynamo=False, do_constant_folding=constant_folding)
    assert_close_to_scale(run_onnx(tmp_path / "model.onnx", x), expected)


def test_torch_export(deployed) -> None:
    model, x, expected = deployed
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert_close_to_scale(exported.module()(other(x)), other(expected))


@pytest.mark.parametrize("name", [*DEPLOY_MODELS, *(pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MODELS)])
def test_jit_script_folded(name: str) -> None:
    _, folded, x = deploy_models(name)
    scripted = torch.jit.script(folded)
    with torch.no_grad():
        # (scripted, a scalar ConstantAffine is x * s + t; eager, one addcmul: rounded differently)
        assert_close_to_scale(scripted(x), folded(x))


# --- torch.func ---------------------------------------------------------------------------------


class Tiny(nn.Module):
    """Conv-BN-SiLU, Linear-BN1d-ReLU, a head: small enough for a full Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn(self.conv(x)))
        return self.head(F.relu(self.bn1(self.fc(x.flatten(1)))))


_tiny: dict[str, nn.Module] = {}


@pytest.fixture(params=["converted", "folded"])
def tiny(request: pytest.FixtureRequest) -> nn.Module:
    """The tiny model in float64, converted (train mode: the training model) or folded."""
    if not _tiny:
        torch.manual_seed(0)
        converted = normprop_fx.convert(Tiny(), example_inputs=torch.randn(2, 3, 4, 4))
        converted = randomize_gamma_beta(converted).double()
        _tiny["converted"], _tiny["folded"] = converted, normprop_fx.fold(converted)
        converted.train()
    return _tiny[request.param]


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


#: Finite-difference step (float64): truncation ~h^2, rounding ~1e-16 / h.
H = 1e-6


def autograd_grad(f, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(f(x), x)[0]


def assert_hessian_matches_gradient_differences(h: torch.Tensor, f, x: torch.Tensor, directions: int = 4) -> None:  # noqa: ANN001
    """``h`` (the Hessian of the scalar ``f`` at ``x``, shape x.shape + x.shape) times random
    directions ``v`` equals the central difference of the autograd gradient along ``v``."""
    n = x.numel()
    g = torch.Generator().manual_seed(7)
    for _ in range(directions):
        v = torch.randn(x.shape, generator=g, dtype=x.dtype)
        fd = (autograd_grad(f, x + H * v) - autograd_grad(f, x - H * v)) / (2 * H)
        torch.testing.assert_close((h.reshape(n, n) @ v.reshape(n)).view_as(x), fd, rtol=1e-6, atol=1e-7)


def test_jvp_wrt_input_and_parameters(tiny: nn.Module) -> None:
    torch.manual_seed(2)
    params, x = params_of(tiny), torch.randn(3, 3, 4, 4, dtype=torch.float64)
    dparams, dx = {k: torch.randn_like(v) for k, v in params.items()}, torch.randn_like(x)

    def f(p, x):  # noqa: ANN001, ANN202
        return functional_call(tiny, p, (x,))

    y, dy = jvp(f, (params, x), (dparams, dx))
    shifted = {s: {k: params[k] + s * H * dparams[k] for k in params} for s in (1, -1)}
    fd = (f(shifted[1], x + H * dx) - f(shifted[-1], x - H * dx)) / (2 * H)
    torch.testing.assert_close(y, f(params, x))
    torch.testing.assert_close(dy, fd, rtol=1e-6, atol=1e-7)


def test_hessian_wrt_input(tiny: nn.Module) -> None:
    torch.manual_seed(3)
    params, x = params_of(tiny), torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def loss(x):  # noqa: ANN001, ANN202
        return functional_call(tiny, params, (x,)).sin().sum()

    h = hessian(loss)(x)
    assert h.abs().max() > 1e-3  # SiLU: not a zero Hessian
    assert_hessian_matches_gradient_differences(h, loss, x)


def test_hessian_wrt_conv_weight(tiny: nn.Module) -> None:
    """Through functional_call: in the converted model the weight normalization's jvp and its
    differentiable backward (weight_norm.NormalizedWeight) give the second derivative."""
    torch.manual_seed(4)
    params, x = params_of(tiny), torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def loss(w):  # noqa: ANN001, ANN202
        return functional_call(tiny, {**params, "conv.weight": w}, (x,)).square().sum()

    w = params["conv.weight"]
    assert_hessian_matches_gradient_differences(hessian(loss)(w), loss, w)


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """vmap(grad(loss)) over the batch equals one backward pass per sample."""
    params = params_of(model)

    def loss(p, x, y):  # noqa: ANN001, ANN202
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(loss(leaves, x[i], y[i]), list(leaves.values()))
        for (name, _), g in zip(leaves.items(), grads):
            torch.testing.assert_close(batched[name][i], g, msg=f"sample {i}, {name}")


def test_per_sample_gradients(tiny: nn.Module) -> None:
    torch.manual_seed(5)
    per_sample_gradients(tiny, torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("name", ["mobilenet_v3_small_5", "preact"])
def test_per_sample_gradients_converted_network(name: str) -> None:
    """Networks with hardswish, SE gates and depthwise convs, or a NormPropAffine after a residual
    add with a per-channel correction: converted, float32, eval mode (no dropout)."""
    converted, _, x = deploy_models(name)
    torch.manual_seed(6)
    per_sample_gradients(converted, torch.randn(2, *x.shape[1:]), torch.randint(0, 3, (2,)))
