"""Pass 5: choose, once per BatchNorm, how its replacement is initialized (docs/method.md section 8).

- ``"trained"``: the replacement computes exactly the BatchNorm's eval-mode function (gamma and
  beta from its statistics and affine; no post-activation normalization, no correction in front
  of it), so a trained network keeps what it learned.
- ``"normprop"``: the paper's initialization (gamma_init, beta 0, normalized activation, moment
  corrections), for a network trained from scratch.

``init="auto"`` (the default) picks "trained" for each BatchNorm that shows it was trained
(:func:`~normprop_fx.batchnorm_state.trained_evidence`: a frozen BatchNorm, batches tracked, or
running statistics moved) and "normprop" for the others;
``init="trained"`` / ``init="normprop"`` force one for every BatchNorm. A BatchNorm with
``track_running_stats=False`` normalizes by batch statistics in eval mode too: it has no
eval-mode function to keep and always gets "normprop". The records say, per BatchNorm, what
was chosen and why; every later pass reads them.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from normprop_fx.batchnorm_state import affine_at_initial_values, batchnorm_state, trained_evidence
from normprop_fx.errors import InvalidOptionError
from normprop_fx.records import NORMPROP_INIT, TRAINED_INIT, LayerInit

INIT_OPTIONS = ("auto", "trained", "normprop")


def check_init_option(init: object) -> str:
    if not isinstance(init, str) or init not in INIT_OPTIONS:
        raise InvalidOptionError(
            f"init must be one of {', '.join(repr(o) for o in INIT_OPTIONS)}, got {init!r}: 'auto' keeps "
            "each trained BatchNorm's function and gives untrained ones the paper's initialization"
        )
    return init


def choose_initializations(batchnorms: dict[str, nn.Module], init: str) -> dict[str, LayerInit]:
    """One :class:`LayerInit` per BatchNorm of ``batchnorms`` (qualified name -> module)."""
    check_init_option(init)
    return {path: _choose(path, bn, init) for path, bn in batchnorms.items()}


def _choose(path: str, bn: nn.Module, init: str) -> LayerInit:
    state = batchnorm_state(bn)
    evidence = trained_evidence(state)
    kind = type(bn).__name__
    if not state.tracks_running_stats:
        reason = ("track_running_stats=False: it normalizes by batch statistics in eval mode too, so it has "
                  "no eval-mode function to keep")
        if init == "trained":
            reason += " (init='trained' cannot apply)"
        if state.affine and not affine_at_initial_values(state):
            reason += "; its learned affine is not kept"
        return LayerInit(path, kind, NORMPROP_INIT, reason)
    if init == "normprop":
        reason = ("init='normprop' (it is at its initial values anyway)" if evidence is None
                  else f"init='normprop': its trained function is discarded ({evidence})")
        return LayerInit(path, kind, NORMPROP_INIT, reason, evidence)
    if init == "trained":
        reason = ("init='trained' (no batch tracked, running statistics at their initial values: its function is "
                  "weight * x / sqrt(1 + eps) + bias)"
                  if evidence is None else f"init='trained' ({evidence})")
        return LayerInit(path, kind, TRAINED_INIT, reason, evidence)
    if evidence is None:
        if state.affine and not affine_at_initial_values(state):
            return LayerInit(path, kind, NORMPROP_INIT, (
                "no batch tracked and running statistics at their initial values; its affine differs from (1, 0), "
                "as a constructor sets it (zero-init of a residual branch's last BatchNorm): counted as untrained "
                "(init='trained' keeps its function)"))
        return LayerInit(path, kind, NORMPROP_INIT,
                         "at its initial values (no batch tracked, running statistics and affine untouched)")
    return LayerInit(path, kind, TRAINED_INIT, evidence, evidence, statistics_only=affine_at_initial_values(state))


def discarded(inits: Iterable[LayerInit]) -> list[LayerInit]:
    """The BatchNorms that show they were trained but get the paper's initialization."""
    return [i for i in inits if not i.trained and i.evidence is not None]
