#!/usr/bin/env python3
"""Train a BatchNorm model and its NormProp conversion side by side on Fashion-MNIST.

    python tools/train.py --quick                       # smoke run, about a minute
    python tools/train.py --out docs/training --doc docs/training.md   # the documented run

For every batch size (128, 8, 1 by default) and every learning rate of one grid, trains the BN
original ("bn"), its NormProp conversion ("np"), and both again with the library's stabilizers
("+stab": normprop_fx.training.param_groups with weight decay on gamma/beta too, and
adaptive_clip_grad_; --no-stab-decay-gamma leaves gamma/beta undecayed), from the same initial
weights, data order, optimizer (SGD with momentum) and cosine schedule. Batch size 1 runs a
fixed number of steps per epoch instead of full epochs (--bs1-steps). Prints per epoch the train
loss, test accuracy and seconds; writes results.json and PNG plots under --out, and the report
(--doc) with the tables and targets.

The learning-rate grid is given for batch 128 and scaled by sqrt(batch / 128) for the smaller
batches (--lr-scaling), the same grid for every variant of a batch size.

Several processes (one machine or several; DistributedDataParallel, gloo on CPU, nccl with
--device cuda):

    torchrun --nproc-per-node 2 tools/train.py --batch-sizes 128,8 ...

A batch size is the global batch: each of the N processes trains on batch/N samples of it (every
N-th index of the global batch, as DistributedSampler splits an epoch), so the run is comparable
to the same run on one process; gradients are averaged across processes, the loss, accuracy and
epoch time are reduced across them, and only rank 0 prints and writes files. NormProp needs no
SyncBatchNorm (it has no batch statistics); --sync-bn converts the BN variants'
BatchNorms to torch.nn.SyncBatchNorm, which accepts only GPU tensors (refused on CPU).

Exit status: 0 on success, 1 when the dataset is missing or a run fails unexpectedly, 2 on a
bad argument.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import normprop_fx
from normprop_fx.datasets import (
    DatasetNotFoundError,
    channel_statistics,
    load_fashion_mnist,
    standardize_images,
)
from normprop_fx.training import adaptive_clip_grad_, param_groups

import common
import training_report
from common import VARIANTS


# ----------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU, conv-BN, add the (projected) shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class SmallResNet(nn.Module):
    """A ResNet for 28x28 inputs: a 3x3 stem, one BasicBlock per stage (stride 2 from the
    second stage on), global average pooling, a linear classifier."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, previous = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(previous, width, 1 if i == 0 else 2))
            previous = width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))


