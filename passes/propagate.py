"""Pass 4: nominal moment propagation and constant scale corrections (docs/method.md section 6).

Every value of the rewritten graph gets nominal moments, assuming a standardized model input,
standardized NormProp outputs (gamma = 1, beta = 0: the corrections are structural and never
undo the 1/1.21 gamma initialization) and independent branches. Where a NormProp layer or a
NormPropAffine would see a value whose nominal moments are not (0, 1), a
:class:`~normprop_fx.standardize.Standardize` correction is inserted in front of it. An
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
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from normprop_fx.activation_functions import ActivationSpec
from normprop_fx.affine import NormPropAffine
from normprop_fx.layers import NormPropLayer
from normprop_fx.moments import activation_moments, max_of_normals
from normprop_fx.normalized_activation import NormalizedActivation
from normprop_fx.opaque_affine import OpaqueNormPropAffine
from normprop_fx.records import TRAINED_INIT, Correction, NormalizedStandalone
from normprop_fx.standardize import Standardize

from .describe import describe_node, owner_module_path
from .graph_utils import (
    NORMPROP_CONSUMERS,
    NORMPROP_MODULES,
    channel_reduce_dims,
    free_module_name,
    module_calls,
    normalizable_activation,
    set_submodule,
)
from .moment_rules import (
    ADD,
    AVG_POOL,
    DIV,
    FUNCTION_RULES,
    LINEAR,
    MAX_POOL,
    METHOD_RULES,
    MODULE_RULES,
    MUL,
    NEG,
    PASS,
    STRUCTURAL,
    SUB,
    Moments,
    compact,
    per_channel,
    pooled_count,
)
from .moment_shape import (
    MAX_EXPLICIT_AVERAGE,
    activation_moments_of,
    activation_shape,
    average_of,
    max_of,
    mixture_shape,
    particles,
    product_shape,
    sum_shape,
    weighted_sum_shape,
)
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
PROBE_SEED = 0
#: A structural correction is kept while the sample's variance is within this fraction of it.
STRUCTURAL_TOLERANCE = 0.1
#: Up to this many distinct channels, an activation's Gaussian moments are integrated by
#: quadrature per channel; past it, on the shared particles at once (much faster, ~1% noise).
_QUADRATURE_CHANNELS = 16

def is_trained(module: nn.Module) -> bool:
    """A NormProp module that keeps a trained BatchNorm's function (docs/method.md section 8)."""
    return getattr(module, "init", None) == TRAINED_INIT


