"""``normprop_fx.fold``: the exact inference form of a converted network.

Every NormProp module becomes the plain operations it computes, with all constants baked in, in
the algebra of its eager form (docs/method.md section 10):

- ``NormPropConv{1,2,3}d`` / ``NormPropLinear`` -> ``nn.Conv{1,2,3}d`` / ``nn.Linear`` with weight
  ``gamma * a * W / ||W||`` and bias ``beta * a + c``, where ``u * a + c`` is the activation's input
  affine: for the clamp family (ReLU, ReLU6, Hardtanh) the whole standardization
  ``(f(u) - c_mean) / c_std = clamp(u / c_std - c_mean / c_std, ...)``, so the layer folds to conv +
  clamp (``F.hardtanh``) with no constant affine; for LeakyReLU its scale (its shift stays); for
  any other ``f`` nothing, ``f`` then the constant affine. A layer that keeps a trained BatchNorm's
  function folds to plain conv + activation, as its BN-folded original;
- ``NormalizedActivation`` -> its input affine, then the clamp (or ``f`` and what is left);
- ``NormPropAffine`` -> its per-channel affine with its activation's input affine in it (on dim 1,
  with its input standardization by running statistics when it keeps a trained BatchNorm's
  function), then the clamp (or ``f`` and its constant affine);
- ``Standardize`` -> the constant affine ``x * scale - mean * scale``.

Then the constant affines are moved and folded where that is exact, in small counted sub-passes
(``folded.fold_report`` counts them and lists every affine left with the reason it stays):

- merged into a constant affine that directly follows;
- moved in front of a max pool or clamp (a positive scalar commutes with both; the clamp's bounds
  map) and folded into the Conv/Linear that computes their input (``(W x + b) s + t``: exact
  whatever the padding), or into a residual add of such a layer's output (``torch.add(p', q,
  alpha)``);
- moved behind a pool, flatten or reshape, and folded into the *following* Conv/Linear
  (docs/method.md section 2: a per-input-channel scale commutes with the weights; a shift becomes
  ``W @ shift`` added to the bias) where: the affine's output has that layer as its single user and
  the layer is called once; the affine is scalar or per input channel of the layer (shape
  ``(C, 1, ..)`` for a conv, ``(C,)`` for a Linear); and a shift meets no zero padding (no padding,
  or a ``padding_mode`` that pads with copies of the input);
- a scalar affine on one operand of an add folded into the layer of the other operand and the
  add's alpha;
- a shift that a zero-padded strided conv's padding would see goes behind that conv as
  :class:`ShiftedInputConv`: the conv plus a kept map of the shift's conv, added to its (smaller)
  output.

Everything that cannot be folded stays as a :class:`ConstantAffine` module, computed exactly.
Modules normprop-fx does not know are kept as they are.

fold is a graph pass, built on ``passes.graph_utils`` like the others, but it stays here rather
than under ``passes/``: it is an entry point of its own on a converted model (``passes/`` holds
the steps of ``convert``'s pipeline, see ``passes/__init__.py``), and :class:`ConstantAffine`, a
module every folded model contains, is pickled and printed as ``normprop_fx.fold.ConstantAffine``.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activation_functions import ACTIVATION_FUNCTIONS
from .affine import NormPropAffine
from .conv_same import NormPropConv2dSame, pad_same
from .eager import has_hooks, is_compiling, records_gradient, scalar_affine, scalar_affine_, tensor_affine
from .errors import NormPropError
from .layers import NormPropLayer, NormPropLinear, _NormPropConvNd
from .normalized_activation import NormalizedActivation
from .opaque_affine import OpaqueNormPropAffine
from .module_types import NORMPROP_MODULES
from .passes.graph_utils import free_module_name, has_submodule, module_uses, set_submodule
from .passes.trace import trace
from .records import REPORT_ATTRIBUTE, ConversionReport
from .standardize import Standardize, input_correction

logger = logging.getLogger(__name__)

_CONVS: dict[int, type[nn.modules.conv._ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: The adds fold rewrites (``a + b``, ``torch.add(a, b, alpha=...)``).
_ADDS = (operator.add, torch.add)
#: Functions whose output has the rank of their widest input (for _min_ranks).
_ELEMENTWISE = (F.relu, F.relu6, F.leaky_relu, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.elu, F.mish, torch.sigmoid,
                torch.tanh, operator.mul, torch.mul)


class ConstantAffine(nn.Module):
    """``x * scale + shift`` with constant (buffer) ``scale`` and ``shift``.

    ``channel_dim=None``: the buffers broadcast against the input as they are (shape ``()``,
    ``(C, 1, 1)``, ``(C,)``...). ``channel_dim=1``: they are 1-D per-channel vectors applied on
    dim 1 whatever the input rank, as BatchNorm and NormPropAffine do.
    """

    if TYPE_CHECKING:  # (at run time torch.jit.script would read them, as strings it cannot resolve)
        scale: torch.Tensor
        shift: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int | None = None) -> None:
        super().__init__()
        if channel_dim not in (None, 1):
            raise NormPropError(f"ConstantAffine: channel_dim must be None or 1, got {channel_dim!r}")
        self.register_buffer("scale", torch.as_tensor(scale).detach().clone())
        self.register_buffer("shift", torch.as_tensor(shift).detach().clone())
        self.channel_dim = channel_dim
        #: overwrite the input (fold sets it where the input is a fresh tensor nothing else
        #: reads); only while no gradient is recorded, and never scripted, traced or compiled
        self.inplace = False
        self._cache_scalars()
        self.register_load_state_dict_post_hook(_cache_scalars_after_load)  # (a lambda would not pickle)

    def _cache_scalars(self) -> None:
        """Scalar constants as Python floats too: inductor then writes them into the kernel as
        literals, where tensor scalars are loaded and converted on every iteration (10% of a
        compiled SiLU kernel on CPU)."""
        self._scalars = (float(self.scale), float(self.shift)) if self.is_scalar else None

    @property
    def is_scalar(self) -> bool:
        return self.scale.numel() == 1 and self.shift.numel() == 1 and self.scale.dim() == 0 and self.shift.dim() == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._scalars is not None:
            if not torch.jit.is_scripting():  # (TorchScript compiles only the line after this block)
                if self._in_place(x):
                    return scalar_affine_(x, self._scalars[0], self._scalars[1])
                if not is_compiling():
                    return scalar_affine(x, self._scalars[0], self._scalars[1])  # eager: one pass, not two
            return x * self._scalars[0] + self._scalars[1]
        scale, shift = self.scale.to(x.dtype), self.shift.to(x.dtype)
        if self.channel_dim is not None:
            shape = (-1,) + (1,) * (x.dim() - 2)
            scale, shift = scale.reshape(shape), shift.reshape(shape)
        if not torch.jit.is_scripting():
            if self._in_place(x) and torch.broadcast_shapes(x.shape, scale.shape, shift.shape) == x.shape:
                return x.mul_(scale).add_(shift)  # (in place only where the buffers do not widen x)
            return tensor_affine(x, scale, shift)
        return torch.addcmul(shift, x, scale)

    @torch.jit.unused
    def _in_place(self, x: torch.Tensor) -> bool:
        return (getattr(self, "inplace", False) and not isinstance(x, fx.Proxy) and not is_compiling()
                and not torch.jit.is_tracing() and not records_gradient(x))

    def extra_repr(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            return f"{t.item():.6g}" if t.numel() == 1 else f"{tuple(t.shape)}"

        where = "" if self.channel_dim is None else f", channel_dim={self.channel_dim}"
        return f"scale={fmt(self.scale)}, shift={fmt(self.shift)}{where}"


def _cache_scalars_after_load(module: ConstantAffine, _incompatible_keys: object) -> None:
    module._cache_scalars()


def fold(converted: nn.Module) -> fx.GraphModule:
    """The inference form of ``converted`` (a model :func:`normprop_fx.convert` returned), in
    eval mode, with no NormProp module left: one flat GraphModule of plain layers (the module
    tree of a converted model is traced flat first, with the conversion's leaf modules kept).
    ``converted`` is not modified. The one exception: a module the trace cannot enter (a leaf)
    is one call, so the NormProp modules inside it stay there, computing as in ``converted``;
    ``fold_report.inside_leaves`` lists them (mobilevitv2_100's three untraceable blocks).

    Its eval outputs equal ``converted.eval()``'s up to floating-point rounding. Raises
    NormPropError when ``converted`` is neither a GraphModule nor a model convert() returned.
    """
    report = getattr(converted, REPORT_ATTRIBUTE, None)
    if isinstance(report, ConversionReport):
        # traced flat, the conversion's leaf modules kept: a module tree's root may be a rebuilt
        # GraphModule whose children (rebuilt too, or the user's) hold the NormProp modules
        gm, _ = trace(copy.deepcopy(converted), [p for p in report.leaf_modules if has_submodule(converted, p)])
    elif isinstance(converted, fx.GraphModule):
        gm = copy.deepcopy(converted)
    else:
        raise NormPropError(
            f"fold() takes a model that normprop_fx.convert() returned (or a torch.fx.GraphModule), got "
            f"{type(converted).__name__}"
        )
    gm.eval()
    with torch.no_grad():
        counts = {
            "identities dropped": _drop_identities(gm),
            "NormProp modules expanded": _expand_normprop_modules(gm),
            "one-element affines made scalars": _one_element_affines_as_scalars(gm),
            "affines merged into the affine after them": _merge_consecutive_affines(gm),
            "made the only reader of their input, its adds reading them instead": _adds_read_the_affine(gm),
            "moved in front of a max pool or clamp": _move_affines(gm, backward=True),
            "merged after those moves": _merge_consecutive_affines(gm),
            "folded into the layer or add that computes their input": _fold_affines_into_preceding_ops(gm),
            "taken into the channel gate and the pool that read them": _fold_affines_into_gates(gm),
            "moved behind a pool, flatten or reshape": _move_affines(gm, backward=False),
            "folded into the layer that reads them": _fold_affines_into_following_layers(gm),
            "scales folded into the zero-padded layer that reads them (the shift kept)": _fold_scales_into_following_layers(gm),
            "shifts moved behind the strided zero-padded conv that reads them": _move_shifts_behind_strided_layers(gm),
            "folded into the add that reads them": _fold_affines_into_following_adds(gm),
            "activations and affines computed in place": _compute_in_place(gm),
        }
    gm.delete_all_unused_submodules()
    _drop_string_annotations(gm)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    gm.fold_report = FoldReport(counts, _kept_affines(gm), _normprop_modules_inside_leaves(gm))
    logger.info("%s", gm.fold_report)
    return gm


def _drop_string_annotations(gm: fx.GraphModule) -> None:
    """Forget the input and output annotations that reached the trace as strings (a model written
    under ``from __future__ import annotations``): the generated forward would name them as
    globals that torch.jit.script cannot resolve (``Unknown type name '_torch_Tensor_'``), and
    unannotated, TorchScript takes them as the tensors they are. (Annotations change nothing else.)"""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") and isinstance(node.type, str):
            node.type = None


@dataclass
class FoldReport:
    """What fold did (``folded.fold_report``): how many modules and affines each sub-pass
    handled, and every constant affine left in the folded graph with the reason it stays."""

    counts: dict[str, int]
    #: (the affine's node, why neither the op before nor the op after it could take it)
    kept_affines: list[tuple[str, str]] = field(default_factory=list)
    #: (a module the trace could not enter, the NormProp modules inside it): they compute there
    #: as in the converted model, exactly, but are not folded (fold sees one call of the module)
    inside_leaves: list[tuple[str, list[str]]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["fold: " + ", ".join(f"{n} {what}" for what, n in self.counts.items())]
        lines += [f"  constant affine kept: {name}: {why}" for name, why in self.kept_affines]
        if not self.kept_affines:
            lines.append("  no constant affine kept")
        lines += [f"  NormProp modules left inside {leaf} (a module the trace cannot enter; computed as converted, not folded): "
                  f"{', '.join(inside)}" for leaf, inside in self.inside_leaves]
        return "\n".join(lines)


# --- pass 0: drop the identities ------------------------------------------------------------------


def _drop_identities(gm: fx.GraphModule) -> int:
    """Remove every call of an ``nn.Identity`` (what a converted module tree keeps at the name of
    each BatchNorm it replaced): the graph reads the input instead, so that the affines around it
    meet the layers they can fold into."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity and len(node.args) == 1 \
                and not node.kwargs and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


# --- pass 1: NormProp modules -> plain layers, activations and constant affines ---------------


def _expand_normprop_modules(gm: fx.GraphModule) -> int:
    """Replace every call of a NormProp module by the plain ops it computes. A module called at
    several nodes (a shared layer) is replaced once; its plain layer stays shared."""
    _refuse_attribute_reads_of_normprop_modules(gm)
    replacements: dict[int, nn.Module] = {}

    def replacement(module: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
        if id(module) not in replacements:
            replacements[id(module)] = make()
        return replacements[id(module)]

    _split_input_corrections(gm)
    # read every call's module before replacing any: a shared module is called at several nodes
    calls = [(node, gm.get_submodule(node.target)) for node in gm.graph.nodes if node.op == "call_module"]
    expanded = 0
    for node, module in calls:
        if isinstance(module, NormPropLayer):
            set_submodule(gm, node.target, replacement(module, partial(_plain_layer, module)))
            _insert_input_padding(gm, node, module)
            _append_after(gm, node, _activation_ops(gm, node.target, module.activation))
        elif isinstance(module, NormalizedActivation):
            ops = _input_affine_ops(gm, node.target, _scalar_input_affine(module))
            _replace_node(gm, node, ops + _activation_ops(gm, node.target, module))
        elif isinstance(module, NormPropAffine):
            affine = replacement(module, partial(_channel_input_affine, module))
            ops = [_module_op(gm, f"{node.target}_affine", affine)]
            ops += _activation_ops(gm, node.target, module.activation)
            _replace_node(gm, node, ops)
        elif isinstance(module, Standardize):
            scale, mean = module.scale.double(), module.mean.double()
            set_submodule(gm, node.target, replacement(module, partial(ConstantAffine, scale, -mean * scale)))
        else:
            continue
        expanded += 1
    return expanded


def _split_input_corrections(gm: fx.GraphModule) -> None:
    """Give every input correction a NormProp module holds (passes/attach_corrections.py) a call
    of its own in front of the module's call, under ``<module>_input_correction``: it then
    expands to a constant affine like any correction, which the later sub-passes fold. The
    module itself is replaced by plain ops that do not apply it."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        correction = input_correction(gm.get_submodule(node.target))
        if correction is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        target = free_module_name(gm, f"{str(node.target).replace('.', '_')}_input_correction", first_suffix=1)
        gm.add_submodule(target, correction)
        with gm.graph.inserting_before(node):
            corrected = gm.graph.call_module(target, (node.args[0],))
        node.replace_input_with(node.args[0], corrected)


def _refuse_attribute_reads_of_normprop_modules(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner = node.target.rpartition(".")[0]
        if owner and isinstance(gm.get_submodule(owner), NORMPROP_MODULES):
            raise NormPropError(
                f"fold: node {node.name} reads {node.target} directly; the inference form replaces "
                f"{owner} with plain layers, so that read would change meaning. Fold a graph that "
                "only calls NormProp modules."
            )


def _insert_input_padding(gm: fx.GraphModule, node: fx.Node, layer: NormPropLayer) -> None:
    """A layer that pads its input itself before its conv (``NormPropConv2dSame``: TensorFlow's
    'SAME' padding, computed from the input's size at run time) keeps that padding in front of
    its plain conv, whose own padding is 0: a call of ``conv_same.pad_same`` on the node's input.
    A NormProp layer of any other subclass with a forward of its own has no plain form known."""
    if isinstance(layer, NormPropConv2dSame):
        with gm.graph.inserting_before(node):
            padded = gm.graph.call_function(pad_same, (node.args[0], layer.kernel_size, layer.stride, layer.dilation))
        node.replace_input_with(node.args[0], padded)
    elif type(layer).forward not in (NormPropLinear.forward, _NormPropConvNd.forward):
        raise NormPropError(f"fold: no plain form known for {type(layer).__name__}, whose forward is its own")
    elif getattr(type(layer), "_pad_input", _NormPropConvNd._pad_input) is not _NormPropConvNd._pad_input:
        raise NormPropError(f"fold: no plain form known for {type(layer).__name__}, whose input padding is its own")


def _plain_layer(layer: NormPropLayer) -> nn.Module:
    """The plain Conv/Linear of ``layer``: its normalized weight and beta, with its activation's
    input affine (:meth:`NormalizedActivation.eager_input_affine`) in them, as in the layer's
    eager form."""
    weight, bias = (t.detach() for t in layer._eager_weight_bias())
    factory = {"device": weight.device, "dtype": weight.dtype}
    plain: nn.Module
    if isinstance(layer, NormPropLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, **factory)
    elif isinstance(layer, _NormPropConvNd):
        plain = _CONVS[layer._dims](
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, bias=True, padding_mode=layer.padding_mode, **factory,
        )
    else:
        raise NormPropError(f"fold: no plain form known for {type(layer).__name__}")
    plain.weight = nn.Parameter(weight.clone(), requires_grad=False)
    plain.bias = nn.Parameter(bias.to(weight.dtype).clone(), requires_grad=False)
    return plain


#: An op to insert: (create the node from its input node).
_Op = Callable[[fx.Node], fx.Node]


def _activation_ops(gm: fx.GraphModule, base: str, act: NormalizedActivation) -> list[_Op]:
    """What ``act`` computes after its input affine ``u * a + c`` (which the caller has put into
    the layer in front or into a ConstantAffine of its own), as the eager form does: for the clamp
    family (ReLU, ReLU6, Hardtanh) one clamp and no constant affine; for LeakyReLU the activation
    and the shift; else ``f`` and ``* (1/c_std) + (-c_mean/c_std)``. Nothing for the identity, and
    ``f`` alone when the output is not standardized (a layer that keeps a trained BatchNorm's
    function)."""
    if act.spec.is_identity:
        return []
    if act.is_plain:
        return [_activation_op(act.spec.function.fn, act.spec.kwargs)]
    clamp = act.output_clamp()
    if clamp is not None:
        return [_activation_op(F.hardtanh, {"min_val": clamp[0], "max_val": clamp[1]})]
    moved, _ = act.eager_input_affine()  # LeakyReLU's scale went in front (no shift did)
    scale, shift = act._scale / moved, act._shift
    ops = [_activation_op(act.spec.function.fn, act.spec.kwargs)]
    if (scale, shift) != (1.0, 0.0):
        affine = ConstantAffine(torch.tensor(scale, dtype=torch.float64), torch.tensor(shift, dtype=torch.float64))
        ops.append(_module_op(gm, f"{base}_normalize", affine))
    return ops


def _scalar_input_affine(act: NormalizedActivation) -> ConstantAffine | None:
    """A standalone activation's input affine ``u * a + c`` as a ConstantAffine, None if it has none."""
    a, c = act.eager_input_affine()
    if (a, c) == (1.0, 0.0):
        return None
    return ConstantAffine(torch.tensor(a, dtype=torch.float64), torch.tensor(c, dtype=torch.float64))


def _channel_input_affine(affine: NormPropAffine) -> ConstantAffine:
    """A NormPropAffine's per-channel affine, its activation's input affine included."""
    scale, shift = (t.detach().double() for t in affine.channel_affine())
    a, c = affine.activation.eager_input_affine()
    return ConstantAffine(scale * a, shift * a + c, channel_dim=1)


def _input_affine_ops(gm: fx.GraphModule, base: str, affine: ConstantAffine | None) -> list[_Op]:
    return [] if affine is None else [_module_op(gm, f"{base}_input_affine", affine)]


def _activation_op(fn: Callable[..., torch.Tensor], kwargs: dict[str, Any]) -> _Op:
    def create(x: fx.Node) -> fx.Node:
        return x.graph.call_function(fn, (x,), kwargs)

    return create


def _module_op(gm: fx.GraphModule, name: str, module: nn.Module) -> _Op:
    target = _free_name(gm, name)
    gm.add_submodule(target, module)
    return lambda x: x.graph.call_module(target, (x,))


def _free_name(gm: fx.GraphModule, name: str) -> str:
    return free_module_name(gm, name, first_suffix=1)  # fold's own scheme: name, name_1, name_2...


def _append_after(gm: fx.GraphModule, node: fx.Node, ops: list[_Op]) -> None:
    """Insert ``ops`` as a chain after ``node``; ``node``'s users read the chain's end."""
    if not ops:
        return
    users = list(node.users)
    last = node
    with gm.graph.inserting_after(node):
        for op in ops:
            with gm.graph.inserting_after(last):
                last = op(last)
    for user in users:
        user.replace_input_with(node, last)


def _replace_node(gm: fx.GraphModule, node: fx.Node, ops: list[_Op]) -> None:
    """Replace a one-input call by the chain ``ops`` applied to that input."""
    if len(node.args) != 1 or node.kwargs:
        raise NormPropError(f"fold: node {node.name} ({node.target}) must take exactly one input")
    last = node.args[0]
    if not isinstance(last, fx.Node):
        raise NormPropError(f"fold: node {node.name} ({node.target}) has a constant input")
    anchor = node
    for op in ops:
        with gm.graph.inserting_before(anchor):
            last = op(last)
    node.replace_all_uses_with(last)
    gm.graph.erase_node(node)


# --- pass 2: one-element affines as scalars, and merges -----------------------------------------

#: The rank a layer's output has at least (a Conv{k}d's is k + 1, unbatched; a Linear's 1).
_LAYER_RANKS: tuple[tuple[tuple[type[nn.Module], ...], int], ...] = (
    ((nn.Linear,), 1),
    ((nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d), 2),
    ((nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), 3),
    ((nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), 4),
)


def _min_ranks(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """A lower bound of each node's output rank, from the layers it comes out of: what tells a
    one-element affine of shape (1, 1, 1) that it broadcasts to nothing wider than its input."""
    ranks: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        rank = 0
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            rank = next((r for types, r in _LAYER_RANKS if isinstance(module, types)), 0)
            if isinstance(module, ConstantAffine) and isinstance(node.args[0], fx.Node):
                rank = max(ranks.get(node.args[0], 0), module.scale.dim(), module.shift.dim())
        elif node.op == "call_function" and (node.target in _ADDS or node.target is F.hardtanh or node.target in _ELEMENTWISE):
            rank = max((ranks.get(a, 0) for a in node.args if isinstance(a, fx.Node)), default=0)
        ranks[node] = rank
    return ranks


def _one_element_affines_as_scalars(gm: fx.GraphModule) -> int:
    """An affine of one-element buffers (a scalar Standardize keeps shape (1, 1, 1)) whose
    broadcast cannot widen its input becomes a true scalar one, which the moves and folds below
    handle (a (1, 1, 1) affine moved behind a flatten would broadcast the output wider)."""
    ranks = _min_ranks(gm)
    made = 0
    for node in gm.graph.nodes:
        affine = _affine_of(gm, node)
        if affine is None or affine.is_scalar or affine.scale.numel() != 1 or affine.shift.numel() != 1:
            continue
        if max(affine.scale.dim(), affine.shift.dim()) > ranks.get(node.args[0], 0):
            continue
        scalar = ConstantAffine(affine.scale.reshape(()), affine.shift.reshape(()))
        target = _free_name(gm, f"{node.target}_scalar")
        gm.add_submodule(target, scalar)
        node.target = target
        made += 1
    return made




def _affine_of(gm: fx.GraphModule, node: Any) -> ConstantAffine | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, ConstantAffine):
            return module
    return None


def _affine_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, ConstantAffine]]:
    """Every call of a ConstantAffine, with the module, over a snapshot of the graph (a sub-pass
    may erase the node it is at, or one before it)."""
    for node in list(gm.graph.nodes):
        affine = _affine_of(gm, node)
        if affine is not None:
            yield node, affine


def _merge_consecutive_affines(gm: fx.GraphModule) -> int:
    """``(x * s1 + t1) * s2 + t2 = x * (s1 s2) + (t1 s2 + t2)`` when the first affine's only
    user is the second and both apply their buffers the same way (or one of them is scalar)."""
    merged = 0
    for node, second in _affine_nodes(gm):
        source = node.args[0]
        first = _affine_of(gm, source)
        if first is None or len(source.users) != 1:
            continue
        if first.channel_dim != second.channel_dim and not (first.is_scalar or second.is_scalar):
            continue
        channel_dim = second.channel_dim if first.is_scalar else first.channel_dim
        s1, t1, s2, t2 = (t.double() for t in (first.scale, first.shift, second.scale, second.shift))
        dtype = torch.promote_types(first.scale.dtype, second.scale.dtype)
        combined = ConstantAffine((s1 * s2).to(dtype), (t1 * s2 + t2).to(dtype), channel_dim)
        target = _free_name(gm, f"{node.target}_merged")
        gm.add_submodule(target, combined)
        node.target = target
        node.args = (source.args[0],)
        gm.graph.erase_node(source)
        merged += 1
    return merged


# --- pass 3: move a scalar affine past the ops it commutes with --------------------------------


def _adds_read_the_affine(gm: fx.GraphModule) -> int:
    """A scalar affine ``A = m * s + t`` whose input ``m`` is read by residual adds too becomes
    ``m``'s only reader, so that the next sub-pass can move it in front of ``m``'s max pool and
    clamp into the layer that computes ``m`` (resnet18: the correction after the stem's max pool,
    read by the first block's conv and its residual add). Each add ``p_factor * p + m_factor * m``
    reads ``A`` instead, ``m = (A - t) / s``: ``p' + (m_factor / s) * A`` with
    ``p' = p_factor * p - m_factor * t / s`` computed by ``p``'s layer (a plain Conv/Linear called
    once, its only reader the add). Done only when every other reader of ``m`` is such an add."""
    calls = module_uses(gm)
    rewritten = 0
    for node, affine in _affine_nodes(gm):
        m = node.args[0]
        if not (affine.is_scalar and affine._scalars[0] != 0 and isinstance(m, fx.Node)):
            continue
        adds = [user for user in m.users if user is not node]
        plans = [plan for add in adds if (plan := _add_reading(gm, add, m, calls)) is not None]
        if not adds or len(plans) != len(adds):
            continue
        s, t = affine._scalars
        m.append(node)  # A right after m: before every add that will read it
        for add, p, layer, p_factor, m_factor in plans:
            _rewrite_add(gm, add, p, layer, p_factor, -m_factor * t / s, node, m_factor / s)
        rewritten += 1
    return rewritten


def _add_reading(gm: fx.GraphModule, add: fx.Node, m: fx.Node, calls: dict[str, int]) -> tuple | None:
    """``(add, p, p's layer, p_factor, m_factor)`` when ``add`` is ``p_factor * p + m_factor * m``
    with ``p`` computed by a plain Conv/Linear called once whose only reader is ``add``."""
    operands = _add_operands(add)
    if operands is None:
        return None
    a, b, alpha = operands
    if (a is m) == (b is m):
        return None  # m on neither side, or on both
    p, p_factor, m_factor = (a, 1.0, alpha) if b is m else (b, alpha, 1.0)
    layer = _plain_layer_call(gm, p, calls, add)
    return None if layer is None else (add, p, layer, p_factor, m_factor)


#: Ops a positive scalar affine ``x * s + t`` (s > 0) commutes with: max pools (the max of
#: affinely mapped values is the mapped max; their -inf padding stays -inf) and the clamp that
#: fold writes for the ReLU family, whose bounds map too.
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_MAX_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                       F.adaptive_max_pool3d)
#: Ops any scalar affine commutes with: averages whose weights sum to one, and reshapes.
_AVERAGES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten)
_AVERAGE_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.flatten, torch.reshape)
_RESHAPE_METHODS = ("flatten", "reshape", "view", "squeeze", "unsqueeze")