def _one_channel_first_conv(model: nn.Module) -> nn.Module:
    """Replace the first Conv2d of a torchvision model by a 1-channel conv with the same
    hyper-parameters (grayscale input)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = nn.Conv2d(1, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, 1, module.bias is not None, module.padding_mode)
            model.set_submodule(name, conv)
            return model
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to 1 channel")


def build_model(spec: str) -> nn.Module:
    """``small_resnet`` (built in), ``small_resnet:8,16,32`` (stage widths), or a torchvision
    / timm name (``[torchvision:|timm:]NAME``), with 1 input channel and 10 classes."""
    if spec == "small_resnet" or spec.startswith("small_resnet:"):
        _, _, widths = spec.partition(":")
        return SmallResNet(tuple(int(w) for w in widths.split(","))) if widths else SmallResNet()
    try:
        source, name = common.find_model(spec)
    except common.UnknownModelError:
        raise ValueError(f"unknown model {spec!r}: use small_resnet, a torchvision or a timm model name") from None
    if source == "torchvision":
        return _one_channel_first_conv(common.create_model(source, name, num_classes=10))
    return common.create_model(source, name, in_chans=1, num_classes=10)


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    stats_x: torch.Tensor  # the fixed test batch for layer statistics
    description: str


def load_data(args: argparse.Namespace) -> Data:
    train = load_fashion_mnist("train", args.data_dir).subset(args.train_size, seed=args.seed)
    test = load_fashion_mnist("test", args.data_dir).subset(args.test_size, seed=args.seed)
    mean, std = channel_statistics(train.images)
    train_x = standardize_images(train.images, mean, std)
    test_x = standardize_images(test.images, mean, std)
    description = (f"Fashion-MNIST: {len(train)} training images (random subset of 60000, seed {args.seed}), "
                   f"{len(test)} test images (of 10000), standardized with the training subset's "
                   f"mean {mean.item():.4f} and std {std.item():.4f}")
    return Data(train_x, train.labels, test_x, test.labels, test_x[: args.stats_batch], description)


# ----------------------------------------------------------------------------- layer statistics


def batchnorm_output_statistics(model: nn.Module, x: torch.Tensor, *, train_mode: bool) -> list[dict[str, Any]]:
    """Mean/std of every BatchNorm's output on ``x``, in eval mode (running statistics) or in
    train mode (batch statistics; measured on a copy so the running statistics stay as they are)."""
    model = copy.deepcopy(model) if train_mode else model
    was_training = model.training
    model.train(train_mode)
    stats: list[dict[str, Any]] = []
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def hook(_m: nn.Module, _a: Any, out: torch.Tensor, path: str = path) -> None:
                stats.append({"path": path, "mean": out.mean().item(), "std": out.std().item()})
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def layer_statistics(model: nn.Module, x: torch.Tensor, variant: str) -> dict[str, list[dict[str, Any]]]:
    if variant.startswith("np"):
        was_training = model.training
        model.eval()
        stats = [asdict(s) for s in normprop_fx.measure_layer_statistics(model, x)]
        model.train(was_training)
        return {"normprop": stats}
    return {"eval": batchnorm_output_statistics(model, x, train_mode=False),
            "train": batchnorm_output_statistics(model, x, train_mode=True)}


def max_scale(model: nn.Module) -> float:
    """The largest |gamma| (NormProp) or |weight| (BatchNorm affine) in the model."""
    values = [m.gamma for m in model.modules() if isinstance(m, normprop_fx.NormPropLayer)]
    values += [m.weight for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return max((v.detach().abs().max().item() for v in values), default=float("nan"))


# ----------------------------------------------------------------------------- several processes


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_shard(index: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of a global batch of indices: every ``world_size``-th one from ``rank`` on,
    the split DistributedSampler makes of an epoch's permutation. The parts are disjoint, equally
    large when ``world_size`` divides the batch, and together they are the global batch."""
    return index[rank::world_size]


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when a process group is up (gradients averaged across
    ranks after every backward); ``model`` itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _all_reduce(values: list[float], op: Any = None) -> list[float]:
    """``values`` reduced over the ranks (summed, or ``op``); unchanged without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor.tolist()


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics: each rank updated its copy
    with its own part of the batch), so that evaluation and the recorded statistics agree."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    model: str
    variant: str
    batch_size: int
    lr: float
    epochs: list[dict[str, float]] = field(default_factory=list)
    status: str = "trained"  # trained | diverged | error | collapsed
    detail: str = ""
    final_accuracy: float = float("nan")
    max_scale_end: float = float("nan")
    stats_init: dict[str, Any] = field(default_factory=dict)
    stats_end: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSettings:
    epochs: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_factor: float = 0.01
    decay_scale_params: bool = True  # +stab: weight decay on gamma/beta too (measured: keeps layer std in range)
    gamma_init: str | float = "paper"
    steps_per_epoch: int | None = None  # None: full epochs over the training data
    eval_batch: int = 500
    seed: int = 0
    trained_threshold: float = 0.2
    progress: bool = True
    device: str = "cpu"
    sync_bn: bool = False  # the BN variants' BatchNorms become torch.nn.SyncBatchNorm (GPU only)


def make_variant(base: nn.Module, variant: str, gamma_init: str | float) -> nn.Module:
    """The model a variant trains: a copy of the BN ``base`` or its NormProp conversion."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant.startswith("np"):
        return normprop_fx.convert(base, gamma_init=gamma_init)
    return copy.deepcopy(base)


def make_optimizer(model: nn.Module, variant: str, lr: float, settings: TrainSettings) -> torch.optim.Optimizer:
    if variant.endswith("+stab"):
        params: Any = param_groups(model, settings.weight_decay, decay_scale_params=settings.decay_scale_params)
        return torch.optim.SGD(params, lr=lr, momentum=settings.momentum)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Test accuracy; with several processes each rank counts its contiguous part of the test
    set and the counts are summed."""
    rank, world = rank_and_world()
    x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    model.train()
    correct, count = _all_reduce([float(correct), float(len(y))])
    return correct / count


def _batches(n: int, batch_size: int, epoch: int, settings: TrainSettings) -> list[torch.Tensor]:
    """Index batches of one epoch: the same permutation for every variant (seeded by seed and
    epoch); a fixed number of steps when ``steps_per_epoch`` is set."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch))
    batches = list(order.split(batch_size))
    if batches and len(batches[-1]) < batch_size and len(batches) > 1:
        batches.pop()  # a short last batch would be a different batch size
    if settings.steps_per_epoch is not None:
        batches = batches[: settings.steps_per_epoch]
    return batches


