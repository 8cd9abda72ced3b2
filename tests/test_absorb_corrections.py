"""Pass 12 (passes/absorb_corrections.py): a scalar correction that reads only a normalized
activation's output is merged into that activation's affine; everything else stays a Standardize."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import fx, nn

import normprop_fx
from normprop_fx import NormalizedActivation, NormPropConv2d, Standardize
from normprop_fx.passes.absorb_corrections import absorb_corrections
from normprop_fx.passes.trace import NormPropTracer
from normprop_fx.records import Correction


def two_layers(act: type[nn.Module] = nn.ReLU) -> fx.GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(),
    )
    return normprop_fx.convert(model, flat=True)  # the tests read the graph the passes made


def with_correction(gm: fx.GraphModule, mean: torch.Tensor, scale: torch.Tensor, extra_reader: bool = False) -> tuple[fx.GraphModule, Correction]:
    """``gm`` with a Standardize between its two NormProp layers, as moment propagation inserts
    one; ``extra_reader`` makes the graph also return the uncorrected first-layer output."""
    gm = copy.deepcopy(gm)
    first = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    second = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "3")
    gm.add_submodule("correction", Standardize(mean, scale, reason="test"))
    with gm.graph.inserting_before(second):
        corrected = gm.graph.call_module("correction", (first,))
    second.replace_input_with(first, corrected)
    if extra_reader:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        output.args = ((output.args[0], first),)
    gm.recompile()
    record = Correction(path="correction", consumer="3", source="0", reason="test", mean=str(float(mean.mean())),
                        scale=str(float(scale.mean())), estimated=False)
    return gm, record


def standardizes(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Standardize)]


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU], ids=["relu", "silu"])
def test_scalar_correction_after_a_layer_is_merged_into_its_activation(act):
    gm, record = with_correction(two_layers(act), torch.tensor(0.3), torch.tensor(0.8))
    x = torch.randn(2, 3, 8, 8)
    expected = gm(x)
    merged, (new_record,) = absorb_corrections(gm, [record])
    assert standardizes(merged) == []
    activation = merged.get_submodule("0.activation")
    assert activation.has_correction and "then (o - 0.3) * 0.8" in repr(activation)
    assert new_record.path == "0.activation" and "applied by 0.activation's output affine" in new_record.reason
    torch.testing.assert_close(merged(x), expected, rtol=1e-6, atol=1e-6)
    # the gradient is unchanged too (the ReLU's is taken from the corrected output)
    gm.zero_grad()
    merged.zero_grad()
    gm(x).square().sum().backward()
    merged(x).square().sum().backward()
    torch.testing.assert_close(merged.get_submodule("0").weight.grad, gm.get_submodule("0").weight.grad, rtol=1e-5, atol=1e-6)
    # and the inference form folds the merged affine like any other
    torch.testing.assert_close(normprop_fx.fold(merged)(x), expected, rtol=1e-5, atol=1e-5)


def test_merged_correction_is_saved_and_restored_with_the_state_dict():
    gm, record = with_correction(two_layers(), torch.tensor(0.3), torch.tensor(0.8))
    merged, _ = absorb_corrections(gm, [record])
    state = merged.state_dict()
    assert float(state["0.activation.correction_mean"]) == pytest.approx(0.3)
    state["0.activation.correction_mean"] = torch.tensor(-0.2)
    state["0.activation.correction_scale"] = torch.tensor(1.5)
    merged.load_state_dict(state)
    # the forward's float constants follow the loaded buffers
    activation = merged.get_submodule("0.activation")
    u = torch.randn(100)
    own = (torch.relu(u) - activation.mean) / activation.std
    torch.testing.assert_close(activation(u), (own + 0.2) * 1.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("mean", "scale", "extra_reader", "why"),
    [
        (torch.full((8, 1, 1), 0.1), torch.full((8, 1, 1), 0.9), False, "per-channel"),
        (torch.tensor(0.1), torch.tensor(0.9), True, "the uncorrected value has another reader"),
    ],
    ids=["per-channel", "two-readers"],
)
def test_what_cannot_be_merged_stays_a_standardize(mean, scale, extra_reader, why):
    gm, record = with_correction(two_layers(), mean, scale, extra_reader)
    x = torch.randn(2, 3, 8, 8)
    expected = gm(x)
    kept, records = absorb_corrections(gm, [record])
    assert standardizes(kept) == ["correction"], why
    assert records == [record] and not kept.get_submodule("0.activation").has_correction
    torch.testing.assert_close(kept(x), expected)


def test_a_standardize_that_is_not_a_correction_of_this_conversion_is_left_alone():
    # no record: the Standardize came with the user's model, not from moment propagation
    gm, _ = with_correction(two_layers(), torch.tensor(0.3), torch.tensor(0.8))
    kept, records = absorb_corrections(gm, [])
    assert standardizes(kept) == ["correction"] and records == []


def test_identity_activation_keeps_its_correction():
    act = NormalizedActivation("identity")
    with pytest.raises(ValueError, match="identity"):
        act.absorb_correction(torch.tensor(0.0), torch.tensor(2.0))


def test_absorb_correction_refuses_bad_constants_and_a_second_correction():
    act = NormalizedActivation("relu")
    with pytest.raises(ValueError, match="scalar"):
        act.absorb_correction(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        act.absorb_correction(torch.tensor(0.0), torch.tensor(-1.0))
    act.absorb_correction(torch.tensor(0.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="already"):
        act.absorb_correction(torch.tensor(0.0), torch.tensor(2.0))


def test_mobilenet_v3_large_merges_every_scalar_correction_after_a_layer():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_large()
    converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 64, 64), flat=True)
    report = normprop_fx.conversion_report(converted)
    merged = [c for c in report.corrections if c.path.endswith(".activation")]
    assert len(merged) >= 5
    for c in merged:
        assert converted.get_submodule(c.path).has_correction
    # no scalar Standardize is left right after a NormProp layer that only it reads
    for node in converted.graph.nodes:
        if node.op == "call_module" and isinstance(converted.get_submodule(node.target), Standardize):
            source = node.args[0]
            module = converted.get_submodule(source.target) if source.op == "call_module" else None
            scalar = converted.get_submodule(node.target).mean.numel() == 1
            assert not (scalar and isinstance(module, normprop_fx.NormPropLayer) and len(source.users) == 1), node.target
    # every record points at a module of the converted model
    paths = dict(converted.named_modules())
    assert all(c.path in paths or c.path.endswith(".correction") for c in report.corrections)


def saved_activations(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the batch-sized 4-D tensors a compiled training step saves for its backward."""
    torch._dynamo.reset()
    compiled = normprop_fx.compile(model)
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = compiled(x)
    y.sum().backward()
    return [s for s in shapes if len(s) == 4 and s[0] == x.shape[0]]


