"""Pass 13 (passes/attach_corrections.py): a correction read by one NormProp module goes inside
it, so that the forward calling that module is kept, not rebuilt; the outputs do not change."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import fx, nn

import normprop_fx
from normprop_fx import NormalizedActivation, NormPropAffine, NormPropConv2d, Standardize, conversion_report
from normprop_fx.fold import fold
from normprop_fx.model_check import relative_l2
from normprop_fx.passes.attach_corrections import attach_corrections
from normprop_fx.records import Correction
from normprop_fx.standardize import input_correction

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Head(nn.Module):
    """EfficientNet's root: its own forward calls blocks, then a conv whose input needs a correction
    (the blocks end in a residual add), a functional pool and a Linear; a ``forward_features``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv_head = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.act = nn.SiLU()
        self.fc = nn.Linear(16, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.branch(x)
        return self.act(self.bn2(self.conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))


class PreActivation(nn.Module):
    """ResNetV2's root: a final BatchNorm + ReLU after a residual add (a NormPropAffine whose input
    needs a correction), and a standalone ReLU module after another add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.after_add = nn.ReLU()
        self.norm = nn.BatchNorm2d(8)
        self.norm_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        y = self.after_add(y + self.bn2(self.conv2(y)))
        return self.norm_act(self.norm(y + y * 0.5))


def _convert(model: nn.Module, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return normprop_fx.convert(model, example_inputs=X, **kwargs)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), (a - b).abs().max()


def _to_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """A correction attached to its consumer is computed inside the consumer's affine in eager
    mode (standardize.absorbable_correction): the same function, rounded differently."""
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [Head, PreActivation])
def test_the_root_keeps_its_class_and_equals_the_flat_graph(cls):
    """The same function as the flat graph, to float32 rounding: the module tree's eager form
    computes an attached correction inside its consumer's affine (standardize.absorbable_correction),
    the flat graph as a node of its own."""
    torch.manual_seed(0)
    model = cls()
    converted, flat = _convert(model), _convert(model, flat=True)
    tree = conversion_report(converted).module_tree
    assert type(converted) is cls and tree.class_kept and not tree.rebuilt
    assert not any(isinstance(m, fx.GraphModule) for m in converted.modules())
    assert any(isinstance(n.target, str) and n.target.endswith("_input_correction") for n in flat.graph.nodes
               if n.op == "call_module"), "the flat form keeps its corrections as nodes"
    for mode in ("train", "eval"):
        getattr(converted, mode)(), getattr(flat, mode)()
        with torch.no_grad():
            torch.testing.assert_close(converted(X), flat(X), rtol=1e-6, atol=1e-6)


def test_the_correction_is_the_consumers_child_and_named_there_in_the_report():
    torch.manual_seed(0)
    converted = _convert(Head())
    assert isinstance(converted.conv_head, NormPropConv2d)
    assert isinstance(converted.conv_head.input_correction, Standardize)
    paths = [c.path for c in conversion_report(converted).corrections]
    assert "conv_head.input_correction" in paths and not any(p.endswith("_input_correction") for p in paths)
    assert "applied by conv_head to its input" in next(c.reason for c in conversion_report(converted).corrections
                                                        if c.path == "conv_head.input_correction")
    # forward_features runs the user's own code, correction included
    converted.eval()
    with torch.no_grad():
        _bitwise(converted.fc(converted.forward_features(X).mean((2, 3))), converted(X))


def test_affine_and_standalone_activation_consumers_take_their_correction():
    torch.manual_seed(0)
    converted = _convert(PreActivation())
    assert isinstance(converted.norm, NormPropAffine) and isinstance(converted.norm.input_correction, Standardize)
    assert isinstance(converted.after_add, NormalizedActivation)
    assert isinstance(converted.after_add.input_correction, Standardize)


@pytest.mark.parametrize("cls", [Head, PreActivation])
def test_fold_state_dict_and_pickle_of_attached_corrections(cls):
    torch.manual_seed(0)
    converted = _convert(cls()).eval()
    with torch.no_grad():
        expected = converted(X)
        folded = fold(converted)
        assert relative_l2(folded(X), expected) <= 1e-6
        assert not any(isinstance(m, Standardize) for m in folded.modules())
        state = converted.state_dict()
        assert any(k.endswith("input_correction.scale") for k in state)
        torch.manual_seed(1)
        other = _convert(cls()).eval()
        other.load_state_dict(state)
        _bitwise(other(X), expected)
        buffer = io.BytesIO()
        torch.save(converted, buffer)
        buffer.seek(0)
        _bitwise(torch.load(buffer, weights_only=False)(X), expected)


def _graph(reads: str) -> tuple[fx.GraphModule, list[Correction]]:
    """A graph whose Standardize ``s`` is read once by a conv called once (``reads="once"``), by
    two convs (``"two"``), or once by a conv that is called again later (``"shared"``)."""
    root = nn.Module()
    root.s = Standardize(torch.tensor(0.5), torch.tensor(2.0))
    root.a = NormPropConv2d(3, 3, 1)
    root.b = NormPropConv2d(3, 3, 1)
    graph = fx.Graph()
    x = graph.placeholder("x")
    corrected = graph.call_module("s", (x,))
    out = graph.call_module("a", (corrected,))
    if reads == "two":
        out = graph.call_function(torch.add, (out, graph.call_module("b", (corrected,))))
    elif reads == "shared":
        out = graph.call_module("a", (out,))
    graph.output(out)
    record = Correction(path="s", consumer="a", source="x", reason="test", mean="0.5", scale="2", estimated=False)
    return fx.GraphModule(root, graph), [record]


@pytest.mark.parametrize("reads", ["two", "shared"])
def test_a_correction_no_single_module_call_can_hold_stays_a_node(reads):
    gm, records = _graph(reads)
    before = gm(X)
    gm, after = attach_corrections(gm, records)
    assert after == records
    assert any(n.op == "call_module" and n.target == "s" for n in gm.graph.nodes)
    assert all(input_correction(m) is None for m in gm.modules() if isinstance(m, NormPropConv2d))
    _to_rounding(gm(X), before)


def test_a_correction_read_once_by_a_module_called_once_moves_in():
    gm, records = _graph("once")
    before = gm(X)
    gm, after = attach_corrections(gm, records)
    assert [c.path for c in after] == ["a.input_correction"]
    assert not any(n.op == "call_module" and n.target == "s" for n in gm.graph.nodes)
    assert input_correction(gm.a) is not None and not hasattr(gm, "s")
    _to_rounding(gm(X), before)
