"""``normprop_fx.convert``: a batch-normalized model in, the same model with NormProp layers out."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.nn.parameter import is_lazy

from .activation_functions import activation
from .batchnorm_state import is_batchnorm
from .errors import InvalidOptionError, NormPropError
from .layers import DEFAULT_EPS, GammaInit, resolve_gamma_init
from .passes.absorb_corrections import absorb_corrections
from .passes.attach_corrections import attach_corrections
from .passes.initialization import check_init_option, choose_initializations, discarded
from .passes.input_shape import record_linear_input_shapes, resolve_example_inputs
from .passes.inventory import batchnorm_modules, batchnorms_outside_graph
from .passes.match import match_patterns
from .passes.dropout_modes import restore_dropout_modes
from .passes.graph_utils import TAKES_OVER
from .passes.hierarchy import Snapshot, restore_hierarchy
from .passes.insert_corrections import insert_corrections
from .passes.opaque import replace_opaque_batchnorms
from .passes.calibration_sample import calibration_line, calibration_sample_size, grown
from .passes.propagate import PROBE_SEED, propagate_moments
from .passes.rewrite import rewrite_patterns
from .passes.trace import (
    MODE_DEPENDENT,
    MODULE_CALLS,
    LeafSpec,
    NormPropTracer,
    frozen_training_flags,
    split_leaf_modules,
    trace,
)
from .records import REPORT_ATTRIBUTE, TRAINED_INIT, ConversionReport, LayerInit, ModuleTree

logger = logging.getLogger(__name__)


INPUT_ASSUMPTION = (
    "the model input is standardized per channel (zero mean, unit variance), as torchvision "
    "and timm transforms produce"
)
TRAINED_ASSUMPTION = (
    "nothing about the input: every layer keeps its trained BatchNorm's eval-mode function exactly, so no "
    "moment propagation and no correction was needed"
)


class NormPropWarning(UserWarning):
    """A conversion that did less than the user probably expected (e.g. no BatchNorm found)."""


def convert(
    model: nn.Module,
    *,
    init: str = "auto",
    gamma_init: GammaInit = "paper",
    leaf_modules: Sequence[LeafSpec] = (),
    inplace: bool = False,
    eps: float = DEFAULT_EPS,
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    flat: bool = False,
    calibration_samples: int | None = None,
    calibration_seed: int = PROBE_SEED,
) -> nn.Module:
    """Trace ``model`` and replace every Conv/Linear -> BatchNorm [-> activation] with a NormProp layer.

    The result is the user's model: of its class, with its module tree, methods and attributes
    (timm's ``forward_features``, ``reset_classifier``, ``pretrained_cfg``...). Each Conv/Linear
    becomes its NormProp layer at its own qualified name, each BatchNorm ``nn.Identity``, each
    activation its normalized form; a block whose own forward needs an operation it does not have
    (a scale correction, a normalized activation for one of two calls of one module) is replaced,
    at its own name, by a GraphModule of its forward rewritten, and its parents keep theirs
    (docs/method.md section 9). ``result.normprop_report.module_tree`` lists those.

    Args:
        model: any traceable ``nn.Module``.
        init: how each BatchNorm's replacement is initialized (docs/method.md section 8). ``"auto"``
            (default): a trained BatchNorm (batches tracked or running statistics moved from
            their initial values, or a frozen BatchNorm) keeps its eval-mode function
            exactly, an untrained one gets the paper's initialization; decided per BatchNorm and
            listed in the report. ``"trained"`` keeps every BatchNorm's function, ``"normprop"``
            gives every one the paper's initialization (a warning says when that discards trained
            BatchNorms). A BatchNorm with ``track_running_stats=False`` always gets the paper's.
        gamma_init: for the layers with the paper's initialization: ``"paper"`` (1 / the
            activation's Jacobian gain: 1/1.21 for ReLU) or a positive number (``1.0`` gives a
            forward-standardized network).
        leaf_modules: module classes or qualified names that torch.fx must not trace into
            (their BatchNorms are left and reported).
        inplace: when False (the default) ``model`` is deep-copied first and never changed.
            When True ``model`` itself is converted and returned (its modules swapped in place);
            only when its own forward must be rebuilt is the result a new GraphModule, holding
            ``model``'s weights, and a warning says so.
            Either way each NormProp layer keeps the conv's weight Parameter itself, so weights
            tied between layers stay tied.
        eps: added to each filter's squared norm in the weight normalization.
        concrete_args: passed to torch.fx to fix inputs that drive control flow.
        example_inputs: example model input(s); only their shapes are used, to compute the
            nominal moments (global pooling averages H*W values, so the corrections after it
            depend on the resolution). When omitted the shape is inferred from the model (timm's
            ``pretrained_cfg["input_size"]``, else the first layer with 224 pixels a side)
            and the report says so.
        flat: return the one flat ``torch.fx.GraphModule`` the passes worked on instead (every
            module inlined, the class and the blocks' forwards gone).
        calibration_samples: how many Gaussian samples (of the example input's shape) moment
            propagation measures what no rule knows on (pooling correlations, ops without a
            rule). None (default): as many as the shapes call for, 8-256
            (``passes/calibration_sample.py``: the smaller the late maps, the more), grown
            during propagation where the samples' own spread asks for more (up to 4x the time),
            so the constants depend little on the draw; the report says how many. A given N is
            used as it is, from start to end.
        calibration_seed: the seed of that sample (and of the probes); another seed gives the
            same constants to within a few percent.

    Returns:
        The converted model (``flat=True``: a ``torch.fx.GraphModule``);
        ``result.normprop_report`` is the :class:`~normprop_fx.records.ConversionReport` that
        :func:`normprop_fx.summary` prints.

    Raises:
        UntraceableModelError: torch.fx cannot trace the model; the message names the module.
        InvalidOptionError: a bad option value.
    """
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"convert() takes an nn.Module, got {type(model).__name__}")
    check_init_option(init)
    resolve_gamma_init(gamma_init, activation("relu"))  # validate before any work
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        raise InvalidOptionError(f"eps must be a finite positive number, got {eps!r}")
    if calibration_samples is not None and (isinstance(calibration_samples, bool) or not isinstance(
            calibration_samples, int) or calibration_samples < 1):
        raise InvalidOptionError(f"calibration_samples must be a positive int or None, got {calibration_samples!r}")
    if isinstance(calibration_seed, bool) or not isinstance(calibration_seed, int):
        raise InvalidOptionError(f"calibration_seed must be an int, got {calibration_seed!r}")
    lazy = [name for name, p in model.named_parameters() if is_lazy(p)]
    if lazy:
        raise NormPropError(
            f"parameter '{lazy[0]}' is not initialized yet (lazy module): run one forward pass "
            "on an example input before convert()"
        )
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as err:
            raise NormPropError(
                f"could not deep-copy {type(model).__name__} ({err}); pass inplace=True to convert it "
                "without a copy (the result then shares weights with it)"
            ) from err

    gm, leaf_paths = trace(model, leaf_modules, concrete_args)
    branching = gm.meta.pop(MODE_DEPENDENT, [])
    snapshot = Snapshot.of(gm)
    restore_dropout_modes(gm)
    frozen = [*frozen_training_flags(gm), *_mode_dependent_warnings(model, branching)]
    for message in frozen:
        warnings.warn(message, NormPropWarning, stacklevel=2)
    found = batchnorm_modules(model)
    inits = choose_initializations(batchnorm_modules(model, remove_duplicate=False), init)
    init_warnings = _initialization_warnings(init, [inits[path] for path in found])
    hidden = batchnorms_outside_graph(model, gm, leaf_paths)
    record_linear_input_shapes(model, gm, example_inputs)
    matches, unmatched = match_patterns(gm)
    gm, rewrites = rewrite_patterns(gm, matches, inits, gamma_init=gamma_init, eps=eps)
    opaque_rewrites, hidden = replace_opaque_batchnorms(gm, hidden, inits, gamma_init)
    corrections, standalone, estimated, unknown = [], [], [], []
    samples, precision = None, None
    if rewrites + opaque_rewrites and all(r.init == TRAINED_INIT for r in rewrites + opaque_rewrites):
        inputs, assumptions = _example_inputs_if_known(model, gm, example_inputs), (TRAINED_ASSUMPTION,)
    else:
        inputs, shape_assumption = resolve_example_inputs(model, gm, example_inputs)
        sample = calibration_sample_size(gm, inputs, calibration_samples)
        assumptions = (INPUT_ASSUMPTION, *shape_assumption, calibration_line(sample, calibration_seed))
        samples = sample.samples
        try:
            analysis = propagate_moments(gm, inputs, sample.samples, calibration_seed, sample.growth)
            if analysis.growth_steps or analysis.growth_failure:
                sample = grown(sample, analysis.growth_steps, analysis.growth_failure)
                assumptions, samples = (*assumptions[:-1], calibration_line(sample, calibration_seed)), sample.samples
            gm, corrections, standalone = insert_corrections(gm, analysis)
            estimated, unknown, precision = analysis.estimated, analysis.unknown, analysis.precision
        except Exception as err:
            # A NormPropError from a converted layer already says what is wrong and what to do
            # (a Linear -> BatchNorm1d layer given 3-D input: keep it out of the conversion); the
            # input-shape advice fits the other errors, which the model itself raised on the shape.
            advice = "" if isinstance(err, NormPropError) else " Pass example_inputs= with a shape the model accepts."
            raise NormPropError(
                f"moment propagation failed on {type(model).__name__} for input shapes "
                f"{[tuple(x.shape) for x in inputs]}: {type(err).__name__}: {err}.{advice}"
            ) from err
        gm, corrections = absorb_corrections(gm, corrections)
    for message in init_warnings:
        warnings.warn(message, NormPropWarning, stacklevel=2)
    if flat:
        result, tree = gm, _flat_tree(model, gm)
    else:
        gm, corrections = attach_corrections(gm, corrections)
        types, names = split_leaf_modules(model, leaf_modules)
        leaves = (types, names + tuple(p for p in branching if p))
        result, tree = restore_hierarchy(model, gm, snapshot, lambda: NormPropTracer(*leaves), concrete_args)
        if inplace and result is not model:
            warnings.warn(
                f"inplace=True: the forward of {type(model).__name__} itself had to be rebuilt "
                f"({tree.rebuilt[0].reason if tree.rebuilt else 'see the report'}): use the returned GraphModule; "
                "it holds the weights of the model you passed, whose own modules are not swapped",
                NormPropWarning,
                stacklevel=2,
            )

    if "" in branching and result is not model:
        message = (f"the forward of {type(model).__name__} itself branches on self.training (its traced graph "
                   f"differs between train and eval mode), and the conversion had to rebuild it: the result "
                   f"follows its {'train' if model.training else 'eval'}-mode graph in both modes")
        warnings.warn(message, NormPropWarning, stacklevel=2)
        frozen.append(message)

    report = ConversionReport(
        model=type(model).__name__,
        gamma_init=str(gamma_init),
        batchnorms_found=len(found),
        init=init,
        initializations=[inits[path] for path in found],
        rewrites=rewrites + opaque_rewrites,
        left=unmatched + hidden,
        leaf_modules=leaf_paths,
        assumptions=assumptions,
        warnings=(*frozen, *init_warnings),
        corrections=corrections,
        normalized_activations=standalone,
        estimated_ops=tuple(estimated),
        unknown_moments=tuple(unknown),
        input_shapes=tuple(tuple(x.shape) for x in inputs),
        calibration_samples=samples,
        calibration_precision=precision,
        module_tree=tree,
    )
    setattr(result, REPORT_ATTRIBUTE, report)
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ restores these (EMA copies, copy.deepcopy(converted)).
        result.meta.setdefault("_user_preserved_attributes", {})[REPORT_ATTRIBUTE] = report
    if not found:
        warnings.warn(
            f"{type(model).__name__} has no BatchNorm module: nothing was converted",
            NormPropWarning,
            stacklevel=2,
        )
    logger.info(
        "converted %s: %d BatchNorm found, %d converted, %d left",
        report.model, report.batchnorms_found, report.converted, len(report.left),
    )
    return result


def _flat_tree(model: nn.Module, gm: fx.GraphModule) -> ModuleTree:
    """The record of a flat result; the trace's bookkeeping for the module tree is dropped (it
    refers to nodes the passes erased)."""
    gm.meta.pop(MODULE_CALLS, None)
    for node in gm.graph.nodes:
        node.meta.pop(TAKES_OVER, None)
    return ModuleTree(root_type=type(model).__name__, class_kept=False, flat=True)


def _example_inputs_if_known(
    model: nn.Module, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """The example inputs for the report when no propagation needs them: given (and checked),
    or inferred where the model tells, else none."""
    try:
        return resolve_example_inputs(model, gm, example_inputs)[0]
    except NormPropError:
        if example_inputs is not None:
            raise
        return ()


def _mode_dependent_warnings(model: nn.Module, branching: list[str]) -> list[str]:
    """One line per module the trace made a leaf because its forward branches on ``self.training``
    (passes/trace.py): what it means, and the BatchNorms that stay inside it."""
    lines = []
    for path in filter(None, branching):
        module = model.get_submodule(path)
        inside = sum(1 for m in module.modules() if is_batchnorm(m))
        left = (f"; its {inside} BatchNorm(s) are replaced inside it as in any leaf module (see the report), "
                "a branch in a module of its own keeps the rest traceable") if inside else ""
        lines.append(f"module '{path}' ({type(module).__name__}) branches on self.training (its traced graph differs "
                     f"between train and eval mode): kept as a leaf module, so its own forward runs in the mode "
                     f"of the moment{left}")
    return lines


def _initialization_warnings(init: str, inits: list[LayerInit]) -> list[str]:
    """What the user should know about the initialization choices: a trained function discarded,
    a model that mixes trained and untrained BatchNorms, statistics that may come from shape checks."""
    lines = []
    lost = discarded(inits)
    if lost:
        lines.append(
            f"init='normprop' discards the trained function of {len(lost)} of {len(inits)} BatchNorms (e.g. "
            f"{lost[0].path}: {lost[0].evidence}): the converted model computes something else; use init='auto' "
            "to keep it"
        )
    trained = [i for i in inits if i.trained]
    fresh = [i for i in inits if not i.trained]
    if init == "auto" and trained and fresh:
        lines.append(
            f"the model mixes trained and untrained BatchNorms: {len(trained)} keep their trained function "
            f"(e.g. {trained[0].path}), {len(fresh)} get the paper's initialization (e.g. {fresh[0].path}: "
            f"{fresh[0].reason}); pass init='trained' or init='normprop' to treat them all alike"
        )
    if init == "auto" and trained and all(i.statistics_only for i in trained):
        lines.append(
            f"the {len(trained)} BatchNorms counted as trained have moved running statistics but affines at their "
            "initial values: if those statistics come from a few train-mode forward passes (a shape check), not "
            "from training, pass init='normprop' for the paper's initialization"
        )
    if init == "trained" and fresh:
        lines.append(
            f"init='trained' cannot apply to {len(fresh)} BatchNorms with track_running_stats=False "
            f"(e.g. {fresh[0].path}): they get the paper's initialization"
        )
    return lines


def conversion_report(converted: nn.Module) -> ConversionReport:
    """The report attached by :func:`convert`; NormPropError if ``converted`` has none."""
    report = getattr(converted, REPORT_ATTRIBUTE, None)
    if not isinstance(report, ConversionReport):
        raise NormPropError(
            f"{type(converted).__name__} carries no conversion report: pass the module that "
            "normprop_fx.convert() returned"
        )
    return report
