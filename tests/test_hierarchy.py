"""Pass 14 (passes/hierarchy.py) on small models made to hit each of its cases: what is swapped,
what is rebuilt, what is inlined, and that the result computes the flat conversion exactly."""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import normprop_fx
from normprop_fx import NormPropConv2d, Standardize, conversion_report
from normprop_fx.passes import hierarchy

X = torch.randn(2, 3, 8, 8)


def conv_bn(c_in: int = 3, c_out: int = 4) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class ModuleBlock(nn.Module):
    """conv -> bn -> relu as modules: swaps only."""

    def __init__(self, c_in: int = 3) -> None:
        super().__init__()
        self.conv, self.bn = conv_bn(c_in)
        self.act = nn.ReLU()
        self.stride = 1  # a plain attribute user code may read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class FunctionalBlock(ModuleBlock):
    """The activation is functional: fusing it into the layer changes this forward."""

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))) * scale


class Residual(nn.Module):
    """A residual add followed by a ReLU module also used inside: relu called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(4, 4)
        self.conv2, self.bn2 = conv_bn(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TupleBlock(ModuleBlock):
    """Returns a tuple its caller unpacks."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.act(self.bn(self.conv(x)))
        return y, x.mean()


class Net(nn.Module):
    def __init__(self, first: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.res = Residual()
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        if isinstance(y, tuple):
            y = y[0] + y[1]
        return self.head(self.res(y).mean((2, 3)))


def convert_both(model: nn.Module, **kwargs: object) -> tuple[nn.Module, fx.GraphModule]:
    """The conversion and the flat one of the same model (the same seeds: the same constants)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        converted = normprop_fx.convert(model, example_inputs=X, **kwargs)
        torch.manual_seed(0)
        flat = normprop_fx.convert(model, example_inputs=X, flat=True)
    return converted, flat


def assert_same_function(converted: nn.Module, flat: nn.Module) -> None:
    """The same function, to float32 rounding: where the module tree attaches a correction to
    the module after it, the eager form computes it inside that module's own affine
    (standardize.absorbable_correction); the flat graph calls it as a node of its own."""
    for mode in ("train", "eval"):
        getattr(converted, mode)(), getattr(flat, mode)()
        torch.testing.assert_close(converted(X), flat(X), rtol=1e-6, atol=1e-6, msg=mode)


def tree(converted: nn.Module) -> normprop_fx.records.ModuleTree:
    return normprop_fx.conversion_report(converted).module_tree


def test_swaps_only_keep_every_class_and_forward():
    model = Net(ModuleBlock())
    converted, flat = convert_both(model)
    assert type(converted) is Net and type(converted.first) is ModuleBlock
    assert isinstance(converted.first.conv, NormPropConv2d)
    assert isinstance(converted.first.bn, nn.Identity) and isinstance(converted.first.act, nn.Identity)
    assert "first" not in {r.path for r in tree(converted).rebuilt}
    assert_same_function(converted, flat)
    assert type(model.first.conv) is nn.Conv2d, "the user's model must not change"


def test_functional_activation_rebuilds_its_block_with_its_signature_and_attributes():
    converted, flat = convert_both(Net(FunctionalBlock()))
    block = converted.first
    assert isinstance(block, fx.GraphModule) and type(block).__name__ == "FunctionalBlock"
    assert list(inspect.signature(block.forward).parameters) == ["x", "scale"]
    assert inspect.signature(block.forward).parameters["scale"].default == 1.0
    assert block.stride == 1
    assert type(converted) is Net, "the parent keeps its class"
    assert {r.path for r in tree(converted).rebuilt} >= {"first"}
    assert_same_function(converted, flat)


def test_module_called_twice_with_two_rewrites_rebuilds_the_block_that_calls_it():
    converted, flat = convert_both(Net(ModuleBlock()))
    rebuilt = {r.path: r for r in tree(converted).rebuilt}
    assert "res" in rebuilt and isinstance(converted.res, fx.GraphModule)
    assert type(converted.first) is ModuleBlock
    assert_same_function(converted, flat)


def test_tuple_output_is_unpacked_by_the_kept_caller():
    converted, flat = convert_both(Net(TupleBlock()))
    assert type(converted) is Net and type(converted.first) is TupleBlock
    assert_same_function(converted, flat)


class Twice(nn.Module):
    """A non-leaf child called at two places whose calls need different edits: inlined."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn()
        self.inner = nn.Sequential(nn.ReLU())  # each call is normalized on its own input
        self.conv2, self.bn2 = conv_bn(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(F.relu(self.bn1(self.conv1(x))))
        return self.bn2(self.conv2(self.inner(y * 3.0)))


def test_child_called_twice_is_inlined_into_its_rebuilt_caller():
    model = Twice()
    converted, flat = convert_both(model)
    record = tree(converted)
    assert_same_function(converted, flat)
    # each call of inner.0 becomes a normalized activation of its own: one forward of inner cannot hold both
    assert {r.path for r in record.inlined} == {"inner"}
    assert isinstance(converted, fx.GraphModule) and not record.class_kept, "the caller of an inlined module is rebuilt"
    assert "self.inner(" not in converted.code


def test_inplace_returns_the_users_object_and_flat_a_graph_module():
    model = Net(ModuleBlock())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = normprop_fx.convert(model, example_inputs=X, inplace=True)
        flat = normprop_fx.convert(Net(ModuleBlock()), example_inputs=X, flat=True)
    assert same is model and isinstance(model.first.conv, NormPropConv2d)
    assert isinstance(flat, fx.GraphModule) and tree(flat).flat and not tree(flat).class_kept


def test_a_rejected_candidate_changes_nothing_and_the_next_one_is_checked(monkeypatch):
    """The first check is made to fail on the kept block: the block is rebuilt instead, the
    result still computes the flat graph, and the failed attempt left no swap behind."""
    real = hierarchy._first_mismatch
    calls = []

    def fail_once(candidate, gm, tracer, concrete_args):
        calls.append(type(candidate.first).__name__)
        if len(calls) == 1:
            assert type(candidate.first) is ModuleBlock
            return "first", "made to fail by the test"
        return real(candidate, gm, tracer, concrete_args)

    monkeypatch.setattr(hierarchy, "_first_mismatch", fail_once)
    model = Net(ModuleBlock())
    converted, flat = convert_both(model, inplace=False)
    assert len(calls) >= 2
    assert isinstance(converted.first, fx.GraphModule)
    assert any("made to fail" in r.reason for r in tree(converted).rebuilt)
    assert type(model.first.conv) is nn.Conv2d
    assert_same_function(converted, flat)


def test_the_check_rejects_a_candidate_that_computes_something_else(monkeypatch):
    seen = {}
    real = hierarchy.restore_hierarchy

    def keep_graph(model, gm, *args):
        seen["gm"] = gm
        return real(model, gm, *args)

    monkeypatch.setattr(importlib.import_module("normprop_fx.convert"), "restore_hierarchy", keep_graph)
    converted, _ = convert_both(Net(ModuleBlock()))
    gm = seen["gm"]
    assert hierarchy._first_mismatch(converted, gm, normprop_fx.passes.NormPropTracer(), None) is None
    converted.first.act = nn.ReLU()  # a module the flat graph does not call there
    mismatch = hierarchy._first_mismatch(converted, gm, normprop_fx.passes.NormPropTracer(), None)
    assert mismatch is not None and mismatch[0] == "first", mismatch
    converted.first.act = nn.Identity()
    converted.head = nn.Linear(4, 5)  # another module object where the graph calls head
    assert hierarchy._first_mismatch(converted, gm, normprop_fx.passes.NormPropTracer(), None) is not None


def test_summary_says_where_the_conversion_lives():
    converted, _ = convert_both(Net(FunctionalBlock()))
    text = normprop_fx.summary(converted)
    assert "Module tree: Net keeps its class and forward" in text
    assert "FunctionalBlock" in text and "rebuilt" in text


@pytest.mark.parametrize("init", ["normprop", "trained"])
def test_state_dict_keys_stay_at_the_users_names(init):
    model = Net(ModuleBlock())
    if init == "trained":
        model.first.bn.num_batches_tracked += 1
    converted, flat = convert_both(model, init=init)
    keys = set(converted.state_dict())
    assert "first.conv.weight" in keys and "first.conv.gamma" in keys and "head.weight" in keys
    flat.load_state_dict(converted.state_dict(), strict=False)


class FunctionalRoot(nn.Module):
    """The root's own forward has the functional activation: only the root can change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class FunctionalHead(nn.Module):
    """DenseNet's head: the root applies a functional relu to what its ``features`` return, and
    only a classifier (no NormProp layer) reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_bn())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.features(x), inplace=True).mean((2, 3)))


