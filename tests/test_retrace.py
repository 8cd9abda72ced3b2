"""A converted model can be traced again by other torch.fx tools (issue 16).

normprop-fx's own tracer keeps its modules as leaves, but a plain ``torch.fx.Tracer`` (torch.nn
modules are leaves, everything else is traced through), as used by
``torch.fx.symbolic_trace``, torchvision's feature extraction and timm's, traces into every
module the library puts into a model. Each of them must trace, and the traced graph must
compute what the module computes: forward and gradients, in train and eval mode.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import normprop_fx
import normprop_fx.passes
from normprop_fx.affine import NormPropAffine
from normprop_fx.batchnorm_state import batchnorm_state
from normprop_fx.conv_same import NormPropConv2dSame
from normprop_fx.fold import ConstantAffine, ShiftedInputConv
from normprop_fx.layers import NormPropConv1d, NormPropConv2d, NormPropConv3d, NormPropLinear
from normprop_fx.normalized_activation import NormalizedActivation
from normprop_fx.opaque_affine import OpaqueNormPropAffine
from normprop_fx.passes.dropout_modes import FeatureDropout
from normprop_fx.standardize import Standardize

from helpers import trained_batchnorm


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """A whole network, float32: the same function, which a traced graph may round
    differently from the module (a jit trace divides by the norm where the module multiplies by
    its inverse: weight_norm.normalized_rows)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def trained_affine() -> NormPropAffine:
    affine = NormPropAffine(3, activation="relu")
    affine.keep_batchnorm_function(batchnorm_state(trained_batchnorm(3)))
    return affine


def measured_opaque() -> OpaqueNormPropAffine:
    module = OpaqueNormPropAffine(NormPropAffine(3, activation="silu"), nn.ReLU())
    module.measuring = True
    module(torch.randn(8, 3, 5, 5) * 2 + 1)
    module.measuring = False
    assert module.measured
    return module


def corrected_activation() -> NormalizedActivation:
    module = NormalizedActivation("relu")
    module.absorb_correction(torch.tensor(0.1), torch.tensor(1.3))
    return module


def rank_checked_linear() -> NormPropLinear:
    layer = NormPropLinear(6, 5)
    layer.required_input_dim = 2
    return layer


#: (id, the module's class, a factory, the input shapes to run the traced module on)
CASES: list[tuple[str, type[nn.Module], Callable[[], nn.Module], list[tuple[int, ...]]]] = [
    ("linear", NormPropLinear, lambda: NormPropLinear(6, 5, activation="leaky_relu"), [(4, 6), (2, 3, 6)]),
    ("linear-rank-checked", NormPropLinear, rank_checked_linear, [(4, 6)]),
    ("conv1d", NormPropConv1d, lambda: NormPropConv1d(3, 4, 3, padding=1, activation="gelu"), [(2, 3, 9)]),
    ("conv2d", NormPropConv2d, lambda: NormPropConv2d(4, 6, 3, stride=2, groups=2), [(2, 4, 9, 9)]),
    ("conv2d-same", NormPropConv2d, lambda: NormPropConv2d(3, 4, 3, padding="same", activation="silu"), [(2, 3, 8, 8)]),
    ("conv2d-reflect", NormPropConv2d,
     lambda: NormPropConv2d(3, 4, 3, padding=1, padding_mode="reflect", activation="relu6"), [(2, 3, 8, 8)]),
    ("conv3d", NormPropConv3d, lambda: NormPropConv3d(3, 4, 3, activation="tanh"), [(1, 3, 5, 5, 5)]),
    # TensorFlow 'SAME' padding depends on the input size: the traced graph must follow it
    ("conv2d-tf-same", NormPropConv2dSame, lambda: NormPropConv2dSame(3, 4, 3, stride=2), [(2, 3, 9, 9), (2, 3, 10, 7)]),
    ("affine", NormPropAffine, lambda: NormPropAffine(3, activation="relu"), [(4, 3), (2, 3, 5, 5), (2, 3, 2, 2, 2)]),
    ("affine-trained", NormPropAffine, trained_affine, [(2, 3, 5, 5)]),
    ("activation-relu", NormalizedActivation, lambda: NormalizedActivation("relu"), [(4, 7)]),
    ("activation-hardtanh", NormalizedActivation, lambda: NormalizedActivation("hardtanh"), [(4, 7)]),
    ("activation-gelu-tanh", NormalizedActivation,
     lambda: NormalizedActivation(normprop_fx.activation("gelu", approximate="tanh")), [(4, 7)]),
    ("activation-not-standardized", NormalizedActivation,
     lambda: NormalizedActivation("relu", standardize=False), [(4, 7)]),
    ("activation-identity", NormalizedActivation, lambda: NormalizedActivation("identity"), [(4, 7)]),
    ("activation-corrected", NormalizedActivation, corrected_activation, [(4, 7)]),
    ("standardize-scalar", Standardize, lambda: Standardize(torch.tensor(0.0), torch.tensor(1.5)), [(2, 3, 4)]),
    ("standardize-channels", Standardize,
     lambda: Standardize(torch.rand(3, 1, 1) - 0.5, torch.rand(3, 1, 1) + 0.5), [(2, 3, 4, 4)]),
    ("opaque-affine", OpaqueNormPropAffine, measured_opaque, [(2, 3, 5, 5)]),
    ("constant-affine-scalar", ConstantAffine, lambda: ConstantAffine(torch.tensor(1.5), torch.tensor(-0.2)), [(2, 3)]),
    ("constant-affine-channels", ConstantAffine,
     lambda: ConstantAffine(torch.rand(3) + 0.5, torch.rand(3), channel_dim=1), [(2, 3), (2, 3, 4, 4)]),
    ("constant-affine-broadcast", ConstantAffine,
     lambda: ConstantAffine(torch.rand(3, 1, 1) + 0.5, torch.rand(3, 1, 1)), [(2, 3, 4, 4)]),
    ("shifted-input-conv", ShiftedInputConv,
     lambda: ShiftedInputConv(nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.rand(3)), [(2, 3, 9, 9), (2, 3, 8, 8), (3, 9, 9)]),
    ("feature-dropout", FeatureDropout, lambda: FeatureDropout(0.5), [(4, 6, 3, 3)]),
]


