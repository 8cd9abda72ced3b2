"""A BatchNorm module called at several places (issue 20, finding 1): a shared Conv+BN(+act)
block becomes ONE NormProp layer called at every place, counted once; a BatchNorm shared by two
different convs becomes one layer per conv; calls that match differently leave it, once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import normprop_fx
from normprop_fx.activation_functions import activation
from normprop_fx.layers import NormPropConv2d, NormPropLayer, NormPropLinear
from normprop_fx.standardize import Standardize


def _shared(block: nn.Module) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u = block

        def forward(self, x):
            return self.u(self.u(x))

    return Net()


class FunctionalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SharedBatchNormTwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv_b(torch.relu(self.bn(self.conv_a(x)))))


def _layers(model: nn.Module) -> list[NormPropLayer]:
    return [m for m in model.modules() if isinstance(m, NormPropLayer)]


def _check_batch_independent_and_modes(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    batched = model(x)
    assert torch.allclose(batched[:1], model(x[:1]), atol=1e-5), "a sample alone differs from it in a batch"
    model.eval()
    assert torch.allclose(model(x), batched, atol=1e-6), "train and eval differ"


def _hand_built(producer: nn.Module, cls: type[NormPropLayer], act: str) -> NormPropLayer:
    return cls.from_module(producer, activation=activation(act), gamma_init="paper")


def test_shared_conv_bn_relu_block_becomes_one_layer_called_twice():
    torch.manual_seed(0)
    model = _shared(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    converted = normprop_fx.convert(model)
    report = normprop_fx.conversion_report(converted)
    assert (report.batchnorms_found, report.converted, report.left) == (1, 1, [])
    (rewrite,) = report.rewrites
    assert rewrite.path == "u.0" and rewrite.batchnorm == "u.1" and rewrite.activation == "relu"
    assert any("u.1 is called 2 times" in note and "one replacement at u.0 serves every call" in note for note in rewrite.notes)
    assert "BatchNorm found: 1, converted: 1, left: 0" in normprop_fx.summary(converted)
    # the user's class and tree: the one layer swapped in at u.0, BN and ReLU nn.Identity
    assert type(converted).__name__ == "Net" and report.module_tree.class_kept
    assert isinstance(converted.u[0], NormPropConv2d) and isinstance(converted.u[1], nn.Identity)
    assert _layers(converted) == [converted.u[0]]

    x = torch.randn(8, 4, 8, 8)
    _check_batch_independent_and_modes(converted, x)
    reference = _hand_built(model.u[0], NormPropConv2d, "relu")
    converted.train()
    out = converted(x)
    expected = reference(reference(x))
    assert torch.allclose(out, expected, atol=1e-6)
    # both calls feed the gradient of the one shared layer, as they do in the hand-built net
    out.square().mean().backward()
    expected.square().mean().backward()
    layer = converted.u[0]
    for name in ("weight", "gamma", "beta"):
        assert torch.allclose(getattr(layer, name).grad, getattr(reference, name).grad, atol=1e-6), name
    only_second = reference(reference(x).detach()).square().mean()
    grads = torch.autograd.grad(only_second, reference.weight)[0]
    assert not torch.allclose(grads, reference.weight.grad, atol=1e-6), "the first call's gradient is missing"


def test_shared_trained_block_keeps_its_function_at_both_calls():
    torch.manual_seed(1)
    model = _shared(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    bn = model.u[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.3, 0.3)
    bn.num_batches_tracked.fill_(100)
    converted = normprop_fx.convert(model)
    report = normprop_fx.conversion_report(converted)
    assert (report.batchnorms_found, report.converted, report.left) == (1, 1, [])
    x = torch.randn(6, 4, 8, 8)
    converted.train()
    assert torch.allclose(converted(x), model.eval()(x), atol=1e-5)


def test_shared_linear_bn1d_block():
    torch.manual_seed(2)
    model = _shared(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh()))
    converted = normprop_fx.convert(model)
    report = normprop_fx.conversion_report(converted)
    assert (report.batchnorms_found, report.converted, report.left) == (1, 1, [])
    assert isinstance(converted.u[0], NormPropLinear) and _layers(converted) == [converted.u[0]]
    x = torch.randn(8, 6)
    _check_batch_independent_and_modes(converted, x)
    reference = _hand_built(model.u[0], NormPropLinear, "tanh")
    assert not report.corrections
    assert torch.allclose(converted(x), reference(reference(x)), atol=1e-6)


def test_shared_block_with_functional_activation():
    torch.manual_seed(3)
    model = _shared(FunctionalBlock())
    converted = normprop_fx.convert(model)
    report = normprop_fx.conversion_report(converted)
    assert (report.batchnorms_found, report.converted, report.left) == (1, 1, [])
    (rewrite,) = report.rewrites
    assert rewrite.path == "u.conv" and rewrite.activation == "relu"
    assert len(_layers(converted)) == 1
    x = torch.randn(8, 4, 8, 8)
    _check_batch_independent_and_modes(converted, x)
    reference = _hand_built(model.u.conv, NormPropConv2d, "relu")
    assert torch.allclose(converted(x), reference(reference(x)), atol=1e-6)
    # the block's forward loses its F.relu at both calls alike: the block is rebuilt once, at
    # its name, for both calls, and the caller keeps its class and forward
    tree = report.module_tree
    assert tree.class_kept and type(converted).__name__ == "Net"
    assert [(r.path, r.type) for r in tree.rebuilt] == [("u", "FunctionalBlock")] and not tree.inlined
    assert isinstance(converted.u, fx.GraphModule) and converted.u.conv is _layers(converted)[0]
    flat = normprop_fx.convert(model, flat=True)
    assert torch.allclose(converted(x), flat(x), atol=1e-6)


def test_shared_block_whose_calls_need_different_edits_is_inlined():
    """A correction in front of the second call only: one forward cannot serve both calls, so
    the block is inlined into its caller, which is rebuilt (the documented fallback)."""
    torch.manual_seed(7)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u = FunctionalBlock()

        def forward(self, x):
            return self.u(self.u(x) + x)

    converted = normprop_fx.convert(Net())
    tree = normprop_fx.conversion_report(converted).module_tree
    assert not tree.class_kept and [r.path for r in tree.inlined] == ["u"]
    assert "need different edits" in tree.inlined[0].reason
    x = torch.randn(4, 4, 8, 8)
    _check_batch_independent_and_modes(converted, x)
    flat = normprop_fx.convert(Net(), flat=True)
    flat.load_state_dict(converted.state_dict())
    assert torch.allclose(converted(x), flat(x), atol=1e-6)


def test_each_call_of_a_shared_layer_keeps_its_own_input_correction():
    torch.manual_seed(4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return self.u(self.u(x) + x)

    model = Net()
    converted = normprop_fx.convert(model)
    report = normprop_fx.conversion_report(converted)
    assert (report.batchnorms_found, report.converted, report.left) == (1, 1, [])
    # only the second call reads a sum (variance 2): one correction, for that call alone
    (correction,) = report.corrections
    assert correction.consumer.startswith("u.0")
    x = torch.randn(8, 4, 8, 8)
    _check_batch_independent_and_modes(converted, x)
    (standardize,) = [m for m in converted.modules() if isinstance(m, Standardize)]
    assert float(standardize.mean) == pytest.approx(0.0, abs=1e-6)
    assert float(standardize.scale) == pytest.approx(2 ** -0.5, rel=1e-3)
    reference = _hand_built(model.u[0], NormPropConv2d, "relu")
    expected = reference(standardize(reference(x) + x))
    assert torch.allclose(converted(x), expected, atol=1e-6)
    assert len(_layers(converted)) == 1


def test_batchnorm_shared_by_two_convs_gives_a_layer_per_conv():
    torch.manual_seed(5)
    model = SharedBatchNormTwoConvs()
    converted = normprop_fx.convert(model)
    report = normprop_fx.conversion_report(converted)
    assert (report.batchnorms_found, report.converted, report.left) == (1, 1, [])
    assert [r.path for r in report.rewrites] == ["conv_a", "conv_b"]
    assert all(r.batchnorm == "bn" for r in report.rewrites)
    assert all(any("bn's parameters are now per call site" in n for n in r.notes) for r in report.rewrites)
    a, b = converted.get_submodule("conv_a"), converted.get_submodule("conv_b")
    assert a.gamma is not b.gamma and a.beta is not b.beta
    x = torch.randn(8, 4, 8, 8)
    _check_batch_independent_and_modes(converted, x)
    # each initialized as a layer of its own (the paper's gamma for its activation, beta 0)
    ref_a = _hand_built(model.conv_a, NormPropConv2d, "relu")
    ref_b = _hand_built(model.conv_b, NormPropConv2d, "identity")
    for layer, ref in ((a, ref_a), (b, ref_b)):
        assert torch.equal(layer.gamma, ref.gamma) and torch.equal(layer.beta, ref.beta)
    assert not report.corrections
    assert torch.allclose(converted(x), ref_b(ref_a(x)), atol=1e-6)


def test_batchnorm_shared_by_two_trained_convs_keeps_its_function_per_call():
    torch.manual_seed(6)
    model = SharedBatchNormTwoConvs()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.weight.data.uniform_(0.5, 1.5)
    model.bn.num_batches_tracked.fill_(10)
    converted = normprop_fx.convert(model)
    assert normprop_fx.conversion_report(converted).converted == 1
    x = torch.randn(4, 4, 8, 8)
    converted.train()
    assert torch.allclose(converted(x), model.eval()(x), atol=1e-5)


@pytest.mark.parametrize("second", ["add", "relu"])
def test_calls_that_match_differently_leave_the_batchnorm_once(second):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.bn(y + x) if second == "add" else torch.relu(self.bn(self.conv(y)))

    converted = normprop_fx.convert(Net(), example_inputs=torch.empty(2, 4, 8, 8))
    report = normprop_fx.conversion_report(converted)
    assert (report.batchnorms_found, report.converted) == (1, 0)
    (left,) = report.left
    assert left.path == "bn" and "called 2 times" in left.reason and "match differently" in left.reason
    assert "the call on the input 'x'" in left.reason
    if second == "add":
        assert "the call on operator.add" in left.reason and "no Conv/Linear in front" in left.reason
