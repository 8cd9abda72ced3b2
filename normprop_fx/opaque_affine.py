"""The NormProp replacement of a BatchNorm inside a module that torch.fx keeps opaque.

timm's not-traceable attention blocks (MobileViT, ConvAttention, BilinearAttnTransform, ...) and
the user's ``leaf_modules`` are single nodes of the traced graph, so no moment rule sees their
inside. A BatchNorm in there is replaced in place by this module: a
:class:`~normprop_fx.standardize.Standardize` whose mean (per channel) and scale (one for all
channels) are *measured* on the Gaussian sample that moment propagation runs the model on (they stay constants afterwards,
like every other correction), then a :class:`~normprop_fx.affine.NormPropAffine`, then, for a
norm-activation unit such as timm's ``BatchNormAct2d``, its own drop and activation modules.

The replacement of a trained BatchNorm measures nothing (``calibrate=False``): its affine keeps the
BatchNorm's eval-mode function, running statistics included (docs/method.md section 8), and its
correction stays the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from .affine import NormPropAffine
from .standardize import Standardize


class OpaqueNormPropAffine(nn.Module):
    """``after(affine(correction(x)))``; ``correction`` is measured on the first call made while
    :attr:`measuring` is True (moment propagation sets it for its sample run): per-channel means of
    its input shrunk by their sampling noise, and one variance for all channels. A sample with
    non-finite values leaves it unmeasured (an identity)."""

    def __init__(self, affine: NormPropAffine, after: nn.Module | None = None, *, calibrate: bool = True) -> None:
        super().__init__()
        self.correction = (Standardize(torch.zeros(()), torch.ones(()), reason="not measured: an identity")
                           if calibrate else nn.Identity())
        self.affine = affine
        self.after = after if after is not None else nn.Identity()
        self.calibrate = calibrate  #: False: nothing to measure (a trained BatchNorm's function is kept)
        self.measuring = False
        self.attempted = False  #: the sample reached this module (its first call while measuring)
        self.measured = False  #: ... and gave finite values, now in ``correction``
        #: each dim-0 slice's mean square around the measured means, for moment propagation to
        #: judge the correction's precision by (it takes and clears it; None when not measured)
        self.slice_squares: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.measuring and self.calibrate and not self.attempted:
            self.attempted = True
            self._measure(x)
        return self.after(self.affine(self.correction(x)))

    @torch.no_grad()
    def _measure(self, x: torch.Tensor) -> None:
        values = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        if not bool(torch.isfinite(values).all()):
            return  # stays unmeasured (an identity), and propagation reports it
        # Per-channel moments, each only as far as the sample can tell it from the others
        # (shrunk to the average over channels by its sampling noise, see _shrunk): the values of
        # one sample can be far from independent (at init, attention makes the tokens of a sample
        # nearly alike), and a per-channel variance from a few dozen effective values is off by
        # +-30% per channel, which 1/sqrt(var) turns into a bias that compounds through depth.
        groups = values.tensor_split(min(_NOISE_GROUPS, values.shape[1]), dim=1)
        group_means = torch.stack([g.mean(1) for g in groups])
        mean = _shrunk(values.mean(1), group_means)
        # One variance for all channels (as for the corrections in the graph: no per-channel
        # noise), measured on each group around the means of the others: held-out values see the
        # means' sampling error as other inputs will, which the values that fitted them hide.
        squares = 0.0
        for k, g in enumerate(groups):
            others = torch.cat([group_means[:k], group_means[k + 1:]])
            held_out = _shrunk(others.mean(0), others) if len(others) else mean
            squares += float(((g - held_out[:, None]) ** 2).sum())
        var = torch.full_like(mean, squares / values.numel())  # one variance: no channel can be near-constant alone
        # Each dim-0 slice's mean square around ``mean``, from its per-channel moments (no
        # full-size temporary beside ``values``, whose columns run slice by slice).
        slice_var, slice_mean = torch.var_mean(values.reshape(x.shape[1], x.shape[0], -1), dim=2, correction=0)
        self.slice_squares = (slice_var + (slice_mean - mean[:, None]) ** 2).mean(0)
        shape = (-1,) + (1,) * (x.dim() - 2)
        self.correction = Standardize(
            mean.float().reshape(shape).to(x.device),
            (var + 1e-5).rsqrt().float().reshape(shape).to(x.device),
            reason="measured on the Gaussian sample (inside a module torch.fx does not trace)",
        )
        self.measured = True


#: Contiguous groups of the sample (whole samples, mostly: dim 0 comes first) whose disagreement
#: measures the sampling noise of a per-channel estimate.
_NOISE_GROUPS = 8


def _shrunk(estimate: torch.Tensor, per_group: torch.Tensor) -> torch.Tensor:
    """Per-channel ``estimate`` (C,) pulled toward its mean over channels by as much as its spread
    over channels is sampling noise: ``per_group`` (G, C) are the same estimates on G disjoint
    groups of the sample, whose variance / G is each channel's noise (empirical Bayes, one weight
    for all channels). Noise-free channel differences are kept; pure noise becomes one scalar."""
    groups, channels = per_group.shape
    if groups < 2 or channels < 2:
        return estimate
    noise = float(per_group.var(0).mean()) / groups
    spread = float(estimate.var())
    signal = max(0.0, spread - noise)
    weight = signal / (signal + noise) if signal + noise > 0 else 1.0
    center = estimate.mean()
    return center + weight * (estimate - center)
