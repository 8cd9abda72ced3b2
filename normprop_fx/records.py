"""What a conversion did, as records: the audit table is built from these, never by
re-reading the graph."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Attribute of a converted model that holds its :class:`ConversionReport`.
REPORT_ATTRIBUTE = "normprop_report"


@dataclass(frozen=True)
class Rewrite:
    """One Conv/Linear -> BatchNorm [-> activation] pattern replaced by a NormProp layer."""

    path: str  #: qualified name of the NormProp layer (the original conv/linear's name)
    original: tuple[str, ...]  #: "path (Type)" of each node the pattern consumed
    replacement: str  #: NormProp class name
    activation: str  #: the normalized activation, e.g. "relu" or "leaky_relu(negative_slope=0.2)"
    gamma_init: float
    c_mean: float
    c_std: float
    jacobian_gain: float
    notes: tuple[str, ...] = ()
    #: "normprop" (the paper's initialization) or "trained" (the BatchNorm's eval-mode function kept)
    init: str = "normprop"
    #: qualified name of the BatchNorm module it replaces ('' when it is ``path``): a BatchNorm
    #: shared by two different convs gives two layers, and counts once (``converted``)
    batchnorm: str = ""


#: The two ways a BatchNorm's replacement is initialized (docs/method.md section 8).
NORMPROP_INIT = "normprop"
TRAINED_INIT = "trained"


@dataclass(frozen=True)
class LayerInit:
    """How one BatchNorm's replacement is initialized, and why: chosen once per BatchNorm
    (``passes.initialization``); the passes read it and never re-derive it."""

    path: str  #: qualified name of the BatchNorm
    type: str
    init: str  #: NORMPROP_INIT or TRAINED_INIT
    reason: str
    #: what shows the BatchNorm was trained (docs/method.md section 8), None when it is at its initial values
    evidence: str | None = None
    #: it counts as trained by its running statistics alone: its affine is at its initial values
    statistics_only: bool = False

    @property
    def trained(self) -> bool:
        return self.init == TRAINED_INIT


@dataclass(frozen=True)
class RebuiltModule:
    """A module of the user's tree whose forward was replaced, at its own qualified name, by a
    GraphModule of that forward rewritten (or inlined into its caller's), and why."""

    path: str  #: qualified name ('' for the root)
    type: str  #: the original class name (the GraphModule keeps it as its own)
    reason: str


@dataclass(frozen=True)
class ModuleTree:
    """How the converted graph was written back into the user's model (``passes.hierarchy``)."""

    root_type: str
    class_kept: bool  #: the returned model is of the user's class, with its own forward
    swapped: int = 0  #: modules replaced at their own qualified names (NormProp layers, nn.Identity...)
    rebuilt: tuple[RebuiltModule, ...] = ()
    inlined: tuple[RebuiltModule, ...] = ()  #: module calls inlined into their caller's rebuilt forward
    flat: bool = False  #: the result is the one flat GraphModule (asked for, or the last resort)


@dataclass(frozen=True)
class LeftBatchNorm:
    """A BatchNorm module that is still in (or hidden inside) the converted model, and why."""

    path: str
    type: str
    reason: str


@dataclass(frozen=True)
class Correction:
    """A constant (x - mean) * scale inserted by moment propagation in front of a consumer."""

    path: str  #: qualified name of the Standardize module, or of the NormalizedActivation that absorbed it
    consumer: str  #: the NormProp layer / affine / normalized activation it feeds
    source: str  #: the value it corrects
    reason: str
    mean: str  #: the subtracted nominal mean (a number or a per-channel range)
    scale: str  #: 1 / sqrt(nominal variance)
    estimated: bool  #: True when the moments depend on weights or on a Gaussian probe


@dataclass(frozen=True)
class NormalizedStandalone:
    """An activation outside any BN pattern (after a residual add, a concat...) that now
    normalizes its output: (f(x) - c_mean) / c_std."""

    path: str
    original: str
    activation: str


@dataclass(frozen=True)
class CalibrationPrecision:
    """How precisely the Gaussian sample pins down the least precise correction it decided
    (docs/method.md section 6). A correction calibrated on the sample divides by the mean, over
    the samples, of each sample's own mean square at its input; at init a deep network's samples
    drift apart in scale, so that mean is only as precise as their spread allows: with coefficient
    of variation ``spread`` over ``samples`` samples, its relative standard error is
    ``spread / sqrt(samples)``, and another calibration seed moves the correction's scale (1 / the
    square root) by about half that. Of the graph's corrections (``passes.propagate``), and of those
    an opaque module measures for itself (``OpaqueNormPropAffine``) where its input's dim 0 is the
    sample (not where a reshape folded heads or windows into it)."""

    consumer: str  #: the layer (or normalized activation) whose input correction it is
    samples: int  #: the samples it was measured on
    spread: float  #: coefficient of variation of the samples' own mean squares there
    largest: float  #: the largest sample's mean square, over their median
    wanted: int  #: samples that would make the mean square precise to the growth's aim at this spread

    @property
    def error(self) -> float:
        """Relative standard error of the mean square the correction divides by."""
        return self.spread / self.samples ** 0.5

    @property
    def scale_error(self) -> float:
        """Relative standard error of the correction's scale (1 / sqrt of that mean square)."""
        return self.error / 2


@dataclass
class ConversionReport:
    """Everything :func:`normprop_fx.convert` did to one model."""

    model: str  #: class name of the converted model
    gamma_init: str  #: the gamma_init option as given ("paper" or a number)
    batchnorms_found: int
    init: str = "auto"  #: the init option as given
    #: one record per BatchNorm found, in model order: how its replacement was initialized
    initializations: list[LayerInit] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    left: list[LeftBatchNorm] = field(default_factory=list)
    leaf_modules: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  #: things the user should act on, e.g. a frozen training flag
    corrections: list[Correction] = field(default_factory=list)
    normalized_activations: list[NormalizedStandalone] = field(default_factory=list)
    estimated_ops: tuple[str, ...] = ()  #: ops whose moments a Gaussian probe or the sample estimated
    #: ops where moments could not be computed (with the error, or where they went unknown without
    #: one); a NormProp layer reading such a value is standardized on the sample's own moments
    unknown_moments: tuple[str, ...] = ()
    input_shapes: tuple[tuple[int, ...], ...] = ()  #: the shapes the nominal moments were computed for
    #: Gaussian samples moment propagation calibrated on (None: none ran, e.g. a trained network)
    calibration_samples: int | None = None
    #: how precisely the sample set its least precise correction (None: the sample set none)
    calibration_precision: CalibrationPrecision | None = None
    #: how the result carries the user's module tree (None: not recorded)
    module_tree: ModuleTree | None = None

    @property
    def converted(self) -> int:
        """BatchNorm modules replaced (not calls, not layers: a BatchNorm shared by two
        different convs gives two layers and counts once)."""
        return len({r.batchnorm or r.path for r in self.rewrites})
