"""``normprop_fx.fold``: the exact inference form of a converted network.

Every NormProp module becomes the plain operations it computes, with all constants baked in:

- ``NormPropConv{1,2,3}d`` / ``NormPropLinear`` -> ``nn.Conv{1,2,3}d`` / ``nn.Linear`` with weight
  ``gamma * W / ||W||`` and bias ``beta``, then the activation ``f``, then the constant affine
  ``(f(u) - c_mean) / c_std`` (none for a layer that keeps a trained BatchNorm's function: a
  trained network folds to plain conv + activation, as its BN-folded original);
- ``NormalizedActivation`` -> ``f`` and its constant affine;
- ``NormPropAffine`` -> its per-channel affine (on dim 1, with its input standardization by
  running statistics when it keeps a trained BatchNorm's function), ``f``, the constant affine;
- ``Standardize`` -> the constant affine ``x * scale - mean * scale``.

Then a constant affine is merged into a constant affine that directly follows it, and folded
into the *following* Conv/Linear wherever that is exact (docs/method.md section 2: a per-input-channel
scale commutes with the weights; a shift becomes ``W @ shift`` added to the bias):

- the affine's output has that layer as its single user, and the layer is called once;
- the affine is scalar or per input channel of the layer (shape ``(C, 1, ..)`` for a conv,
  ``(C,)`` for a Linear), so the output shape does not change;
- a shift is folded into a conv only when padding cannot see it: no padding, or a
  ``padding_mode`` (reflect, replicate, circular) that pads with copies of the input; zero
  padding would pad with zeros where the unfolded model pads the shifted value's zeros.

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
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import fx, nn

from .activation_functions import ActivationSpec
from .affine import NormPropAffine
from .errors import NormPropError
from .layers import NormPropLayer, NormPropLinear, _NormPropConvNd
from .normalized_activation import NormalizedActivation
from .module_types import NORMPROP_MODULES
from .passes.graph_utils import free_module_name, has_submodule, module_uses, set_submodule
from .passes.trace import trace
from .records import REPORT_ATTRIBUTE, ConversionReport
from .standardize import Standardize

logger = logging.getLogger(__name__)

_CONVS: dict[int, type[nn.modules.conv._ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConstantAffine(nn.Module):
    """``x * scale + shift`` with constant (buffer) ``scale`` and ``shift``.

    ``channel_dim=None``: the buffers broadcast against the input as they are (shape ``()``,
    ``(C, 1, 1)``, ``(C,)``...). ``channel_dim=1``: they are 1-D per-channel vectors applied on
    dim 1 whatever the input rank, as BatchNorm and NormPropAffine do.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int | None = None) -> None:
        super().__init__()
        if channel_dim not in (None, 1):
            raise NormPropError(f"ConstantAffine: channel_dim must be None or 1, got {channel_dim!r}")
        self.register_buffer("scale", torch.as_tensor(scale).detach().clone())
        self.register_buffer("shift", torch.as_tensor(shift).detach().clone())
        self.channel_dim = channel_dim
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
            return x * self._scalars[0] + self._scalars[1]
        scale, shift = self.scale.to(x.dtype), self.shift.to(x.dtype)
        if self.channel_dim is not None:
            shape = (-1,) + (1,) * (x.dim() - 2)
            scale, shift = scale.reshape(shape), shift.reshape(shape)
        return torch.addcmul(shift, x, scale)

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
    ``converted`` is not modified.

    Its eval outputs equal ``converted.eval()``'s up to floating-point rounding. Raises
    NormPropError when ``converted`` is neither a GraphModule nor a model convert() returned.
    """
    if isinstance(converted, fx.GraphModule):
        gm = copy.deepcopy(converted)
    else:
        report = getattr(converted, REPORT_ATTRIBUTE, None)
        if not isinstance(report, ConversionReport):
            raise NormPropError(
                f"fold() takes a model that normprop_fx.convert() returned (or a torch.fx.GraphModule), got "
                f"{type(converted).__name__}"
            )
        gm, _ = trace(copy.deepcopy(converted), [p for p in report.leaf_modules if has_submodule(converted, p)])
    gm.eval()
    with torch.no_grad():
        expanded = _expand_normprop_modules(gm)
        merged = _merge_consecutive_affines(gm)
        folded = _fold_affines_into_following_layers(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    logger.info(
        "fold: %d NormProp modules expanded, %d affines merged, %d folded into the following layer",
        expanded, merged, folded,
    )
    return gm


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

    # read every call's module before replacing any: a shared module is called at several nodes
    calls = [(node, gm.get_submodule(node.target)) for node in gm.graph.nodes if node.op == "call_module"]
    expanded = 0
    for node, module in calls:
        if isinstance(module, NormPropLayer):
            set_submodule(gm, node.target, replacement(module, partial(_plain_layer, module)))
            _append_after(gm, node, _normalized_activation_ops(gm, node.target, module.activation))
        elif isinstance(module, NormalizedActivation):
            _replace_node(gm, node, _normalized_activation_ops(gm, node.target, module))
        elif isinstance(module, NormPropAffine):
            affine = replacement(module, partial(ConstantAffine, *module.channel_affine(), channel_dim=1))
            ops = [_module_op(gm, f"{node.target}_affine", affine)]
            ops += _normalized_activation_ops(gm, node.target, module.activation)
            _replace_node(gm, node, ops)
        elif isinstance(module, Standardize):
            scale, mean = module.scale.double(), module.mean.double()
            set_submodule(gm, node.target, replacement(module, partial(ConstantAffine, scale, -mean * scale)))
        else:
            continue
        expanded += 1
    return expanded


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


def _plain_layer(layer: NormPropLayer) -> nn.Module:
    weight = layer.normalized_weight().detach()
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
    plain.bias = nn.Parameter(layer.beta.detach().to(weight.dtype).clone(), requires_grad=False)
    return plain


#: An op to insert: (create the node from its input node).
_Op = Callable[[fx.Node], fx.Node]


def _normalized_activation_ops(gm: fx.GraphModule, base: str, act: NormalizedActivation) -> list[_Op]:
    """``f`` then ``* (1/c_std) + (-c_mean/c_std)``; nothing for the identity, and ``f`` alone when
    the output is not standardized (a layer that keeps a trained BatchNorm's function)."""
    if act.spec.is_identity:
        return []
    if act.is_plain:
        return [_activation_op(act.spec)]
    affine = ConstantAffine(torch.tensor(act._scale, dtype=torch.float64), torch.tensor(act._shift, dtype=torch.float64))
    return [_activation_op(act.spec), _module_op(gm, f"{base}_normalize", affine)]


def _activation_op(spec: ActivationSpec) -> _Op:
    def create(x: fx.Node) -> fx.Node:
        return x.graph.call_function(spec.function.fn, (x,), spec.kwargs)

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


# --- pass 2: merge an affine into the affine right after it ------------------------------------


def _affine_of(gm: fx.GraphModule, node: Any) -> ConstantAffine | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, ConstantAffine):
            return module
    return None


