"""Small graph helpers shared by every pass (and by ``fold``): the bottom of ``passes``.

This module imports only torch and normprop_fx's core modules, never another pass, so any pass
can use it (the layering is in ``passes/__init__.py``).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from normprop_fx.activation_functions import ActivationSpec, activation
from normprop_fx.errors import UnsupportedActivationError
from normprop_fx.module_types import NORMPROP_CONSUMERS, NORMPROP_MODULES
from normprop_fx.moments import activation_constants

if TYPE_CHECKING:
    from .patterns import ActivationForm

__all__ = [
    "AS_WRITTEN",
    "NORMPROP_CONSUMERS",
    "NORMPROP_MODULES",
    "RESTORED_FUNCTION",
    "TAKES_OVER",
    "activation_spec",
    "adopt_owner",
    "channel_reduce_dims",
    "feeds_modules",
    "free_module_name",
    "hand_over",
    "has_submodule",
    "holder_paths",
    "is_gate",
    "module_calls",
    "module_uses",
    "normalizable_activation",
    "owner_stack",
    "set_submodule",
    "take_over",
    "upstream_of",
]

#: torch.fx's record, in ``node.meta``, of the module calls a node was traced in.
MODULE_STACK = "nn_module_stack"
#: ``node.meta`` key: the nodes whose role this node took over (:func:`hand_over`).
TAKES_OVER = "normprop_takes_over"
#: ``node.meta`` key of a dropout module call that stands for a functional dropout the trace froze
#: (``passes.dropout_modes``): the function. A forward that is not rebuilt still makes that call,
#: and follows train()/eval() by itself.
RESTORED_FUNCTION = "normprop_restored_function"
#: ``node.meta`` key of an activation the match leaves as the user wrote it, neither fused nor
#: normalized (``passes.match``): why, as the rewrite's note says it.
AS_WRITTEN = "normprop_as_written"


def owner_stack(node: fx.Node) -> dict[str, tuple[str, type]]:
    """The module calls whose forward made ``node``, outermost first, as torch.fx records them
    (``{key: (qualified name, type)}``; the key has ``@k`` for the k-th repeated call). A
    ``call_module`` node's own call is not part of it."""
    stack = dict(node.meta.get(MODULE_STACK) or {})
    if node.op == "call_module" and stack:
        key = next(reversed(stack))
        if stack[key][0] == node.target:
            del stack[key]
    return stack


def adopt_owner(node: fx.Node, anchor: fx.Node) -> fx.Node:
    """Give the new ``node`` the owner of ``anchor`` (the node it is inserted for): in the
    user's module tree it belongs to the forward that ``anchor`` belongs to."""
    node.meta[MODULE_STACK] = owner_stack(anchor)
    return node


def hand_over(old: fx.Node, new: fx.Node, **kwargs: object) -> None:
    """``old.replace_all_uses_with(new)``, remembering that ``new`` now plays ``old``'s role for
    its readers (``new.meta[TAKES_OVER]``): where a module returned ``old``, it now returns ``new``."""
    old.replace_all_uses_with(new, **kwargs)
    take_over(new, old)


