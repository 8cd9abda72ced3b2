"""Shared test helpers: small models and reference NormProp math written out by hand."""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normprop_fx.model_check import dropout_off  # noqa: F401 - re-exported for the tests


class ConvNormAct(nn.Module):
    """producer -> norm -> act, where act is an nn.Module or any callable (F/torch/method form)."""

    def __init__(self, producer: nn.Module, norm: nn.Module, act: Callable[[torch.Tensor], torch.Tensor] | None):
        super().__init__()
        self.producer = producer
        self.norm = norm
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.producer(x))
        return y if self.act is None else self.act(y)


def reference_normprop(
    producer: nn.Module, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor], gamma: float
) -> torch.Tensor:
    """What a freshly converted producer->BN->act must compute, from first principles:
    conv(x, gamma * W / ||W||) with no bias, then (act(u) - E[act(z)]) / Std[act(z)], the
    moments taken from a 2e6-point grid over [-12, 12] (independent of the library's quadrature)."""
    w = producer.weight.detach().double()
    w = gamma * w / w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    if isinstance(producer, nn.Linear):
        u = F.linear(x.double(), w)
    else:
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        if producer.padding_mode != "zeros":
            x = F.pad(x, producer._reversed_padding_repeated_twice, mode=producer.padding_mode)
            padding: Any = 0
        else:
            padding = producer.padding
        u = conv(x.double(), w, None, producer.stride, padding, producer.dilation, producer.groups)
    z = torch.linspace(-12, 12, 2_000_001, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    fz = act(z)
    mean = (fz * density).sum()
    std = (((fz - mean) ** 2) * density).sum().sqrt()
    return ((act(u) - mean) / std).float()


def trained_batchnorm(channels: int, *, affine: bool = True) -> nn.BatchNorm2d:
    """A BatchNorm2d that looks trained: running statistics (and affine) moved off their
    initial values, as a checkpoint's are."""
    bn = nn.BatchNorm2d(channels, affine=affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return bn


def mlp(depth: int, width: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), act()]
    return nn.Sequential(*layers)


def build_zoo_model(source: str, name: str) -> nn.Module:
    """A torchvision or timm model by name, seeded, without pretrained weights (inception_v3
    without its auxiliary head)."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


# ----------------------------------------------------------------------------- fake Fashion-MNIST


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(array.to(torch.uint8).flatten().tolist()))


def fake_fashion_mnist(folder: Path, n_train: int = 96, n_test: int = 48) -> None:
    """Gzipped idx files shaped like Fashion-MNIST's in ``folder``: random labels, images whose brightness
    follows the label (learnable), ``n_train`` / ``n_test`` samples."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = (labels.reshape(-1, 1, 1) * 20 + torch.randint(0, 60, (n, 28, 28), generator=g)).clamp(0, 255)
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)


def check_page_rebuilds(doc: Path, tool: str, plots: list[Path], rebuild: Callable[[], int]) -> None:
    """A tool's page (``doc``) names its command (tools/``tool`` --data-dir ...) near the top and has
    targets, its ``plots`` are real images, and ``rebuild()`` (its report's main) rewrites the page
    keeping the hand-written notes."""
    text = doc.read_text()
    command = next(line for line in text.splitlines()[:8] if f"tools/{tool}" in line)
    assert command.startswith(f".venv/bin/python tools/{tool} --data-dir") and "## Targets" in text
    assert all(p.stat().st_size > 1000 for p in plots)
    doc.write_text(text.replace("(No notes yet", "KEEP ME (No notes yet"))
    assert rebuild() == 0
    assert "KEEP ME" in doc.read_text()
