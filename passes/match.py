"""Pass 2: find Conv/Linear -> BatchNorm [-> activation] patterns in a traced graph.

The tables in :mod:`normprop_fx.passes.patterns` say which producers, norms and activation
forms exist; this pass only walks the graph. Every BatchNorm call in the graph ends either in a
:class:`PatternMatch` or in a :class:`~normprop_fx.records.LeftBatchNorm` with the reason.

The producer's output must have the BatchNorm as its only user (any other user would see the
changed value). The BatchNorm's output may have several users: every one of them then reads the
NormProp output, and the activation is fused only when it is the single user.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from normprop_fx.activation_functions import ActivationSpec, activation
from normprop_fx.errors import UnsupportedActivationError
from normprop_fx.moments import activation_constants
from normprop_fx.records import LeftBatchNorm

from .describe import describe_node
from .patterns import (
    BATCH_NORM_BASE,
    FUNCTION_ACTIVATION_FORMS,
    MODULE_ACTIVATION_FORMS,
    PRODUCER_PATTERNS,
    UNSUPPORTED_ACTIVATIONS,
    ActivationForm,
    ProducerPattern,
    lookup_by_type,
    own_forward_reason,
)


@dataclass(frozen=True)
class PatternMatch:
    """One pattern to rewrite: nodes of the graph plus what replaces them."""

    producer: fx.Node
    norm: fx.Node
    activation: fx.Node | None
    pattern: ProducerPattern
    spec: ActivationSpec
    notes: tuple[str, ...] = ()


class _NotMatched(Exception):
    """Internal: the BatchNorm at hand is left, for the reason in the message."""


def match_patterns(gm: fx.GraphModule) -> tuple[list[PatternMatch], list[LeftBatchNorm]]:
    """All convertible patterns in ``gm``, and the BatchNorm calls that are not, with reasons."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    calls.update(_owner(n.target) for n in gm.graph.nodes if n.op == "get_attr")
    matches: list[PatternMatch] = []
    left: list[LeftBatchNorm] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BATCH_NORM_BASE):
            continue
        try:
            matches.append(_match_at(gm, modules, calls, node))
        except _NotMatched as why:
            left.append(LeftBatchNorm(str(node.target), type(modules[node.target]).__name__, str(why)))
    return matches, left


def _owner(attribute: Any) -> str:
    """'layer1.conv.bias' -> 'layer1.conv': the module whose attribute a get_attr node reads."""
    return str(attribute).rpartition(".")[0]


def _users(node: fx.Node, gm: fx.GraphModule) -> str:
    return ", ".join(describe_node(u, gm) for u in node.users)


def _match_at(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: Counter, norm_node: fx.Node) -> PatternMatch:
    norm = modules[norm_node.target]
    producer_node = norm_node.args[0] if norm_node.args else None
    if not (isinstance(producer_node, fx.Node) and producer_node.op == "call_module"):
        raise _NotMatched(f"its input is {describe_node(producer_node, gm)}, not a Conv/Linear module")
    producer = modules[producer_node.target]
    pattern: ProducerPattern | None = lookup_by_type(PRODUCER_PATTERNS, producer)
    if pattern is None:
        own = own_forward_reason(PRODUCER_PATTERNS, producer)
        if own:
            raise _NotMatched(f"its input {producer_node.target}: {own}, which a NormProp layer would drop")
        raise _NotMatched(f"its input is {describe_node(producer_node, gm)}, not a Conv1d/2d/3d or Linear")
    norms = {cls: cls for cls in pattern.norms}
    if lookup_by_type(norms, norm) is None:
        own = own_forward_reason(norms, norm)
        if own:
            raise _NotMatched(f"{own}, which replacing it would drop")
        raise _NotMatched(f"a {type(norm).__name__} cannot normalize the output of a {type(producer).__name__}")
    if norm.num_features != pattern.out_features(producer):
        raise _NotMatched(
            f"num_features={norm.num_features} differs from the {pattern.out_features(producer)} "
            f"outputs of {producer_node.target}"
        )
    if calls[producer_node.target] > 1:
        raise _NotMatched(
            f"{producer_node.target} is used {calls[producer_node.target]} times in the graph (called "
            "again, or its parameters read directly): replacing it would change every use"
        )
    if len(producer_node.users) != 1:
        raise _NotMatched(
            f"the output of {producer_node.target} has {len(producer_node.users)} users "
            f"({_users(producer_node, gm)}), so the pattern is left alone"
        )
    act_node, spec, notes = _activation_after(gm, modules, norm_node)
    if getattr(producer, "bias", None) is not None:
        notes = (f"bias of {producer_node.target} dropped (beta takes its role)", *notes)
    if not norm.affine:
        notes = (*notes, f"{norm_node.target} had affine=False: gamma and beta are fixed buffers")
    return PatternMatch(producer_node, norm_node, act_node, pattern, spec, notes)


def _activation_after(
    gm: fx.GraphModule, modules: dict[str, nn.Module], norm_node: fx.Node
) -> tuple[fx.Node | None, ActivationSpec, tuple[str, ...]]:
    """The activation node that consumes ``norm_node`` and its spec, or (None, identity, notes)."""
    identity = activation("identity")
    if len(norm_node.users) > 1:
        # Every user read the BatchNorm's output and now reads the standardized NormProp output;
        # only fusing an activation would change what the other users see.
        return None, identity, (
            f"the BatchNorm output has {len(norm_node.users)} users ({_users(norm_node, gm)}): no activation fused",
        )
    if not norm_node.users:
        return None, identity, ()
    (user,) = norm_node.users
    if not user.args or user.args[0] is not norm_node:
        return None, identity, ()
    module = modules.get(user.target) if user.op == "call_module" else None
    form: ActivationForm | None
    if module is not None:
        form = lookup_by_type(MODULE_ACTIVATION_FORMS, module)
        unsupported = lookup_by_type(UNSUPPORTED_ACTIVATIONS, module) or own_forward_reason(
            MODULE_ACTIVATION_FORMS, module
        )
        if form is None and unsupported is not None:
            return None, identity, (
                f"{describe_node(user, gm)} after the BatchNorm is not normalized: {unsupported}",
            )
    else:
        form = FUNCTION_ACTIVATION_FORMS.get((user.op, user.target))
    if form is None or len(user.args) > 1 + len(form.params):
        return None, identity, ()
    try:
        spec = activation(form.name, **_activation_params(form, user, module))
        activation_constants(spec)
    except UnsupportedActivationError as err:
        return None, identity, (f"{describe_node(user, gm)} after the BatchNorm is not normalized: {err}",)
    return user, spec, ()


def _activation_params(form: ActivationForm, node: fx.Node, module: nn.Module | None) -> dict[str, Any]:
    if module is not None:
        return {p: getattr(module, p) for p in form.params}
    params = dict(zip(form.params, node.args[1:]))
    params.update(node.kwargs)
    params.pop("inplace", None)
    for key, value in params.items():
        if isinstance(value, fx.Node):
            raise UnsupportedActivationError(f"parameter {key} is computed at run time, not a constant")
    return params