def train_run(base: nn.Module, variant: str, batch_size: int, lr: float, data: Data,
              settings: TrainSettings, model_name: str = "", log: Any = print,
              model: nn.Module | None = None) -> RunResult:
    """Train ``variant`` of the BN model ``base`` (left unchanged) and return what happened.
    ``model``: train this model in place instead of ``make_variant(base, variant)`` (tools/finetune.py's
    variants); ``variant`` still chooses the optimizer and the clipping (its ``+stab`` suffix).

    Under a torch.distributed process group, every rank calls this with the same arguments: the
    model is wrapped in DistributedDataParallel and each rank trains on its ``rank_shard`` of every
    global batch of ``batch_size`` (which the world size must divide); the result is the same on
    every rank."""
    from tqdm import tqdm

    rank, world = rank_and_world()
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} cannot be split evenly over {world} processes")
    result = RunResult(model_name, variant, batch_size, lr)
    torch.manual_seed(settings.seed)
    if model is None:
        model = make_variant(base, variant, settings.gamma_init)
    if settings.sync_bn and not variant.startswith("np"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(settings.device).train()
    result.stats_init = layer_statistics(model, data.stats_x, variant)
    optimizer = make_optimizer(model, variant, lr, settings)
    net = wrap_ddp(model)
    epoch_batches = [_batches(len(data.train_y), batch_size, e, settings) for e in range(settings.epochs)]
    total_steps = sum(len(b) for b in epoch_batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    label = f"{model_name} {variant} bs={batch_size} lr={lr:g}"
    step = 0
    for epoch, batches in enumerate(epoch_batches):
        losses = []
        start = time.perf_counter()
        for index in tqdm(batches, desc=f"{label} epoch {epoch + 1}", leave=False, mininterval=5,
                          disable=not settings.progress or rank != 0):
            index = rank_shard(index, rank, world).to(data.train_x.device)
            try:
                loss = F.cross_entropy(net(data.train_x[index]), data.train_y[index])
            except ValueError as error:  # BatchNorm refuses batch statistics of 1 value per channel
                if "value per channel" not in str(error):
                    raise
                result.status, result.detail = "error", f"{type(error).__name__}: {error}"
                break
            # the global batch's mean loss (the ranks' parts are equally large): every rank sees
            # the same value, so all of them stop together when it is not finite
            global_loss = _all_reduce([loss.item()])[0] / world
            if not math.isfinite(global_loss):
                result.status, result.detail = "diverged", f"non-finite loss at step {step}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if variant.endswith("+stab"):
                adaptive_clip_grad_(model, settings.clip_factor)
            optimizer.step()
            schedule.step()
            losses.append(global_loss)
            step += 1
        seconds = _all_reduce([time.perf_counter() - start], dist.ReduceOp.MAX)[0]  # the slowest rank
        if result.status != "trained":
            log(f"{label}: {result.status} ({result.detail})")
            break
        _broadcast_buffers(model)
        accuracy = evaluate(model, data.test_x, data.test_y, settings.eval_batch)
        record = {"epoch": epoch + 1, "steps": len(batches), "train_loss": statistics.fmean(losses),
                  "test_accuracy": accuracy, "seconds": seconds}
        result.epochs.append(record)
        log(f"{label} epoch {epoch + 1}/{settings.epochs}: train loss {record['train_loss']:.4f}, "
            f"test accuracy {accuracy:.4f}, {seconds:.1f} s ({len(batches)} steps)")
    result.max_scale_end = max_scale(model)
    if result.status == "trained":
        result.final_accuracy = result.epochs[-1]["test_accuracy"]
        result.stats_end = layer_statistics(model, data.stats_x, variant)
        if result.final_accuracy < settings.trained_threshold:
            result.status = "collapsed"
            result.detail = f"final test accuracy {result.final_accuracy:.3f} < {settings.trained_threshold}"
    return result


# ----------------------------------------------------------------------------- command line


def torchrun_env(environ: Any = None) -> dict[str, int] | None:
    """rank, world_size, local_rank and local_world_size that torchrun (or another launcher
    following its convention) sets; None for a plain run."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    world = int(environ["WORLD_SIZE"])
    return {"rank": int(environ["RANK"]), "world_size": world, "local_rank": int(environ.get("LOCAL_RANK", 0)),
            "local_world_size": int(environ.get("LOCAL_WORLD_SIZE", world))}


def _is_rank0() -> bool:
    env = torchrun_env()
    return env is None or env["rank"] == 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              print_errors=_is_rank0())
    p.add_argument("--model", default="small_resnet", help="small_resnet[:W1,W2,..], or a torchvision/timm name")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx(.gz) files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--train-size", type=int, default=4000, help="training subset size (default 4000)")
    p.add_argument("--test-size", type=int, default=2000, help="test subset size (default 2000)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-sizes", type=common.positive_numbers(int), default=[128, 8, 1])
    p.add_argument("--lrs", type=common.positive_numbers(float), default=[0.01, 0.03, 0.1, 0.3, 1.0],
                   help="learning-rate grid at batch 128 (default 0.01,0.03,0.1,0.3,1)")
    p.add_argument("--lr-scaling", choices=("sqrt", "linear", "none"), default="sqrt",
                   help="how the grid follows the batch size: lr * (batch/128)^(1/2, 1 or 0)")
    p.add_argument("--bs1-steps", type=int, default=400, help="steps per epoch at batch size 1 (default 400)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--bn-stab-batch-sizes", type=common.positive_numbers(int), default=[128],
                   help="batch sizes at which bn+stab runs (it is the costly optional comparison)")
    p.add_argument("--collapse-below", type=float, default=0.2,
                   help="a run whose final test accuracy is below this collapsed (default 0.2, twice chance)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--clip-factor", type=float, default=0.01, help="adaptive gradient clipping factor (+stab)")
    p.add_argument("--gamma-init", type=common.gamma_init, default="paper", help="NormProp gamma init: paper or a number")
    p.add_argument("--stab-decay-gamma", action=argparse.BooleanOptionalAction, default=True,
                   help="the +stab variants put weight decay on gamma/beta/biases too (default; "
                        "--no-stab-decay-gamma: none on them, the ablation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--stats-batch", type=int, default=256, help="test images in the fixed layer-statistics batch")
    p.add_argument("--out", type=Path, default=Path("training_out"), help="folder for results.json and plots")
    p.add_argument("--doc", type=Path, default=None, help="write the markdown report there")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: model small_resnet:8,16, 512/500 images, 1 epoch, 30 batch-1 steps, lrs 0.01,0.1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="train on the CPU (default; gloo between processes) or on CUDA (one GPU per process, "
                        "cuda:LOCAL_RANK; nccl between processes)")
    p.add_argument("--sync-bn", action="store_true",
                   help="the BN variants use torch.nn.SyncBatchNorm (batch statistics over all processes' parts of "
                        "the batch); needs --device cuda. NormProp has no batch statistics and needs none")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        quick = {"model": "small_resnet:8,16", "train_size": 512, "test_size": 500, "epochs": 1, "bs1_steps": 30,
                 "lrs": [0.01, 0.1]}
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    for name in ("train_size", "test_size", "epochs", "bs1_steps", "threads", "stats_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not (args.weight_decay >= 0 and 0 <= args.momentum < 1 and args.clip_factor > 0):
        p.error("need --weight-decay >= 0, 0 <= --momentum < 1, --clip-factor > 0")
    if args.sync_bn and args.device != "cuda":
        p.error("--sync-bn needs --device cuda: torch.nn.SyncBatchNorm accepts only GPU/XPU tensors and this run "
                "is on the CPU (without it, BN normalizes each process's part of the batch with that part's own "
                "statistics; NormProp needs no SyncBatchNorm)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device here")
    env = torchrun_env()
    world = 1 if env is None else env["world_size"]
    uneven = [b for b in args.batch_sizes if b % world]
    if uneven:
        p.error(f"batch size(s) {', '.join(map(str, uneven))} cannot be split evenly over {world} processes "
                f"(each trains on batch/{world} samples of the global batch); choose --batch-sizes divisible "
                f"by {world}")
    return args


def lr_grid(args: argparse.Namespace, batch_size: int, reference: int = 128) -> list[float]:
    """``args.lrs`` (given at batch ``reference``) scaled to ``batch_size`` by ``args.lr_scaling``."""
    power = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}[args.lr_scaling]
    return [float(f"{lr * (batch_size / reference) ** power:.3g}") for lr in args.lrs]


def run_settings(args: argparse.Namespace, batch_size: int, device: str = "cpu") -> TrainSettings:
    """The TrainSettings of the command line's runs at ``batch_size``."""
    return TrainSettings(
        epochs=args.epochs, momentum=args.momentum, weight_decay=args.weight_decay,
        clip_factor=args.clip_factor, gamma_init=args.gamma_init, seed=args.seed,
        trained_threshold=args.collapse_below, decay_scale_params=args.stab_decay_gamma,
        steps_per_epoch=args.bs1_steps if batch_size == 1 else None, progress=not args.no_progress,
        device=device, sync_bn=args.sync_bn,
    )


def _torchrun_command(env: dict[str, int]) -> str:
    nodes = env["world_size"] // env["local_world_size"]
    launcher = ["torchrun", *([f"--nnodes {nodes}"] if nodes > 1 else []), f"--nproc-per-node {env['local_world_size']}"]
    return " ".join([".venv/bin/" + launcher[0], *launcher[1:], "tools/train.py", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = torchrun_env()
    rank0 = env is None or env["rank"] == 0

    def error(message: str, status: int) -> int:
        if rank0:
            print(f"train.py: error: {message}", file=sys.stderr)
        return status

    try:
        build_model(args.model)
    except ValueError as exc:
        return error(str(exc), 2)
    try:
        data = load_data(args)
    except DatasetNotFoundError as exc:
        return error(str(exc), 1)
    if env is None:
        return _train(args, data, None, args.device)
    device = args.device
    if device == "cuda":
        device = f"cuda:{env['local_rank']}"
        torch.cuda.set_device(device)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        return _train(args, data, {**env, "backend": backend}, device)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace, data: Data, env: dict[str, Any] | None, device: str) -> int:
    """Every run of the grid; under torchrun every rank calls this and rank 0 alone prints and writes."""
    rank0 = env is None or env["rank"] == 0
    data = Data(*(t.to(device) for t in (data.train_x, data.train_y, data.test_x, data.test_y, data.stats_x)),
                data.description)
    from tqdm import tqdm

    log = tqdm.write if rank0 else (lambda _text: None)
    if rank0:
        meta = training_report.run_metadata(args, data.description)
        if env is not None:
            meta["command"] = _torchrun_command(env)
            meta["machine"] += (f", {env['world_size']} processes ({env['backend']}, batch/{env['world_size']} "
                                "samples each)")
        meta["distributed"] = {"world_size": 1 if env is None else env["world_size"],
                               "backend": None if env is None else env["backend"], "device": args.device,
                               "sync_bn": args.sync_bn}
        print(f"{data.description}\n{meta['machine']}")
        if args.sync_bn and env is None:
            print("--sync-bn without torchrun: SyncBatchNorm has no other process to synchronize with")
        args.out.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    start = time.perf_counter()
    for batch_size in args.batch_sizes:
        settings = run_settings(args, batch_size, device)
        for variant in args.variants:
            if variant == "bn+stab" and batch_size not in args.bn_stab_batch_sizes:
                continue
            for lr in lr_grid(args, batch_size):
                torch.manual_seed(args.seed)
                base = build_model(args.model)
                results.append(train_run(base, variant, batch_size, lr, data, settings, args.model, log=log))
                if rank0:
                    partial = {"meta": {**meta, "complete": False}, "runs": [asdict(r) for r in results]}
                    (args.out / "results.partial.json").write_text(json.dumps(partial))  # progress so far
    if not rank0:
        return 0
    meta["wall_seconds"] = time.perf_counter() - start
    meta["loadavg_end"] = os.getloadavg()
    meta["lr_grids"] = {str(b): lr_grid(args, b) for b in args.batch_sizes}
    meta["corrections"] = training_report.count_corrections(normprop_fx.convert(build_model(args.model)))
    (args.out / "results.partial.json").unlink(missing_ok=True)
    payload = {"meta": meta, "runs": [asdict(r) for r in results]}
    training_report.write_outputs(payload, args.out, args.doc, training_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
