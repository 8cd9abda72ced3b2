"""``check_model``: convert one model and check what a conversion must deliver (the project targets docs/zoo.md reports).

One call answers, for one model and one input shape: did it trace, how many BatchNorms were
found / converted / left, do forward and backward run (gradient reaching every parameter the
original model trains, all finite), is the converted model batch-independent in train mode,
and how far each NormProp layer's output is from its nominal moments (mean 0, std 1) at
``gamma_init=1`` on N(0, I) input. Every exception is caught into a failure line, so a zoo
sweep gets a row per model and never a crash.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from .convert import conversion_report, convert
from .errors import InvalidOptionError, UntraceableModelError
from .passes.graph_utils import channel_reduce_dims, restore_buffers, save_buffers
from .passes.inventory import NEVER_CALLED
from .passes.trace import mode_dependent_modules
from .statistics import LayerStatistics, correction_scales, correction_spread, measure_layer_statistics

logger = logging.getLogger(__name__)

#: The project's per-layer target at gamma_init=1 on N(0, I) input: std in this closed range...
STD_TARGET = (0.7, 1.4)
#: ... and |mean| below this.
MEAN_TARGET = 0.3

def within_target(layer: LayerStatistics) -> bool:
    """A NormProp layer's measured output within STD_TARGET and MEAN_TARGET."""
    return STD_TARGET[0] <= layer.std <= STD_TARGET[1] and abs(layer.mean) < MEAN_TARGET


#: Batch independence is checked in float64. A batch-dependent op (a BatchNorm left in train
#: mode) moves a sample's output by O(1) relative to the output scale; what is left between a
#: sample run alone and inside a batch is summation order (different conv blocking per batch
#: size), ~1e-16 per op, grown by depth and by the unpropagated activation growth of deep
#: residual nets to at most ~1e-12 in torchvision's zoo. 1e-6 of the output scale sits many
#: orders of magnitude from both.
BATCH_INDEPENDENCE_RTOL = 1e-6

#: Failure categories, in the order the checks run (the prefix of each failure line).
CATEGORIES = ("trace", "convert", "BN left", "forward", "backward", "batch dependence", "statistics")


@dataclass
class ModelCheck:
    """What :func:`check_model` found for one model. ``None`` means "not reached"."""

    name: str
    input_shape: tuple[int, ...]
    gamma_init: float
    traced: bool | None = None
    batchnorms_found: int | None = None
    converted: int | None = None
    left: int | None = None
    #: reason -> how many BatchNorms were left for it
    left_reasons: dict[str, int] = field(default_factory=dict)
    conversion_seconds: float | None = None
    forward_ok: bool | None = None
    backward_ok: bool | None = None
    batch_independent: bool | None = None
    #: max |sample alone - same sample in the batch| / max(output scale, 1), float64
    batch_max_relative_difference: float | None = None
    #: samples whose alone-vs-batch difference is amplified rounding, not batch dependence: the
    #: network is ill-conditioned at them (see _ill_conditioned), with both numbers
    ill_conditioned: list[dict[str, float]] = field(default_factory=list)
    layers_measured: int = 0
    worst_std_deviation: float | None = None  #: max over NormProp layers of |std - 1|
    worst_std_layer: str | None = None
    worst_abs_mean: float | None = None  #: max over NormProp layers of |mean|
    worst_mean_layer: str | None = None
    #: every NormProp layer within STD_TARGET and MEAN_TARGET (None: nothing measured)
    within_std_target: bool | None = None
    #: the converted model is of the user's class with its own forward (docs/method.md section 9)
    class_kept: bool | None = None
    #: "category: detail" lines, in the order found; the first is the reason of the row
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """The pass criterion: BN found, none left, forward, backward and batch independence OK."""
        return bool(
            self.batchnorms_found
            and self.left == 0
            and self.forward_ok
            and self.backward_ok
            and self.batch_independent
        )

    @property
    def reason(self) -> str:
        return self.failures[0] if self.failures else ""

    def to_dict(self) -> dict[str, Any]:
        return _as_row(self)


def _as_row(check: Any, **extra: Any) -> dict[str, Any]:
    """A check's fields as one JSON row (tools/zoo.py writes one a model), with its verdict."""
    data = asdict(check)
    data["input_shape"] = list(check.input_shape)
    data["passed"] = check.passed
    data.update(extra)
    return data