def _commutes(gm: fx.GraphModule, node: fx.Node, affine: ConstantAffine) -> bool:
    """Whether ``node`` (its first argument the tensor) commutes with the scalar ``affine``."""
    if not affine.is_scalar or not (node.args and isinstance(node.args[0], fx.Node)):
        return False
    positive = affine._scalars[0] > 0
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _AVERAGES) or (positive and isinstance(module, _MAX_POOLS) and not getattr(module, "return_indices", False))
    if node.op == "call_function":
        if node.target in _AVERAGE_FUNCTIONS:
            return True
        if node.target is F.hardtanh:
            return positive and set(node.kwargs) == {"min_val", "max_val"} and len(node.args) == 1
        return positive and node.target in _MAX_POOL_FUNCTIONS and not node.kwargs.get("return_indices", False)
    return node.op == "call_method" and node.target in _RESHAPE_METHODS


def _move_affines(gm: fx.GraphModule, *, backward: bool) -> int:
    """Move scalar affines in front of the op that computes their input (``backward``: toward a
    layer that can take them) or behind the op that reads them (toward a layer that reads them),
    where the op commutes with the affine and the two read each other only. Repeated until no
    affine moves: a clamp then a max pool are passed one after the other."""
    moved = 0
    while True:
        count = 0
        for node, affine in _affine_nodes(gm):
            if backward:
                first, second = node.args[0], node  # the op, then the affine
            elif len(node.users) == 1:
                first, second = node, next(iter(node.users))  # the affine, then the op
            else:
                continue
            op = first if backward else second
            if not (isinstance(first, fx.Node) and list(first.users) == [second] and second.args[:1] == (first,)):
                continue
            if not _commutes(gm, op, affine) or op.args[1:].count(first) or first in op.kwargs.values():
                continue
            _swap(first, second)
            if op.target is F.hardtanh and backward:  # the bounds go through the affine
                s, t = affine._scalars
                op.kwargs = {"min_val": op.kwargs["min_val"] * s + t, "max_val": op.kwargs["max_val"] * s + t}
            elif op.target is F.hardtanh:
                s, t = affine._scalars
                op.kwargs = {"min_val": (op.kwargs["min_val"] - t) / s, "max_val": (op.kwargs["max_val"] - t) / s}
            count += 1
        if not count:
            return moved
        moved += count


