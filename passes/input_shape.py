"""Pass 9: the example input shape that moment propagation runs on, given or inferred from the model;
and, before matching (pass 6), the ranks of the values that a Linear -> BatchNorm1d pattern depends on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from normprop_fx.errors import InvalidOptionError, NormPropError

from .graph_utils import restore_buffers, save_buffers
from .patterns import PRODUCER_PATTERNS, lookup_by_type

DEFAULT_SPATIAL = 224
_SPATIAL_DEFAULTS = {1: (DEFAULT_SPATIAL,), 2: (DEFAULT_SPATIAL, DEFAULT_SPATIAL), 3: (16, 112, 112)}


def resolve_example_inputs(
    model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None
) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...]]:
    """The example inputs (meta tensors are fine: only shapes are read) and, when they were
    inferred, one report line that says which shape was assumed."""
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
            raise InvalidOptionError("example_inputs must be a tensor or a sequence of tensors")
        return inputs, ()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NormPropError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs: pass example_inputs= "
            "so the nominal moments can be computed"
        )
    shape = _timm_input_size(model) or _first_layer_shape(gm, placeholders[0])
    if shape is None:
        raise NormPropError(
            f"cannot tell the input shape of {type(model).__name__} (its input does not go straight "
            "into a Conv or Linear): pass example_inputs=torch.empty(...) with one example's shape"
        )
    shape = (2, *shape)
    line = (
        f"nominal moments computed for input shape {shape} (inferred; pass example_inputs= for the "
        "resolution you train at: pooling corrections depend on it)"
    )
    return (torch.empty(shape, device="meta"),), (line,)


def _timm_input_size(model: nn.Module) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(int(s) for s in size) if size else None


def _first_layer_shape(gm: fx.GraphModule, placeholder: fx.Node) -> tuple[int, ...] | None:
    """(C, *spatial) for the first Conv (224 pixels a side), (features,) for a first Linear."""
    frontier = [placeholder]
    seen = set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op == "call_module":
                module = gm.get_submodule(str(user.target))
                in_channels = getattr(module, "in_channels", None)
                weight = getattr(module, "weight", None)
                if in_channels is not None and isinstance(weight, torch.Tensor):
                    return (in_channels, *_SPATIAL_DEFAULTS.get(weight.dim() - 2, ()))
                in_features = getattr(module, "in_features", None)
                if in_features is not None:
                    return (in_features,)
            frontier.append(user)
    return None


#: ``node.meta`` key: the shape of the value a node computes on the example input (see below).
SHAPE = "normprop_shape"


def record_linear_input_shapes(model: nn.Module, gm: fx.GraphModule,
                               example_inputs: Sequence[torch.Tensor] | torch.Tensor | None) -> None:
    """Record ``node.meta[SHAPE]`` on the input of every producer whose pattern holds only for one
    input rank (``ProducerPattern.input_dim``: Linear -> BatchNorm1d) and that feeds one of its
    norms, from a shape propagation of ``gm`` on the example inputs (given or inferred) under a
    FakeTensorMode: nothing is computed and no module's state changes, whatever its mode. On
    (N, L, C) input a BatchNorm1d normalizes dim 1, whatever its size, not the Linear's output
    features; pass 6 checks the rank with these shapes. When the shapes cannot be had (no
    inferable input, an op fake tensors do not support), nothing is recorded and the NormProp
    layer checks the rank at run time instead."""
    sources = [n.args[0] for n in gm.graph.nodes if n.args and isinstance(n.args[0], fx.Node) and _rank_bound_producer(gm, n)]
    if not sources:
        return
    try:
        inputs, _ = resolve_example_inputs(model, gm, example_inputs)
        shapes = fake_shapes(gm, [tuple(x.shape) for x in inputs], [x.dtype for x in inputs])
    except Exception:  # noqa: BLE001 - no shapes: the run-time check stays
        return
    for source in sources:
        if shapes.get(source) is not None:
            source.meta[SHAPE] = shapes[source]


def fake_shapes(gm: fx.GraphModule, shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[torch.dtype]) -> dict[fx.Node, tuple[int, ...]]:
    """The shape of every tensor-valued node of ``gm`` on inputs of ``shapes``, found by running
    ``gm`` on fake inputs under a FakeTensorMode (as ``torch.fx.passes.shape_prop`` does, but
    without its deep copy of the model, which recursed too deep on torchvision's EfficientNet):
    nothing is computed. A buffer that the forward updates in place on the real tensor (a
    BatchNorm's ``num_batches_tracked += 1`` in train mode does) is restored afterwards, so no
    module's state changes. Raises what the model raises on such inputs (or what fake tensors do
    not support)."""
    return {n: s.shape for n, s in fake_signatures(gm, shapes, dtypes).items() if isinstance(s, TensorSignature)}


@dataclass(frozen=True)
class TensorSignature:
    """A tensor as :func:`fake_signatures` records it: what is known without computing it."""

    shape: tuple[int, ...]
    floating: bool


class _Opaque:
    """A value :func:`fake_signatures` cannot describe: equal to nothing, itself included."""

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__


_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSignature(tuple(value.shape), value.is_floating_point())
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return (slice, _signature(value.start), _signature(value.stop), _signature(value.step))
    return value if isinstance(value, _PLAIN) else _Opaque()


def fake_signatures(gm: fx.GraphModule, shapes: Sequence[tuple[int, ...]],
                    dtypes: Sequence[torch.dtype]) -> dict[fx.Node, Any]:
    """What every node of ``gm`` computes on inputs of ``shapes``, as far as it is known without
    computing anything (the FakeTensorMode run of :func:`fake_shapes`): a tensor as its
    :class:`TensorSignature`, a size or an int read off a shape as its value, a container as the
    signatures of its items; anything else compares unequal to everything. Comparing two runs
    with other batch sizes tells which values carry the batch (``passes.calibration_sample``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    found: dict[fx.Node, Any] = {}

    class _Signatures(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            found[n] = _signature(value)
            return value

    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    saved = save_buffers(gm)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            fake = [mode.from_tensor(torch.empty(shape, dtype=dtype, device=device)) for shape, dtype in zip(shapes, dtypes)]
            _Signatures(gm).run(*fake)
    finally:
        restore_buffers(gm, saved)
    return found


def _rank_bound_producer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` calls a producer whose pattern has an ``input_dim`` and feeds one of its norms."""
    if node.op != "call_module":
        return False
    pattern = lookup_by_type(PRODUCER_PATTERNS, gm.get_submodule(str(node.target)))
    return pattern is not None and pattern.input_dim is not None and any(
        u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), pattern.norms) for u in node.users)
