"""The NormProp replacement of a BatchNorm inside a module that torch.fx keeps opaque.

timm's not-traceable attention blocks (MobileViT, ConvAttention, BilinearAttnTransform, ...) and
the user's ``leaf_modules`` are single nodes of the traced graph, so no moment rule sees their
inside. A BatchNorm in there is replaced in place by this module: a
:class:`~normprop_fx.standardize.Standardize` whose per-channel mean and scale are *measured* on
the Gaussian sample that moment propagation runs the model on (they stay constants afterwards,
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
    :attr:`measuring` is True (moment propagation sets it for its sample run): per-channel mean
    and variance of its input, the variance floored at a tenth of the mean over channels. A
    sample with non-finite values leaves it unmeasured (an identity)."""

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
        mean = values.mean(1)
        # A channel that is nearly constant on the sample would get a huge constant scale that
        # other inputs do not warrant: its variance is floored at a tenth of the channels' mean.
        var = values.var(1, unbiased=False)
        var = var.clamp_min(0.1 * float(var.mean()))
        shape = (-1,) + (1,) * (x.dim() - 2)
        self.correction = Standardize(
            mean.float().reshape(shape).to(x.device),
            (var + 1e-5).rsqrt().float().reshape(shape).to(x.device),
            reason="measured on the Gaussian sample (inside a module torch.fx does not trace)",
        )
        self.measured = True
