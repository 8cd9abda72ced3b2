"""Pass 10: nominal moment propagation, the analysis behind the scale corrections (docs/method.md section 6).

Every value of the rewritten graph gets nominal moments, assuming a standardized model input,
standardized NormProp outputs (gamma = 1, beta = 0: the corrections are structural and never
undo the 1/1.21 gamma initialization) and independent branches. Where a NormProp layer or a
NormPropAffine would see a value whose nominal moments are not (0, 1), it needs a
:class:`~normprop_fx.standardize.Standardize` correction in front of it. An
activation that stands alone (after a residual add, a concat, a kept drop-block) and whose
input moments follow from the structure is normalized too: corrected input, then the
activation's own (f - c_mean) / c_std.

The graph runs once, without gradients and in eval mode, on a Gaussian sample input with every
NormProp gamma at 1 and beta at 0, exactly as the converted model will run at init: each
correction and normalized activation is applied to the sample as soon as it is decided. The
sample gives the shapes, and it measures what no structural rule can know: how correlated the
values that a pooling op combines are (neighbouring positions of a feature map are, so their
average keeps more than 1/k of the variance, and their max is smaller than the max of k
independent values). Pooling moments are the rule's, scaled by that measured correlation, and
reported as estimated. Ops without a rule are estimated by running them on Gaussian probes with
the predicted moments; such estimates are marked in the records too.

Layers that keep a trained BatchNorm's function (``init == "trained"``, docs/method.md section 8) are left as
they are: no correction in front of them, their gamma and beta keep their values on the sample,
and their outputs' moments are measured on the sample (estimated, not structural). A standalone
activation whose output reaches such a layer without passing through an untrained NormProp layer
is not normalized: the trained layer expects the raw values. So in a model that mixes trained and
untrained BatchNorms, corrections and normalized activations are added only where they feed the
untrained ones; :func:`propagate_moments` is not needed at all for a model with none.

This pass only computes, as ``torch.fx.passes.shape_prop`` does: it records its results in each
node's ``meta`` (:data:`MOMENTS`, and :data:`CORRECTION` / :data:`NORMALIZE` where the converted
model needs a correction or a normalized activation) and returns the rest of what it measured on
the sample as a :class:`MomentAnalysis`. The graph edits are the next pass's,
``passes.insert_corrections``; the rules per op are ``passes.moment_rules``'.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from normprop_fx.activation_functions import ActivationSpec
from normprop_fx.affine import NormPropAffine
from normprop_fx.heap import FreedBytes, release_freed_heap
from normprop_fx.layers import NormPropLayer
from normprop_fx.moments import activation_moments
from normprop_fx.normalized_activation import NormalizedActivation
from normprop_fx.opaque_affine import OpaqueNormPropAffine
from normprop_fx.records import TRAINED_INIT, CalibrationPrecision, Correction
from normprop_fx.standardize import standardizing_scale

from .calibration_sample import SampleGrowth, sample_shape
from .describe import calibration_estimate, calibration_note, describe_node, opaque_unmeasured, value_range
from .graph_utils import (
    AS_WRITTEN,
    NORMPROP_CONSUMERS,
    NORMPROP_MODULES,
    channel_moments,
    holder_paths,
    is_gate,
    normalizable_activation,
    restore_buffers,
    sample_mean_squares,
    save_buffers,
    upstream_of,
)
from .moment_rules import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    RULES,
    Moments,
    NoRule,
    flat_moments,
    per_channel,
    sample_moments,
    tensor_args,
)
from .moment_particles import activation_moments_of, activation_particles, particles_or_gaussian, weighted_sum_particles
from .patterns import (
    FUNCTION_ACTIVATION_FORMS,
    MODULE_ACTIVATION_FORMS,
    ActivationForm,
    lookup_by_type,
)

logger = logging.getLogger(__name__)

#: Samples per channel a Gaussian probe aims for, and the most probe runs per op.
PROBE_SAMPLES = 4096
PROBE_MAX_RUNS = 16
PROBE_SEED = 0  #: the default seed of the sample and the probes (convert's calibration_seed)
#: A structural correction is kept while the sample's variance is within this fraction of it.
STRUCTURAL_TOLERANCE = 0.1
#: The relative standard error a growing sample aims for in a mean square that a correction is
#: measured from (``_GrowingSample.enough_for``): three calibration seeds then give constants
#: about 2.5% apart, and the largest of a model's spreads stays within ~3 standard errors, 4.5%.
SAMPLE_ERROR = 0.015
#: The new samples of a growing sample are drawn in pieces of this fraction of the sample's start,
#: and run through the graph so far as many pieces at once as keep the largest tensor of the
#: replay within REPLAY_VALUES values (at least one piece: a fraction of the start's memory).
REPLAY_PIECES = 4
REPLAY_VALUES = 2**22
#: the propagation, and its replays, hand the heap's free pages back whenever the values they
#: freed since the last time add up to this many bytes (normprop_fx.heap)
HEAP_TRIM_BYTES = 2**20
REPLAY_TRIM_BYTES = 2**26
#: Up to this many distinct channels, an activation's Gaussian moments are integrated by
#: quadrature per channel; past it, on the shared particles at once (much faster, ~1% noise).
_QUADRATURE_CHANNELS = 16

#: ``node.meta`` keys of this pass's records (removed again by ``passes.insert_corrections``).
MOMENTS = "normprop_moments"  #: every node: its nominal moments (None: unknown or not a tensor)
CORRECTION = "normprop_correction"  #: a NormProp consumer whose input needs a correction
NORMALIZE = "normprop_normalize"  #: a standalone activation to normalize
RECORDS = (MOMENTS, CORRECTION, NORMALIZE)


@dataclass(frozen=True)
class InputCorrection:
    """``node.meta[CORRECTION]``: the consumer's input gets a Standardize with these moments."""

    moments: Moments
    calibration: str | None = None  #: how the sample rescaled the moments, when it did