def _merge_consecutive_affines(gm: fx.GraphModule) -> int:
    """``(x * s1 + t1) * s2 + t2 = x * (s1 s2) + (t1 s2 + t2)`` when the first affine's only
    user is the second and both apply their buffers the same way (or one of them is scalar)."""
    merged = 0
    for node in list(gm.graph.nodes):
        second = _affine_of(gm, node)
        if second is None:
            continue
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


# --- pass 3: fold an affine into the Conv/Linear that reads it ---------------------------------


def _fold_affines_into_following_layers(gm: fx.GraphModule) -> int:
    calls = module_uses(gm)
    folded = 0
    for node in list(gm.graph.nodes):
        affine = _affine_of(gm, node)
        if affine is None or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or user.args[:1] != (node,) or node in user.args[1:] or user.kwargs:
            continue
        if calls.get(user.target, 0) != 1:
            continue  # a shared layer: folding would change its other calls
        layer = gm.get_submodule(user.target)
        per_channel = _per_input_channel(affine, layer)
        if per_channel is None:
            continue
        scale, shift = per_channel
        if bool((shift != 0).any()) and not _shift_commutes_with_padding(layer):
            continue
        set_submodule(gm, user.target, _layer_with_folded_input_affine(layer, scale, shift))
        user.replace_input_with(node, node.args[0])
        gm.graph.erase_node(node)
        folded += 1
    return folded


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
    new = copy.copy(layer)
    new._parameters = dict(layer._parameters)
    w = layer.weight.detach().double()
    groups = getattr(layer, "groups", 1)
    out_channels = w.shape[0]
    # input channel of weight entry [o, j]: group(o) * (C / groups) + j
    per_row = partial(_rows_per_output, groups=groups, out_channels=out_channels, width=w.shape[1])
    view = (out_channels, w.shape[1]) + (1,) * (w.dim() - 2)
    w_scaled = w * per_row(scale).reshape(view)
    bias_shift = (w * per_row(shift).reshape(view)).sum(dim=tuple(range(1, w.dim())))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(out_channels, dtype=torch.float64, device=w.device)
    dtype = layer.weight.dtype
    new.weight = nn.Parameter(w_scaled.to(dtype), requires_grad=False)
    new.bias = nn.Parameter((bias + bias_shift).to(dtype), requires_grad=False)
    return new


def _rows_per_output(v: torch.Tensor, *, groups: int, out_channels: int, width: int) -> torch.Tensor:
    """(C_in,) -> (out_channels, C_in / groups): the input-channel values each weight row sees."""
    return v.reshape(groups, width).repeat_interleave(out_channels // groups, dim=0)


__all__ = ["ConstantAffine", "fold"]