def _feeds_trained_layers(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """The nodes whose value a trained layer reads as it is: directly, or through any ops but an
    untrained NormProp consumer (which gets a corrected input of its own). A call of a module that
    holds trained replacements inside (an opaque module) counts as a trained layer."""
    trained_inside = {
        path.rpartition(".")[0] for path, m in modules.items() if isinstance(m, OpaqueNormPropAffine) and not m.calibrate
    }

    def is_trained_call(node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        if is_trained(modules[node.target]):
            return True
        prefix = f"{node.target}."
        return any(p == node.target or p.startswith(prefix) for p in trained_inside)

    feeds: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        for user in node.users:
            module = modules.get(user.target) if user.op == "call_module" else None
            untrained_consumer = isinstance(module, NORMPROP_CONSUMERS) and not is_trained(module)
            if is_trained_call(user) or (user in feeds and not untrained_consumer):
                feeds.add(node)
                break
    return feeds


class _Propagation(fx.Interpreter):
    """Runs the graph on a Gaussian sample, as corrected, while computing every node's moments."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.feeds_trained = _feeds_trained_layers(gm, self.modules)
        self.moments: dict[fx.Node, Any] = {}
        self.corrections: dict[fx.Node, Moments] = {}  # consumer -> moments of its input
        self.standalone: dict[fx.Node, tuple[ActivationSpec, Moments]] = {}
        self.estimated: list[str] = []
        self.unknown: list[str] = []  #: nodes whose moments could not be computed, and why
        self.calibrations: dict[fx.Node, str] = {}  #: consumer -> how the sample rescaled its correction
        self.generator = torch.Generator().manual_seed(PROBE_SEED)

    def run_node(self, n: fx.Node) -> Any:
        value = self._run_as_corrected(n)
        try:
            self.moments[n] = self._moments_of(n, value)
        except Exception as err:  # noqa: BLE001 - an unforeseen op: unknown moments, reported
            self.moments[n] = None
            self.unknown.append(f"{describe_node(n, self.module)}: {type(err).__name__}: {err}")
        return value

    def _run_as_corrected(self, n: fx.Node) -> Any:
        """Run ``n`` on the sample as the converted model will: a consumer (NormProp layer,
        NormPropAffine) on its corrected input, a normalized standalone activation as a
        NormalizedActivation of its corrected input. Decides and records both."""
        module = self.modules.get(n.target) if n.op == "call_module" else None
        source = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        moments = self.moments.get(source) if source is not None else None
        needs_correction = isinstance(moments, Moments) and not moments.constant and not moments.is_standard()
        if isinstance(module, NORMPROP_CONSUMERS):
            if needs_correction and not is_trained(module):
                moments = self._calibrated(n, source, moments)
                self.corrections[n] = moments
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                with torch.no_grad():
                    return module(_standardized(args[0], moments), *args[1:], **kwargs)
        elif isinstance(moments, Moments):
            spec = self._standalone_spec(n, module, moments)
            if spec is not None:
                self.standalone[n] = (spec, moments)
                x = self.env[source]
                with torch.no_grad():
                    return NormalizedActivation(spec)(_standardized(x, moments) if needs_correction else x)
        return super().run_node(n)

    def _calibrated(self, n: fx.Node, source: fx.Node, moments: Moments) -> Moments:
        """The moments a consumer's correction uses. Estimated moments (through plain weighted
        layers or a probe: they depend on the weights) get their variance scaled so that, on the
        sample, the corrected input has unit variance over all channels (one scalar, so no
        per-channel noise enters). Structural moments are kept unless the sample is off by more
        than STRUCTURAL_TOLERANCE: per-channel mean offsets that depend on the weights can build
        up through many blocks, and the structural rules cannot see them."""
        x = self.env[source]
        mean, var = per_channel(moments, x.dim())
        spread = float(((x.detach().double().cpu() - mean) ** 2).mean())
        nominal = float(var.expand((1, *x.shape[1:])).mean()) if x.dim() >= 1 else float(var)
        if not (spread > 0 and nominal > 0):
            return moments
        ratio = spread / nominal
        if moments.structural and abs(math.log(ratio)) <= math.log1p(STRUCTURAL_TOLERANCE):
            return moments
        why = "estimated moments" if not moments.structural else "structural moments off on the sample"
        self.estimated.append(
            f"input of {describe_node(n, self.module)} ({why}: on the Gaussian sample the variance around the "
            f"nominal mean is x{ratio:.3g} the nominal one, which is scaled by that)"
        )
        self.calibrations[n] = f"calibrated on the Gaussian sample: x{ratio:.3g} the {'structural' if moments.structural else 'estimated'} variance {nominal:.4g}"
        return Moments(moments.mean, moments.var * ratio, False, shape=moments.shape)

    def _standalone_spec(self, n: fx.Node, module: nn.Module | None, moments: Moments) -> ActivationSpec | None:
        """The activation ``n`` applies, when it is a standalone activation to normalize: its
        input's moments follow from the structure (else they are only estimates)."""
        if isinstance(module, NORMPROP_MODULES) or not moments.structural or moments.constant:
            return None
        if n in self.feeds_trained:
            return None  # a trained layer reads this value as it is
        form = _activation_form(n, module)
        if form is None:
            return None
        spec, _ = normalizable_activation(form, n, module)
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
            return _sample_moments(value)  # the trained function's output: only the sample tells
        if module is not None and isinstance(module, NORMPROP_MODULES):
            spec = getattr(module, "spec", None) or getattr(getattr(module, "activation", None), "spec", None)
            # A NormPropAffine keeps its (standardized) input's distribution shape.
            source = self.moments.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
            shape = source.shape if isinstance(source, Moments) else None
            if isinstance(module, NormPropLayer):
                # The pre-activation sums fan_in inputs: Gaussian only when fan_in is large
                # (a depthwise 3x3 sums 9).
                shape = weighted_sum_shape(shape, module.weight.detach().flatten(1))
            elif not isinstance(module, (NormPropAffine, NormalizedActivation)):
                shape = None
            return Moments.normalized_activation(value.dim(), spec, shape)
        form = _activation_form(n, module)
        if form is not None:
            return self._activation(n, value, module, form)
        kind = MODULE_RULES.get(type(module)) if module is not None else (
            FUNCTION_RULES.get(n.target) if n.op == "call_function" else METHOD_RULES.get(n.target)
        )
        inputs = [self.moments.get(a) if isinstance(a, fx.Node) else None for a in _tensor_args(n)]
        if kind is None or any(m is None for m in inputs) and kind not in (STRUCTURAL,):
            return self._probe(n, value, module)
        try:
            return _RULES[kind](self, n, value, module)
        except _NoRule:
            return self._probe(n, value, module)

    def _activation(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None, form: ActivationForm) -> Moments | None:
        source = n.args[0]
        moments = self.moments.get(source) if isinstance(source, fx.Node) else None
        if not isinstance(moments, Moments):
            return self._probe(n, value, module)
        spec, _ = normalizable_activation(form, n, module)
        if spec is None:
            return self._probe(n, value, module)
        if n in self.standalone:
            return Moments.normalized_activation(value.dim(), spec, moments.shape)
        mean, var = per_channel(moments, value.dim())
        if moments.shape is None and mean.numel() <= _QUADRATURE_CHANNELS:
            out_mean, out_var = activation_moments(spec, mean, var)
        else:
            out_mean, out_var = activation_moments_of(spec, particles(moments.shape), mean, var)
        shape = activation_shape(spec, moments.shape, moments.average_mean, moments.average_std)
        return Moments(out_mean, out_var, moments.structural, shape=shape)

    # -- the rules ----------------------------------------------------------------------------

    def _env_value(self, a: Any) -> Any:
        return self.env[a] if isinstance(a, fx.Node) else a

    def _apply(
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
                if isinstance(m, Moments) and isinstance(v, torch.Tensor):
                    return pick(m, v.shape)
                if isinstance(m, (tuple, list)) and isinstance(v, (tuple, list)):
                    return type(v)(pick(mi, vi.shape) if isinstance(mi, Moments) else vi for mi, vi in zip(m, v))
                if isinstance(v, torch.Tensor):
                    raise _NoRule
                return v
            return a

        args = fx.node.map_aggregate(n.args, materialize)
        kwargs = fx.node.map_aggregate(n.kwargs, materialize)
        return _call(n, module, args, kwargs)

    def _structural(self, n: fx.Node, value: Any, module: nn.Module | None) -> Any:
        inputs = [m for m in _flat_moments([self.moments.get(a) for a in _tensor_args(n)]) if m is not None]
        structural = all(m.structural for m in inputs)
        means = self._apply(n, module, lambda m, s: m.full(s)[0].contiguous())
        variances = self._apply(n, module, lambda m, s: m.full(s)[1].contiguous())
        return _pair_up(means, variances, structural, mixture_shape([m.shape for m in inputs if not m.constant]))

    def _pass(self, n: fx.Node, value: Any, module: nn.Module | None) -> Any:
        return self.moments[_tensor_args(n)[0]]

    def _binary(self, n: fx.Node) -> tuple[Moments, Moments, bool]:
        args = list(n.args) + list(n.kwargs.values())
        a, b = args[0], args[1]
        ma = self.moments.get(a) if isinstance(a, fx.Node) else Moments.of_constant(a)
        mb = self.moments.get(b) if isinstance(b, fx.Node) else Moments.of_constant(b)
        if not isinstance(ma, Moments) or not isinstance(mb, Moments) or n.kwargs.get("alpha", 1) != 1:
            raise _NoRule
        return ma, mb, a is b

    def _add(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None, sign: float = 1.0) -> Moments:
        ma, mb, same = self._binary(n)
        if same:
            return _scaled(ma, 1.0 + sign, value)
        shape = sum_shape(ma.shape, _signed(mb.shape, sign), ma.average_std, mb.average_std)
        return _fit(ma.mean + sign * mb.mean, ma.var + mb.var, ma.structural and mb.structural, value, shape)

    def _sub(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
        return self._add(n, value, module, sign=-1.0)

    def _mul(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
        ma, mb, same = self._binary(n)
        if same:
            raise _NoRule
        return _product(ma, mb, value)

    def _div(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
        ma, mb, _ = self._binary(n)
        if not mb.constant or (mb.mean == 0).any() or n.kwargs.get("rounding_mode") is not None:
            raise _NoRule
        shape = _signed(ma.shape, -1.0 if bool((mb.mean < 0).all()) else 1.0)
        return _fit(ma.mean / mb.mean, ma.var / mb.mean**2, ma.structural, value, shape)

    def _neg(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
        m = self.moments[_tensor_args(n)[0]]
        return Moments(-m.mean, m.var, m.structural, shape=_signed(m.shape, -1.0))

    def _avg_pool(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
        source = _tensor_args(n)[0]
        k = pooled_count(_pool_args(n, module), self.env[source].shape, value.shape)
        src = self.moments[source]
        nominal = self._averaged(n, module, source, src, k)
        # The rule assumes the k values independent; the sample says how much variance their
        # correlation keeps, relative to that.
        sample = _sample_moments(self.env[source])
        predicted = self._averaged(n, module, source, sample, k)
        measured = _sample_moments(value, center=predicted.mean)
        total = float(predicted.var.sum())
        inflation = float(measured.var.sum()) / total if total > 0 else 1.0
        inflation = min(max(inflation, 1.0 / k), float(k))
        # Each channel's mean also differs from its nominal mean by a weight-dependent offset
        # (small next to a unit variance, but averaging keeps it while it shrinks the variance,
        # so after a global pool it can dominate): its spread over channels, on the sample.
        nominal_mean = per_channel(src, sample.mean.dim())[0]
        offsets = float(((sample.mean - nominal_mean) ** 2).mean()) if sample.mean.dim() == nominal_mean.dim() else 0.0
        self.estimated.append(
            f"{describe_node(n, self.module)} (averages {k} values; on the Gaussian sample their correlation keeps "
            f"x{inflation:.3g} the variance of independent values, and channel-mean offsets add {offsets:.3g})"
        )
        k_independent = max(1, round(k / inflation))
        var = nominal.var * inflation + offsets
        return Moments(nominal.mean, var, src.structural, shape=average_of(src.shape, k_independent))

    def _averaged(self, n: fx.Node, module: nn.Module | None, source: fx.Node, moments: Moments, k: int) -> Moments:
        """The average pool's moments for independent inputs of the given moments."""
        override = {source: moments}
        mean = self._apply(n, module, lambda m, s: m.full(s)[0].contiguous(), override)
        var = self._apply(n, module, lambda m, s: m.full(s)[1].contiguous(), override)
        return compact(mean, var / k, moments.structural)

    def _max_pool(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
        source = _tensor_args(n)[0]
        if isinstance(value, tuple) or _pool_args(n, module).get("return_indices"):
            raise _NoRule
        k = pooled_count(_pool_args(n, module), self.env[source].shape, value.shape)
        src = self.moments[source]
        mean, var = per_channel(src, value.dim())
        if src.shape is None and k > MAX_EXPLICIT_AVERAGE:
            e_max, v_max = max_of_normals(k)
            shape = None
        else:
            e_max, v_max, shape = max_of(src.shape, min(k, 4 * MAX_EXPLICIT_AVERAGE))
        # Correlated neighbours have a smaller and wider max than k independent values: take the
        # standardized max's mean and variance from the sample instead, averaged over channels.
        inputs, outputs = _sample_moments(self.env[source]), _sample_moments(value)
        spread = float(inputs.var.sqrt().sum())
        if spread > 0 and inputs.mean.shape == outputs.mean.shape:
            e_max = float((outputs.mean - inputs.mean).sum()) / spread
            v_max = float(outputs.var.sum() / inputs.var.sum())
            self.estimated.append(
                f"{describe_node(n, self.module)} (max of {k} values; on the Gaussian sample it shifts the mean by "
                f"{e_max:.3g} std and scales the variance x{v_max:.3g})"
            )
        return Moments(mean + var.sqrt() * e_max, var * v_max, src.structural, shape=shape)

    def _linear(self, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
        if module is not None:
            weight, bias = module.weight, module.bias
            if isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode != "zeros":
                raise _NoRule
            source = n.args[0]
            call = module._conv_forward if isinstance(module, nn.modules.conv._ConvNd) else None

            def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
                return call(x, w, b) if call is not None else torch.nn.functional.linear(x, w, b)
        else:
            source, weight = n.args[0], self._env_value(n.args[1])
            bias = self._env_value(n.args[2]) if len(n.args) > 2 else n.kwargs.get("bias")
            rest = n.args[3:]

            def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
                return n.target(x, w, b, *rest)
        m = self.moments.get(source)
        if not isinstance(m, Moments):
            raise _NoRule
        shape = self.env[source].shape
        w = weight.detach().double()
        b = bias.detach().double() if bias is not None else None
        x_mean, x_var = (t.double().contiguous() for t in m.full((1, *shape[1:])))
        with torch.no_grad():
            return compact(run(x_mean, w, b), run(x_var, w * w, None), structural=False)

    # -- the fallback: a Gaussian probe --------------------------------------------------------------

    def _probe(self, n: fx.Node, value: Any, module: nn.Module | None) -> Any:
        inputs = _flat_moments([self.moments.get(a) for a in _tensor_args(n)])
        if any(m is None for m in inputs):
            return None
        runs = max(1, min(PROBE_MAX_RUNS, math.ceil(PROBE_SAMPLES / max(1, _elements_per_channel(value)))))
        sums: Any = None
        saved = _save_buffers(module)
        try:
            for _ in range(runs):
                stats = tree_map(_channel_sums, self._apply(n, module, self._gaussian))
                sums = stats if sums is None else tree_map(torch.add, sums, stats)
        except Exception as err:  # noqa: BLE001 - an op the probe cannot run: its moments stay unknown
            logger.debug("probe of %s failed: %s", n.name, err)
            return None
        finally:
            _restore_buffers(module, saved)
        self.estimated.append(describe_node(n, self.module))
        return _moments_from_sums(sums, runs)

    def _gaussian(self, m: Moments, shape: torch.Size) -> torch.Tensor:
        mean, var = m.full(shape)
        noise = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        return (mean + var.sqrt() * noise).float()


class _NoRule(Exception):
    """Internal: the rule does not apply to this node; estimate it by a probe."""


_RULES: dict[str, Callable[..., Any]] = {
    PASS: _Propagation._pass,
    STRUCTURAL: _Propagation._structural,
    ADD: _Propagation._add,
    SUB: _Propagation._sub,
    MUL: _Propagation._mul,
    DIV: _Propagation._div,
    NEG: _Propagation._neg,
    AVG_POOL: _Propagation._avg_pool,
    MAX_POOL: _Propagation._max_pool,
    LINEAR: _Propagation._linear,
}


# --- helpers ------------------------------------------------------------------------------------


def _is_float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _has_float_tensor(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return any(_has_float_tensor(x) for x in v)
    return _is_float_tensor(v)


def _sample_moments(t: torch.Tensor, center: torch.Tensor | None = None) -> Moments:
    """Per-channel mean and variance of a sample tensor (over every dim but 1), compact; with
    ``center`` (compact, like the result), the mean square around it instead of the variance."""
    t = t.detach().double()
    dims = channel_reduce_dims(t.dim())
    mean = t.mean(dims, keepdim=True) if dims else t
    around = mean if center is None else center.to(t.device)
    var = ((t - around) ** 2).mean(dims, keepdim=True) if dims else torch.zeros_like(t)
    return Moments(mean.cpu(), var.cpu(), structural=False)


def _product(ma: Moments, mb: Moments, value: torch.Tensor) -> Moments:
    """Moments of a * b for independent a and b."""
    second_a = ma.var + ma.mean**2
    second_b = mb.var + mb.mean**2
    mean = ma.mean * mb.mean
    if ma.constant or mb.constant:
        random, constant = (mb, ma) if ma.constant else (ma, mb)
        shape = _signed(random.shape, -1.0 if bool((constant.mean < 0).all()) else 1.0)
    else:
        shape = product_shape(ma.shape, mb.shape, ma.average_mean, ma.average_std, mb.average_mean, mb.average_std)
    return _fit(mean, second_a * second_b - mean**2, ma.structural and mb.structural, value, shape)


def _standardized(x: torch.Tensor, moments: Moments) -> torch.Tensor:
    """(x - mean) / std with the nominal per-channel moments, as a correction does."""
    mean, var = per_channel(moments, x.dim())
    mean = mean.to(x.device, x.dtype)
    scale = var.clamp_min(1e-12).rsqrt().to(x.device, x.dtype)
    return (x - mean) * scale


def _tensor_args(n: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) or a)
    return found


def _flat_moments(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, (tuple, list)):
            out.extend(_flat_moments(list(item)))
        else:
            out.append(item)
    return out


def _pair_up(means: Any, variances: Any, structural: bool, shape: torch.Tensor | None) -> Any:
    if isinstance(means, torch.Tensor):
        return compact(means, variances, structural, shape) if means.is_floating_point() else None
    if isinstance(means, (tuple, list)):
        return tuple(_pair_up(m, v, structural, shape) for m, v in zip(means, variances))
    return None


def _fit(
    mean: torch.Tensor, var: torch.Tensor, structural: bool, value: torch.Tensor, shape: torch.Tensor | None = None
) -> Moments:
    full = torch.Size((1, *value.shape[1:])) if value.dim() >= 1 else value.shape
    return compact(mean.expand(full), var.clamp_min(0.0).expand(full), structural, shape)


def _scaled(m: Moments, factor: float, value: torch.Tensor) -> Moments:
    return _fit(m.mean * factor, m.var * factor * factor, m.structural, value, _signed(m.shape, factor))


def _signed(shape: torch.Tensor | None, sign: float) -> torch.Tensor | None:
    return shape if shape is None or sign >= 0 else -shape


def _elements_per_channel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() // max(1, value.shape[1]) if value.dim() >= 2 else value.numel()
    tensors = [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else []
    return min((_elements_per_channel(t) for t in tensors), default=1)


def _channel_sums(t: Any) -> Any:
    """Per-channel E[x] and E[x^2] of one probe output, stacked on a new leading dim."""
    if not _is_float_tensor(t):
        return None
    t = t.detach().double()
    dims = channel_reduce_dims(t.dim())
    if not dims:
        return torch.stack([t, t * t])
    return torch.stack([t.mean(dims, keepdim=True), (t * t).mean(dims, keepdim=True)])


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


def _pool_args(n: fx.Node, module: nn.Module | None) -> dict[str, Any]:
    if module is not None:
        return {k: getattr(module, k) for k in ("kernel_size", "return_indices") if hasattr(module, k)}
    if n.target in (torch.mean, torch.amax) or n.op == "call_method":
        return {}
    name = getattr(n.target, "__name__", "")
    if name.startswith("adaptive"):
        return {"return_indices": n.kwargs.get("return_indices", False)}
    kernel = n.args[1] if len(n.args) > 1 else n.kwargs.get("kernel_size")
    return {"kernel_size": kernel, "return_indices": n.kwargs.get("return_indices", False)}


def _save_buffers(module: nn.Module | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if module is None:
        return []
    return [(b, b.detach().clone()) for b in module.buffers()]


def _restore_buffers(module: nn.Module | None, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, copy_ in saved:
            buffer.copy_(copy_)


def _activation_form(n: fx.Node, module: nn.Module | None) -> ActivationForm | None:
    if module is not None:
        return lookup_by_type(MODULE_ACTIVATION_FORMS, module)
    if n.op in ("call_function", "call_method"):
        return FUNCTION_ACTIVATION_FORMS.get((n.op, n.target))
    return None


# --- the pass -----------------------------------------------------------------------------------


def propagate_moments(
    gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]
) -> tuple[fx.GraphModule, list[Correction], list[NormalizedStandalone], list[str], list[str]]:
    """Insert the corrections and normalize standalone activations in ``gm`` (modified, returned).

    ``example_inputs`` only give shapes and dtypes (their values are never read: the sample is
    seeded Gaussian noise of those shapes). Returns the records of corrections and normalized
    activations, the ops whose moments were estimated (by a probe or a sample measurement), and
    the ops whose moments could not be computed at all, with the error.
    """
    reference = next(iter(gm.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtypes = [x.dtype if x.dtype != torch.float32 or reference is None else reference.dtype for x in example_inputs]
    generator = torch.Generator().manual_seed(PROBE_SEED)
    sample = [torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device, d) for x, d in zip(example_inputs, dtypes)]
    propagation = _Propagation(gm)
    opaque = {path: m for path, m in gm.named_modules() if isinstance(m, OpaqueNormPropAffine) and m.calibrate}
    for m in opaque.values():
        m.measuring = True
    try:
        with _as_at_init(gm), torch.no_grad():
            propagation.run(*sample)
    finally:
        for m in opaque.values():
            m.measuring = False

    corrections: list[Correction] = []
    standalone: list[NormalizedStandalone] = []
    for node, (spec, moments) in propagation.standalone.items():
        standalone.append(_normalize_standalone(gm, node, spec, moments, corrections))
    for node, moments in propagation.corrections.items():
        source = node.args[0]
        note = propagation.calibrations.get(node)
        corrections.append(_insert_correction(gm, node, source, moments, str(node.target), note))
    for path, m in opaque.items():
        if m.measured:
            corrections.append(Correction(
                path=f"{path}.correction", consumer=f"{path}.affine", source=f"input of {path}",
                reason=m.correction.reason, mean=_range(m.correction.mean), scale=_range(m.correction.scale),
                estimated=True,
            ))
        else:
            why = "its input on the Gaussian sample was not finite" if m.attempted else "it did not run on the Gaussian sample"
            propagation.unknown.append(f"{path}: {why}, so its input is not corrected")
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, corrections, standalone, propagation.estimated, propagation.unknown


@contextlib.contextmanager
def _as_at_init(gm: fx.GraphModule) -> Iterator[None]:
    """The structural state the corrections are computed for: eval mode (dropout off, BNs on
    their running statistics), every NormProp gamma 1 and beta 0 (but a trained layer's, which
    keep their values); all restored afterwards."""
    training = [(m, m.training) for m in gm.modules()]
    affine = [m for m in gm.modules() if isinstance(m, NORMPROP_CONSUMERS) and not is_trained(m)]
    saved = [(m, m.gamma.detach().clone(), m.beta.detach().clone()) for m in affine]
    buffers = _save_buffers(gm)
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
        _restore_buffers(gm, buffers)
        for m, flag in training:
            m.training = flag


def _insert_correction(
    gm: fx.GraphModule, consumer: fx.Node, source: fx.Node, moments: Moments, name: str, note: str | None = None
) -> Correction:
    # compact (1, C, 1, ...) -> Standardize's (C, 1, ...) without the batch dim; scalar below rank 2
    def without_batch(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[1:]) if t.dim() >= 2 else t.reshape(())

    mean, var = without_batch(moments.mean), without_batch(moments.var)
    if mean.numel() > 1 and torch.allclose(mean, mean.flatten()[0].expand_as(mean)) and torch.allclose(var, var.flatten()[0].expand_as(var)):
        mean, var = mean.flatten()[0], var.flatten()[0]
    scale = var.clamp_min(1e-12).rsqrt()
    reason = f"{describe_node(source, gm)} has nominal mean {_range(mean)}, variance {_range(var)}"
    if note is not None:
        reason += f" ({note})"
    elif not moments.structural:
        reason += " (estimated: depends on weights or a probe)"
    module = Standardize(mean.float(), scale.float(), reason=reason)
    target = free_module_name(gm, f"{name}_input_correction")
    gm.add_submodule(target, module)
    with gm.graph.inserting_before(consumer):
        corrected = gm.graph.call_module(target, (source,))
    consumer.replace_input_with(source, corrected)
    return Correction(
        path=target,
        consumer=name,
        source=describe_node(source, gm),
        reason=reason,
        mean=_range(mean),
        scale=_range(scale),
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
        new = gm.graph.call_module(target, (source,))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if not moments.is_standard():
        corrections.append(_insert_correction(gm, new, source, moments, target))
    return NormalizedStandalone(path=target, original=original, activation=str(spec))


def _range(t: torch.Tensor) -> str:
    t = t.detach().double().flatten()
    lo, hi = t.min().item(), t.max().item()
    return f"{lo:.4g}" if math.isclose(lo, hi, rel_tol=1e-6, abs_tol=1e-9) else f"{lo:.4g}..{hi:.4g}"
