"""The torch.fx passes behind normprop_fx.convert, one pass a module.

Layering (each layer imports only from the layers before it):

1. core modules, ``normprop_fx/*.py`` without convert / fold / model_check / summary: the
   NormProp layers and modules, activation functions and their constants, records, errors;
2. ``passes/graph_utils.py`` (small graph helpers shared by every pass, and fold), the data
   and text modules the passes read (``patterns``, ``moment_rules`` with ``moment_particles``,
   ``describe``), then the passes below; a pass reads another only for its data
   (``insert_corrections`` reads ``propagate``'s record types, ``moment_rules`` ``trace``'s
   mode-dependent modules);
3. ``normprop_fx.convert`` (runs the pipeline), ``normprop_fx.fold`` (a graph pass of its own on a
   converted model, built on ``graph_utils``), ``normprop_fx.model_check`` and ``summary``.

The pipeline, in the order ``convert`` runs it (the "Pass N" of each module's docstring):

1. ``trace.trace``: model -> GraphModule (NormProp and frozen BatchNorms kept as leaves);
2. ``dropout_modes.restore_dropout_modes``: functional dropout frozen by the trace follows
   train()/eval() again;
3. ``trace.frozen_training_flags``: the other calls whose ``training=`` the trace froze (warned);
4. ``inventory``: every BatchNorm of the original model, and those the graph does not show;
5. ``initialization``: per BatchNorm, keep its trained function or the paper's initialization;
6. ``match``: find what replaces each BatchNorm (patterns as data in ``patterns``);
7. ``rewrite``: NormProp layers (and NormPropAffines) in place;
8. ``opaque``: BatchNorms inside modules torch.fx keeps opaque, replaced in place;
9. ``input_shape``: the example input shape moment propagation runs on;
10. ``propagate``: nominal moments of every node on a Gaussian sample; only computes, records in
    ``node.meta`` (rules per op in ``moment_rules``);
11. ``insert_corrections``: the Standardize corrections and normalized activations from those
    records (the graph edits);
12. ``absorb_corrections``: scalar corrections merged into the activation before them;
13. ``attach_corrections``: a correction read by one NormProp module called once becomes that
    module's ``input_correction``, so the forward that calls it needs no rebuilding;
14. ``hierarchy``: the converted flat graph written back into the user's model: modules swapped
    at their own names, forwards that changed rebuilt as GraphModules at theirs, the result
    checked against the flat graph by tracing it again (13 and 14 are skipped for
    ``convert(flat=True)``).

Passes 10 to 12 are skipped for a model whose every BatchNorm keeps its trained function.
Every pass that adds a node gives it the owner of the node it is inserted for, and every pass
that hands a node's readers to another records it (``graph_utils.adopt_owner``, ``hand_over``):
pass 14 reads both.
"""

from .inventory import batchnorm_modules, batchnorms_outside_graph
from .match import PatternMatch, match_patterns
from .rewrite import rewrite_patterns
from .trace import NormPropTracer, trace

__all__ = [
    "NormPropTracer",
    "PatternMatch",
    "batchnorm_modules",
    "batchnorms_outside_graph",
    "match_patterns",
    "rewrite_patterns",
    "trace",
]