def inputs(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape)
    # values in (0, 3e-8), where the piecewise-linear activations' gradient taken from the output
    # differs from plain autograd's (piecewise_linear.py): a trace that went into the
    # autograd.Function instead of calling it would give other gradients there
    x.view(-1)[::5] = 1e-9
    return x.requires_grad_()


def forward_and_gradients(module: nn.Module, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # (the same dropout mask for both)
    y = module(x)
    leaves = [x, *(p for p in module.parameters() if p.requires_grad)]
    grads = torch.autograd.grad(y, leaves, torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return [y.detach(), *grads]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "cls", "make", "shapes"), CASES, ids=[c[0] for c in CASES])
def test_symbolic_trace_computes_what_the_module_computes(name, cls, make, shapes, mode):
    torch.manual_seed(0)
    module = make().train(mode == "train")
    assert type(module) is cls
    traced = fx.symbolic_trace(module)  # traced in the mode it runs in (fx freezes Python flags)
    for i, shape in enumerate(shapes):
        x = inputs(shape)
        for actual, expected in zip(forward_and_gradients(traced, x, i), forward_and_gradients(module, x, i), strict=True):
            exact(actual, expected)


def test_the_traced_rank_check_still_refuses_another_rank():
    traced = fx.symbolic_trace(rank_checked_linear())
    with pytest.raises(AssertionError, match="only for 2-D input"):
        traced(torch.randn(2, 3, 6))


def test_every_module_class_of_the_library_is_covered():
    """A module class added to the library gets a case above (or this fails)."""
    found = set()
    for package in (normprop_fx, normprop_fx.passes):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if (issubclass(cls, nn.Module) and cls.__module__ == module.__name__
                        and not cls.__name__.startswith("_") and cls.forward is not nn.Module.forward):
                    found.add(cls)
    assert found, "no module class found: the discovery is broken"
    assert found <= {c[1] for c in CASES}, f"not covered: {sorted(c.__name__ for c in found - {c[1] for c in CASES})}"


def last_node_of(names: list[str], module_path: str) -> str:
    """The node computing ``module_path``'s output: the last one traced inside it."""
    inside = [n for n in names if n == module_path or n.startswith(module_path + ".")]
    assert inside, f"no node of {module_path}"
    return inside[-1]


# torchvision's feature extraction keeps its own ops modules (Conv2dNormActivation...) as leaves,
# and traces into the rest: resnet18's layer3.1 is rebuilt (a GraphModule, traced into, and with it
# the NormProp layer inside); mobilenet_v3_large's features.12.block.3 keeps its class (its conv's
# input correction is inside the conv) and stays a leaf
@pytest.mark.parametrize(("arch", "module_path"), [("resnet18", "layer3.1.conv2"), ("mobilenet_v3_large", "features.12.block.3")])
def test_torchvision_feature_extraction_on_a_converted_model(arch, module_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    converted = normprop_fx.convert(getattr(torchvision.models, arch)(weights=None), example_inputs=x).eval()

    train_nodes, eval_nodes = get_graph_node_names(converted)
    assert train_nodes and eval_nodes
    node = last_node_of(eval_nodes, module_path)
    extractor = create_feature_extractor(converted, return_nodes={node: "feat", eval_nodes[-1]: "out"}).eval()

    captured = []
    # a clone: MobileNetV3's own forward adds the residual to the block's output in place
    hook = converted.get_submodule(module_path).register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    with torch.no_grad():
        expected = converted(x)
        features = extractor(x)
        hook.remove()
        to_rounding(features["feat"], captured[0])
        to_rounding(features["out"], expected)
        to_rounding(fx.symbolic_trace(converted)(x), expected)