@dataclass(frozen=True)
class StandaloneActivation:
    """``node.meta[NORMALIZE]``: the activation becomes a NormalizedActivation of ``spec``; its
    input gets a correction first unless ``moments`` (the input's) are standard."""

    spec: ActivationSpec
    moments: Moments


@dataclass
class MomentAnalysis:
    """What :func:`propagate_moments` measured on the Gaussian sample, besides the node records."""

    #: ops whose moments were estimated (by a probe or a sample measurement), for the report
    estimated: list[str] = field(default_factory=list)
    #: ops whose moments could not be computed at all, with the error
    unknown: list[str] = field(default_factory=list)
    #: the corrections opaque modules measured for themselves on the sample (no graph edit)
    opaque_corrections: list[Correction] = field(default_factory=list)
    #: where the sample grew: (node, samples from there on); empty when it did not grow
    growth_steps: list[tuple[str, int]] = field(default_factory=list)
    #: why the sample stopped growing where its spread asked for more (a replay failed), if it did
    growth_failure: str | None = None
    #: how precisely the sample set its least precise correction (None: it set none)
    precision: CalibrationPrecision | None = None

def is_trained(module: nn.Module) -> bool:
    """A NormProp module that keeps a trained BatchNorm's function (docs/method.md section 8)."""
    return getattr(module, "init", None) == TRAINED_INIT


