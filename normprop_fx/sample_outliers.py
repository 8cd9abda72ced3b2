"""Samples of the calibration sample that lie far above the rest, left out of a measured variance.

At init a NormProp network is not batch normalized, and a rare input can grow through it far
more than the others: in timm's levit_conv_384 at 224 px, one of the 47 Gaussian calibration
samples of seed 0 has 5.5x the median second moment in its second attention block and 580x by
the end of stage 2, whichever seed calibrated the conversion, while 32 fresh samples stay within
0.6-2.4x (in the original model with batch statistics the same input is at 1.4x). A variance
measured over the sample follows that one input: each correction shrank the other 46 a little
more, and the layers of stage 2 ended at std 0.30. A sample like that says nothing about the
scale of the others, so the variance is measured without it.

:func:`outlying_samples` tells such isolated outliers from a heavy tail that is the network's
own (the per-sample scales of a very deep ReLU network spread log-normally, docs/method.md
section 6, and the corrections must keep the mean over them): a sample is left out only when its
second moment lies beyond Tukey's far-out fence on the log scale, Q3 + 3 IQR of the log second
moments, *and* above ``OUTLIER_RATIO`` (32) times their median. A log-normal spread of any width
keeps all its samples (the fence sits 4.7 standard deviations above the median), and a sample set
with no outlier is measured exactly as before.

Why 32x: a sample at 32x the median holds about half of the second moment of 32 samples, so the
mean then says more about that one input than about the rest; one below it, left in, shrinks the
variance of the others by at most n / (n + 32) at that layer (the corrections after it measure
again). A lower ratio leaves out the top of tails that are the network's own: at 4x, timm's
efficientnet_b1_pruned lost 1-3 of its 21 samples at 4-15x the median in its last stages, which
fresh samples reach as well (its largest layer std rose from 1.27 to 1.49), and dla102x's and
convmixer_768_32's constants moved more between seeds, not less. levit_conv_384 is within the
statistics bounds at 32x as at 4x (its outlier passes 32x at stage 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: a sample is an outlier only above this multiple of the median second moment ...
OUTLIER_RATIO = 32.0
#: ... and beyond Q3 + FENCE * IQR of the log second moments (Tukey's far-out fence)
FENCE = 3.0
#: below this many samples, quartiles say nothing: nothing is left out
MIN_SAMPLES = 4
#: the words a correction's reason carries when outliers were left out of its variance
OUTLIER_WORDS = "left out as outliers"


@dataclass(frozen=True)
class Outliers:
    """The samples to keep, and the largest left-out sample's second moment over the median."""

    keep: torch.Tensor  #: bool, one per sample (dim 0)
    ratio: float

    @property
    def count(self) -> int:
        return int((~self.keep).sum())

    def note(self) -> str:
        """The report's words on them."""
        samples = "sample" if self.count == 1 else "samples"
        return (f"{self.count} of {self.keep.numel()} {samples} {OUTLIER_WORDS} "
                f"(second moment up to {self.ratio:.3g}x the median)")


def per_sample_second_moments(x: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's (dim 0) mean square of ``x`` (N, C, ...) around the per-channel ``center``
    (broadcastable to (1, C, 1, ...); default: the median over samples of each sample's channel
    mean, which one outlier cannot move), in float64. Computed from per-(sample, channel) means and
    variances, without a copy of ``x``."""
    x = x.detach()
    dims = list(range(2, x.dim()))
    if dims:
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        var, mean = var.double(), mean.double()
    else:
        mean, var = x.double(), torch.zeros((), dtype=torch.float64, device=x.device)
    if center is None:
        center = mean.median(0, keepdim=True).values
    squares = var + (mean - center.to(mean.device, torch.float64)) ** 2
    return squares.flatten(1).mean(1)


def outlying_samples(x: torch.Tensor, center: torch.Tensor | None = None) -> Outliers | None:
    """The isolated outliers among the samples (dim 0) of ``x`` (N, C, ...), by their second
    moments around ``center`` (module docstring); None when there are none (or too few samples,
    or values that are not finite)."""
    if x.dim() < 2 or x.shape[0] < MIN_SAMPLES:
        return None
    second = per_sample_second_moments(x, center)
    if not bool(torch.isfinite(second).all()):
        return None
    median = float(second.median())
    if not median > 0:
        return None
    logs = second.clamp_min(median * 1e-12).log()
    q1, q3 = (float(q) for q in torch.quantile(logs, torch.tensor([0.25, 0.75], dtype=logs.dtype, device=logs.device)))
    fence = max(q3 + FENCE * (q3 - q1), math.log(median * OUTLIER_RATIO))
    keep = logs <= fence
    if bool(keep.all()):
        return None
    return Outliers(keep, float(second[~keep].max()) / median)
