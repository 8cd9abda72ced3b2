"""The Gaussian sample that moment propagation (pass 10) runs on: how many samples, and their shape.

Moment propagation measures on a Gaussian sample what no structural rule can know (how correlated
the values a pooling combines are; the scale of an op without a rule, such as an SE gate's
product). At init a deep network's output scale varies a lot from one input to the next: in
timm's lcnet_050 at 224 px the per-sample standard deviation of a late layer's input ranges over
0.6-2.2, so a sample of 2, 8 or 32 gives late corrections that differ by 16-34% between seeds,
and the layers after them end up at std 2.3-5.7. The sample must therefore be large where the
maps are small, and its size cannot be the example input's batch (which users pick for other
reasons: its values are never read, only its shape).

:func:`calibration_sample_size` picks the number of samples from the shapes alone, known without
computing anything (``passes.input_shape.fake_shapes``):

* enough samples that the smallest map a NormProp consumer reads holds ``CALIBRATION_VALUES``
  values per channel (7x7 maps: 168 samples; 1x1: ``MAX_SAMPLES``);
* at most ``MAX_SAMPLES``, and at most as many as keep the values that the whole forward
  computes on the sample within ``SAMPLE_VALUES`` (a bound on the conversion's time, and on its
  memory: the interpreter holds a few of the largest tensors at once);
* at least ``MIN_SAMPLES``, whatever the memory.

lcnet_050 at 224 px gets 112 samples; its correction constants then move by at most 4.2%
between calibration seeds (docs/calibration-stability.txt). ``convert(...,
calibration_samples=N)`` overrides the rule, ``calibration_seed=`` draws another sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from .graph_utils import NORMPROP_CONSUMERS
from .input_shape import fake_shapes

#: values per channel the smallest map that a NormProp consumer reads should hold in the sample
CALIBRATION_VALUES = 8192
MIN_SAMPLES = 8
MAX_SAMPLES = 256
#: values (summed over every op's output) the forward may compute on the whole sample: ~11 samples
#: of resnet50 at 224 px, 47 of mobilenet_v3_large
SAMPLE_VALUES = 2**28
#: samples when the shapes cannot be had (an op fake tensors do not support)
FALLBACK_SAMPLES = 32


@dataclass(frozen=True)
class CalibrationSample:
    """How many samples moment propagation runs on, and why (one line for the report)."""

    samples: int
    reason: str


def calibration_sample_size(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                            requested: int | None = None) -> CalibrationSample:
    """The number of Gaussian samples for ``gm`` on inputs shaped like ``example_inputs`` (their
    batch is not used): ``requested`` when given, else the rule of the module docstring."""
    if requested is not None:
        return CalibrationSample(requested, "calibration_samples= given")
    probe = 2  # a batch of 1 would trip a left BatchNorm1d in train mode
    try:
        shapes = fake_shapes(gm, [sample_shape(x, probe, example_inputs) for x in example_inputs],
                             [x.dtype for x in example_inputs])
    except Exception:  # noqa: BLE001 - no shapes: a fixed size, said in the report
        return CalibrationSample(FALLBACK_SAMPLES, "the shapes could not be propagated")
    modules = dict(gm.named_modules())
    read = [
        shapes[n.args[0]] for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(modules.get(str(n.target)), NORMPROP_CONSUMERS)
        and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in shapes
    ]
    if not read:
        return CalibrationSample(MIN_SAMPLES, "no NormProp consumer reads a tensor")
    per_channel = min(_values_per_channel(s) for s in read) // probe or 1
    wanted = min(MAX_SAMPLES, math.ceil(CALIBRATION_VALUES / per_channel))
    computed = sum(math.prod(s) for s in shapes.values()) // probe
    fits = SAMPLE_VALUES // max(1, computed)
    samples = max(MIN_SAMPLES, min(wanted, fits))
    why = (f"{per_channel} values per channel in the smallest map a NormProp consumer reads"
           + (f"; a sample computes {computed / 1e6:.3g}M values, {fits} fit in {SAMPLE_VALUES / 1e6:.0f}M"
              if fits < wanted else ""))
    return CalibrationSample(samples, why)


def calibration_line(sample: CalibrationSample, seed: int) -> str:
    """The report's line on the sample."""
    return f"the corrections were calibrated on {sample.samples} Gaussian samples (seed {seed}; {sample.reason})"


def sample_shape(x: torch.Tensor, samples: int, inputs: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """``x``'s shape with its batch (dim 0, when it equals the first input's) set to ``samples``."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() >= 1 else None
    if x.dim() >= 1 and x.shape[0] == batch:
        return (samples, *x.shape[1:])
    return tuple(x.shape)


def _values_per_channel(shape: tuple[int, ...]) -> int:
    """Values of one channel in a tensor of ``shape`` (N, C, ...): N * prod(...); N for (N, C)."""
    if len(shape) < 2:
        return max(1, math.prod(shape))
    return max(1, math.prod(shape) // shape[1])