def _feeds_trained_layers(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """The nodes whose value a trained layer reads as it is: directly, or through any ops but an
    untrained NormProp consumer (which gets a corrected input of its own). A call of a module that
    holds trained replacements inside (an opaque module: the NormPropAffine inside an
    OpaqueNormPropAffine that does not calibrate keeps a trained function) counts as a trained layer."""
    trained = holder_paths(gm, is_trained)

    def is_trained_call(node: fx.Node) -> bool:
        return node.op == "call_module" and str(node.target) in trained

    def untrained_consumer(node: fx.Node) -> bool:
        module = modules.get(node.target) if node.op == "call_module" else None
        return isinstance(module, NORMPROP_CONSUMERS) and not is_trained(module)

    return upstream_of(gm, is_trained_call, lambda user: not untrained_consumer(user))


class MomentInterpreter(fx.Interpreter):
    """Runs the graph on a Gaussian sample, as corrected, while computing every node's moments
    (the rules: ``passes.moment_rules``, which read this interpreter as their context)."""

    def __init__(self, gm: fx.GraphModule, seed: int = PROBE_SEED, sample: _GrowingSample | None = None) -> None:
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.feeds_trained = _feeds_trained_layers(gm, self.modules)
        self.moments: dict[fx.Node, Any] = {}  #: as recorded in node.meta[MOMENTS]
        self.estimated: list[str] = []
        self.unknown: list[str] = []  #: nodes whose moments could not be computed, and why
        self.generator = torch.Generator().manual_seed(seed)
        self.sample = sample  #: where the sample grows (None: it has all its samples from the start)
        self.precision: CalibrationPrecision | None = None  #: of the least precise correction the sample set
        self._bytes: dict[fx.Node, int] = {}  #: the bytes of each value still held
        self._previous: fx.Node | None = None
        self._freed = FreedBytes(HEAP_TRIM_BYTES)

    def run_node(self, n: fx.Node) -> Any:
        # the values the interpreter freed after the last node (normprop_fx.heap)
        if self._previous is not None:
            self._freed.add(sum(self._bytes.pop(d, 0) for d in self.user_to_last_uses.get(self._previous, [])))
        self._previous = n
        value = self._run_as_corrected(n)
        self._bytes[n] = _tensor_bytes(value)
        try:
            self.moments[n] = self._moments_of(n, value)
        except Exception as err:  # noqa: BLE001 - an unforeseen op: unknown moments, reported
            self.moments[n] = None
            self.unknown.append(f"{describe_node(n, self.module)}: {type(err).__name__}: {err}")
        else:
            if self.moments[n] is None and n.op not in ("output", "placeholder", "get_attr") and _holds_float_tensor(value):
                self._report_unknown(n)
        n.meta[MOMENTS] = self.moments[n]
        return value

    def _report_unknown(self, n: fx.Node) -> None:
        """A float value got no moments without an error (no rule, and the probe gave none):
        report the node where that starts; the values computed from it are unknown too and say
        nothing more. A value that only leaves the model (a named tuple of outputs) needs none."""
        if all(user.op == "output" for user in n.users):
            return
        unknown_inputs = [a for a in tensor_args(n) if _holds_float_tensor(self.env.get(a)) and self.moments.get(a) is None]
        if not unknown_inputs:
            self.unknown.append(f"{describe_node(n, self.module)}: moments unknown (no rule applies and the Gaussian probe gave none)")

    def _run_as_corrected(self, n: fx.Node) -> Any:
        """Run ``n`` on the sample as the converted model will: a consumer (NormProp layer,
        NormPropAffine) on its corrected input, a normalized standalone activation as a
        NormalizedActivation of its corrected input. Decides and records both."""
        module = self.modules.get(n.target) if n.op == "call_module" else None
        source = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        moments = self.moments.get(source) if source is not None else None
        needs_correction = isinstance(moments, Moments) and not moments.constant and not moments.is_standard()
        if isinstance(module, NORMPROP_CONSUMERS):
            note: str | None = None
            if is_trained(module):
                needs_correction = False  # a trained layer reads its input as it is
            elif moments is None and source is not None and _is_float_tensor(self.env[source]):
                # Unknown moments are no reason to assume a standardized input: the sample's own
                # per-channel moments are the only estimate left (reported as unknown already).
                moments, note = sample_moments(self.env[source]), "moments unknown: measured on the Gaussian sample"
                needs_correction = not moments.is_standard()
                if needs_correction:
                    self.estimated.append(f"input of {describe_node(n, self.module)} ({note})")
            elif needs_correction:
                moments, note = self._calibrated(n, source, moments)
            if needs_correction:
                n.meta[CORRECTION] = InputCorrection(moments, note)
        elif isinstance(moments, Moments):
            spec = self._standalone_spec(n, module, moments)
            if spec is not None:
                n.meta[NORMALIZE] = StandaloneActivation(spec, moments)
        return run_as_recorded(self, n, module)

    def _calibrated(self, n: fx.Node, source: fx.Node, moments: Moments) -> tuple[Moments, str | None]:
        """The moments a consumer's correction uses. Estimated moments (through plain weighted
        layers or a probe: they depend on the weights) get their variance scaled so that, on the
        sample, the corrected input has unit variance over all channels (one scalar, so no
        per-channel noise enters). Structural moments are kept unless the sample is off by more
        than STRUCTURAL_TOLERANCE (and rescaled by the part :func:`structural_ratio` takes on):
        per-channel mean offsets that depend on the weights can build up through many blocks,
        and the structural rules cannot see them. A growing sample first grows until the
        measured variance is precise enough (``_GrowingSample.enough_for``). Returns the moments
        and, when the sample rescaled them, how."""
        mean, var = per_channel(moments, self.env[source].dim())
        if self.sample is not None:
            self.sample.enough_for(n, source, mean, self)
        x = self.env[source]
        spread = float(channel_moments(x, center=mean)[1].mean())
        nominal = float(var.expand((1, *x.shape[1:])).mean()) if x.dim() >= 1 else float(var)
        if not (spread > 0 and nominal > 0):
            return moments, None
        ratio = spread / nominal
        if moments.structural:
            ratio = structural_ratio(ratio)
            if ratio == 1.0:
                return moments, None
        consumer = describe_node(n, self.module)
        self.note_squares(consumer, sample_mean_squares(x, mean))
        self.estimated.append(calibration_estimate(consumer, moments.structural, ratio))
        note = calibration_note(moments.structural, ratio, nominal)
        return Moments(moments.mean, moments.var * ratio, False, particles=moments.particles), note

    def note_squares(self, consumer: str, squares: torch.Tensor | None) -> None:
        """Keep the precision of a correction measured on the samples whose own mean squares
        around its mean are ``squares`` when it is the least precise so far."""
        if squares is None or squares.numel() < 2 or not float(squares.mean()) > 0:
            return
        spread = float(squares.std(correction=1) / squares.mean())
        samples = squares.numel()
        if self.precision is not None and spread / samples ** 0.5 <= self.precision.error:
            return
        median = float(squares.median())
        largest = float(squares.max()) / median if median > 0 else math.inf
        self.precision = CalibrationPrecision(consumer, samples, spread, largest, math.ceil((spread / SAMPLE_ERROR) ** 2))

    def _standalone_spec(self, n: fx.Node, module: nn.Module | None, moments: Moments) -> ActivationSpec | None:
        """The activation ``n`` applies, when it is a standalone activation to normalize: its
        input's moments follow from the structure (else they are only estimates)."""
        if isinstance(module, NORMPROP_MODULES) or not moments.structural or moments.constant:
            return None
        if n in self.feeds_trained:
            return None  # a trained layer reads this value as it is
        if AS_WRITTEN in n.meta:
            return None  # the match left this activation as the user wrote it (its note says why)
        form = _activation_form(n, module)
        if form is None:
            return None
        spec, _ = normalizable_activation(form, n, module)
        if spec is not None and spec.function.gate and is_gate(n, self.modules):
            return None  # a gate stays raw (ActivationFunction.gate)
        return None if spec is None or spec.is_identity else spec

    # -- dispatch ---------------------------------------------------------------------------

    def _moments_of(self, n: fx.Node, value: Any) -> Any:
        if n.op == "output":
            return None
        if n.op == "placeholder":
            return tree_map(lambda v: Moments.standard(v.dim()) if _is_float_tensor(v) else None, value)
        if n.op == "get_attr":
            return Moments.of_constant(value) if isinstance(value, torch.Tensor) else None
        if not _has_float_tensor(value) or (isinstance(value, tuple) and type(value) is not tuple):
            return None
        module = self.modules.get(n.target) if n.op == "call_module" else None
        if is_trained(module):
            return sample_moments(value)  # the trained function's output: only the sample tells
        if module is not None and isinstance(module, NORMPROP_MODULES):
            spec = getattr(module, "spec", None) or getattr(getattr(module, "activation", None), "spec", None)
            # A NormPropAffine keeps its (standardized) input's particles.
            source = self.moments.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
            particles = source.particles if isinstance(source, Moments) else None
            if isinstance(module, NormPropLayer):
                # The pre-activation sums fan_in inputs: Gaussian only when fan_in is large
                # (a depthwise 3x3 sums 9).
                particles = weighted_sum_particles(particles, module.weight.detach().flatten(1))
            elif not isinstance(module, (NormPropAffine, NormalizedActivation)):
                particles = None
            return Moments.normalized_activation(value.dim(), spec, particles)
        if _reads_only_constants(n, self._input_moments(n)):
            # Every tensor it reads is a constant (a buffer, a parameter, a literal): so is its
            # value, whatever the op (a relative-position MLP over fixed coordinates, an indexed
            # bias table). Its value on the sample is exact; a rule would read the constant's
            # full-shape mean as a batch of moments and fail on it.
            return tree_map(lambda v: Moments.of_constant(v) if _is_float_tensor(v) else None, value)
        form = _activation_form(n, module)
        if form is not None:
            return self._activation(n, value, module, form)
        kind = MODULE_RULES.get(type(module)) if module is not None else (
            FUNCTION_RULES.get(n.target) if n.op == "call_function" else METHOD_RULES.get(n.target)
        )
        inputs = self._input_moments(n)
        if kind is None or any(m is None for m in inputs):
            return self._probe(n, value, module)
        try:
            return RULES[kind](self, n, value, module)
        except NoRule:
            return self._probe(n, value, module)

    def _activation(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None, form: ActivationForm) -> Moments | None:
        source = n.args[0]
        moments = self.moments.get(source) if isinstance(source, fx.Node) else None
        if not isinstance(moments, Moments):
            return self._probe(n, value, module)
        spec, _ = normalizable_activation(form, n, module)
        if spec is None:
            return self._probe(n, value, module)
        if NORMALIZE in n.meta:
            return Moments.normalized_activation(value.dim(), spec, moments.particles)
        mean, var = per_channel(moments, value.dim())
        if moments.particles is None and mean.numel() <= _QUADRATURE_CHANNELS:
            out_mean, out_var = activation_moments(spec, mean, var)
        else:
            out_mean, out_var = activation_moments_of(spec, particles_or_gaussian(moments.particles), mean, var)
        particles = activation_particles(spec, moments.particles, moments.average_mean, moments.average_std)
        return Moments(out_mean, out_var, moments.structural, particles=particles)

    def _input_moments(self, n: fx.Node) -> list[Any]:
        """The moments of the inputs of ``n`` that hold float tensors on the sample (flattened;
        None: unknown). The other inputs (a size or an int read off a shape, an integer index, a
        mask) have no moments and need none: the op reads them as they are."""
        return flat_moments([self.moments.get(a) for a in tensor_args(n) if _holds_float_tensor(self.env.get(a))])

    # -- running the op on moments -------------------------------------------------------------

    def apply(
        self,
        n: fx.Node,
        module: nn.Module | None,
        pick: Callable[[Moments, torch.Size], torch.Tensor],
        moments: dict[fx.Node, Moments] | None = None,
    ) -> Any:
        """Run the node's own op on tensors built from each input's moments by ``pick``
        (``moments`` overrides the propagated moments of some inputs)."""

        def materialize(a: Any) -> Any:
            if isinstance(a, fx.Node):
                m = (moments or {}).get(a, self.moments.get(a))
                v = self.env[a]
                if isinstance(m, Moments) and m.constant and isinstance(v, torch.Tensor) and not v.is_floating_point():
                    return v  # an integer or boolean constant indexes or masks: its value, never its moments
                if isinstance(m, Moments) and isinstance(v, torch.Tensor):
                    return pick(m, v.shape)
                if isinstance(m, (tuple, list)) and isinstance(v, (tuple, list)):
                    return type(v)(pick(mi, vi.shape) if isinstance(mi, Moments) else vi for mi, vi in zip(m, v))
                if _holds_float_tensor(v):
                    raise NoRule  # unknown moments: never run the op on the sample's own values
                return v
            return a

        args = fx.node.map_aggregate(n.args, materialize)
        kwargs = fx.node.map_aggregate(n.kwargs, materialize)
        return _call(n, module, args, kwargs)

    # -- the fallback: a Gaussian probe --------------------------------------------------------------

    def _probe(self, n: fx.Node, value: Any, module: nn.Module | None) -> Any:
        inputs = self._input_moments(n)
        if any(m is None for m in inputs):
            return None
        runs = max(1, min(PROBE_MAX_RUNS, math.ceil(PROBE_SAMPLES / max(1, _elements_per_channel(value)))))
        sums: Any = None
        saved = save_buffers(module)
        try:
            for _ in range(runs):
                stats = tree_map(_channel_sums, self.apply(n, module, self._gaussian))
                sums = stats if sums is None else tree_map(torch.add, sums, stats)
        except Exception as err:  # noqa: BLE001 - an op the probe cannot run: its moments stay unknown
            logger.debug("probe of %s failed: %s", n.name, err)
            return None
        finally:
            restore_buffers(module, saved)
        self.estimated.append(describe_node(n, self.module))
        return _moments_from_sums(sums, runs)

    def _gaussian(self, m: Moments, shape: torch.Size) -> torch.Tensor:
        """N(mean, var) of ``shape``, drawn in float64 and returned in float32. The compact moments
        broadcast in place into the noise: ``mean + var.sqrt() * noise`` on the moments expanded
        to ``shape`` made three full-size float64 temporaries besides the noise (the sqrt of an
        expanded view is full size); at the probe of timm maxvit_tiny_tf_512 that peaked its whole
        conversion, the node's transient memory went from 3.5 to 2.0 GiB. The values are the same,
        bit for bit (each element is one product and one sum either way)."""
        noise = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        return noise.mul_(m.var.sqrt()).add_(m.mean).float()


def run_as_recorded(interpreter: fx.Interpreter, n: fx.Node, module: nn.Module | None) -> Any:
    """Run ``n`` as the converted model will, by the records this pass left on it: a consumer
    with a :data:`CORRECTION` on its standardized input, a standalone activation with a
    :data:`NORMALIZE` as a NormalizedActivation (of its standardized input, unless the input's
    moments are standard); any other node as it is."""
    correction, normalize = n.meta.get(CORRECTION), n.meta.get(NORMALIZE)
    if correction is not None:
        args, kwargs = interpreter.fetch_args_kwargs_from_env(n)
        with torch.no_grad():
            return module(_standardized(args[0], correction.moments), *args[1:], **kwargs)
    if normalize is not None:
        x, moments = interpreter.env[n.args[0]], normalize.moments
        standard = moments.constant or moments.is_standard()
        with torch.no_grad():
            return NormalizedActivation(normalize.spec)(x if standard else _standardized(x, moments))
    return fx.Interpreter.run_node(interpreter, n)


class _Replay(fx.Interpreter):
    """Runs the first nodes of the graph on new samples as the converted model will, with the
    corrections decided so far (:func:`run_as_recorded`), and nothing else."""

    def run_node(self, n: fx.Node) -> Any:
        return run_as_recorded(self, n, self.submodules.get(n.target) if n.op == "call_module" else None)

    def values_before(self, stop: fx.Node, inputs: list[Any], wanted: set[fx.Node]) -> dict[fx.Node, Any]:
        """The values of ``wanted`` (all computed before ``stop``) on ``inputs``."""
        self.env, self.args_iter = {}, iter(inputs)
        # Freed values go back to the system, as in the propagation (without it, resnet50's
        # replays left 0.09 GiB of freed activations resident), but in larger steps: the replayed
        # nodes' values are fractions of the sample, and trimming after each cost resnet50's
        # conversion 2.3 s of 10.2 with no lower peak (at the replay's end it is trimmed anyway).
        freed = FreedBytes(REPLAY_TRIM_BYTES)
        for node in self.graph.nodes:
            if node is stop:
                break
            self.env[node] = self.run_node(node)
            freed.add(sum(_tensor_bytes(self.env.pop(dead)) for dead in self.user_to_last_uses.get(node, [])))
        values = {k: self.env[k] for k in wanted}
        self.env = {}
        release_freed_heap()
        return values


class _GrowingSample:
    """The Gaussian sample of a propagation, when it may grow (``passes.calibration_sample``'s
    :class:`SampleGrowth`). Before a correction is measured on it (:meth:`enough_for`), it grows
    as far as the samples' spread asks: it draws the new samples, runs them through the nodes so
    far with the constants already decided, in pieces of a quarter of the sample at its start,
    and appends their values to every value still needed. So each correction is measured on every
    sample there is at its node, and all of them saw the same constants upstream, as one run on
    the grown sample with these constants would (the earlier constants rest on fewer samples,
    which their own spread said was enough). Where a value still needed neither carries the batch
    nor is free of it (an int read off the batch dim, say), the sample does not grow there."""

    def __init__(self, growth: SampleGrowth, inputs: list[torch.Tensor], placeholders: list[fx.Node],
                 generator: torch.Generator) -> None:
        self.growth = growth
        self.start = self.size = int(inputs[0].shape[0])
        #: the inputs that do not grow, kept for the replays (those that do are drawn anew)
        self.fixed = [None if p.name in growth.batch_major else x for p, x in zip(placeholders, inputs)]
        self.shapes = [(tuple(x.shape[1:]), x.dtype, x.device) for x in inputs]
        self.generator = generator
        self.taken: list[tuple[str, int]] = []  #: (node, size) of each step taken
        self.failure: str | None = None  #: why a replay failed (then the sample grows no more)

    def enough_for(self, n: fx.Node, source: fx.Node, center: torch.Tensor, interpreter: MomentInterpreter) -> None:
        """Before ``n``'s correction is measured on the sample (its input ``source``, around
        ``center``): grow the sample until the mean square the correction rests on has a relative
        standard error of at most ``SAMPLE_ERROR``, as far as the samples' own spread tells (its
        95% upper confidence bound: a few samples may not show how far apart they are), or as far
        as the time and the memory allow (``cap``, ``limits``).

        Where the samples' mean squares are heavy-tailed (docs/method.md section 6: at init a few
        samples of a deep network carry most of a late layer's mean square), no affordable sample
        gets there, and the constant still moves between draws; but it is the better estimate of
        the mean, and the layers after it end closer to unit variance (torchvision resnet152:
        135 instead of 80 of its 155 layers within the statistics bounds, largest std 1.30
        instead of 2.16; docs/zoo.md)."""
        limit = min(self.growth.cap, self.growth.limits.get(n.name, self.size))
        while self.size < limit and self.failure is None:
            squares = sample_mean_squares(interpreter.env[source], center)
            if squares is None or squares.numel() < 2 or not float(squares.mean()) > 0:
                return
            cv = float(squares.std(correction=1) / squares.mean()) * _upper_bound_factor(squares.numel() - 1)
            wanted = math.ceil((cv / SAMPLE_ERROR) ** 2)
            if wanted <= self.size:
                return
            try:
                if not self.grow(n, interpreter, min(limit, max(2 * self.size, wanted))):
                    return
            except Exception as err:  # noqa: BLE001 - an op the new samples trip: the sample stays, reported
                self.failure = f"the sample could not grow before {describe_node(n, interpreter.module)}: {type(err).__name__}: {err}"

    def grow(self, n: fx.Node, interpreter: MomentInterpreter, size: int) -> bool:
        """Grow the sample to ``size`` just before ``n`` runs: new samples run through the graph
        so far and appended; False when a value still needed cannot grow (then it stays as it is)."""
        growing = self._growing(interpreter)
        if growing is None:
            return False
        parts: dict[fx.Node, list[torch.Tensor]] = {k: [interpreter.env[k]] for k in growing}
        replay = _Replay(interpreter.module)
        # Drawn in pieces of a quarter of the start (the draw does not depend on what fits), run
        # as many pieces at once as REPLAY_VALUES holds (a small model's new samples in one go).
        piece = max(1, self.start // REPLAY_PIECES)
        draws = [self._draw(min(piece, size - first)) for first in range(self.size, size, piece)]
        runs = max(1, REPLAY_VALUES // max(1, self.growth.largest * piece))
        for group in (draws[i:i + runs] for i in range(0, len(draws), runs)):
            inputs = [fixed if fixed is not None else torch.cat([d[j] for d in group]) for j, fixed in enumerate(self.fixed)]
            values = replay.values_before(n, inputs, set(growing))
            for k in growing:
                parts[k].append(values[k])
        del draws
        for k, values in parts.items():
            interpreter.env[k] = torch.cat(values)
        del parts, replay
        self.taken.append((n.name, size))
        self.size = size
        return True

    def _growing(self, interpreter: MomentInterpreter) -> list[fx.Node] | None:
        """The values still needed that grow with the sample; None if one neither grows nor is
        free of the batch."""
        growing = []
        for k, v in interpreter.env.items():
            if k.name in self.growth.batch_major and isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.size:
                growing.append(k)
                continue
            constant = isinstance(interpreter.moments.get(k), Moments) and interpreter.moments[k].constant
            if not (k.name in self.growth.batch_free and (constant or not _holds_float_tensor(v))):
                return None
        return growing

    def _draw(self, count: int) -> list[Any]:
        """``count`` new samples of every input that grows; the others as they were."""
        return [
            x if x is not None else torch.randn((count, *shape), generator=self.generator, dtype=torch.float64).to(device, dtype)
            for x, (shape, dtype, device) in zip(self.fixed, self.shapes)
        ]


# --- helpers ------------------------------------------------------------------------------------


def _upper_bound_factor(k: int) -> float:
    """sqrt(k / q), q the 5% quantile of the chi-square distribution with k degrees of freedom
    (Wilson and Hilferty's approximation, within ~7% for k >= 1): a standard deviation measured on
    k + 1 normal values times this is its 95% upper confidence bound."""
    z = -1.6449
    q = k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3
    return math.sqrt(k / q) if q > 0 else math.inf


def structural_ratio(measured: float) -> float:
    """The part of a measured variance ratio (sample / structural) that a structural correction
    takes on: none within ``STRUCTURAL_TOLERANCE``, all of it beyond twice that (in log scale),
    and in between a ramp from none to all. A hard switch at the tolerance made the constant jump
    by the tolerance between calibration seeds whose samples fell on either side of it (timm
    lcnet_050's blocks.2.0.conv_pw: x1.14 at two seeds, x1 at the third)."""
    tolerance, log_ratio = math.log(1.0 + STRUCTURAL_TOLERANCE), math.log(measured)
    if abs(log_ratio) <= tolerance:
        return 1.0
    taken = min(abs(log_ratio), 2.0 * (abs(log_ratio) - tolerance))
    return math.exp(math.copysign(taken, log_ratio))


def _tensor_bytes(v: Any) -> int:
    """The bytes of a tensor (0 for anything else)."""
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def _is_float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _has_float_tensor(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return any(_has_float_tensor(x) for x in v)
    return _is_float_tensor(v)


def _standardized(x: torch.Tensor, moments: Moments) -> torch.Tensor:
    """(x - mean) / std with the nominal per-channel moments, as a correction does."""
    mean, var = per_channel(moments, x.dim())
    mean = mean.to(x.device, x.dtype)
    scale = standardizing_scale(var)[0].to(x.device, x.dtype)
    return (x - mean) * scale


#: Ops whose result is random even on constant inputs (not constant-folded).
_RANDOM_OPS = frozenset({
    torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli, torch.normal, torch.poisson,
    torch.multinomial, "bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_",
})


def _reads_only_constants(n: fx.Node, inputs: list[Any]) -> bool:
    """Whether ``n`` reads float tensors, all of them constants (``inputs``: their moments), and
    draws no random numbers: then its value is a constant too."""
    if n.op != "call_module" and n.target in _RANDOM_OPS:
        return False
    return bool(inputs) and all(isinstance(m, Moments) and m.constant for m in inputs)


def _holds_float_tensor(v: Any) -> bool:
    """A float tensor, or a container (tuple, list, named tuple, dict) with one somewhere inside."""
    if isinstance(v, dict):
        return any(_holds_float_tensor(x) for x in v.values())
    if isinstance(v, (tuple, list)):
        return any(_holds_float_tensor(x) for x in v)
    return _is_float_tensor(v)


def _elements_per_channel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() // max(1, value.shape[1]) if value.dim() >= 2 else value.numel()
    tensors = [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else []
    return min((_elements_per_channel(t) for t in tensors), default=1)


def _channel_sums(t: Any) -> Any:
    """Per-channel E[x] and E[x^2] of one probe output, stacked on a new leading dim."""
    if not _is_float_tensor(t):
        return None
    mean, var = channel_moments(t)
    return torch.stack([mean, var + mean * mean])


def _moments_from_sums(sums: Any, runs: int) -> Any:
    if sums is None:
        return None
    if isinstance(sums, torch.Tensor):
        mean = sums[0] / runs
        return Moments(mean, (sums[1] / runs - mean * mean).clamp_min(0.0), structural=False)
    return type(sums)(_moments_from_sums(s, runs) for s in sums)


def _call(n: fx.Node, module: nn.Module | None, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        if n.op == "call_module":
            return module(*args, **kwargs)
        if n.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, n.target)(*rest, **kwargs)
        return n.target(*args, **kwargs)


def _activation_form(n: fx.Node, module: nn.Module | None) -> ActivationForm | None:
    if module is not None:
        return lookup_by_type(MODULE_ACTIVATION_FORMS, module)
    if n.op in ("call_function", "call_method"):
        return FUNCTION_ACTIVATION_FORMS.get((n.op, n.target))
    return None


# --- the pass -----------------------------------------------------------------------------------


def propagate_moments(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], samples: int | None = None,
                      seed: int = PROBE_SEED, growth: SampleGrowth | None = None) -> MomentAnalysis:
    """Compute every node's nominal moments on ``gm`` and decide the corrections and normalized
    activations its untrained NormProp layers need: recorded in ``node.meta`` (module docstring),
    for ``passes.insert_corrections`` to apply. ``gm``'s graph is not changed.

    ``example_inputs`` only give shapes and dtypes (their values are never read: the sample is
    Gaussian noise of those shapes, drawn with ``seed``). ``samples`` replaces their batch
    (``passes.calibration_sample`` says how many the shapes call for); None keeps it. With a
    ``growth``, the sample may grow along the graph where its samples' spread asks for more
    (:class:`_GrowingSample`).
    """
    for node in gm.graph.nodes:
        for key in RECORDS:
            node.meta.pop(key, None)
    reference = next(iter(gm.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtypes = [x.dtype if x.dtype != torch.float32 or reference is None else reference.dtype for x in example_inputs]
    generator = torch.Generator().manual_seed(seed)
    shapes = [tuple(x.shape) if samples is None else sample_shape(x, samples, example_inputs) for x in example_inputs]
    sample = [torch.randn(shape, generator=generator, dtype=torch.float64).to(device, d) for shape, d in zip(shapes, dtypes)]
    growing = None
    if growth is not None and samples is not None and sample and sample[0].dim() >= 1:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        growing = _GrowingSample(growth, sample, placeholders, generator)
    propagation = MomentInterpreter(gm, seed, growing)
    opaque = {path: m for path, m in gm.named_modules() if isinstance(m, OpaqueNormPropAffine) and m.calibrate}
    for m in opaque.values():
        m.measuring = True
    try:
        with _as_at_init(gm), torch.no_grad():
            propagation.run(*sample)
    finally:
        for m in opaque.values():
            m.measuring = False

    # An opaque module's correction measured on whole samples (dim 0 of its input the sample, at
    # one of the sizes it had; not a reshape that folds heads or windows into it) counts too.
    sizes = {int(sample[0].shape[0])} if sample and sample[0].dim() else set()
    sizes.update(size for _, size in (growing.taken if growing is not None else ()))
    for path, m in opaque.items():
        squares, m.slice_squares = m.slice_squares, None
        if m.measured and squares is not None and squares.numel() in sizes:
            propagation.note_squares(f"{path}.affine ({type(m.affine).__name__})", squares)
    analysis = MomentAnalysis(estimated=propagation.estimated, unknown=propagation.unknown, precision=propagation.precision)
    if growing is not None:
        analysis.growth_steps = growing.taken
        analysis.growth_failure = growing.failure
    for path, m in opaque.items():
        if m.measured:
            analysis.opaque_corrections.append(Correction(
                path=f"{path}.correction", consumer=f"{path}.affine", source=f"input of {path}",
                reason=m.correction.reason, mean=value_range(m.correction.mean), scale=value_range(m.correction.scale),
                estimated=True,
            ))
        else:
            analysis.unknown.append(opaque_unmeasured(path, m.attempted))
    return analysis


@contextlib.contextmanager
def _as_at_init(gm: fx.GraphModule) -> Iterator[None]:
    """The structural state the corrections are computed for: eval mode (dropout off, BNs on
    their running statistics), every NormProp gamma 1 and beta 0 (but a trained layer's, which
    keep their values); all restored afterwards."""
    training = [(m, m.training) for m in gm.modules()]
    affine = [m for m in gm.modules() if isinstance(m, NORMPROP_CONSUMERS) and not is_trained(m)]
    saved = [(m, m.gamma.detach().clone(), m.beta.detach().clone()) for m in affine]
    buffers = save_buffers(gm)
    gm.eval()
    try:
        with torch.no_grad():
            for m in affine:
                m.gamma.fill_(1.0)
                m.beta.zero_()
        yield
    finally:
        with torch.no_grad():
            for m, gamma, beta in saved:
                m.gamma.copy_(gamma)
                m.beta.copy_(beta)
        restore_buffers(gm, buffers)
        for m, flag in training:
            m.training = flag