def test_a_functional_activation_of_a_module_output_that_no_normprop_layer_reads_stays_as_written():
    model = FunctionalHead()
    converted = normprop_fx.convert(model, example_inputs=X)
    assert type(converted) is FunctionalHead and tree(converted).class_kept and not tree(converted).rebuilt
    layer = converted.features[0]
    assert isinstance(layer, NormPropConv2d) and layer.activation.spec.is_identity
    (rewrite,) = converted.normprop_report.rewrites
    assert rewrite.activation == "identity" and any("no NormProp layer reads it" in note for note in rewrite.notes)
    with torch.no_grad():  # features return the standardized layer output, and the relu runs raw on it
        expected = converted.fc(F.relu(layer(X)).mean((2, 3)))
        torch.testing.assert_close(converted.features.eval()(X), layer(X), rtol=0, atol=0)
        torch.testing.assert_close(converted.eval()(X), expected, rtol=0, atol=0)


def test_a_functional_activation_in_an_activation_module_after_the_batchnorm_is_fused_as_before():
    """timm's GELU module is traced through: its F.gelu is made deeper than the BatchNorm, not by a
    caller, so nothing a module returns changes when it is fused (the head's last one too)."""

    class GeluModule(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(x)

    class Head(FunctionalHead):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*conv_bn(), GeluModule())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x).mean((2, 3)))

    converted = normprop_fx.convert(Head(), example_inputs=X)
    assert converted.normprop_report.rewrites[0].activation == "gelu"


