"""Pass 6: find what replaces each BatchNorm in a traced graph.

The tables in :mod:`normprop_fx.passes.patterns` say which producers, norms and activation
forms exist; this pass only walks the graph. Every BatchNorm call in the graph ends either in a
:class:`PatternMatch` or in a :class:`~normprop_fx.records.LeftBatchNorm` with the reason.

A Conv/Linear is fused with the BN only when its output has the BatchNorm as its only user (any
other user would see the changed value); otherwise, and when there is no Conv/Linear in front,
the BN alone is replaced (NormPropAffine). The BatchNorm's output may have several users: every
one of them then reads the NormProp output, and the activation is fused only when it is the
single user.

A BatchNorm module called at several places (a shared block ``self.u(self.u(x))``) is matched at
each call, and converted when every call matches the same way (:func:`_shared_pattern`): NormProp
has no per-call state, so one replacement serves every call, as the BatchNorm module did, and each
call keeps its own input correction (moment propagation corrects graph nodes, not modules). When
the calls match differently, the BatchNorm is left, once, with the reason naming each call site.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from torch import fx, nn

from normprop_fx.activation_functions import ActivationSpec, activation
from normprop_fx.batchnorm_state import batchnorm_state
from normprop_fx.records import LeftBatchNorm

from .describe import describe_node
from .graph_utils import AS_WRITTEN, feeds_modules, is_gate, module_uses, normalizable_activation, owner_stack
from .input_shape import SHAPE
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
    sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], BATCH_NORM_TYPES):
            sites.setdefault(str(node.target), []).append(node)
    matches: list[PatternMatch] = []
    left: list[LeftBatchNorm] = []
    normalized = feeds_modules(gm, BATCH_NORM_TYPES)
    for path, nodes in sites.items():
        try:
            found = [_match_at(gm, modules, calls, node, sites, normalized) for node in nodes]
            if len(found) > 1:
                found = _shared_pattern(gm, found)
        except _NotMatched as why:
            left.append(LeftBatchNorm(path, type(modules[path]).__name__, str(why)))
            continue
        matches.extend(found)
    return matches, left


def _call_site(match: PatternMatch, gm: fx.GraphModule) -> str:
    """One call of a shared BatchNorm, as the report names it: the module call it is made in
    (torch.fx's key, ``u@1`` for the second call of ``u``) and the pattern's input."""
    first = match.producer if match.producer is not None else match.norm
    source = first.args[0] if first.args else None
    stack = owner_stack(match.norm)
    where = f" in {next(reversed(stack))}" if stack else ""
    return f"the call{where} on {describe_node(source, gm)}"


def _match_shape(match: PatternMatch) -> tuple:
    """What a match does, apart from the nodes it consumes: equal for the calls of a shared
    BatchNorm that one replacement (per producer) can serve."""
    act = match.activation
    act_kind = None if act is None else (act.op, act.target if act.op != "call_module" else str(act.target))
    return (match.pattern, match.spec, act_kind, tuple(name for name, _ in match.kept))


def _shared_pattern(gm: fx.GraphModule, matches: list[PatternMatch]) -> list[PatternMatch]:
    """The matches of the calls of one BatchNorm module, when one replacement can serve them all
    (each call matched the same way), each with a note; else _NotMatched naming the call sites.

    - the same Conv/Linear in front of every call (a shared Conv+BN[+act] block): one NormProp
      layer, at the conv's name, called at every place;
    - no Conv/Linear in front of any call: one NormPropAffine at the BatchNorm's name;
    - a different Conv/Linear in front of each call (``bn(conv_a(x))``, ``bn(conv_b(y))``, each
      with an activation of its own or none): NormProp has no BatchNorm left to share, and one
      gamma/beta cannot act on two differently normalized convs as the BatchNorm's did on their
      batch-standardized outputs (a trained BatchNorm's function, folded with each conv's bias,
      is even different per conv). Each conv
      becomes its own NormProp layer whose gamma and beta are initialized from the BatchNorm as if
      it were that conv's alone (a trained BatchNorm's function kept exactly at each call; else the
      paper's initialization, gamma per the layer's activation), and the note says the
      BatchNorm's parameters are now per call site: they are trained apart from then on.
    """
    producers = [None if m.producer is None else str(m.producer.target) for m in matches]
    # the calls that one replacement serves (those with the same producer, or all when there is
    # none) must match alike; the layers of different producers are independent of each other
    shapes = {(p, _match_shape(m)) for p, m in zip(producers, matches)}
    path = str(matches[0].norm.target)
    n = len(matches)
    sites = [_call_site(m, gm) for m in matches]
    if len(shapes) > len(set(producers)) or (None in producers and len(set(producers)) > 1):
        described = "; ".join(
            f"{site}: "
            + (f"fused with {producers[i]}" if producers[i] else (m.notes[0] if m.notes else "no Conv/Linear in front"))
            + (f", activation {describe_node(m.activation, gm)}" if m.activation is not None else ", no activation")
            for i, (site, m) in enumerate(zip(sites, matches))
        )
        raise _NotMatched(
            f"{path} is called {n} times and its calls match differently ({described}): one replacement "
            "cannot serve them all"
        )
    if len(set(producers)) == 1:
        where = producers[0] or path
        note = (
            f"{path} is called {n} times ({'; '.join(sites)}): one replacement at {where} serves every call "
            "with the same parameters, each call with its own input correction"
        )
    else:
        note = (
            f"{path} is shared by {', '.join(dict.fromkeys(p for p in producers if p))}: each has its own NormProp "
            f"layer, whose gamma and beta are initialized from {path} (its trained function, or the paper's "
            f"initialization) as if {path} were its alone; {path}'s parameters are now per call site"
        )
    return [replace(m, notes=(*m.notes, note)) for m in matches]


def _users(node: fx.Node, gm: fx.GraphModule) -> str:
    return ", ".join(describe_node(u, gm) for u in node.users)


def _match_at(
    gm: fx.GraphModule, modules: dict[str, nn.Module], calls: Counter, norm_node: fx.Node,
    sites: dict[str, list[fx.Node]], normalized: set[fx.Node],
) -> PatternMatch:
    norm = modules[norm_node.target]
    unit = lookup_by_type(norm_act_units(), norm)
    if unit is None and lookup_by_type(PLAIN_BATCH_NORMS, norm) is None:
        own = own_forward_reason(PLAIN_BATCH_NORMS, norm) or f"{type(norm).__name__} is not a known BatchNorm form"
        raise _NotMatched(f"{own}, which replacing it would drop")
    if calls[norm_node.target] > len(sites[norm_node.target]):
        raise _NotMatched(
            f"{norm_node.target}'s attributes are read directly ({calls[norm_node.target]} uses, "
            f"{len(sites[norm_node.target])} calls): replacing it would change those reads"
        )
    if unit is not None:
        act_node, spec, kept, notes = None, *_unit_activation(norm, unit, is_gate(norm_node, modules))
    else:
        act_node, spec, notes = _activation_after(gm, modules, norm_node, normalized)
        kept = ()
    if not batchnorm_state(norm).affine:
        notes = (*notes, f"{norm_node.target} had affine=False: gamma and beta are fixed buffers")
    producer_node, pattern, why_not = _producer_of(gm, modules, calls, norm_node, norm, sites)
    if pattern is None:
        return PatternMatch(norm_node, act_node, spec, kept=kept, notes=(why_not, *notes))
    return PatternMatch(norm_node, act_node, spec, producer_node, pattern, kept, notes)


def _producer_of(
    gm: fx.GraphModule, modules: dict[str, nn.Module], calls: Counter, norm_node: fx.Node, norm: nn.Module,
    sites: dict[str, list[fx.Node]],
) -> tuple[fx.Node | None, ProducerPattern | None, str]:
    """The Conv/Linear node that the BN can be fused with, or (None, None, why not). A producer
    called at several places is fused when every one of its calls feeds a call of this BatchNorm
    alone (a shared Conv+BN block): the fused layer then computes each call's pair."""
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
    if pattern.input_dim is not None:
        source = producer_node.args[0] if producer_node.args else None
        shape = source.meta.get(SHAPE) if isinstance(source, fx.Node) else None
        if shape is not None and len(shape) != pattern.input_dim:
            return None, None, (
                f"{producer_node.target} gets {len(shape)}-D input {shape}: on it a {type(norm).__name__} "
                f"normalizes dim 1, not the {features} output features, so it is not fused"
            )
    if calls[producer_node.target] > 1 and not _feeds_only(gm, str(producer_node.target), sites[norm_node.target]):
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


