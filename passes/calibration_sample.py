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
* at least ``MIN_SAMPLES``, whatever the time.

Where the samples are far apart, that size is not enough: in a deep network each sample's scale
drifts from the others' with depth, and a correction measured on the sample is only as precise
as the spread of the samples' own mean squares allows (docs/method.md section 6). So the sample
can *grow* during moment propagation (:class:`SampleGrowth`, ``passes.propagate``): before a
correction is measured, the samples' spread says how many samples it needs for a relative
standard error of ``SAMPLE_ERROR`` (``passes.propagate``), and the sample grows toward that, up to
``GROWTH_TIME`` times the forward values ``SAMPLE_VALUES`` allows (the conversion's time), and
never past what keeps every value held from there on within half the largest tensor the sample
held at its start (the memory: growing holds the old values and the new ones at once). The new samples run through the graph so far with the corrections
already decided, so every correction is the exact statistic of every sample there is at its
node, all of them seeing the same constants upstream.

lcnet_050 at 224 px gets 112 samples, grown to 256 in its last stages; its correction constants
then move by at most 1.2% between calibration seeds (4.2% on the 112 alone;
docs/calibration-stability.txt). ``convert(..., calibration_samples=N)`` overrides the rule (and
the sample does not grow), ``calibration_seed=`` draws another sample.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .graph_utils import NORMPROP_CONSUMERS
from .input_shape import TensorSignature, fake_signatures

#: values per channel the smallest map that a NormProp consumer reads should hold in the sample
CALIBRATION_VALUES = 8192
MIN_SAMPLES = 8
MAX_SAMPLES = 256
#: values (summed over every op's output) the forward may compute on the whole sample: ~11 samples
#: of resnet50 at 224 px, 47 of mobilenet_v3_large
SAMPLE_VALUES = 2**28
#: samples when the shapes cannot be had (an op fake tensors do not support)
FALLBACK_SAMPLES = 32
#: how many times ``SAMPLE_VALUES`` a sample may compute when its samples' spread asks it to grow
GROWTH_TIME = 4


@dataclass(frozen=True)
class SampleGrowth:
    """How far the sample may grow during moment propagation: to ``cap`` samples at most, and
    just before a node to at most ``limits[node name]`` (the size whose largest value held from
    there on, computed or still needed, is no larger than half the largest at the start).
    ``batch_major`` names the nodes whose value is a tensor with the batch as dim 0 (it grows
    with the sample), ``batch_free`` those whose value does not depend on the batch's size (a
    size read off a channel dim, a constant); the sample grows only where every value still
    needed is one of the two."""

    cap: int
    limits: dict[str, int]
    batch_major: frozenset[str]
    batch_free: frozenset[str]
    largest: int = 1  #: the values of the largest tensor one sample makes in the graph


@dataclass(frozen=True)
class CalibrationSample:
    """How many samples moment propagation runs on, and why (one line for the report)."""

    samples: int
    reason: str
    growth: SampleGrowth | None = None  #: None: the whole sample from the start


def calibration_sample_size(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                            requested: int | None = None) -> CalibrationSample:
    """The number of Gaussian samples for ``gm`` on inputs shaped like ``example_inputs`` (their
    batch is not used): ``requested`` when given, else the rule of the module docstring."""
    if requested is not None:
        return CalibrationSample(requested, "calibration_samples= given")
    probe = 2  # a batch of 1 would trip a left BatchNorm1d in train mode
    try:
        small = _signatures(gm, example_inputs, probe)
    except Exception:  # noqa: BLE001 - no shapes: a fixed size, said in the report
        return CalibrationSample(FALLBACK_SAMPLES, "the shapes could not be propagated")
    shapes = {n: s.shape for n, s in small.items() if isinstance(s, TensorSignature)}
    modules = dict(gm.named_modules())
    consumers = {
        n: _values_per_channel(shapes[n.args[0]]) // probe or 1 for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(modules.get(str(n.target)), NORMPROP_CONSUMERS)
        and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in shapes
    }
    if not consumers:
        return CalibrationSample(MIN_SAMPLES, "no NormProp consumer reads a tensor")
    per_channel = min(consumers.values())
    wanted = min(MAX_SAMPLES, math.ceil(CALIBRATION_VALUES / per_channel))
    computed = sum(math.prod(s) for s in shapes.values()) // probe
    fits = SAMPLE_VALUES // max(1, computed)
    samples = max(MIN_SAMPLES, min(wanted, fits))
    why = (f"{per_channel} values per channel in the smallest map a NormProp consumer reads"
           + (f"; a sample computes {computed / 1e6:.3g}M values, {fits} fit in {SAMPLE_VALUES / 1e6:.0f}M"
              if fits < wanted else ""))
    return CalibrationSample(samples, why, _growth(gm, example_inputs, small, samples, computed, probe))


def _signatures(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], batch: int) -> dict[fx.Node, Any]:
    """Every node's signature on inputs shaped like ``example_inputs`` with ``batch`` samples."""
    return fake_signatures(gm, [sample_shape(x, batch, example_inputs) for x in example_inputs],
                           [x.dtype for x in example_inputs])