def take_over(new: fx.Node, old: fx.Node) -> None:
    """Record that ``new`` plays ``old``'s role (and that of every node ``old`` took over)."""
    new.meta.setdefault(TAKES_OVER, []).extend([old, *old.meta.get(TAKES_OVER, ())])


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified name ``path`` of ``root``, replacing the module there
    (torch's ``nn.Module.set_submodule``: the parent must exist)."""
    root.set_submodule(path, module)


def has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def free_module_name(root: nn.Module, path: str, *, first_suffix: int = 2) -> str:
    """``path``, else ``path_<k>`` for k = ``first_suffix``, ``first_suffix + 1``, ...: the first
    that names no submodule of ``root`` yet.

    The conversion passes count from 2 (``x``, ``x_2``, ``x_3``: the audit shows these names);
    ``fold`` counts from 1 (``x``, ``x_1``, ``x_2``: the names of folded models' modules). The
    two schemes stay as they are so that no name a user may already rely on changes.
    """
    candidate, k = path, first_suffix
    while has_submodule(root, candidate):
        candidate, k = f"{path}_{k}", k + 1
    return candidate


def module_calls(gm: fx.GraphModule) -> Counter[str]:
    """How many ``call_module`` nodes call each module path."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def module_uses(gm: fx.GraphModule, *, nested: bool = True) -> Counter[str]:
    """Uses of each module path: a ``call_module`` of it, or a ``get_attr`` of one of its
    attributes. With ``nested`` (the default) a use of anything under a path counts for the path
    too (``a.b.w`` counts for ``a`` and ``a.b``): a module used once can be rewritten for that one
    use without changing any other. Without it, a call counts for its module and an attribute
    read for the module that owns the attribute only."""
    uses: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)
        if not nested:
            uses[target if node.op == "call_module" else target.rpartition(".")[0]] += 1
            continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            uses[".".join(parts[:i])] += 1
    return uses


def channel_reduce_dims(rank: int) -> list[int]:
    """The dims a per-channel statistic reduces over: every dim but 1 (the channels), or all
    dims of a tensor of rank below 2."""
    return [d for d in range(rank) if d != 1] if rank >= 2 else list(range(rank))


def channel_moments(t: torch.Tensor, center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and mean square around ``center`` (default: that mean) of ``t`` over
    :func:`channel_reduce_dims`, keepdim, in float64, on ``t``'s device.

    The sample tensors are the largest a conversion holds (11 samples of resnet50 at 224 px:
    35 MB a tensor), and a float64 copy of one, squared, is four times its size; ``torch.var_mean``
    needs no copy (it accumulates float32 in double on the CPU, Welford's way elsewhere), and the
    square around a per-channel ``center`` follows as variance + (mean - center)^2. A ``center``
    that varies within a channel is reduced directly."""
    t = t.detach()
    dims = channel_reduce_dims(t.dim())
    if not dims:
        t = t.double()
        return t, torch.zeros_like(t)
    var, mean = torch.var_mean(t, dims, correction=0, keepdim=True)
    mean, var = mean.double(), var.double()
    if center is None:
        return mean, var
    center = center.to(t.device, torch.float64)
    if center.numel() > mean.numel():
        return mean, ((t.double() - center) ** 2).mean(dims, keepdim=True)
    return mean, var + (mean - center) ** 2


def sample_mean_squares(t: torch.Tensor, center: torch.Tensor) -> torch.Tensor | None:
    """Each sample's (dim 0's) mean square around the per-channel ``center``, averaged over its
    channels, in float64: how far apart the samples are in what a correction measures on them
    (None for a tensor without a batch and a channel dim, or a center that varies within a
    channel). Like :func:`channel_moments`, without a float64 copy of ``t``."""
    if t.dim() < 2:
        return None
    t = t.detach()
    center = center.to(t.device, torch.float64)
    if center.numel() > t.shape[1] or (center.dim() >= 1 and center.shape[0] > 1):
        return None
    dims = [d for d in range(2, t.dim())]
    if dims:
        var, mean = torch.var_mean(t, dims, correction=0, keepdim=True)
        squares = var.double() + (mean.double() - center) ** 2
    else:
        squares = (t.double() - center) ** 2
    return squares.flatten(1).mean(1)


def activation_spec(form: ActivationForm, node: fx.Node | None, module: nn.Module | None) -> ActivationSpec:
    """The activation a node (or activation module) computes, with its constant parameters.

    Raises UnsupportedActivationError when a parameter is computed at run time, or the call has
    more positional arguments than the form knows."""
    if module is not None:
        return activation(form.name, **dict(form.fixed), **{p: getattr(module, p) for p in form.params})
    assert node is not None
    if len(node.args) > 1 + len(form.params):
        raise UnsupportedActivationError(f"{len(node.args) - 1} positional parameters, the form knows {len(form.params)}")
    params = dict(zip(form.params, node.args[1:]))
    params.update(node.kwargs)
    params.pop("inplace", None)
    for key, value in params.items():
        if isinstance(value, fx.Node):
            raise UnsupportedActivationError(f"parameter {key} is computed at run time, not a constant")
    return activation(form.name, **params)


def normalizable_activation(
    form: ActivationForm, node: fx.Node | None, module: nn.Module | None
) -> tuple[ActivationSpec | None, str | None]:
    """``(spec, None)`` when the activation ``node`` / ``module`` computes has constant
    parameters and known normalization constants (NormProp can normalize it), else
    ``(None, why not)``."""
    try:
        spec = activation_spec(form, node, module)
        activation_constants(spec)
    except UnsupportedActivationError as err:
        return None, str(err)
    return spec, None


#: Ops that only move, repeat or resize a gate on its way to the product it scales.
_GATE_CARRIERS = {
    ("call_function", torch.nn.functional.interpolate), ("call_function", torch.flatten),
    ("call_function", torch.reshape), ("call_function", torch.unsqueeze), ("call_function", torch.repeat_interleave),
    *(("call_method", m) for m in ("view", "reshape", "expand", "expand_as", "unsqueeze", "repeat", "flatten",
                                   "permute", "transpose", "contiguous", "to", "type_as")),
}
_PRODUCTS = {
    ("call_function", operator.mul), ("call_function", operator.imul), ("call_function", torch.mul),
    ("call_method", "mul"), ("call_method", "mul_"),
}


def is_gate(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether every use of ``node``'s value multiplies another value: directly, or after ops
    that only move, repeat or resize it (interpolate, expand, view...; nn.Upsample, nn.Identity).
    Such a (0, 1) activation is a gate and stays raw (``ActivationFunction.gate``)."""
    if not node.users:
        return False
    for user in node.users:
        key = (user.op, user.target)
        if key in _PRODUCTS:
            if sum(a is node for a in user.args) != 1 or len(user.args) != 2 or not all(isinstance(a, fx.Node) for a in user.args):
                return False  # a square, or a product with a constant: no gate
            continue
        carries = key in _GATE_CARRIERS or (
            user.op == "call_module" and isinstance(modules.get(str(user.target)), (nn.Upsample, nn.Identity)))
        if not (carries and user.args and user.args[0] is node and is_gate(user, modules)):
            return False
    return True


def upstream_of(gm: fx.GraphModule, reads: Callable[[fx.Node], bool],
                passes_on: Callable[[fx.Node], bool] = lambda _: True) -> set[fx.Node]:
    """The nodes whose value reaches a node for which ``reads`` holds: read by it directly, or
    through users that ``passes_on`` lets the value go on from (one sweep, users first)."""
    found: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if any(reads(user) or (user in found and passes_on(user)) for user in node.users):
            found.add(node)
    return found


def holder_paths(gm: fx.GraphModule, holds: Callable[[nn.Module], bool]) -> set[str]:
    """The qualified names of the modules for which ``holds`` is true, and of every module that
    holds one of them inside: a call of such a module (a leaf the trace did not enter) runs it."""
    return {
        path.rsplit(".", k)[0] if k else path
        for path, module in gm.named_modules() if holds(module)
        for k in range(path.count(".") + 1)
    }


def feeds_modules(gm: fx.GraphModule, types: tuple[type[nn.Module], ...]) -> set[fx.Node]:
    """The nodes whose value reaches a call of a module of ``types`` (a BatchNorm, a NormProp
    consumer), through any ops: a call of a module that holds one inside (a leaf the trace did not
    enter) counts as such a call."""
    holders = holder_paths(gm, lambda module: isinstance(module, types))
    return upstream_of(gm, lambda user: user.op == "call_module" and str(user.target) in holders)


def save_buffers(module: nn.Module | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of every buffer of ``module``, for :func:`restore_buffers` after a run that must
    leave no trace (a probe, the sample, a fake-tensor shape pass)."""
    if module is None:
        return []
    return [(b, b.detach().clone()) for b in module.buffers()]


def restore_buffers(module: nn.Module | None, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the copies :func:`save_buffers` took back into their buffers."""
    with torch.no_grad():
        for buffer, copy_ in saved:
            buffer.copy_(copy_)
