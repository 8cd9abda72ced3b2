"""Pass 11: insert the corrections and normalized activations that moment propagation decided.

``passes.propagate`` only computes: it leaves its decisions in ``node.meta`` (``CORRECTION`` on
a NormProp consumer whose input is not standardized, ``NORMALIZE`` on a standalone activation to
normalize). This pass makes the graph edits from those records, as the converted model runs them
on propagation's sample:

- each standalone activation becomes a :class:`~normprop_fx.normalized_activation.NormalizedActivation`
  (at the activation module's own name when it is called once, else at ``<name>_normalized``),
  with a correction in front when its input's moments are not standard;
- each consumer's input gets a :class:`~normprop_fx.standardize.Standardize` correction,
  ``<consumer>_input_correction``.

Then the records are removed from ``node.meta`` (they hold particle tensors that a converted
model must not carry), unused submodules are deleted and the graph is recompiled.
"""

from __future__ import annotations

import torch
from torch import fx

from normprop_fx.activation_functions import ActivationSpec
from normprop_fx.normalized_activation import NormalizedActivation
from normprop_fx.records import Correction, NormalizedStandalone
from normprop_fx.standardize import Standardize, standardizing_scale

from .describe import correction_reason, describe_node, near_constant_line, owner_module_path, value_range
from .graph_utils import adopt_owner, free_module_name, hand_over, module_calls, set_submodule
from .moment_rules import Moments
from .propagate import CORRECTION, NORMALIZE, RECORDS, MomentAnalysis


def insert_corrections(
    gm: fx.GraphModule, analysis: MomentAnalysis
) -> tuple[fx.GraphModule, list[Correction], list[NormalizedStandalone]]:
    """Apply the records :func:`~normprop_fx.passes.propagate.propagate_moments` left in ``gm``
    (modified and returned). Returns the corrections (those inserted, then those the opaque
    modules measured for themselves) and the normalized standalone activations."""
    standalone_nodes = [n for n in gm.graph.nodes if NORMALIZE in n.meta]
    consumers = [n for n in gm.graph.nodes if CORRECTION in n.meta]
    corrections: list[Correction] = []
    standalone: list[NormalizedStandalone] = []
    for node in standalone_nodes:
        record = node.meta[NORMALIZE]
        standalone.append(_normalize_standalone(gm, node, record.spec, record.moments, corrections))
    for node in consumers:
        record = node.meta[CORRECTION]
        source = node.args[0]
        corrections.append(_insert_correction(gm, node, source, record.moments, str(node.target), record.calibration))
    corrections += analysis.opaque_corrections
    for node in gm.graph.nodes:
        for key in RECORDS:
            node.meta.pop(key, None)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, corrections, standalone


def _insert_correction(
    gm: fx.GraphModule, consumer: fx.Node, source: fx.Node, moments: Moments, name: str, note: str | None = None
) -> Correction:
    # compact (1, C, 1, ...) -> Standardize's (C, 1, ...) without the batch dim; scalar below rank 2
    def without_batch(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[1:]) if t.dim() >= 2 else t.reshape(())

    mean, var = without_batch(moments.mean), without_batch(moments.var)
    if mean.numel() > 1 and torch.allclose(mean, mean.flatten()[0].expand_as(mean)) and torch.allclose(var, var.flatten()[0].expand_as(var)):
        mean, var = mean.flatten()[0], var.flatten()[0]
    scale, near_constant = standardizing_scale(var)
    reason = correction_reason(describe_node(source, gm), mean, var, note, moments.structural)
    if near_constant:
        reason += f"; {near_constant_line(near_constant, var.numel())}"
    module = Standardize(mean.float(), scale.float(), reason=reason)
    target = free_module_name(gm, f"{name}_input_correction")
    gm.add_submodule(target, module)
    with gm.graph.inserting_before(consumer):
        corrected = adopt_owner(gm.graph.call_module(target, (source,)), consumer)
    consumer.replace_input_with(source, corrected)
    return Correction(
        path=target,
        consumer=name,
        source=describe_node(source, gm),
        reason=reason,
        mean=value_range(mean),
        scale=value_range(scale),
        estimated=not moments.structural,
    )


def _normalize_standalone(
    gm: fx.GraphModule, node: fx.Node, spec: ActivationSpec, moments: Moments, corrections: list[Correction]
) -> NormalizedStandalone:
    original = describe_node(node, gm)
    base = str(node.target) if node.op == "call_module" else ".".join(p for p in (owner_module_path(node), node.name) if p)
    uses = module_calls(gm)[node.target]
    target = base if node.op == "call_module" and uses == 1 else free_module_name(gm, f"{base}_normalized")
    module = NormalizedActivation(spec)
    if target == base:
        set_submodule(gm, target, module)
    else:
        gm.add_submodule(target, module)
    source = node.args[0]
    with gm.graph.inserting_before(node):
        new = adopt_owner(gm.graph.call_module(target, (source,)), node)
    hand_over(node, new)
    gm.graph.erase_node(node)
    if not moments.is_standard():
        corrections.append(_insert_correction(gm, new, source, moments, target))
    return NormalizedStandalone(path=target, original=original, activation=str(spec))
