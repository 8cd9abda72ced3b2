"""Pass 6: find what replaces each BatchNorm in a traced graph.

The tables in :mod:`normprop_fx.passes.patterns` say which producers, norms and activation
forms exist; this pass only walks the graph. Every BatchNorm call in the graph ends either in a
:class:`PatternMatch` or in a :class:`~normprop_fx.records.LeftBatchNorm` with the reason.

A Conv/Linear is fused with the BN only when its output has the BatchNorm as its only user (any
other user would see the changed value); otherwise, and when there is no Conv/Linear in front,
the BN alone is replaced (NormPropAffine). The BatchNorm's output may have several users: every
one of them then reads the NormProp output, and the activation is fused only when it is the
single user.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx, nn

from normprop_fx.activation_functions import ActivationSpec, activation
from normprop_fx.batchnorm_state import batchnorm_state
from normprop_fx.records import LeftBatchNorm

from .describe import describe_node
from .graph_utils import module_uses, normalizable_activation
from .patterns import (
    BATCH_NORM_TYPES,
    FUNCTION_ACTIVATION_FORMS,
    MODULE_ACTIVATION_FORMS,
    PLAIN_BATCH_NORMS,
    PRODUCER_PATTERNS,
    UNSUPPORTED_ACTIVATIONS,
    ActivationForm,
    NormActUnit,
    ProducerPattern,
    lookup_by_type,
    norm_act_units,
    own_forward_reason,
)


@dataclass(frozen=True)
class PatternMatch:
    """One BatchNorm to rewrite, with what feeds it and what follows it.

    With a ``producer`` (Conv/Linear -> BN [-> act]) the three become one NormProp layer. Without
    one (a BN after a concat, an add, a plain layer whose output is also used elsewhere...), the BN
    becomes a :class:`~normprop_fx.affine.NormPropAffine` and moment propagation standardizes its
    input.
    """

    norm: fx.Node
    activation: fx.Node | None  #: a separate activation node fused into the replacement
    spec: ActivationSpec
    producer: fx.Node | None = None
    pattern: ProducerPattern | None = None
    #: (attribute, module) of a norm-activation unit that stay after the replacement, in order
    #: (a drop-block, or an activation that is not normalized).
    kept: tuple[tuple[str, nn.Module], ...] = ()
    notes: tuple[str, ...] = ()


class _NotMatched(Exception):
    """Internal: the BatchNorm at hand is left, for the reason in the message."""


def match_patterns(gm: fx.GraphModule) -> tuple[list[PatternMatch], list[LeftBatchNorm]]:
    """A match for every BatchNorm call in ``gm`` that can be replaced, and the others with reasons."""
    modules = dict(gm.named_modules())
    calls = module_uses(gm, nested=False)
    matches: list[PatternMatch] = []
    left: list[LeftBatchNorm] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BATCH_NORM_TYPES):
            continue
        try:
            matches.append(_match_at(gm, modules, calls, node))
        except _NotMatched as why:
            left.append(LeftBatchNorm(str(node.target), type(modules[node.target]).__name__, str(why)))
    return matches, left


def _users(node: fx.Node, gm: fx.GraphModule) -> str:
    return ", ".join(describe_node(u, gm) for u in node.users)


def _match_at(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: Counter, norm_node: fx.Node) -> PatternMatch:
    norm = modules[norm_node.target]
    unit = lookup_by_type(norm_act_units(), norm)
    if unit is None and lookup_by_type(PLAIN_BATCH_NORMS, norm) is None:
        own = own_forward_reason(PLAIN_BATCH_NORMS, norm) or f"{type(norm).__name__} is not a known BatchNorm form"
        raise _NotMatched(f"{own}, which replacing it would drop")
    if calls[norm_node.target] > 1:
        raise _NotMatched(f"{norm_node.target} is called {calls[norm_node.target]} times: replacing it would change every use")
    if unit is not None:
        act_node, spec, kept, notes = None, *_unit_activation(norm, unit)
    else:
        act_node, spec, notes = _activation_after(gm, modules, norm_node)
        kept = ()
    if not batchnorm_state(norm).affine:
        notes = (*notes, f"{norm_node.target} had affine=False: gamma and beta are fixed buffers")
    producer_node, pattern, why_not = _producer_of(gm, modules, calls, norm_node, norm)
    if pattern is None:
        return PatternMatch(norm_node, act_node, spec, kept=kept, notes=(why_not, *notes))
    return PatternMatch(norm_node, act_node, spec, producer_node, pattern, kept, notes)


def _producer_of(
    gm: fx.GraphModule, modules: dict[str, nn.Module], calls: Counter, norm_node: fx.Node, norm: nn.Module
) -> tuple[fx.Node | None, ProducerPattern | None, str]:
    """The Conv/Linear node that the BN can be fused with, or (None, None, why not)."""
    producer_node = norm_node.args[0] if norm_node.args else None
    if not (isinstance(producer_node, fx.Node) and producer_node.op == "call_module"):
        return None, None, f"no Conv/Linear in front (input: {describe_node(producer_node, gm)})"
    producer = modules[producer_node.target]
    pattern: ProducerPattern | None = lookup_by_type(PRODUCER_PATTERNS, producer)
    if pattern is None:
        own = own_forward_reason(PRODUCER_PATTERNS, producer)
        if own:
            return None, None, f"input {producer_node.target}: {own}, so it is not fused"
        return None, None, f"no Conv/Linear in front (input: {describe_node(producer_node, gm)})"
    if not isinstance(norm, pattern.norms):
        return None, None, f"a {type(norm).__name__} does not normalize the outputs of a {type(producer).__name__} per feature"
    features = batchnorm_state(norm).num_features
    if features != pattern.out_features(producer):
        return None, None, (
            f"num_features={features} differs from the {pattern.out_features(producer)} "
            f"outputs of {producer_node.target}"
        )
    if calls[producer_node.target] > 1:
        return None, None, (
            f"{producer_node.target} is used {calls[producer_node.target]} times in the graph (called "
            "again, or its parameters read directly), so it is not fused"
        )
    if len(producer_node.users) != 1:
        return None, None, (
            f"the output of {producer_node.target} has {len(producer_node.users)} users "
            f"({_users(producer_node, gm)}), so it is not fused"
        )
    return producer_node, pattern, ""


def _unit_activation(
    norm: nn.Module, unit: NormActUnit
) -> tuple[ActivationSpec, tuple[tuple[str, nn.Module], ...], tuple[str, ...]]:
    """The activation of a norm-activation unit to fuse, and its modules that stay after it."""
    identity = activation("identity")
    drop, act = getattr(norm, unit.drop), getattr(norm, unit.act)
    drop_is_identity = lookup_by_type({nn.Identity: True}, drop) is not None
    form = lookup_by_type(MODULE_ACTIVATION_FORMS, act)
    spec = None
    note = ()
    if form is not None:
        spec, why = normalizable_activation(form, None, act)
        if spec is None:
            note = (f"its activation {type(act).__name__} is not normalized: {why}",)
    else:
        reason = lookup_by_type(UNSUPPORTED_ACTIVATIONS, act) or own_forward_reason(MODULE_ACTIVATION_FORMS, act)
        note = (f"its activation {type(act).__name__} is not normalized: {reason or 'not a known activation'}",)
    if drop_is_identity and spec is not None:
        return spec, (), note
    kept: tuple[tuple[str, nn.Module], ...] = ()
    if not drop_is_identity:
        kept = ((unit.drop, drop),)
        note = (*note, f"its {type(drop).__name__} stays between the normalization and the activation")
    if spec is None or not spec.is_identity:
        kept = (*kept, (unit.act, act))  # normalized later as a standalone activation when it can be
    return identity, kept, note


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
    spec, why = normalizable_activation(form, user, module)
    if spec is None:
        return None, identity, (f"{describe_node(user, gm)} after the BatchNorm is not normalized: {why}",)
    return user, spec, ()