def check_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    name: str = "",
    gamma_init: float = 1.0,
    batch_size: int = 2,
    statistics_batch_size: int = 4,
    convert_options: dict[str, Any] | None = None,
    inplace: bool = False,
) -> ModelCheck:
    """Convert ``model`` (left unchanged) and check it on N(0, I) input of ``input_shape``
    (one sample, no batch dimension).

    Checks, in order; a check that cannot run because an earlier one failed stays ``None``:

    1. ``convert(model, gamma_init=gamma_init, example_inputs=<a batch of input_shape>)``: traced?,
       BatchNorms found / converted / left.
    2. Train mode (dropout, drop-path and drop-block off), a batch of ``batch_size``: forward
       output finite; backward of the mean square of every floating output: every parameter
       gets a finite gradient, except parameters that get none in the original model too.
    3. Eval mode, a batch of ``statistics_batch_size``: each NormProp layer's output mean and
       std against the nominal (0, 1), via :func:`measure_layer_statistics`.
    4. Train mode in float64: each sample alone gives the output it gives inside the batch.

    Seed the RNG before calling for a reproducible result. Never raises for a failing model:
    every exception becomes a line of ``failures``.

    ``inplace=True`` converts ``model`` itself (``convert(inplace=True)``; it is the converted
    model afterwards), so the check holds one copy of the weights less (tools/zoo.py, which builds
    every model for its check alone). Which parameters the original leaves without gradient is
    then found before the conversion, on a batch of its own, with its buffers restored after.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise InvalidOptionError(f"input_shape must be positive sizes without the batch dim, got {input_shape!r}")
    if batch_size < 2 or statistics_batch_size < 1:
        raise InvalidOptionError("batch_size must be >= 2 (batch independence) and statistics_batch_size >= 1")
    check = ModelCheck(name=name or type(model).__name__, input_shape=shape, gamma_init=float(gamma_init))

    # The moments are computed for the shape the model is checked on, as a user passes theirs.
    options = {"example_inputs": torch.empty(batch_size, *shape), **(convert_options or {})}
    without_gradient = None  # found on the original when needed, unless it is converted in place
    if inplace:
        options["inplace"] = True
        probe = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0))
        saved, modes = save_buffers(model), [(m, m.training) for m in model.modules()]
        without_gradient = _parameters_without_gradient(model, probe, copy_model=False)
        restore_buffers(model, saved)
        for m, training in modes:
            m.training = training
        for p in model.parameters():
            p.grad = None
    converted = _convert(model, check, gamma_init, options)
    if converted is None:
        return check
    x = torch.randn(batch_size, *shape)
    with functional_dropout_off():
        outputs = _run(check, "forward", lambda: floating_outputs(dropout_off(converted.train())(x)))
        if outputs is None:
            return check
        check.forward_ok = all(bool(torch.isfinite(t).all()) for t in outputs)
        if not check.forward_ok:
            check.failures.append("forward: non-finite output")
        if outputs:
            _run(check, "backward", lambda: _check_backward(converted, model, x, outputs, check, without_gradient))
        else:
            check.failures.append("forward: the model returns no floating-point tensor")
        _run(check, "statistics", lambda: _check_statistics(converted, shape, statistics_batch_size, check))
        _run(check, "batch dependence", lambda: _check_batch_independence(converted, x, check))
    return check


def dropout_off(model: nn.Module) -> nn.Module:
    """Put every stochastic module (dropout, stochastic depth, drop-path, drop-block) in eval
    mode, so train-mode comparisons test the normalization only."""
    stochastic = _stochastic_types()
    for m in model.modules():
        if isinstance(m, stochastic):
            m.eval()
    return model


#: torch.nn.functional's dropout functions, all ``(input, p=0.5, training=True, inplace=False)``
_FUNCTIONAL_DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")


@contextlib.contextmanager
def functional_dropout_off() -> Iterator[None]:
    """While active, ``F.dropout(x, p, training=self.training)`` and its kin do nothing: a converted
    model keeps the user's own forward (docs/method.md section 9), and a functional dropout there
    (timm's heads) follows ``self.training``, which :func:`dropout_off` cannot reach. Calls that
    name the function another way (``torch.dropout``, an imported name) are not switched."""
    saved = {name: getattr(F, name) for name in _FUNCTIONAL_DROPOUTS}

    def off(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def without_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
            return fn(input, p, False, inplace)
        return without_dropout

    try:
        for name, fn in saved.items():
            setattr(F, name, off(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def _stochastic_types() -> tuple[type, ...]:
    # the modes the tracer keeps as leaves are the stochastic ones: drop-path, drop-block...
    return (nn.modules.dropout._DropoutNd, *mode_dependent_modules())


def _failure_line(category: str, err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" [{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}]" if frame else ""
    return f"{category}: {type(err).__name__}: {text}{where}"


def _run(check: ModelCheck, category: str, step: Callable[[], Any]) -> Any:
    """``step()``, or None with a failure line (and the check's flag set False) if it raises."""
    try:
        return step()
    except Exception as err:
        logger.debug("%s: %s failed", check.name, category, exc_info=True)
        check.failures.append(_failure_line(category, err))
        flag = {"forward": "forward_ok", "backward": "backward_ok", "batch dependence": "batch_independent",
                "statistics": "within_std_target"}[category]
        setattr(check, flag, False)
        return None


def _convert(model: nn.Module, check: ModelCheck, gamma_init: float, options: dict[str, Any]) -> nn.Module | None:
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert(model, gamma_init=gamma_init, **options)
    except UntraceableModelError as err:
        check.traced = False
        check.failures.append(_failure_line("trace", err))
        return None
    except Exception as err:  # noqa: BLE001 - any conversion error is this model's row
        check.failures.append(_failure_line("convert", err))
        return None
    check.conversion_seconds = time.perf_counter() - start
    check.traced = True
    report = conversion_report(converted)
    check.batchnorms_found = report.batchnorms_found
    check.converted = report.converted
    check.left = len(report.left)
    check.left_reasons = dict(Counter(b.reason for b in report.left))
    check.class_kept = kept_class(model, converted)
    if report.left:
        first = report.left[0]
        check.failures.append(f"BN left: {len(report.left)} of {report.batchnorms_found}, e.g. {first.path} "
                              f"({first.type}): {first.reason}")
    return converted


def kept_class(model: nn.Module, converted: nn.Module) -> bool:
    """The conversion of ``model`` is of its class, with its own forward (its root not rebuilt)."""
    tree = conversion_report(converted).module_tree
    return type(converted) is type(model) and tree is not None and tree.class_kept


def floating_outputs(out: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a model's output (a tensor, a tuple, a dict...)."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@dataclass(frozen=True)
class GradientCoverage:
    """Which trainable parameters a backward reached, in parameter order."""

    trainable: list[str]
    missing: list[str]  #: no gradient at all
    nonfinite: list[str]  #: a gradient with inf or NaN


def backward_coverage(model: nn.Module, outputs: list[torch.Tensor]) -> GradientCoverage:
    """Backward of the mean square of every output in ``outputs`` (``model``'s, with a graph), and
    which of ``model``'s trainable parameters got a gradient, and a finite one."""
    sum(t.float().square().mean() for t in outputs).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return GradientCoverage(
        trainable=[n for n, _ in params],
        missing=[n for n, p in params if p.grad is None],
        nonfinite=[n for n, p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())],
    )


def _check_backward(converted: nn.Module, original: nn.Module, x: torch.Tensor,
                    outputs: list[torch.Tensor], check: ModelCheck, without_gradient: set[str] | None = None) -> None:
    coverage = backward_coverage(converted, outputs)
    missing = set(coverage.missing)
    if missing:
        missing -= _parameters_without_gradient(original, x) if without_gradient is None else without_gradient
    nonfinite = sorted(coverage.nonfinite)
    check.backward_ok = not missing and not nonfinite
    if missing:
        names = sorted(missing)
        check.failures.append(f"backward: no gradient for {len(names)} of {len(coverage.trainable)} parameters, "
                              f"e.g. {', '.join(names[:3])}")
    if nonfinite:
        check.failures.append(f"backward: non-finite gradient in {len(nonfinite)} parameters, e.g. {nonfinite[0]}")


def _parameters_without_gradient(model: nn.Module, x: torch.Tensor, copy_model: bool = True) -> set[str]:
    """Parameters the *original* model leaves without gradient on ``x`` (unused heads...);
    empty when the original cannot run in train mode (then every missing gradient counts).
    Runs on a copy unless ``copy_model`` is False (the caller restores buffers and gradients)."""
    if copy_model:
        model = copy.deepcopy(model)
    try:
        return set(backward_coverage(model, floating_outputs(dropout_off(model.train())(x))).missing)
    except Exception:  # noqa: BLE001 - documented: then every missing gradient counts
        return set()


def _check_statistics(converted: nn.Module, shape: tuple[int, ...], batch: int, check: ModelCheck) -> None:
    stats = measure_layer_statistics(converted.eval(), torch.randn(batch, *shape))
    check.layers_measured = len(stats)
    if not stats:
        return
    worst_std = max(stats, key=lambda s: abs(s.std - 1))
    worst_mean = max(stats, key=lambda s: abs(s.mean))
    check.worst_std_deviation = abs(worst_std.std - 1)
    check.worst_std_layer = worst_std.path
    check.worst_abs_mean = abs(worst_mean.mean)
    check.worst_mean_layer = worst_mean.path
    low, high = STD_TARGET
    outside = [s for s in stats if not within_target(s)]
    check.within_std_target = not outside
    if outside:
        s = outside[0]
        check.failures.append(f"statistics: {len(outside)} of {len(stats)} NormProp layers outside std "
                              f"[{low}, {high}] / |mean| < {MEAN_TARGET}, first {s.path} "
                              f"(mean {s.mean:+.3f}, std {s.std:.3f})")


def _check_batch_independence(converted: nn.Module, x: torch.Tensor, check: ModelCheck) -> None:
    for p in converted.parameters():
        p.grad = None  # the backward check's gradients would be converted to float64 too: 2x the weights
    model = dropout_off(converted.train()).double()
    x = x.double()
    with torch.no_grad():
        batched = floating_outputs(model(x))
        scale = max(max(t.abs().max().item() for t in batched), 1.0)
        n = x.shape[0]
        alone = [floating_outputs(model(x[i : i + 1])) for i in range(n)]
        differences = [_difference(alone[i], batched, i, scale, (1, n)) for i in range(n)]
        worst = max(differences)
        counted = (_ill_conditioned(model, x, batched, alone, differences, scale, check)
                   if worst > BATCH_INDEPENDENCE_RTOL else worst)
    check.batch_max_relative_difference = worst
    check.batch_independent = counted <= BATCH_INDEPENDENCE_RTOL
    if not check.batch_independent:
        check.failures.append(f"batch dependence: a sample alone differs from itself in a batch of "
                              f"{x.shape[0]} by {counted:.2e} of the output scale (train mode, float64)")


#: The relative change of a sample's input, at float64 rounding, that tells an ill-conditioned
#: sample (its output moves by more than the batch-independence tolerance) from a well-conditioned one.
ROUNDING_PERTURBATION = 1e-15


def _ill_conditioned(model: nn.Module, x: torch.Tensor, batched: list[torch.Tensor], alone: list[list[torch.Tensor]],
                     differences: list[float], scale: float, check: ModelCheck) -> float:
    """The batch difference that counts, when some sample alone differs from itself in the batch.

    Alone and in a batch, a conv or matmul sums in another order (other blocking for another
    batch size): ~1e-16 apart. A network that is ill-conditioned at some input (timm's
    efficientnet_l2 at 64 px, gamma_init=1: a 1e-15 relative change of one sample's input moves
    its output by 5-8%) amplifies that to anything, and the alone-vs-batch comparison can no
    longer see batch dependence. Two measurements decide instead, per sample: its output in the
    same batch with every other sample replaced (same batch size, same summation order: bit for
    bit the same unless one sample reads another), and how far a ROUNDING_PERTURBATION of its
    own input moves it alone. A sample counts as independent when the first is within tolerance
    and its alone-vs-batch difference is within 10x the second; ``check.ill_conditioned`` records
    those samples' sensitivities. Returns the worst difference left."""
    generator = torch.Generator().manual_seed(1)
    others = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    worst = 0.0
    for i, difference in enumerate(differences):
        if difference <= BATCH_INDEPENDENCE_RTOL:
            continue
        replaced = others.clone()
        replaced[i] = x[i]
        swapped = _difference(floating_outputs(model(replaced)), batched, i, scale, (len(x), len(x)), position=i)
        noise = torch.randn(x[i : i + 1].shape, generator=generator, dtype=x.dtype)
        moved = floating_outputs(model(x[i : i + 1] * (1 + ROUNDING_PERTURBATION * noise)))
        sensitivity = _difference(moved, alone[i], 0, scale, (1, 1))
        if swapped <= BATCH_INDEPENDENCE_RTOL and difference <= 10 * sensitivity:
            check.ill_conditioned.append({"sample": i, "alone_vs_batch": difference, "rounding_sensitivity": sensitivity})
            continue
        worst = max(worst, difference if swapped <= BATCH_INDEPENDENCE_RTOL else max(difference, swapped))
    return worst


def _difference(outputs: list[torch.Tensor], references: list[torch.Tensor], i: int, scale: float,
                rows: tuple[int, int], position: int = 0) -> float:
    """max |outputs[.][position] - references[.][i]| / scale over the per-sample outputs (those
    with ``rows`` = (outputs', references') batch sizes; another size is not a per-sample output,
    e.g. a scalar loss term); inf for NaN."""
    worst = 0.0
    for a, b in zip(outputs, references, strict=True):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"output shape {tuple(a.shape)} alone vs {tuple(b.shape)} in the batch")
        if a.dim() == 0 or (a.shape[0], b.shape[0]) != rows:
            continue
        difference = (a[position] - b[i]).abs().max().item() / scale
        worst = max(worst, float("inf") if math.isnan(difference) else difference)
    return worst


# --- trained networks (docs/method.md section 8) -----------------------------------------------------------

#: Issue target for the exact conversion of a trained network: relative L2 distance of the eval
#: outputs, converted vs original, in float32 and in float64.
TRAINED_RTOL_FLOAT32 = 1e-5
TRAINED_RTOL_FLOAT64 = 1e-10
#: A float32 conversion also counts as exact when its distance to the original's float64 outputs is
#: within this factor of the original's own float32 distance to them: some deep networks amplify
#: float32 rounding past 1e-5 by themselves (a 1e-7 perturbation of every parameter moves their
#: outputs by 1e-5), and a converted model, which rounds in other places, cannot do better than
#: the original does. It rounds in one more place: the BatchNorm's scale is multiplied into each
#: weight (O(#weights), docs/method.md section 2), one rounding per weight where the original rounds
#: once per output, and a short filter whose products cancel (a depthwise 3x3 sums 9) turns that
#: into up to sqrt(9) = 3 times the relative error of its output. Measured on the torchvision zoo:
#: the median of the two distances' ratio is 1.06, the depthwise + squeeze-excitation networks
#: reach 1.9-2.1 (efficientnet_b5, mobilenet_v3_large). A conversion bug that shows in float32 alone
#: (a gamma rounded to half precision, say) is orders of magnitude past this factor; float64 is
#: held to 1e-10 besides.
ROUNDING_FLOOR_FACTOR = 3.0
#: Samples the randomized running statistics are measured on, at least: a trained BatchNorm's come
#: from a whole dataset; from a handful of values (a late 2x2 feature map, a pooled SE input) some
#: channel's variance would come out near zero, a scale no trained network has.
CALIBRATION_BATCH = 16
#: Values per channel every BatchNorm's statistics are measured on, where CALIBRATION_BATCH samples
#: give fewer (up to MAX_CALIBRATION_BATCH samples). 16 samples of a 2x2 map are 64 values a
#: channel; statistics that noisy fit the calibration samples and not the next input, and over the
#: ~100 BatchNorms of a deep 64-pixel EfficientNet the misfit compounds: the randomized originals of
#: timm's efficientnet_b8, efficientnetv2_rw_m, tf_efficientnetv2_l/xl and halonet_h1 came out
#: 2-64% away from their own float64 forward (chaotic, which a trained network is not), and
#: 8e-6-2.5e-5 with 64 samples. Deep features are correlated across positions, so a position
#: counts for less than a sample: halonet_h1's 16 samples of an 8x8 map (1024 values) were still
#: chaotic. Hence 4096: 64 samples for any map of 8x8 or less, 16 from 16x16 up (a 448-pixel
#: model whose BatchNorms are all in its stem stays cheap).
CALIBRATION_VALUES = 4096
MAX_CALIBRATION_BATCH = 64


@torch.no_grad()
def calibration_batch_size(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Samples :func:`randomize_batchnorms` should measure ``model``'s statistics on: enough for
    CALIBRATION_VALUES values per channel in the BatchNorm with the fewest values per sample (a
    late 2x2 map: 4, a BatchNorm1d: 1), within [CALIBRATION_BATCH, MAX_CALIBRATION_BATCH]. Finds
    that BatchNorm with one eval-mode forward of one zero sample; leaves ``model`` in eval mode."""
    from .batchnorm_state import is_batchnorm

    fewest: list[int] = []

    def measure(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] > 0:
            fewest.append(x[:1].numel() // x.shape[1])

    handles = [m.register_forward_pre_hook(measure) for m in model.modules() if is_batchnorm(m)]
    try:
        model.eval()(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    if not fewest:
        return CALIBRATION_BATCH
    needed = math.ceil(CALIBRATION_VALUES / max(1, min(fewest)))
    return max(CALIBRATION_BATCH, min(MAX_CALIBRATION_BATCH, needed))


@torch.no_grad()
def randomize_batchnorms(model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...], seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``model`` (frozen ones too) the statistics and affine of a trained
    checkpoint, as a stand-in for pretrained weights (which cannot be downloaded here). Seeded.

    Each affine gets weight ~ U(0.5, 1.5) and bias ~ N(0, 0.2^2). The running statistics are what
    training leaves there: those of the BatchNorm's own input, measured on one eval-mode pass over
    ``example_input`` (each BatchNorm's, as its input arrives: a forward pre-hook writes them before
    the BatchNorm runs, so every later layer sees normalized values, as in a trained network), then
    perturbed (variance x log-uniform [0.7, 1.4], mean + N(0, 0.1^2) of a standard deviation) so
    they are not the batch's. Statistics drawn without regard to the activations would scale each
    layer's output at random, a random walk over depth (timm's rexnet_100: its float32 forward
    came out 1e-2 away from its float64 one). Statistics fitted to too few values leave the deepest
    networks chaotic (16 samples of a 2x2 map: the randomized tf_efficientnetv2_xl's float32
    outputs were 64% away from its float64 ones), which a trained network is not:
    :func:`calibration_batch_size` says how many samples a model needs. A stand-in, no more.
    BatchNorms without running statistics get the affine only; every one counts 1000 batches
    tracked. ``example_input``: the model's input, or a tuple of its inputs. Changes ``model`` in
    place (and leaves it in eval mode) and returns it.
    """
    from .batchnorm_state import is_batchnorm

    generator = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor, sample: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return sample(torch.empty(like.numel(), dtype=torch.float64)).to(like.device, like.dtype).reshape(like.shape)

    def measure(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().double()
        dims = channel_reduce_dims(x.dim())
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        var = var * draw(var, lambda t: t.uniform_(math.log(0.7), math.log(1.4), generator=generator).exp())
        mean = mean + var.sqrt() * draw(mean, lambda t: t.normal_(0.0, 0.1, generator=generator))
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)

    handles = []
    for module in model.modules():
        if not is_batchnorm(module):
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None and bias is not None:
            weight.copy_(draw(weight, lambda t: t.uniform_(0.5, 1.5, generator=generator)))
            bias.copy_(draw(bias, lambda t: t.normal_(0.0, 0.2, generator=generator)))
        if getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None:
            handles.append(module.register_forward_pre_hook(measure))
        tracked = getattr(module, "num_batches_tracked", None)
        if isinstance(tracked, torch.Tensor):
            tracked.fill_(1000)
    try:
        model.eval()(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    finally:
        for handle in handles:
            handle.remove()
    return model


def trained_float64_tolerance(computes_in: Sequence[str]) -> float:
    """The float64 tolerance of the trained check: TRAINED_RTOL_FLOAT64, or the float32 one for an
    original whose float64 forward computes in lower precision in places (``computes_in``, found
    by :class:`_LowerPrecision`): it has float32 results there."""
    return TRAINED_RTOL_FLOAT32 if computes_in else TRAINED_RTOL_FLOAT64


class _LowerPrecision(TorchDispatchMode):
    """Records the floating dtypes below float64 that the ops run under it return (``found``)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                name = str(t.dtype).removeprefix("torch.")
                if name not in self.found:
                    self.found.append(name)
        return out


def _train_only_outputs(train: list[torch.Tensor], evaluated: list[torch.Tensor]) -> int:
    """How many outputs the train mode returns after those of the eval mode: the auxiliary heads
    of torchvision's GoogLeNet and Inception3, whose own forward (kept with the user's class)
    returns ``(logits, aux...)`` in training and ``logits`` in eval. 0 unless the eval outputs
    are the first train outputs, shape for shape."""
    head = train[:len(evaluated)]
    if len(train) > len(evaluated) and [t.shape for t in head] == [t.shape for t in evaluated]:
        return len(train) - len(evaluated)
    return 0


def relative_l2(actual: Any, expected: Any) -> float:
    """||actual - expected|| / ||expected|| over every floating output tensor together."""
    a, b = floating_outputs(actual), floating_outputs(expected)
    if len(a) != len(b) or not b:
        raise ValueError(f"{len(a)} floating outputs vs {len(b)}")
    diff = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b, strict=True))
    norm = sum(float(y.double().square().sum()) for y in b)
    return math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)


@dataclass
class TrainedCheck:
    """What :func:`check_trained_conversion` found for one model (relative L2 distances)."""

    name: str
    input_shape: tuple[int, ...]
    batchnorms_found: int | None = None
    kept_trained: int | None = None  #: BatchNorms whose replacement keeps their function
    error_float32: float | None = None  #: eval outputs, converted vs original, in float32
    error_float64: float | None = None  #: the same in float64
    #: the original's own float32 eval outputs vs its float64 ones (the rounding floor)
    original_rounding: float | None = None
    #: the float32 conversion's outputs vs the float64 original's
    converted_rounding: float | None = None
    train_eval_difference: float | None = None  #: converted (float32), train mode (dropout off) vs eval
    #: BatchNorms left because the eval-mode forward (which the check traces) never calls them
    never_called: list[str] = field(default_factory=list)
    class_kept: bool | None = None  #: as ModelCheck.class_kept, for the float32 conversion
    #: samples the randomized statistics were measured on (:func:`calibration_batch_size`)
    calibration_batch: int | None = None
    #: outputs the train mode returns besides the eval mode's (auxiliary heads), not compared
    train_only_outputs: int = 0
    #: the lower floating dtypes the original's float64 forward computes in (timm's efficientvit
    #: casts its linear attention to float32): its float64 error is then held to the float32 tolerance
    float64_computes_in: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def at_rounding_floor(self) -> bool:
        """The float32 error exceeds the target, but the original rounds nearly as far by itself."""
        return (self.converted_rounding is not None and self.original_rounding is not None
                and self.converted_rounding <= ROUNDING_FLOOR_FACTOR * self.original_rounding)

    @property
    def passed(self) -> bool:
        if self.failures or None in (self.error_float32, self.error_float64, self.train_eval_difference):
            return False
        float32_ok = self.error_float32 <= TRAINED_RTOL_FLOAT32 or self.at_rounding_floor
        return (float32_ok and self.error_float64 <= trained_float64_tolerance(self.float64_computes_in)
                and self.train_eval_difference <= TRAINED_RTOL_FLOAT32)

    def to_dict(self) -> dict[str, Any]:
        return _as_row(self, at_rounding_floor=self.at_rounding_floor)


def check_trained_conversion(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    name: str = "",
    seed: int = 0,
    batch_size: int = 2,
    convert_options: dict[str, Any] | None = None,
) -> TrainedCheck:
    """Randomize a copy of ``model``'s BatchNorms (:func:`randomize_batchnorms`, on a batch of
    :func:`calibration_batch_size` N(0, I) samples of ``input_shape``, no batch dim), convert it and a float64 copy with
    the default ``init="auto"``, and compare eval outputs with the randomized original's on
    another N(0, I) batch; also the float32 conversion in train mode (dropout off) against its
    eval mode, and the original's own float32 rounding. Never raises for a failing model."""
    shape = tuple(int(d) for d in input_shape)
    check = TrainedCheck(name=name or type(model).__name__, input_shape=shape)
    stage = "randomize"
    try:
        generator = torch.Generator().manual_seed(seed)
        original32 = copy.deepcopy(model).float()
        check.calibration_batch = calibration_batch_size(original32, shape)
        calibration = torch.randn(check.calibration_batch, *shape, generator=generator)
        original32 = randomize_batchnorms(original32, calibration, seed)
        original64 = copy.deepcopy(original32).double()  # the same values, computed in float64
        x64 = torch.randn(batch_size, *shape, generator=generator, dtype=torch.float64)
        x32 = x64.float()
        stage = "forward"
        with torch.no_grad():  # the originals' outputs first: each copy is then converted in place
            with _LowerPrecision() as lower:
                expected64 = original64(x64)
            check.float64_computes_in = lower.found
            expected32 = original32(x32)
        stage = "convert"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = {"inplace": True, **(convert_options or {})}  # a copy already: one copy of the weights less
            converted64 = convert(original64, example_inputs=torch.empty(batch_size, *shape, dtype=torch.float64), **options)
            del original64
            converted32 = convert(original32, example_inputs=torch.empty(batch_size, *shape), **options)
            del original32
        report = conversion_report(converted32)
        check.class_kept = kept_class(model, converted32)
        check.batchnorms_found = report.batchnorms_found
        check.kept_trained = sum(i.trained for i in report.initializations)
        # A BatchNorm the eval-mode forward never calls (an auxiliary head that runs in training
        # only) cannot change the eval outputs compared here: listed, not a failure.
        idle = [b for b in report.left if b.reason == NEVER_CALLED]
        check.never_called = [b.path for b in idle]
        left = [b for b in report.left if b.reason != NEVER_CALLED]
        if left:
            check.failures.append(f"BN left: {len(left)} of {report.batchnorms_found}, e.g. {left[0].path}: {left[0].reason}")
        fresh = [i for i in report.initializations if not i.trained]
        if fresh:
            check.failures.append(f"not kept: {len(fresh)} BatchNorms got the paper's initialization, e.g. "
                                  f"{fresh[0].path}: {fresh[0].reason}")
        stage = "forward"
        with torch.no_grad():
            check.error_float64 = relative_l2(converted64.eval()(x64), expected64)
            del converted64
            evaluated32 = converted32.eval()(x32)
            check.error_float32 = relative_l2(evaluated32, expected32)
            check.original_rounding = relative_l2(expected32, expected64)
            check.converted_rounding = relative_l2(evaluated32, expected64)
            with functional_dropout_off():
                trained_mode = floating_outputs(dropout_off(converted32.train())(x32))
            evaluated = floating_outputs(evaluated32)
            check.train_only_outputs = _train_only_outputs(trained_mode, evaluated)
            check.train_eval_difference = relative_l2(trained_mode[:len(trained_mode) - check.train_only_outputs], evaluated)
    except Exception as err:  # noqa: BLE001 - a failing model is a row, never a crash
        check.failures.append(_failure_line(stage, err))
    return check


# --- statistics at the model's own resolution, over calibration seeds (issue 20) ----------------------------

#: every model's worst NormProp layer should have its output std within this range at init...
WORST_STD_RANGE = (0.5, 2.0)
#: ... and its correction constants should move by at most this much (relative) between seeds
SEED_SPREAD_TARGET = 0.05


@dataclass
class StatisticsCheck:
    """What :func:`check_statistics` found for one model."""

    name: str
    input_shape: tuple[int, ...]
    seeds: int
    samples: int  #: N(0, I) samples the layer statistics are measured over
    calibration_samples: int | None = None  #: the size of the sample the corrections are calibrated on
    layers: int = 0  #: NormProp layer calls measured
    within: int = 0  #: of those, with std in STD_TARGET and |mean| < MEAN_TARGET
    min_std: float | None = None
    min_std_layer: str | None = None
    max_std: float | None = None
    max_std_layer: str | None = None
    worst_abs_mean: float | None = None
    worst_mean_layer: str | None = None
    #: largest relative spread (max - min) / mean of a correction constant over the seeds, and where
    seed_spread: float | None = None
    seed_spread_at: str | None = None
    #: the seed-0 report's estimate of that spread's source: the relative standard error of its
    #: least precise correction's scale, and where (``ConversionReport.calibration_precision``)
    calibration_error: float | None = None
    calibration_error_at: str | None = None
    corrections: int = 0  #: Standardize corrections in the seed-0 conversion
    failures: list[str] = field(default_factory=list)

    @property
    def expected_spread(self) -> float | None:
        """The seed spread the seed-0 report leads one to expect: its least precise correction's
        scale error times the expected range of ``seeds`` standard normal draws (1.69 for 3)."""
        return expected_seed_spread(self.calibration_error, self.seeds)

    @property
    def worst_within_range(self) -> bool:
        low, high = WORST_STD_RANGE
        return self.min_std is not None and low <= self.min_std and self.max_std <= high

    @property
    def passed(self) -> bool:
        """Converted and measured, its worst layer within WORST_STD_RANGE, its constants within
        SEED_SPREAD_TARGET across seeds (a model without corrections has nothing to move)."""
        return (not self.failures and self.layers > 0 and self.worst_within_range
                and (self.seed_spread is None or self.seed_spread <= SEED_SPREAD_TARGET))

    def to_dict(self) -> dict[str, Any]:
        return _as_row(self, worst_within_range=self.worst_within_range, expected_spread=self.expected_spread)


def expected_seed_spread(scale_error: float | None, seeds: int) -> float | None:
    """The spread of a correction's scale over ``seeds`` calibration seeds to expect from its
    relative standard error (``CalibrationPrecision.scale_error``): that times the expected range
    of ``seeds`` standard normal draws; None without an error."""
    return None if scale_error is None else scale_error * expected_range(seeds)


@functools.lru_cache(maxsize=None)
def expected_range(n: int) -> float:
    """E[max - min] of ``n`` independent standard normal values (1.128 for 2, 1.693 for 3):
    the integral of 1 - Phi(x)^n - (1 - Phi(x))^n over x, by the trapezoid rule on [-10, 10]."""
    if n < 2:
        return 0.0
    step = 1e-3
    total = 0.0
    for i in range(-10_000, 10_001):
        phi = 0.5 * (1.0 + math.erf(i * step / math.sqrt(2.0)))
        total += 1.0 - phi ** n - (1.0 - phi) ** n
    return total * step


def check_statistics(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    name: str = "",
    seeds: int = 3,
    samples: int = 32,
    batch_size: int = 8,
    convert_options: dict[str, Any] | None = None,
) -> StatisticsCheck:
    """Convert ``model`` (left unchanged) at ``gamma_init=1`` once per calibration seed
    ``0..seeds-1`` on an example input of ``input_shape`` (no batch dim), and measure every
    NormProp layer's output mean and std in eval mode over ``samples`` N(0, I) samples
    (``torch.Generator().manual_seed(1)``, run ``batch_size`` at a time) on the seed-0
    conversion; the spread of every correction constant over the seeds. Only the constants of
    the other conversions are kept, so at most two copies of the weights live at once. Never
    raises for a failing model: the error is a line of ``failures``."""
    shape = tuple(int(d) for d in input_shape)
    if seeds < 1 or samples < 1 or batch_size < 1:
        raise InvalidOptionError("seeds, samples and batch_size must be >= 1")
    check = StatisticsCheck(name=name or type(model).__name__, input_shape=shape, seeds=seeds, samples=samples)
    options = {"gamma_init": 1.0, "example_inputs": torch.empty(2, *shape), **(convert_options or {})}
    scales = []
    stage = "convert"
    try:
        for seed in range(seeds):
            stage = "convert"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = convert(model, calibration_seed=seed, **options)
            scales.append(correction_scales(converted))
            if seed == 0:
                report = conversion_report(converted)
                check.calibration_samples = report.calibration_samples
                if report.calibration_precision is not None:
                    check.calibration_error = report.calibration_precision.scale_error
                    check.calibration_error_at = report.calibration_precision.consumer
                stage = "statistics"
                x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(1))
                _record_statistics(check, measure_layer_statistics(converted.eval(), x, batch_size=batch_size))
            del converted
        check.corrections = len(scales[0])
        if scales[0]:
            check.seed_spread, check.seed_spread_at = correction_spread(scales)
    except Exception as err:  # noqa: BLE001 - a failing model is a row, never a crash
        check.failures.append(_failure_line(stage, err))
    return check


def _record_statistics(check: StatisticsCheck, stats: list[LayerStatistics]) -> None:
    check.layers = len(stats)
    if not stats:
        check.failures.append("statistics: no NormProp layer ran")
        return
    check.within = sum(within_target(s) for s in stats)
    smallest, largest = min(stats, key=lambda s: s.std), max(stats, key=lambda s: s.std)
    worst_mean = max(stats, key=lambda s: abs(s.mean))
    check.min_std, check.min_std_layer = smallest.std, smallest.path
    check.max_std, check.max_std_layer = largest.std, largest.path
    check.worst_abs_mean, check.worst_mean_layer = abs(worst_mean.mean), worst_mean.path