def _swap(first: fx.Node, second: fx.Node) -> None:
    """``second(first(x, ...), ...)`` -> ``first(second(x, ...), ...)``: ``first``'s only reader
    is ``second``, and each takes the tensor as its first argument."""
    x = first.args[0]
    second.replace_all_uses_with(first)
    # first now runs after second, where second stood: every other input of either is defined
    # before that place (second's may not be before first's: a reshape to ``x.shape`` read later)
    second.append(first)
    second.args = (x, *second.args[1:])
    first.args = (second, *first.args[1:])


# --- pass 4: fold an affine into the Conv/Linear or the add that computes its input ------------


def _plain_layer_call(gm: fx.GraphModule, node: Any, calls: dict[str, int], reader: fx.Node) -> nn.Module | None:
    """The plain Conv/Linear ``node`` calls, when ``reader`` is the only reader of its output
    and the layer is called nowhere else (so changing its weights changes only this use)."""
    if not (isinstance(node, fx.Node) and node.op == "call_module" and list(node.users) == [reader]):
        return None
    if calls.get(node.target, 0) != 1:
        return None
    layer = gm.get_submodule(node.target)
    return layer if type(layer) is nn.Linear or type(layer) in _CONVS.values() else None


def _per_output_channel(affine: ConstantAffine, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The affine as per-output-channel ``(scale, shift)`` vectors of ``layer``: scalar, or shaped
    as a channel of the layer's output broadcasts (``(C, 1, ..)`` for a conv, ``(C,)`` for a
    Linear); None otherwise."""
    out, spatial = _out_features(layer), (0 if type(layer) is nn.Linear else len(layer.kernel_size))
    if affine.channel_dim is not None and not affine.is_scalar:
        return None  # dim 1 is the channel only for batched input: not provably the same
    vectors = []
    for t in (affine.scale, affine.shift):
        if t.numel() == 1 and t.dim() <= 1 + spatial:
            vectors.append(t.double().reshape(()).expand(out))
        elif t.dim() == 1 + spatial and t.shape[0] == out and all(d == 1 for d in t.shape[1:]):
            vectors.append(t.double().reshape(out))
        else:
            return None
    return vectors[0], vectors[1]


def _layer_with_folded_output_affine(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` computing ``layer(x) * scale + shift`` for per-output-channel vectors:
    ``(W x + b) * s + t = (s W) x + (s b + t)``, exact whatever the padding."""
    w, bias = _weight_and_bias(layer)
    return _with_weight_and_bias(layer, w * scale.reshape(-1, *([1] * (w.dim() - 1))), bias * scale + shift)


