"""Tiny models with one known behaviour each, for check_model and tools/zoo.py
(the tool builds them in its worker processes as ``python:zoo_models.<Class>``)."""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import fx, nn


def _fail_at_run_time(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return x  # convert's shape pass falls back to a no-grad run: let the conversion itself succeed
    raise RuntimeError("boom: this op fails when the converted model runs")


fx.wrap("_fail_at_run_time")  # a graph node: tracing succeeds, running raises


class Small(nn.Module):
    """conv -> BN -> ReLU -> global pool -> linear, with a hook for each behaviour."""

    default_input_size = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class Untraceable(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        return self.fc(y.mean((2, 3)))


class RaisesAfterConversion(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if not isinstance(x, fx.Proxy) and not torch.is_grad_enabled():
            return self.fc(y.mean((2, 3)))  # the original runs (the input-size probe uses no_grad)
        return self.fc(_fail_at_run_time(y).mean((2, 3)))


class BatchDependent(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        return self.fc((y - y.mean(0, keepdim=True)).mean((2, 3)))  # mixes the samples of a batch


class NonFiniteGradient(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        return self.fc(y.mean((2, 3))) + (y * 0).sqrt().sum()  # finite forward, d sqrt(0) = inf


class UnusedParameters(Small):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)  # no gradient in the original either: not a failure


class UncalledBatchNorm(Small):
    def __init__(self) -> None:
        super().__init__()
        self.spare_bn = nn.BatchNorm2d(8)  # never called: left, with that reason


class Crashes(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
        return x


class Hangs(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(3600)
        return x


class Hog(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held = torch.ones(2**29)  # 2 GiB, touched, then held
        time.sleep(3600)
        return x + held[0]


class IllConditioned(Small):
    """Batch independent, but ill-conditioned: a plain Linear (whose sums run in another order
    alone than in a batch, ~1e-16 apart) then sin(1e17 * y), which turns any rounding difference
    into an O(1) one, as a chaotic deep network at init can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 256)
        self.amplify = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(1e17 * self.amplify(torch.relu(self.fc(self.features(x).mean((2, 3))))))