def test_compiled_training_step_saves_one_tensor_per_layer_once_merged():
    # Why the pass exists: with the Standardize kept, the backward needs the activation's own
    # output (its gradient) and the corrected value (the next conv's), two tensors where a
    # network without normalization saves one. Merged, the corrected output serves both.
    gm, record = with_correction(two_layers(), torch.tensor(0.3), torch.tensor(0.8))
    x = torch.randn(4, 3, 16, 16)
    kept = saved_activations(copy.deepcopy(gm), x)
    merged = saved_activations(absorb_corrections(copy.deepcopy(gm), [record])[0], x)
    floor = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    )
    assert len(merged) == len(saved_activations(floor, x)) == len(kept) - 1, (kept, merged)


class ResidualBlock(nn.Module):
    """``y = a(x)``, then ``b(correction(y)) + y`` (a ResNet's identity block), or with
    ``second`` set, ``b(correction(y)) + c(second(y))`` (a downsampling block: the same value
    corrected for two convs)."""

    def __init__(self, second: tuple[float, float] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = NormPropConv2d(3, 8, 3, padding=1, activation="relu")
        self.correction = Standardize(torch.tensor(0.3), torch.tensor(0.8))
        self.b = NormPropConv2d(8, 8, 3, padding=1, activation="relu")
        self.second = None if second is None else Standardize(torch.tensor(second[0]), torch.tensor(second[1]))
        self.c = NormPropConv2d(8, 8, 1, activation="identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        out = self.b(self.correction(y))
        return out + (y if self.second is None else self.c(self.second(y)))


def traced_with_records(model: nn.Module) -> tuple[fx.GraphModule, list[Correction]]:
    gm = fx.GraphModule(model, NormPropTracer().trace(model))
    records = [
        Correction(path=n.target, consumer=str(next(iter(n.users))), source="a", reason="test", mean="", scale="", estimated=False)
        for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Standardize)
    ]
    return gm, records


def check_same_function(before: fx.GraphModule, after: fx.GraphModule) -> None:
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(after(x), before(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normprop_fx.fold(after)(x), before(x), rtol=1e-5, atol=1e-5)


def test_residual_add_takes_the_uncorrected_value_back():
    gm, records = traced_with_records(ResidualBlock())
    merged, new_records = absorb_corrections(copy.deepcopy(gm), records)
    check_same_function(gm, merged)
    assert merged.get_submodule("a.activation").has_correction
    # the add reads z / 0.8 + 0.3: Standardize(mean=-0.3 * 0.8, scale=1 / 0.8)
    (restore,) = standardizes(merged)
    module = merged.get_submodule(restore)
    assert float(module.mean) == pytest.approx(-0.24) and float(module.scale) == pytest.approx(1.25)
    assert [r.path for r in new_records] == ["a.activation", restore]
    assert "restores the uncorrected output of a" in new_records[1].reason
    # compiled, the step saves one tensor less: z serves a's backward and b's
    x = torch.randn(4, 3, 16, 16)
    assert len(saved_activations(merged, x)) == len(saved_activations(gm, x)) - 1


@pytest.mark.parametrize(("second", "left"), [((0.3, 0.8), 0), ((0.1, 0.5), 1)], ids=["same", "different"])
def test_a_second_correction_of_the_same_value_is_composed_or_dropped(second, left):
    gm, records = traced_with_records(ResidualBlock(second))
    merged, new_records = absorb_corrections(copy.deepcopy(gm), records)
    check_same_function(gm, merged)
    assert len(standardizes(merged)) == left and len(new_records) == 2
    if left:
        composed = merged.get_submodule("second")
        # ((z / 0.8 + 0.3) - 0.1) * 0.5 = (z + 0.16) * 0.625
        assert float(composed.mean) == pytest.approx(-0.16) and float(composed.scale) == pytest.approx(0.625)
    else:
        assert {r.path for r in new_records} == {"a.activation"}