def _growth(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], small: dict[fx.Node, Any], samples: int,
            computed: int, probe: int) -> SampleGrowth | None:
    """How far a sample of ``samples`` may grow (module docstring), from the signatures of every
    node on batches of ``probe`` (``small``) and ``probe + 1``; None where it may not (then the
    second run is not needed: a model at its time bound saves it)."""
    cap = min(MAX_SAMPLES, GROWTH_TIME * SAMPLE_VALUES // max(1, computed))
    if cap <= samples:
        return None
    try:
        large = _signatures(gm, example_inputs, probe + 1)
    except Exception:  # noqa: BLE001 - the shapes of the first run were had; no growth without these
        return None
    batch_major, batch_free = set(), set()
    for n, s in small.items():
        t = large.get(n)
        if s == t:
            batch_free.add(n.name)
        elif (isinstance(s, TensorSignature) and isinstance(t, TensorSignature) and len(s.shape) == len(t.shape) >= 1
              and (s.shape[0], t.shape[0]) == (probe, probe + 1) and s.shape[1:] == t.shape[1:]):
            batch_major.add(n.name)
    nodes = list(gm.graph.nodes)
    per_sample = {n: math.prod(small[n].shape) // probe if n.name in batch_major else 0 for n in nodes}
    held = _largest_held(nodes, per_sample)
    # Growing holds the old and the new values at once (torch.cat), beside the replay's own
    # forward: half the largest tensor of the start keeps the total near the start's peak.
    budget = samples * max(held, default=1) // 2
    limits = {n.name: min(cap, budget // max(1, h)) for n, h in zip(nodes, held)}
    return SampleGrowth(cap, limits, frozenset(batch_major), frozenset(batch_free), max(1, max(held, default=1)))


def _largest_held(nodes: list[fx.Node], per_sample: dict[fx.Node, int]) -> list[int]:
    """For each node, the largest per-sample size of a value held from just before it on: one
    computed at it or later, or one computed earlier and still needed (a sweep with a heap)."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users if u in index), default=index[n]) for n in nodes}
    ahead = list(itertools.accumulate((per_sample[n] for n in reversed(nodes)), max))[::-1]
    live: list[tuple[int, int]] = []  # (-size, last use) of values computed so far
    held = []
    for i, n in enumerate(nodes):
        while live and live[0][1] < i:
            heapq.heappop(live)  # the largest is no longer needed; smaller dead ones go when they surface
        held.append(max(ahead[i], -live[0][0] if live else 0))
        heapq.heappush(live, (-per_sample[n], last_use[n]))
    return held


def grown(sample: CalibrationSample, steps: Sequence[tuple[str, int]], failure: str | None = None) -> CalibrationSample:
    """``sample`` after moment propagation grew it in ``steps`` ((node, size) each), and why it
    stopped growing early (``failure``), if it did."""
    reason = sample.reason
    if steps:
        reason += f"; grown from {sample.samples} as the samples' spread asked, before {len(steps)} corrections"
    if failure:
        reason += f"; {failure}"
    return dataclasses.replace(sample, samples=steps[-1][1] if steps else sample.samples, reason=reason)


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
