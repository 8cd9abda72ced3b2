"""Pass 7: replace each matched BatchNorm by its NormProp form.

- Conv/Linear -> BN [-> act]: one NormProp layer at the producer's qualified name; the BN and
  activation nodes go.
- BN with no Conv/Linear to fuse with: a NormPropAffine at the BN's own qualified name.

Each replacement is initialized as its BatchNorm's :class:`~normprop_fx.records.LayerInit` says
(``passes.initialization``): the paper's way, or keeping the trained BatchNorm's eval-mode
function exactly (docs/method.md section 8). Its gamma and beta are trained when the BatchNorm's affine was
(a frozen BatchNorm's: when its conv's weight is).

Users of the pattern's last node read the replacement's output; modules of a norm-activation
unit that cannot be fused (a drop-block, an activation without fixed moments) stay after it as
``<bn path>_<attribute>``. The graph is linted and recompiled. State-dict keys stay readable:
``layer1.0.conv1.weight``, ``.gamma``, ``.beta``.

A BatchNorm called at several places (``passes.match``) has one match per call: the replacement
is made once, at the first, and every later match with the same path only rewires its own nodes to
call it, so the calls share one module and its parameters, and the report has one record for it.
"""

from __future__ import annotations

from torch import fx, nn

from normprop_fx.affine import NormPropAffine
from normprop_fx.batchnorm_state import batchnorm_state, follow_requires_grad
from normprop_fx.layers import DEFAULT_EPS, GammaInit
from normprop_fx.moments import activation_constants
from normprop_fx.records import LayerInit, Rewrite

from .describe import describe_node
from .graph_utils import adopt_owner, hand_over, set_submodule, take_over
from .match import PatternMatch


def rewrite_patterns(
    gm: fx.GraphModule,
    matches: list[PatternMatch],
    inits: dict[str, LayerInit],
    *,
    gamma_init: GammaInit = "paper",
    eps: float = DEFAULT_EPS,
) -> tuple[fx.GraphModule, list[Rewrite]]:
    """Rewrite ``matches`` in ``gm`` (modified and returned).

    Each NormProp layer takes the producer's weight Parameter itself, so weights tied between
    layers (or with modules that stay) stay tied; ``convert`` has already deep-copied the model
    unless it was asked to work in place. A computed weight (a parametrization or an old-style
    weight_norm/spectral_norm hook) cannot be shared: the layer gets a plain copy and a note.
    """
    records = []
    replaced: set[str] = set()  # paths already holding their replacement (a module called again)
    for match in matches:
        bn_path = str(match.norm.target)
        norm = gm.get_submodule(bn_path)
        state = batchnorm_state(norm)
        choice = inits[bn_path]
        original = tuple(describe_node(n, gm) for n in (match.producer, match.norm, match.activation) if n is not None)
        notes = match.notes
        fused = match.producer is not None and match.pattern is not None
        replaced_at = str(match.producer.target) if fused else bn_path
        if replaced_at in replaced:
            # another call of a module replaced already: its node calls the replacement already
            _rewire(gm, match, match.producer if fused else match.norm)
            continue
        replaced.add(replaced_at)
        if fused:
            path, out = str(match.producer.target), match.producer
            producer = gm.get_submodule(path)
            layer = match.pattern.replacement.from_module(
                producer, share_weight=True, activation=match.spec, gamma_init=gamma_init, affine=state.affine, eps=eps
            )
            if layer.weight is not producer.weight:
                notes = (*notes, (f"the weight of {path} is computed (parametrization or hook): "
                                  "the NormProp layer holds a plain copy of its current value"))
            bias = getattr(producer, "bias", None)
            if choice.trained:
                layer.keep_batchnorm_function(state, bias, where=path)
            if bias is not None:
                fate = "folded into beta" if choice.trained else "dropped (beta takes its role)"
                notes = (f"bias of {path} {fate}", *notes)
            layer.required_input_dim = match.pattern.input_dim
            layer.train(producer.training)
            conv_weight = producer.weight
        else:
            path, out = bn_path, match.norm
            layer = NormPropAffine.from_batchnorm(norm, activation=match.spec, gamma_init=gamma_init)
            if choice.trained:
                layer.keep_batchnorm_function(state)
            layer.train(norm.training)
            conv_weight = None
        follow_requires_grad(layer, state, conv_weight)
        set_submodule(gm, path, layer)
        _rewire(gm, match, out)

        records.append(
            Rewrite(
                path=path,
                original=original,
                replacement=type(layer).__name__,
                activation=str(match.spec),
                gamma_init=layer.gamma_init,
                c_mean=layer.activation.mean,
                c_std=layer.activation.std,
                jacobian_gain=activation_constants(match.spec).jacobian_gain,
                notes=notes,
                init=choice.init,
                batchnorm=bn_path,
            )
        )
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, records


def _rewire(gm: fx.GraphModule, match: PatternMatch, out: fx.Node) -> None:
    """Make ``out`` (the node that now calls the replacement) stand for the pattern's last node:
    the kept modules after it, the BatchNorm and fused activation nodes erased."""
    first_kept, tail = _insert_kept(gm, match.norm, out, match.kept)
    last = match.activation if match.activation is not None else match.norm
    if last is out:
        if tail is not out:
            hand_over(out, tail, delete_user_cb=lambda user, first=first_kept: user is not first)
    else:
        hand_over(last, tail)
        for node in (match.activation, match.norm):
            if node is not None and node is not out:
                if node is not last:  # a module that returned the BatchNorm's output now returns the layer's
                    take_over(tail, node)
                gm.graph.erase_node(node)


def _insert_kept(
    gm: fx.GraphModule, norm: fx.Node, out: fx.Node, kept: tuple[tuple[str, nn.Module], ...]
) -> tuple[fx.Node | None, fx.Node]:
    """Call ``kept`` modules in order after ``out``, each registered as ``<norm path>_<attr>`` and
    owned by the forward that called the BatchNorm ``norm``.
    Returns the first inserted node (or None) and the last node of the chain."""
    first: fx.Node | None = None
    tail = out
    for attribute, module in kept:
        target = f"{norm.target}_{attribute}"
        gm.add_submodule(target, module)
        with gm.graph.inserting_after(tail):
            tail = adopt_owner(gm.graph.call_module(target, (tail,)), norm)
        first = first or tail
    return first, tail