def _weight_and_bias(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain Conv/Linear's weight and bias (zeros where it has none), in float64."""
    w = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    return w, bias


def _with_weight_and_bias(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` (its hyper-parameters; ``layer`` is not changed) with this weight and
    bias, in the layer's dtype, frozen."""
    new = copy.copy(layer)
    new._parameters = dict(layer._parameters)
    dtype = layer.weight.dtype
    new.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    new.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return new




def _add_operands(node: Any) -> tuple[Any, Any, float] | None:
    """``(a, b, alpha)`` of an add ``a + alpha * b`` of two graph values, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ADDS and len(node.args) == 2):
        return None
    if set(node.kwargs) - {"alpha"}:
        return None
    a, b = node.args
    alpha = node.kwargs.get("alpha", 1)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and isinstance(alpha, (int, float))):
        return None
    return a, b, float(alpha)


def _fold_affines_into_preceding_ops(gm: fx.GraphModule) -> int:
    """Fold an affine into the op that computes its input, where that is exact whatever the input:

    - a plain Conv/Linear whose only reader is the affine (per output channel or scalar);
    - an add ``p + alpha * q`` of such a layer's output ``p`` and anything (a scalar affine):
      ``(p + alpha q) s + t = (s p + t) + (alpha s) q``, the layer takes ``s`` and ``t`` and the
      add becomes ``torch.add(p', q, alpha=alpha * s)``, one op as before (the same for ``p``
      on the right). This is the affine that moment propagation puts after a residual add.
    """
    calls = module_uses(gm)
    folded = 0
    for node, affine in _affine_nodes(gm):
        source = node.args[0]
        layer = _plain_layer_call(gm, source, calls, node)
        if layer is not None and (per_channel := _per_output_channel(affine, layer)) is not None:
            set_submodule(gm, source.target, _layer_with_folded_output_affine(layer, *per_channel))
        elif not (affine.is_scalar and _fold_scalar_affine_into_add(gm, source, affine, calls, node)):
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    return folded


def _fold_scalar_affine_into_add(gm: fx.GraphModule, add: Any, affine: ConstantAffine, calls: dict[str, int],
                                 reader: fx.Node) -> bool:
    operands = _add_operands(add)
    if operands is None or list(add.users) != [reader]:
        return False
    a, b, alpha = operands
    s, t = affine._scalars
    for p, q, p_factor, q_factor in ((a, b, 1.0, alpha), (b, a, alpha, 1.0)):
        layer = _plain_layer_call(gm, p, calls, add)
        if layer is None or p is q:
            continue
        # a + alpha b = p_factor * p + q_factor * q; times s plus t: p' = (p_factor s) p + t
        _rewrite_add(gm, add, p, layer, p_factor * s, t, q, q_factor * s)
        return True
    return False


def _rewrite_add(gm: fx.GraphModule, add: fx.Node, p: fx.Node, layer: nn.Module, p_scale: float, p_shift: float,
                 q: fx.Node, alpha: float) -> None:
    """``add`` becomes ``torch.add(p', q, alpha=alpha)``, ``p' = p * p_scale + p_shift`` computed
    by ``p``'s layer (whose only reader is ``add``), its weight and bias scaled and shifted."""
    scale = torch.full((_out_features(layer),), p_scale, dtype=torch.float64)
    set_submodule(gm, p.target, _layer_with_folded_output_affine(layer, scale, torch.full_like(scale, p_shift)))
    add.target, add.args, add.kwargs = torch.add, (p, q), {"alpha": alpha}


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if type(layer) is nn.Linear else layer.out_channels


# --- pass 4b: an affine read by a squeeze-excitation block ---------------------------------------

#: Averages over spatial dimensions a scalar affine commutes with (an SE block's squeeze).
_SQUEEZES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_SQUEEZE_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
_MULS = (operator.mul, torch.mul)


def gated_affine(x: torch.Tensor, gate: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """``(x * scale + shift) * gate``; when ``gate`` is smaller than ``x`` (a squeeze-excitation
    gate, one value a channel) as ``x * (gate * scale)`` plus ``gate * shift`` in place, two
    passes over ``x`` where the affine and the product took three. (One ``addcmul`` with the two
    broadcast gates, tried first, profiled slower on CPU than the product and the add.) Else, and
    under torch.jit tracing (where the sizes are traced values and a trace records one branch),
    as written."""
    if not torch.jit.is_tracing() and gate.numel() < x.numel():
        return (x * (gate * scale)).add_(gate * shift)
    return (x * scale + shift) * gate


torch.fx.wrap("gated_affine")  # a leaf of a torch.fx trace of a folded model


def _fold_affines_into_gates(gm: fx.GraphModule) -> int:
    """A scalar affine ``A = y s + t`` read only by a squeeze-excitation block, its average pool
    (or ``mean``) and the product with the gate, needs no pass of its own: the pool reads ``y``
    and a copy of the affine goes after the pool (``pool(A) = pool(y) s + t``, then folded into
    the SE's first conv by the next sub-passes), and ``A * gate`` becomes
    :func:`gated_affine` of ``y`` (the product, then the gate's shift added in place). The SiLU
    normalization of each EfficientNet/MobileNetV3 SE block."""
    taken = 0
    for node, affine in _affine_nodes(gm):
        y = node.args[0]
        users = list(node.users)
        if not (affine.is_scalar and isinstance(y, fx.Node) and users):
            continue
        pools = [u for u in users if _is_squeeze(gm, u, node)]
        products = [u for u in users if u.op == "call_function" and u.target in _MULS and len(u.args) == 2
                     and not u.kwargs and list(u.args).count(node) == 1]
        if not products or len(pools) + len(products) != len(users):
            continue
        s, t = affine._scalars
        for pool in pools:
            pool.replace_input_with(node, y)
            copy_target = _free_name(gm, f"{node.target}_after_pool")
            gm.add_submodule(copy_target, ConstantAffine(affine.scale.clone(), affine.shift.clone()))
            readers = list(pool.users)
            with gm.graph.inserting_after(pool):
                after = gm.graph.call_module(copy_target, (pool,))
            for reader in readers:
                reader.replace_input_with(pool, after)
        for product in products:
            gate = product.args[1] if product.args[0] is node else product.args[0]
            with gm.graph.inserting_before(product):
                gated = gm.graph.call_function(gated_affine, (y, gate, s, t))
            product.replace_all_uses_with(gated)
            gm.graph.erase_node(product)
        gm.graph.erase_node(node)
        taken += 1
    return taken


def _is_squeeze(gm: fx.GraphModule, node: fx.Node, reads: fx.Node) -> bool:
    """``node`` averages ``reads`` over its spatial dimensions: an adaptive average pool, or a
    ``mean`` over dimensions other than 0 and 1 (timm's SE: ``x.mean((2, 3), keepdim=True)``)."""
    if node.args[:1] != (reads,) or reads in node.args[1:] or reads in node.kwargs.values():
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _SQUEEZES)
    if node.op == "call_function":
        return node.target in _SQUEEZE_FUNCTIONS
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        return isinstance(dims, (tuple, list)) and len(dims) > 0 and all(isinstance(d, int) and (d >= 2 or d < 0) for d in dims) \
            and set(node.kwargs) <= {"dim", "keepdim"}
    return False


# --- pass 5: fold an affine into the Conv/Linear that reads it ---------------------------------


def _fold_affines_into_following_layers(gm: fx.GraphModule) -> int:
    calls = module_uses(gm)
    folded = 0
    for node, affine in _affine_nodes(gm):
        found = _following_layer(gm, node, affine, calls)
        if found is None:
            continue
        user, layer, scale, shift = found
        if bool((shift != 0).any()) and not _shift_commutes_with_padding(layer):
            continue
        set_submodule(gm, user.target, _layer_with_folded_input_affine(layer, scale, shift))
        user.replace_input_with(node, node.args[0])
        gm.graph.erase_node(node)
        folded += 1
    return folded


def _fold_scales_into_following_layers(gm: fx.GraphModule) -> int:
    """What pass 5 left because the layer's zero padding would see the shift: ``x * s + t`` =
    ``(x + t / s) * s``, and a per-input-channel scale commutes with zero padding, so the layer
    takes ``s`` and the affine keeps only the shift ``t / s``: one pass (an in-place add) instead
    of two (a SiLU's or Hardswish's normalization before a depthwise conv)."""
    folded = 0
    for node, affine, user, layer, scale, shift in _affines_called_once_before_a_layer(gm):
        if bool((scale == 1).all()) or not bool((scale != 0).all()):
            continue
        set_submodule(gm, user.target, _layer_with_folded_input_affine(layer, scale, torch.zeros_like(shift)))
        set_submodule(gm, node.target, ConstantAffine(torch.ones_like(affine.scale), affine.shift / affine.scale,
                                                      channel_dim=affine.channel_dim))
        folded += 1
    return folded


def _affines_called_once_before_a_layer(
        gm: fx.GraphModule) -> Iterator[tuple[fx.Node, ConstantAffine, fx.Node, nn.Module, torch.Tensor, torch.Tensor]]:
    """``(node, affine, reader node, layer, scale, shift)`` for every ConstantAffine called once
    whose only reader is a plain Conv/Linear called once, the affine per input channel of it."""
    calls = module_uses(gm)
    for node, affine in _affine_nodes(gm):
        found = _following_layer(gm, node, affine, calls)
        if found is not None and calls.get(node.target, 0) == 1:
            yield (node, affine, *found)


def _following_layer(gm: fx.GraphModule, node: fx.Node, affine: ConstantAffine,
                     calls: dict[str, int]) -> tuple[fx.Node, nn.Module, torch.Tensor, torch.Tensor] | None:
    """``(reader node, layer, scale, shift)`` when the affine's only reader is a plain
    Conv/Linear called once, with the affine per input channel of it."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or user.args[:1] != (node,) or node in user.args[1:] or user.kwargs:
        return None
    if calls.get(user.target, 0) != 1:
        return None  # a shared layer: folding would change its other calls
    layer = gm.get_submodule(user.target)
    per_channel = _per_input_channel(affine, layer)
    return None if per_channel is None else (user, layer, *per_channel)


def conv_of_shift(x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int) -> torch.Tensor:
    """What a zero-padded conv adds to its output when its input ``x`` is shifted by the
    per-input-channel ``shift``: the conv (no bias) of the shift alone, over ``x``'s shape with
    one sample. Constant inside (``shift`` times each filter's sum); at the border the padding
    sees zeros instead of the shift, so there it differs, which is why it is a map and not a bias.
    Broadcasts against the conv's output over the batch."""
    spatial = len(stride)
    size = [1, *x.shape[1:]] if x.dim() == spatial + 2 else list(x.shape)  # (or an unbatched input)
    filled = shift.to(x.dtype).reshape([-1] + [1] * spatial).expand(size).contiguous()
    return _CONV_FUNCTIONS[spatial](filled, weight, None, stride, padding, dilation, groups)


class ShiftedInputConv(nn.Module):
    """``conv(x + shift)`` for a zero-padded strided conv (a per-input-channel ``shift``).

    In plain eager mode: ``conv(x)`` plus :func:`conv_of_shift`, a map of one sample's output
    shape, added in place to the conv's fresh output: one pass over the strided conv's output
    (a quarter of its input at stride 2) where the shift added in front of the conv took one
    over the input (what fold otherwise leaves in front of a zero-padded depthwise conv whose
    input is a SiLU's or Hardswish's normalized output). The map depends on the input's shape
    only, so it is computed once per input shape, dtype and device and kept (a few entries),
    and computed anew when the conv's weight or the shift change (their version counters).

    Everywhere else (a gradient may flow through the weights, torch.compile and torch.export,
    tracing, scripting, torch.func transforms) it is the shift added in front, as written: a
    compiler fuses that add into the op that computes ``x``, and no kept tensor can leak into a
    trace."""

    if TYPE_CHECKING:
        shift: torch.Tensor

    #: input shapes whose map is kept
    MAX_KEPT = 8
    #: (the kept maps are an eager-mode cache; TorchScript would try to type the dict)
    __jit_ignored_attributes__ = ["_maps"]

    def __init__(self, conv: nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        if type(conv) not in _CONVS.values() or isinstance(conv.padding, str):
            raise NormPropError(f"ShiftedInputConv takes a Conv1d/2d/3d with integer padding, got {conv!r}")
        self.conv = conv
        self.register_buffer("shift", shift.detach().to(conv.weight.dtype).reshape(-1).clone())
        self.stride: list[int] = list(conv.stride)
        self.padding: list[int] = list(conv.padding)
        self.dilation: list[int] = list(conv.dilation)
        self.groups: int = conv.groups
        self._maps: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            the_map = self._kept_map(x)
            if the_map is not None:
                out = self.conv(x)  # (a hook on the conv may keep its output: then not in place)
                return out + the_map if records_gradient(out) or has_hooks(self.conv) else out.add_(the_map)
        return self.conv(x + self.shift.reshape([-1] + [1] * len(self.stride)))

    @torch.jit.unused
    def _kept_map(self, x: torch.Tensor) -> torch.Tensor | None:
        """The map for ``x``'s shape, computed once; None where the shift must go in front."""
        weight, shift = self.conv.weight, self.shift
        if (isinstance(x, fx.Proxy) or torch.jit.is_tracing() or is_compiling()
                or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (x, weight, shift))
                or (torch.is_grad_enabled() and (weight.requires_grad or shift.requires_grad))):
            return None
        batched = x.dim() == len(self.stride) + 2
        key = (batched, tuple(x.shape[1:] if batched else x.shape), x.dtype, x.device,
               weight.data_ptr(), weight._version, shift.data_ptr(), shift._version)
        found = self._maps.get(key)
        if found is None:
            with torch.no_grad():
                found = conv_of_shift(x, shift, weight, self.stride, self.padding, self.dilation, self.groups)
            if len(self._maps) >= self.MAX_KEPT:
                self._maps.pop(next(iter(self._maps)))
            self._maps[key] = found
        return found

    def extra_repr(self) -> str:
        return f"shift={tuple(self.shift.shape)}"


def _move_shifts_behind_strided_layers(gm: fx.GraphModule) -> int:
    """A shift that pass 5b left in front of a zero-padded conv (the conv took its scale) whose
    output is at most half the size of its input (stride 2 and more: the stride-2 depthwise convs
    of EfficientNet and MobileNetV3) goes behind it as :class:`ShiftedInputConv`: the same
    function, its pass over the output instead of over the input. In front of a conv that is not
    strided the in-place add stays: there the map measured no faster than the shift
    (docs/method.md section 10)."""
    moved = 0
    for node, _, user, layer, scale, shift in _affines_called_once_before_a_layer(gm):
        if type(layer) not in _CONVS.values() or isinstance(layer.padding, str) or not bool((scale == 1).all()):
            continue
        strides = math.prod(layer.stride)
        if strides == 1 or layer.out_channels * 2 > layer.in_channels * strides:
            continue  # not a strided conv whose output is at most half its input: nothing measured to gain
        set_submodule(gm, user.target, ShiftedInputConv(layer, shift))
        user.replace_input_with(node, node.args[0])
        gm.graph.erase_node(node)
        moved += 1
    return moved


# --- pass 6: fold a scalar affine into the add that reads it -----------------------------------


def _fold_affines_into_following_adds(gm: fx.GraphModule) -> int:
    """``p + alpha * (q s + t)`` -> ``p' + (alpha s) * q`` with ``t`` in the bias of the layer
    that computes ``p`` (its only reader the add): the correction that moment propagation puts
    on a residual's identity path."""
    calls = module_uses(gm)
    folded = 0
    for node, affine in _affine_nodes(gm):
        if not affine.is_scalar or len(node.users) != 1:
            continue
        reading = _add_reading(gm, next(iter(node.users)), node, calls)
        if reading is None:
            continue
        add, p, layer, p_factor, q_factor = reading
        s, t = affine._scalars
        # p_factor * p + q_factor * (q s + t) = p' + (q_factor s) q,  p' = p_factor * p + q_factor t
        _rewrite_add(gm, add, p, layer, p_factor, q_factor * t, node.args[0], q_factor * s)
        gm.graph.erase_node(node)
        folded += 1
    return folded


# --- pass 7: overwrite fresh tensors -------------------------------------------------------------

#: The activation functions that take ``inplace=True`` (the activation table's, F.hardtanh among them).
_IN_PLACE_ACTIVATIONS = frozenset(row.fn for row in ACTIVATION_FUNCTIONS.values() if row.takes_inplace)
#: Functions whose output is a new tensor, never an input or a view of one.
_FRESH_OUTPUT_FUNCTIONS = (operator.add, torch.add, operator.mul, torch.mul)


def _compute_in_place(gm: fx.GraphModule) -> int:
    """Let an activation, or a ConstantAffine called once, overwrite its input where that input
    is a fresh tensor nothing else reads: the output of a plain Conv/Linear, of an add or a
    product, or of an out-of-place activation, or what such a tensor became in place. A BN-folded
    torchvision model does the same with its ``ReLU(inplace=True)`` / ``SiLU(inplace=True)``; on
    CPU a new activation-sized tensor costs more than the pass that fills it (its pages are
    mapped and zeroed on first touch; ``eager.scalar_affine_``). The affines do it only while no
    gradient is recorded (:meth:`ConstantAffine._in_place`); an in-place activation under
    autograd is what ``nn.SiLU(inplace=True)`` is."""
    calls = module_uses(gm)
    fresh: set[fx.Node] = set()
    count = 0
    for node in gm.graph.nodes:
        source = node.args[0] if node.args else None
        overwritable = isinstance(source, fx.Node) and source in fresh and len(source.users) == 1
        if node.op == "call_function" and node.target in _IN_PLACE_ACTIVATIONS:
            if overwritable and len(node.args) == 1 and not node.kwargs.get("inplace", False):
                node.kwargs = {**node.kwargs, "inplace": True}
                count += 1
            fresh.add(node)  # a new tensor, or the fresh one it overwrote
        elif node.op == "call_function" and node.target in _FRESH_OUTPUT_FUNCTIONS:
            fresh.add(node)
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            if type(module) is nn.Linear or type(module) in _CONVS.values() or isinstance(module, ShiftedInputConv):
                fresh.add(node)
            elif isinstance(module, ConstantAffine) and overwritable and calls.get(node.target, 0) == 1:
                module.inplace = True
                fresh.add(node)
                count += 1
    return count


# --- what stays ---------------------------------------------------------------------------------


def _normprop_modules_inside_leaves(gm: fx.GraphModule) -> list[tuple[str, list[str]]]:
    """The NormProp modules still in the folded model, by the called module that holds them:
    only a module the trace kept whole (a leaf) can, and fold cannot see into it (the BatchNorms
    of an untraceable block become ``OpaqueNormPropAffine`` there, passes/opaque.py)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    inside: dict[str, list[str]] = {}
    for path, module in gm.named_modules():
        if isinstance(module, (*NORMPROP_MODULES, OpaqueNormPropAffine)):
            parts = path.split(".")
            leaf = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in called), None)
            if leaf is None:
                raise NormPropError(f"fold: NormProp module {path} ({type(module).__name__}) was left outside any called module")
            if not any(path.startswith(p + ".") for p in inside.get(leaf, [])):  # (its own children: one entry)
                inside.setdefault(leaf, []).append(path)
    return sorted(inside.items())


def _kept_affines(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Every ConstantAffine left, with why the op before and the op after could not take it."""
    calls = module_uses(gm)
    return [(node.name, f"before it: {_describe_before(gm, node)}; after it: {_describe_after(gm, node, affine, calls)}")
            for node, affine in _affine_nodes(gm)]


def _describe_before(gm: fx.GraphModule, node: fx.Node) -> str:
    source = node.args[0]
    if not isinstance(source, fx.Node):
        return "a constant"
    if len(source.users) > 1:
        return f"{source.name}, read by {len(source.users)} ops (scaling it would change the others)"
    if source.op == "call_function" and getattr(source.target, "__name__", "") not in ("add", "hardtanh"):
        return f"{source.target.__name__} (an op the affine cannot move in front of)"
    if source.op == "call_module":
        return f"{type(gm.get_submodule(source.target)).__name__} {source.target} (not a plain Conv/Linear called once)"
    if source.op == "call_function" and source.target is F.hardtanh:
        return f"{source.name}, a clamp the affine cannot move in front of (it is per channel, or negative)"
    if source.op == "placeholder":
        return "the model's input"
    return f"{source.name} (not a plain Conv/Linear, nor an add of one, for this affine's shape)"


def _describe_after(gm: fx.GraphModule, node: fx.Node, affine: ConstantAffine, calls: dict[str, int]) -> str:
    if len(node.users) != 1:
        return f"{len(node.users)} readers"
    user = next(iter(node.users))
    if user.op == "call_module":
        layer = gm.get_submodule(user.target)
        name = f"{type(layer).__name__} {user.target}"
        if type(layer) is nn.Linear or type(layer) in _CONVS.values():
            if calls.get(user.target, 0) != 1:
                return f"{name}, called more than once (folding would change its other calls)"
            if _per_input_channel(affine, layer) is None:
                return f"{name}, and the affine is not per input channel of it"
            if bool((affine.scale == 1).all()):
                return f"{name}, whose zero padding would see the shift (the layer took the scale)"
            return f"{name}, whose zero padding would see the shift"
        return f"{name} (not a plain Conv/Linear)"
    if user.op == "output":
        return "the model's output"
    target = getattr(user.target, "__name__", str(user.target))
    return f"{target} (not a plain Conv/Linear)"


def _per_input_channel(affine: ConstantAffine, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The affine as per-input-channel ``(scale, shift)`` vectors of ``layer``, or None when it
    is not one (a spatial shape, another axis, or one that would broadcast the output wider)."""
    if type(layer) is nn.Linear:
        channels, max_dim = layer.in_features, 1
    elif type(layer) in _CONVS.values():
        channels, max_dim = layer.in_channels, len(layer.kernel_size) + 1
    else:
        return None
    if affine.channel_dim is not None and not affine.is_scalar:
        return None  # dim 1 is the channel only for batched input: not provably the same
    vectors = []
    for t in (affine.scale, affine.shift):
        if t.dim() > max_dim:
            return None
        if type(layer) is not nn.Linear and t.dim() == max_dim:
            if any(s != 1 for s in t.shape[1:]):
                return None
            t = t.reshape(t.shape[0])
        elif t.numel() == 1:
            t = t.reshape(())
        elif t.dim() != 1:
            return None
        if t.numel() not in (1, channels):
            return None
        vectors.append(t.double().expand(channels))
    return vectors[0], vectors[1]


def _shift_commutes_with_padding(layer: nn.Module) -> bool:
    if type(layer) is nn.Linear:
        return True
    if layer.padding_mode != "zeros":
        return True  # reflect/replicate/circular pad with copies of the (shifted) input
    if isinstance(layer.padding, str):
        return layer.padding == "valid" or all(d * (k - 1) == 0 for d, k in zip(layer.dilation, layer.kernel_size))
    return all(p == 0 for p in layer.padding)


def _layer_with_folded_input_affine(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` computing ``layer(x * scale + shift)`` for per-input-channel vectors."""
    w, bias = _weight_and_bias(layer)
    groups = getattr(layer, "groups", 1)
    out_channels = w.shape[0]
    # input channel of weight entry [o, j]: group(o) * (C / groups) + j
    per_row = partial(_rows_per_output, groups=groups, out_channels=out_channels, width=w.shape[1])
    view = (out_channels, w.shape[1]) + (1,) * (w.dim() - 2)
    w_scaled = w * per_row(scale).reshape(view)
    bias_shift = (w * per_row(shift).reshape(view)).sum(dim=tuple(range(1, w.dim())))
    return _with_weight_and_bias(layer, w_scaled, bias + bias_shift)


def _rows_per_output(v: torch.Tensor, *, groups: int, out_channels: int, width: int) -> torch.Tensor:
    """(C_in,) -> (out_channels, C_in / groups): the input-channel values each weight row sees."""
    return v.reshape(groups, width).repeat_interleave(out_channels // groups, dim=0)


__all__ = ["ConstantAffine", "fold"]
