"""normprop_fx.compile: correctness, and inductor's own counters for BN vs NormProp vs no norm.

The claim (normprop_fx/compile.py): the weight normalization is fused into kernels over the
weights and ``f(u) / c_std - c_mean / c_std`` into the one pointwise kernel that follows each
conv, so a NormProp network launches no more kernels than the same network without any
normalization, and its training graph has fewer IR nodes than the BatchNorm original, which
needs a statistics reduction over the activations in the forward and two in the backward.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch._dynamo
import torch._inductor.metrics as inductor_metrics
from torch import nn
from torch._inductor.utils import run_and_get_code

import normprop_fx
from normprop_fx.errors import NormPropError


def small_convnet() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c = 3
    for width in (16, 32):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def without_batchnorm(model: nn.Sequential) -> nn.Sequential:
    floor = copy.deepcopy(model)
    for i, m in enumerate(floor):
        if isinstance(m, nn.BatchNorm2d):
            floor[i] = nn.Identity()
    return floor


def inductor_counts(model: nn.Module, train: bool) -> dict[str, int]:
    """Compile ``model`` afresh and run one step (forward + backward when ``train``); return
    inductor's counters and the number of generated kernels each compiled graph launches.
    The compiled output must equal the eager one."""
    torch._dynamo.reset()
    inductor_metrics.reset()
    model.train(train)
    compiled = normprop_fx.compile(model)
    x = torch.randn(4, 3, 16, 16)
    outputs = []

    def step() -> None:
        if train:
            y = compiled(x)
            y.sum().backward()
        else:
            with torch.no_grad():
                y = compiled(x)
        outputs.append(y.detach())

    _, sources = run_and_get_code(step)
    if not train:  # (train-mode BN updates its running stats: compare in eval only)
        with torch.no_grad():
            torch.testing.assert_close(outputs[0], model(x), rtol=1e-4, atol=1e-5)
    launches = sum(len(re.findall(r"^\s+cpp_fused\w*\(", src, re.MULTILINE)) for src in sources)
    return {
        "bool_buffers": sum(src.count("torch.bool") for src in sources),
        "generated_kernel_count": inductor_metrics.generated_kernel_count,
        "ir_nodes_pre_fusion": inductor_metrics.ir_nodes_pre_fusion,
        "launches": launches,
    }


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    bn = small_convnet()
    return {"bn": bn, "normprop": normprop_fx.convert(bn), "floor": without_batchnorm(bn)}


def test_eval_forward_launches_no_more_kernels_than_the_unnormalized_network(models):
    normprop = inductor_counts(models["normprop"], train=False)
    floor = inductor_counts(models["floor"], train=False)
    print("eval:", {"normprop": normprop, "floor": floor})
    # Per layer, the weight norm (a reduction over the filter) fuses into the kernel that
    # applies the previous layer's activation, and bias + activation + normalization are one
    # pointwise kernel: exactly what conv + ReLU costs.
    assert normprop["launches"] <= floor["launches"]


def test_training_step_kernels_bn_vs_normprop_vs_floor(models):
    counts = {name: inductor_counts(model, train=True) for name, model in models.items()}
    print("train:", counts)
    # BatchNorm in training adds, per layer, a statistics reduction over the activations in the
    # forward and two reductions (sum of grad, sum of grad * x_hat) in the backward, plus the
    # running-stat updates; NormProp adds only O(#weights) work per layer. Inductor's IR sees it.
    assert counts["normprop"]["ir_nodes_pre_fusion"] < counts["bn"]["ir_nodes_pre_fusion"]
    assert counts["normprop"]["ir_nodes_pre_fusion"] > counts["floor"]["ir_nodes_pre_fusion"]
    # The forward launches what the floor launches; the backward adds one kernel that computes
    # every layer's weight-norm gradient (over the weights, not the activations).
    assert counts["normprop"]["launches"] <= counts["floor"]["launches"] + 1


def test_training_step_saves_no_more_masks_than_the_unnormalized_network(models):
    # A bool buffer in the generated code is a mask saved for the backward (a ReLU's u <= 0).
    # Inductor writes those slowly on CPU (7 ms for 524k activations vs 0.1 ms for a float
    # pointwise kernel); the normalized ReLU takes its gradient from its output instead, like
    # the plain ReLU of the floor does.
    counts = {name: inductor_counts(models[name], train=True) for name in ("normprop", "floor")}
    print("bool buffers:", {name: c["bool_buffers"] for name, c in counts.items()})
    assert counts["normprop"]["bool_buffers"] <= counts["floor"]["bool_buffers"]


def test_compile_refuses_what_is_not_a_module():
    with pytest.raises(NormPropError, match="nn.Module"):
        normprop_fx.compile(lambda x: x)


class _RecordCompile:
    """Stands in for torch.compile: records the keywords normprop_fx.compile passes."""

    def __init__(self):
        self.kwargs = None

    def __call__(self, model, **kwargs):
        self.kwargs = kwargs
        return model


@pytest.fixture
def recorded_compile(monkeypatch):
    record = _RecordCompile()
    monkeypatch.setattr(torch, "compile", record)
    return record


def _small_converted():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    return normprop_fx.convert(net, example_inputs=torch.randn(2, 3, 8, 8))


def test_compile_adds_the_cpu_options_for_normprop_layers_and_the_caller_wins(recorded_compile):
    from normprop_fx.compile import CPU_TRAINING_OPTIONS

    converted = _small_converted()
    normprop_fx.compile(converted, dynamic=False)
    assert recorded_compile.kwargs == {"dynamic": False, "options": CPU_TRAINING_OPTIONS}
    normprop_fx.compile(converted, options={"max_autotune": False})
    assert recorded_compile.kwargs == {"options": {"max_autotune": False, **CPU_TRAINING_OPTIONS}}
    chosen = {key: not value for key, value in CPU_TRAINING_OPTIONS.items()}
    normprop_fx.compile(converted, options=dict(chosen))
    assert recorded_compile.kwargs == {"options": chosen}
    normprop_fx.compile(converted, mode="max-autotune-no-cudagraphs")  # torch.compile takes mode or options
    assert recorded_compile.kwargs == {"mode": "max-autotune-no-cudagraphs"}


def test_compile_leaves_inductor_defaults_without_normprop_layers_or_off_cpu(recorded_compile):
    converted = _small_converted()
    normprop_fx.compile(normprop_fx.fold(converted))  # inference form: plain convs, no backward
    assert recorded_compile.kwargs == {}
    normprop_fx.compile(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert recorded_compile.kwargs == {}
    normprop_fx.compile(converted.to("meta"))  # not measured off the CPU: inductor's defaults
    assert recorded_compile.kwargs == {}