def test_a_functional_activation_of_a_module_output_that_a_normprop_layer_reads_is_fused():
    class Caller(FunctionalHead):
        def __init__(self) -> None:
            super().__init__()
            self.conv2, self.bn2 = conv_bn(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn2(self.conv2(F.relu(self.features(x))))

    converted = normprop_fx.convert(Caller(), example_inputs=X)
    assert not tree(converted).class_kept, "the caller's relu is fused into the layer before it"
    assert converted.normprop_report.rewrites[0].activation == "relu"


def test_a_root_whose_own_forward_changes_is_rebuilt_and_inplace_says_so():
    model = FunctionalRoot()
    with pytest.warns(normprop_fx.NormPropWarning, match="inplace=True: the forward of FunctionalRoot itself had to be rebuilt"):
        converted = normprop_fx.convert(model, example_inputs=X, inplace=True)
    assert converted is not model and isinstance(converted, fx.GraphModule)
    assert type(converted).__name__ == "FunctionalRoot" and not tree(converted).class_kept
    assert isinstance(converted.conv, NormPropConv2d) and isinstance(converted.bn, nn.Identity)
    assert converted.conv.weight is model.conv.weight, "the rebuilt root holds the model's weights"


class ScaledInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(*conv_bn(), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x * 3.0)  # seq.0's input needs a correction, which seq's forward must run


def test_a_correction_goes_inside_its_consumer_and_the_sequential_keeps_its_forward():
    """Pass 13: seq.0's input correction becomes seq.0's own input_correction, so seq is swapped
    into, not rebuilt: it is still an nn.Sequential, and the correction's buffers are under seq.0."""
    converted, flat = convert_both(ScaledInput())
    seq = converted.seq
    assert type(seq) is nn.Sequential and not isinstance(seq, fx.GraphModule)
    assert [type(m) for m in seq] == [NormPropConv2d, nn.Identity, nn.Identity]
    assert isinstance(seq[0].input_correction, Standardize)
    assert torch.allclose(seq[0].input_correction.scale, torch.tensor(1 / 3.0))
    assert "seq.0.input_correction.scale" in converted.state_dict()
    assert [c.path for c in conversion_report(converted).corrections] == ["seq.0.input_correction"]
    assert not conversion_report(converted).module_tree.rebuilt
    assert type(converted) is ScaledInput
    assert_same_function(converted, flat)


class SharedReluSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        relu = nn.ReLU()
        self.seq = nn.Sequential(*conv_bn(), relu, nn.MaxPool2d(2), relu)  # one ReLU at two places

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


def test_a_rebuilt_sequential_still_indexes_its_children():
    """The shared ReLU's first call is fused into seq.0, its second normalized: no swap says
    that, so seq's forward is rebuilt, and the GraphModule still indexes like the Sequential."""
    converted, flat = convert_both(SharedReluSequential())
    seq = converted.seq
    assert isinstance(seq, fx.GraphModule) and type(seq).__name__ == "Sequential"
    assert isinstance(seq[0], NormPropConv2d) and isinstance(seq[1], nn.Identity) and isinstance(seq[3], nn.MaxPool2d)
    assert type(converted) is SharedReluSequential
    assert_same_function(converted, flat)


class ConstantBlock(ModuleBlock):
    """A forward that makes a tensor while traced: torch.fx keeps it on the root as _tensor_constant0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))) * torch.tensor([2.0])


def test_a_rebuilt_block_keeps_the_tensors_its_forward_made():
    converted, flat = convert_both(Net(ConstantBlock()))
    assert type(converted) is Net and isinstance(converted.first, fx.GraphModule)
    assert any(name.startswith("_tensor_constant") for name, _ in converted.first.named_buffers())
    assert_same_function(converted, flat)


class DropoutHead(nn.Module):
    """timm's heads: F.dropout(x, p, training=self.training) in the root's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.first = ModuleBlock()
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.dropout(self.first(x).mean((2, 3)), 0.5, training=self.training)
        return self.head(y)


def test_functional_dropout_in_a_kept_forward_keeps_the_class_and_follows_the_mode():
    converted, flat = convert_both(DropoutHead())
    assert type(converted) is DropoutHead and tree(converted).class_kept
    assert torch.equal(converted.eval()(X), flat.eval()(X))
    converted.train(), flat.train()
    torch.manual_seed(1)
    a = converted(X)
    torch.manual_seed(1)
    assert torch.equal(a, flat(X)), "the same dropout mask: the kept forward drops out as the flat graph's module"
    assert not torch.equal(converted.eval()(X), a)


class SlicedHead(DropoutHead):
    """A slice bound computed in the graph (x[:, :n] with n from the shape): its node is inside the slice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x).mean((2, 3))
        return self.head(torch.cat([y[:, : y.shape[1] // 2], y[:, y.shape[1] // 2 :]], 1))


def test_a_slice_that_holds_a_graph_value_is_compared_by_what_it_holds():
    converted, flat = convert_both(SlicedHead())
    assert type(converted) is SlicedHead and tree(converted).class_kept
    assert_same_function(converted, flat)


class NamedSequentialRoot(nn.Module):
    """DenseNet's shape: a rebuilt Sequential with named (not numbered) children (one ReLU at
    two of them), called from a root that is rebuilt too (its own functional relu is fused away)."""

    def __init__(self) -> None:
        super().__init__()
        conv, bn = conv_bn()
        relu = nn.ReLU()
        self.features = nn.Sequential(OrderedDict(conv=conv, norm=bn, relu=relu, pool=nn.MaxPool2d(2), relu2=relu))
        self.conv2, self.bn2 = conv_bn(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(self.features(x * 3.0))))


def test_a_rebuilt_sequential_with_named_children_is_called_by_its_rebuilt_caller():
    converted, flat = convert_both(NamedSequentialRoot())
    record = tree(converted)
    assert {r.path for r in record.rebuilt} == {"", "features"} and not record.inlined
    assert isinstance(converted.features, fx.GraphModule) and bool(converted.features)
    assert_same_function(converted, flat)


def test_check_model_switches_off_the_functional_dropout_a_kept_forward_calls():
    from normprop_fx.model_check import check_model, functional_dropout_off

    torch.manual_seed(0)
    result = check_model(DropoutHead(), (3, 8, 8))
    assert result.class_kept and result.batch_independent, result.failures
    with functional_dropout_off():
        assert torch.equal(F.dropout(X, 0.5, training=True), X)
    assert not torch.equal(F.dropout(X, 0.5, training=True), X), "F.dropout is restored afterwards"
