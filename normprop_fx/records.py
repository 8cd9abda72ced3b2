"""What a conversion did, as records: the audit table is built from these, never by
re-reading the graph."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class LeftBatchNorm:
    """A BatchNorm module that is still in (or hidden inside) the converted model, and why."""

    path: str
    type: str
    reason: str


@dataclass
class ConversionReport:
    """Everything :func:`normprop_fx.convert` did to one model."""

    model: str  #: class name of the converted model
    gamma_init: str  #: the gamma_init option as given ("paper" or a number)
    batchnorms_found: int
    rewrites: list[Rewrite] = field(default_factory=list)
    left: list[LeftBatchNorm] = field(default_factory=list)
    leaf_modules: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  #: things the user should act on, e.g. a frozen training flag

    @property
    def converted(self) -> int:
        return len(self.rewrites)