def _feeds_only(gm: fx.GraphModule, producer: str, norm_calls: list[fx.Node]) -> bool:
    """Every use of module ``producer`` in ``gm`` is a call whose one user is one of ``norm_calls``."""
    producer_calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == producer]
    attribute_reads = any(n.op == "get_attr" and str(n.target).startswith(f"{producer}.") for n in gm.graph.nodes)
    return not attribute_reads and all(
        len(n.users) == 1 and next(iter(n.users)) in norm_calls for n in producer_calls
    )


#: What a rewrite's notes say of a gate activation left out of the NormProp layer.
_GATE_NOTE = "is a gate (its output only multiplies other values): it stays raw, on the standardized output"
#: ... and of a functional activation that the caller of the BatchNorm's module applies to that
#: module's output, and whose output no NormProp layer reads (DenseNet's ``F.relu`` after
#: ``features``): fusing it would change what the module returns, and normalizing it would rewrite
#: the caller's forward for no layer's sake, so it stays as the user wrote it.
HEAD_NOTE = ("is applied by the caller to its module's output, and no NormProp layer reads it: it stays as written, "
             "on the standardized output (the module's output and the caller's forward are not changed)")


def _unit_activation(
    norm: nn.Module, unit: NormActUnit, gate: bool = False
) -> tuple[ActivationSpec, tuple[tuple[str, nn.Module], ...], tuple[str, ...]]:
    """The activation of a norm-activation unit to fuse, and its modules that stay after it.
    ``gate``: the unit's output only multiplies other values, so a (0, 1) activation stays raw."""
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
        elif spec.function.gate and gate:
            note = (f"its activation {type(act).__name__} {_GATE_NOTE}",)
            spec = None
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


def _applied_by_a_caller(user: fx.Node, norm_node: fx.Node) -> bool:
    """Whether ``user`` is made in a forward that called (directly or not) the module whose
    forward called the BatchNorm: the BatchNorm's output was returned up to it."""
    outer, inner = list(owner_stack(user)), list(owner_stack(norm_node))
    return len(outer) < len(inner) and inner[: len(outer)] == outer


def _activation_after(
    gm: fx.GraphModule, modules: dict[str, nn.Module], norm_node: fx.Node, normalized: set[fx.Node],
) -> tuple[fx.Node | None, ActivationSpec, tuple[str, ...]]:
    """The activation node that consumes ``norm_node`` and its spec, or (None, identity, notes).
    ``normalized``: the nodes whose value reaches a BatchNorm (a NormProp layer to be)."""
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
    if spec.function.gate and is_gate(user, modules):
        return None, identity, (f"{describe_node(user, gm)} after the BatchNorm {_GATE_NOTE}",)
    if module is None and user not in normalized and _applied_by_a_caller(user, norm_node):
        user.meta[AS_WRITTEN] = HEAD_NOTE
        return None, identity, (f"{describe_node(user, gm)} after the BatchNorm {HEAD_NOTE}",)
    return user, spec, ()

