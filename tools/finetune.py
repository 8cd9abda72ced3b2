#!/usr/bin/env python3
"""Fine-tune a trained BatchNorm network at small batch sizes and under DP-SGD: NormProp against
BN, FrozenBN and GroupNorm on Fashion-MNIST.

    python tools/finetune.py --quick                                    # smoke run, a few minutes
    python tools/finetune.py --out docs/finetune --doc docs/finetune.md  # the documented run

1. Pretrain tools/train.py's BN model (SmallResNet) on Fashion-MNIST classes 0-4 at batch 128
   (train.train_run) and save the checkpoint (--out/checkpoint.pt).
2. Fine-tune it on classes 5-9 with a new 5-way head (the same head for every variant of a seed),
   the same number of images (--finetune-size images, --epochs passes) at every batch size, as:
   bn (BatchNorm in train mode: batch statistics), frozen_bn (torchvision FrozenBatchNorm2d with the
   checkpoint's statistics and affine), gn (Opacus' ModuleValidator.fix: GroupNorm with gcd(32, C)
   groups, the BatchNorm's affine copied in), np (normprop_fx.convert(init="trained"): the same
   function), np+stab and np_keepgb+stab (np with the library's stabilizers: param_groups with and
   without weight decay on gamma/beta, adaptive_clip_grad_), np_fixedgb+stab (gamma/beta frozen,
   stabilizers), np_recal (np, then normprop_fx.recalibrate on the fine-tuning images),
   np_scratch+stab (NormProp from the paper's initialization, no pretraining, with stabilizers).
   np_keepgb+stab and np_fixedgb+stab run only when --variants names them. Each variant runs a
   learning-rate grid at seed 0, then more seeds at its best rate.
3. DP-SGD (Opacus, ``pip install normprop-fx[dp]``): np, gn and frozen_bn fine-tuned under
   PrivacyEngine.make_private_with_epsilon (Poisson sampling) at --dp-epsilon / --dp-delta.

Steps 2 and 3 run as tasks (one per batch size, one for DP-SGD) in --workers processes. Writes
results.json (partial files while it runs; --resume continues from them, or adds runs to a finished
results.json), PNG curves and, with --doc, the markdown page (tools/finetune_report.py, which
rebuilds it from results.json).

Exit status: 0 on success, 1 when the dataset or opacus is missing, 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import normprop_fx
from normprop_fx.batchnorm_state import is_batchnorm
from normprop_fx.datasets import DatasetNotFoundError, channel_statistics, load_fashion_mnist, standardize_images
from normprop_fx.training import classifier_name

import common
import finetune_report
import train
import training_report
from finetune_report import VARIANT_LABELS
from train import Data, TrainSettings

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
#: Fine-tuning variants, in the order the page lists them (their labels: finetune_report.VARIANT_LABELS).
VARIANTS = tuple(VARIANT_LABELS)
DP_VARIANTS = ("np", "gn", "frozen_bn")


# ----------------------------------------------------------------------------- data


def class_subset(images: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...], count: int | None,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of ``classes`` (labels renumbered 0..len(classes)-1), ``count`` of them drawn
    without replacement with ``seed`` (all when None or more)."""
    keep = torch.isin(labels, torch.tensor(classes))
    images, labels = images[keep], labels[keep]
    if count is not None and count < len(labels):
        index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
        images, labels = images[index], labels[index]
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return images, relabel[labels]


@dataclasses.dataclass
class Domains:
    source: Data  #: pretraining (classes 0-4)
    target: Data  #: fine-tuning (classes 5-9): train_x has --finetune-size images
    dp_x: torch.Tensor  #: the DP-SGD fine-tuning set (classes 5-9, --dp-size images)
    dp_y: torch.Tensor
    description: str


def load_domains(args: argparse.Namespace) -> Domains:
    train_split = load_fashion_mnist("train", args.data_dir)
    test_split = load_fashion_mnist("test", args.data_dir)
    src_x, src_y = class_subset(train_split.images, train_split.labels, SOURCE_CLASSES, args.pretrain_size, args.seed)
    mean, std = channel_statistics(src_x)
    tgt_all_x, tgt_all_y = class_subset(train_split.images, train_split.labels, TARGET_CLASSES, None, args.seed)
    order = torch.randperm(len(tgt_all_y), generator=torch.Generator().manual_seed(args.seed))
    ft_index, dp_index = order[: args.finetune_size], order[: args.dp_size]  # the DP set contains the fine-tuning set
    src_test_x, src_test_y = class_subset(test_split.images, test_split.labels, SOURCE_CLASSES, args.test_size, args.seed)
    tgt_test_x, tgt_test_y = class_subset(test_split.images, test_split.labels, TARGET_CLASSES, args.test_size, args.seed)

    def std_(x: torch.Tensor) -> torch.Tensor:
        return standardize_images(x, mean, std)

    source = Data(std_(src_x), src_y, std_(src_test_x), src_test_y, std_(src_test_x[: args.stats_batch]), "source")
    target = Data(std_(tgt_all_x[ft_index]), tgt_all_y[ft_index], std_(tgt_test_x), tgt_test_y,
                  std_(tgt_test_x[: args.stats_batch]), "target")
    description = (
        f"Fashion-MNIST. Pretraining: classes 0-4 ({', '.join(common_names(SOURCE_CLASSES))}), {len(src_y)} "
        f"training images (random subset, seed {args.seed}), {len(src_test_y)} test images. Fine-tuning: classes "
        f"5-9 ({', '.join(common_names(TARGET_CLASSES))}), {len(target.train_y)} training images, "
        f"{len(tgt_test_y)} test images; DP-SGD: {len(dp_index)} training images of classes 5-9 (the fine-tuning "
        f"images among them). Everything standardized with the pretraining images' mean {mean.item():.4f} and "
        f"std {std.item():.4f} (the checkpoint's input pipeline)")
    return Domains(source, target, std_(tgt_all_x[dp_index]), tgt_all_y[dp_index], description)


def common_names(classes: tuple[int, ...]) -> list[str]:
    from normprop_fx.datasets import FASHION_MNIST_CLASSES

    return [FASHION_MNIST_CLASSES[c] for c in classes]


# ----------------------------------------------------------------------------- models


def with_new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """``model`` with its classifier (its last plain nn.Linear) replaced by a fresh
    ``num_classes``-way one, initialized from ``seed``: the same head for every variant."""
    name = classifier_name(model)
    if name is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    old = model.get_submodule(name)
    torch.manual_seed(10_000 + seed)
    model.set_submodule(name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return model


def frozen_batchnorms(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by torchvision's FrozenBatchNorm2d holding its
    statistics and affine (buffers: nothing of it trains), as torchvision's detection models do."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            with torch.no_grad():
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
                if module.affine:
                    frozen.weight.copy_(module.weight)
                    frozen.bias.copy_(module.bias)
            model.set_submodule(name, frozen)
    return model


def opacus_groupnorm(model: nn.Module) -> nn.Module:
    """``ModuleValidator.fix(model)``: every BatchNorm becomes ``GroupNorm(gcd(32, C), C)``, as
    Opacus makes a model DP-trainable; the BatchNorm's affine is copied into the GroupNorm (fix
    leaves it at 1, 0). The trained function is not kept: GroupNorm normalizes each sample by its
    own group statistics, not by the checkpoint's running statistics."""
    from opacus.validators import ModuleValidator

    batchnorms = {name: m for name, m in model.named_modules() if is_batchnorm(m)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fix() logs what it replaces
        fixed = ModuleValidator.fix(copy.deepcopy(model))
    for name, bn in batchnorms.items():
        gn = fixed.get_submodule(name)
        if not isinstance(gn, nn.GroupNorm):
            raise TypeError(f"ModuleValidator.fix turned {name} into {type(gn).__name__}, not GroupNorm")
        if bn.affine:
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
    return fixed


def make_model(checkpoint: nn.Module, variant: str, seed: int, args: argparse.Namespace,
               target: Data, new_head: bool = True) -> nn.Module:
    """The model ``variant`` fine-tunes, with the new head of ``seed`` (``new_head=False``: the
    checkpoint's own head, for the source task); ``checkpoint`` is left as it is."""
    if variant == "np_scratch+stab":
        torch.manual_seed(seed)
        base = with_new_head(train.build_model(args.model), len(TARGET_CLASSES), seed)
        return normprop_fx.convert(base, init="normprop")
    base = copy.deepcopy(checkpoint)
    if new_head:
        base = with_new_head(base, len(TARGET_CLASSES), seed)
    if variant == "bn":
        return base
    if variant == "frozen_bn":
        return frozen_batchnorms(base)
    if variant == "gn":
        return opacus_groupnorm(base)
    model = normprop_fx.convert(base, init="trained")
    if variant == "np_fixedgb+stab":
        for layer in model.modules():
            if isinstance(layer, normprop_fx.NormPropLayer):
                layer.gamma.requires_grad_(False)
                layer.beta.requires_grad_(False)
    if variant == "np_recal":
        model.train()
        normprop_fx.recalibrate(model, target.train_x.split(args.eval_batch))
    return model


# ----------------------------------------------------------------------------- runs


def finetune_settings(args: argparse.Namespace, variant: str, seed: int) -> TrainSettings:
    return TrainSettings(
        epochs=args.epochs, momentum=args.momentum, weight_decay=args.weight_decay, clip_factor=args.clip_factor,
        decay_scale_params=variant != "np_keepgb+stab", seed=seed, trained_threshold=args.collapse_below,
        progress=False, eval_batch=args.eval_batch)


def pretrain(args: argparse.Namespace, source: Data, log: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Train the BN model on the source classes at batch 128 (tools/train.py's train_run)."""
    torch.manual_seed(args.seed)
    model = with_new_head(train.build_model(args.model), len(SOURCE_CLASSES), args.seed)
    settings = TrainSettings(epochs=args.pretrain_epochs, momentum=args.momentum, weight_decay=args.weight_decay,
                             seed=args.seed, progress=False, eval_batch=args.eval_batch)
    result = train.train_run(model, "bn", args.pretrain_batch, args.pretrain_lr, source, settings, args.model,
                             log=log, model=model)
    if result.status != "trained":
        raise RuntimeError(f"pretraining failed: {result.status} ({result.detail})")
    model.eval()
    return model, asdict(result)


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    model.train()
    return out


def exactness(checkpoint: nn.Module, domains: Domains, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint and its exact conversion on the source test set (their own head) and on the
    target test set (the seed-0 new head): accuracies and how many predictions differ."""
    rows = {}
    for where, data, model in (
        ("source", domains.source, copy.deepcopy(checkpoint)),
        ("target", domains.target, with_new_head(copy.deepcopy(checkpoint), len(TARGET_CLASSES), 0)),
    ):
        converted = normprop_fx.convert(model, init="trained")
        a, b = predictions(model, data.test_x, args.eval_batch), predictions(converted, data.test_x, args.eval_batch)
        with torch.no_grad():
            x = data.test_x[: args.eval_batch]
            max_logit_diff = (model.eval()(x) - converted.eval()(x)).abs().max().item()
        rows[where] = {"images": len(data.test_y), "bn_accuracy": (a == data.test_y).float().mean().item(),
                       "np_accuracy": (b == data.test_y).float().mean().item(),
                       "predictions_differing": int((a != b).sum()), "max_logit_difference": max_logit_diff}
    return rows


def source_accuracies(checkpoint: nn.Module, domains: Domains, args: argparse.Namespace) -> dict[str, float]:
    """What each variant's starting point computes on the source task (the checkpoint's head, the
    source test images): the same as the checkpoint when it keeps its function, less when not
    (GroupNorm), and what recalibration on the target images does to it."""
    accuracies = {}
    for variant in ("bn", "frozen_bn", "gn", "np", "np_recal"):
        if variant == "gn" and "gn" not in args.variants:
            continue
        model = make_model(checkpoint, variant, 0, args, domains.target, new_head=False)
        accuracies[variant] = train.evaluate(model, domains.source.test_x, domains.source.test_y, args.eval_batch)
    return accuracies


def finetune_run(checkpoint: nn.Module, variant: str, batch_size: int, lr: float, seed: int, phase: str,
                 domains: Domains, args: argparse.Namespace, step0: dict[str, float], log: Any) -> dict[str, Any]:
    model = make_model(checkpoint, variant, seed, args, domains.target)
    key = f"{variant}/{seed}"
    if key not in step0:
        step0[key] = train.evaluate(model, domains.target.test_x, domains.target.test_y, args.eval_batch)
    result = train.train_run(checkpoint, variant, batch_size, lr, domains.target, finetune_settings(args, variant, seed),
                             args.model, log=log, model=model)
    run = asdict(result)
    run.update(seed=seed, phase=phase, step0_accuracy=step0[key],
               train_seconds=sum(e["seconds"] for e in result.epochs))
    return run


def grad_sample_modes(model: nn.Module) -> dict[str, str]:
    """How Opacus computes each trainable module's per-sample gradients: ``hooks`` (a grad sampler
    registered for its type) or ``functorch`` (its fallback, vmap over the module's forward),
    keyed by module type, for the modules that own trainable parameters."""
    from opacus import GradSampleModule

    modes: dict[str, str] = {}
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            kind = "hooks" if type(module) in GradSampleModule.GRAD_SAMPLERS else "functorch"
            modes[type(module).__name__] = kind
    return modes


def dp_run(checkpoint: nn.Module, variant: str, lr: float, seed: int, phase: str, domains: Domains,
           args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Fine-tune ``variant`` with DP-SGD: Opacus' PrivacyEngine.make_private_with_epsilon (Poisson
    sampling at --dp-batch / --dp-size, per-sample clipping at --dp-clip, noise for the target
    epsilon over --dp-epochs), SGD with momentum, no weight decay."""
    from opacus import PrivacyEngine

    model = make_model(checkpoint, variant, seed, args, domains.target).train()
    step0 = train.evaluate(model, domains.target.test_x, domains.target.test_y, args.eval_batch)
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(domains.dp_x, domains.dp_y),
                                         batch_size=args.dp_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode and full-backward-hook notices
        engine = PrivacyEngine(accountant="rdp")
        private, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.dp_epsilon,
            target_delta=args.dp_delta, epochs=args.dp_epochs, max_grad_norm=args.dp_clip, poisson_sampling=True,
            grad_sample_mode="hooks")
    run: dict[str, Any] = {"variant": variant, "lr": lr, "seed": seed, "phase": phase, "batch_size": args.dp_batch,
                           "status": "trained", "detail": "", "epochs": [], "step0_accuracy": step0,
                           "noise_multiplier": optimizer.noise_multiplier, "grad_sample_modes": grad_sample_modes(model)}
    step = 0
    for epoch in range(args.dp_epochs):
        start, losses, batches = time.perf_counter(), [], 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for x, y in loader:
                if len(y) == 0:
                    continue  # an empty Poisson batch: no step (the accountant counts only steps taken)
                loss = F.cross_entropy(private(x), y)
                if not torch.isfinite(loss):
                    run["status"], run["detail"] = "diverged", f"non-finite loss at step {step}"
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                batches += 1
                step += 1
        seconds = time.perf_counter() - start
        if run["status"] != "trained":
            break
        accuracy = train.evaluate(private, domains.target.test_x, domains.target.test_y, args.eval_batch)
        run["epochs"].append({"epoch": epoch + 1, "steps": batches, "train_loss": sum(losses) / max(len(losses), 1),
                              "test_accuracy": accuracy, "seconds": seconds})
        log(f"dp {variant} lr={lr:g} seed={seed} epoch {epoch + 1}/{args.dp_epochs}: test accuracy {accuracy:.4f}, "
            f"{seconds:.1f} s ({batches} steps)")
    run["epsilon"] = engine.get_epsilon(args.dp_delta)
    run["train_seconds"] = sum(e["seconds"] for e in run["epochs"])
    run["final_accuracy"] = run["epochs"][-1]["test_accuracy"] if run["status"] == "trained" else float("nan")
    if run["status"] == "trained" and run["final_accuracy"] < args.collapse_below:
        run["status"], run["detail"] = "collapsed", f"final test accuracy {run['final_accuracy']:.3f}"
    return run


# ----------------------------------------------------------------------------- the tasks


def _task_path(args: argparse.Namespace, task: str) -> Path:
    return args.out / f"results.partial.{task.replace(' ', '')}.json"


def run_task(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """One batch size's sweep ("batch B": every variant's grid at seed 0, then the other seeds at its
    best lr) or the DP-SGD part ("dp"), from the saved checkpoint; run in a worker process of its own
    with --workers > 1. Saves its runs after each one (--resume continues from them)."""
    torch.set_num_threads(args.threads)
    domains = load_domains(args)
    checkpoint = with_new_head(train.build_model(args.model), len(SOURCE_CLASSES), args.seed)
    checkpoint.load_state_dict(torch.load(args.out / "checkpoint.pt"))
    checkpoint.eval()
    path = _task_path(args, task)
    state: dict[str, Any] = {"runs": [], "dp_runs": [], "step0": {}}
    finished = args.out / "results.json"
    if args.resume and path.is_file():
        state.update(json.loads(path.read_text()))
    elif args.resume and finished.is_file():  # a finished run: this task's part of it
        previous = json.loads(finished.read_text())
        state["step0"] = previous.get("step0", {})
        if task == "dp":
            state["dp_runs"] = previous.get("dp_runs", [])
        else:
            state["runs"] = [r for r in previous.get("runs", []) if r["batch_size"] == int(task.split()[1])]

    def log(text: str) -> None:
        print(f"[{task}] {text}", flush=True)

    def save() -> None:
        path.write_text(json.dumps(state))

    if task == "dp":
        done = {(r["variant"], r["lr"], r["seed"]) for r in state["dp_runs"]}
        for variant in args.dp_variants:
            for lr in args.dp_lrs:
                if (variant, lr, 0) not in done:
                    state["dp_runs"].append(dp_run(checkpoint, variant, lr, 0, "grid", domains, args, log))
                    save()
            best = training_report.best_run([r for r in state["dp_runs"]
                                             if r["variant"] == variant and r["seed"] == 0 and r["lr"] in args.dp_lrs])
            for seed in range(1, args.seeds if best is not None else 1):
                if (variant, best["lr"], seed) not in done:
                    state["dp_runs"].append(dp_run(checkpoint, variant, best["lr"], seed, "seeds", domains, args, log))
                    save()
        return state
    batch_size = int(task.split()[1])
    grid = grid_for(args, batch_size)
    done = {(r["variant"], r["lr"], r["seed"]) for r in state["runs"]}
    for variant in args.variants:
        for lr in grid:
            if (variant, lr, 0) not in done:
                state["runs"].append(finetune_run(checkpoint, variant, batch_size, lr, 0, "grid", domains, args,
                                                  state["step0"], log))
                save()
        best = training_report.best_run([r for r in state["runs"]
                                         if r["variant"] == variant and r["seed"] == 0 and r["lr"] in grid])
        for seed in range(1, args.seeds if best is not None else 1):
            if (variant, best["lr"], seed) not in done:
                state["runs"].append(finetune_run(checkpoint, variant, batch_size, best["lr"], seed, "seeds", domains,
                                                  args, state["step0"], log))
                save()
    return state



# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_resnet", help="small_resnet[:W1,W2,..], or a torchvision/timm name")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx(.gz) files")
    p.add_argument("--pretrain-size", type=int, default=10000, help="pretraining images of classes 0-4")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--pretrain-batch", type=int, default=128)
    p.add_argument("--pretrain-lr", type=float, default=0.1)
    p.add_argument("--finetune-size", type=int, default=256, help="fine-tuning images of classes 5-9")
    p.add_argument("--epochs", type=int, default=4, help="passes over the fine-tuning images (every batch size)")
    p.add_argument("--test-size", type=int, default=1000, help="test images of each task")
    p.add_argument("--batch-sizes", type=common.positive_numbers(int), default=[1, 2, 4, 32])
    p.add_argument("--lrs", type=common.positive_numbers(float), default=[0.003, 0.01, 0.03, 0.1],
                   help="learning-rate grid at batch 32, scaled by (batch/32)^1/2 (--lr-scaling)")
    p.add_argument("--lr-scaling", choices=("sqrt", "linear", "none"), default="sqrt")
    p.add_argument("--small-batch-sizes", type=common.positive_numbers(int), default=[1, 2],
                   help="batch sizes that run only the top --small-batch-grid values of the grid (the cut that sizes the run)")
    p.add_argument("--small-batch-grid", type=int, default=4,
                   help="how many of the grid's values those batch sizes run: the largest ones (default 4: all)")
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in ("np_keepgb+stab", "np_fixedgb+stab")), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds at each variant's best learning rate (seed 0 is the grid's)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--clip-factor", type=float, default=0.01, help="adaptive gradient clipping factor (+stab)")
    p.add_argument("--collapse-below", type=float, default=0.3, help="collapsed below this final accuracy (chance 0.2)")
    p.add_argument("--dp", action=argparse.BooleanOptionalAction, default=True, help="the DP-SGD part (needs opacus)")
    p.add_argument("--dp-variants", default=",".join(DP_VARIANTS))
    p.add_argument("--dp-size", type=int, default=1024, help="DP-SGD training images of classes 5-9")
    p.add_argument("--dp-batch", type=int, default=256, help="expected Poisson batch size")
    p.add_argument("--dp-epochs", type=int, default=5)
    p.add_argument("--dp-epsilon", type=float, default=8.0)
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--dp-clip", type=float, default=1.0, help="per-sample gradient norm bound")
    p.add_argument("--dp-lrs", type=common.positive_numbers(float), default=[0.03, 0.1, 0.3, 1.0])
    p.add_argument("--seed", type=int, default=0, help="data subsets and pretraining")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=3,
                   help="processes running the tasks (one per batch size, one for DP-SGD) side by side (default 3)")
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--stats-batch", type=int, default=64, help="test images in the fixed layer-statistics batch")
    p.add_argument("--out", type=Path, default=Path("finetune_out"))
    p.add_argument("--doc", type=Path, default=None)
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs already in --out (an unfinished run's partial files, or a finished "
                        "results.json, e.g. to add --variants); every run is seeded, so the results are those of "
                        "one invocation")
    p.add_argument("--quick", action="store_true", help="smoke run: small_resnet:8,16, few images, 2 lrs, 2 seeds")
    args = p.parse_args(argv)
    if args.quick:
        quick = {"model": "small_resnet:8,16", "pretrain_size": 1000, "pretrain_epochs": 1, "finetune_size": 64,
                 "epochs": 1, "test_size": 200, "batch_sizes": [1, 32], "lrs": [0.01, 0.1], "small_batch_grid": 2,
                 "seeds": 2, "dp_size": 512, "dp_epochs": 1, "dp_lrs": [0.1], "eval_batch": 200, "workers": 1}
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.dp_variants = [v.strip() for v in args.dp_variants.split(",") if v.strip()]
    for name, allowed in (("variants", VARIANTS), ("dp_variants", DP_VARIANTS)):
        unknown = [v for v in getattr(args, name) if v not in allowed]
        if unknown:
            p.error(f"unknown --{name.replace('_', '-')} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    for name in ("pretrain_size", "pretrain_epochs", "pretrain_batch", "finetune_size", "epochs", "test_size",
                 "small_batch_grid", "seeds", "dp_size", "dp_batch", "dp_epochs", "threads", "workers", "eval_batch",
                 "stats_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not (args.dp_epsilon > 0 and 0 < args.dp_delta < 1 and args.dp_clip > 0):
        p.error("need --dp-epsilon > 0, 0 < --dp-delta < 1, --dp-clip > 0")
    if args.dp_size < args.finetune_size:
        p.error("--dp-size must be at least --finetune-size (the DP set contains the fine-tuning images)")
    return args


def grid_for(args: argparse.Namespace, batch_size: int) -> list[float]:
    grid = train.lr_grid(args, batch_size, reference=32)
    return grid[-args.small_batch_grid:] if batch_size in args.small_batch_sizes else grid


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dp or "gn" in args.variants:
        try:
            import opacus  # noqa: F401
        except ImportError:
            print("finetune.py: error: the gn variant and the DP-SGD part need opacus: pip install 'normprop-fx[dp]' "
                  "(or --no-dp and --variants without gn)", file=sys.stderr)
            return 1
    try:
        domains = load_domains(args)
    except DatasetNotFoundError as exc:
        print(f"finetune.py: error: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    partial_path = args.out / "results.partial.json"
    log = print
    meta = training_report.run_metadata(args, domains.description)
    meta["command"] = " ".join([".venv/bin/python", "tools/finetune.py", *(argv if argv is not None else sys.argv[1:])])
    payload: dict[str, Any] = {"meta": meta, "runs": [], "dp_runs": [], "step0": {}}
    results_path = args.out / "results.json"
    resume_from = partial_path if partial_path.is_file() else results_path
    if args.resume and resume_from.is_file():  # an unfinished run, or a finished one to add runs to
        previous = json.loads(resume_from.read_text())
        payload.update({k: previous[k] for k in ("runs", "dp_runs", "step0", "pretrain", "exactness", "source_accuracies")
                        if k in previous})
        before = previous["meta"]
        meta["resumed_after_seconds"] = before.get("wall_seconds", before.get("elapsed_seconds", 0.0))
        meta["resumed_from"] = {k: before.get(k) for k in ("command", "commit", "date")}
        meta["resumed_from"]["seconds"] = meta["resumed_after_seconds"]
    start = time.perf_counter() - meta.get("resumed_after_seconds", 0.0)
    print(f"{domains.description}\n{meta['machine']}")

    def save() -> None:
        meta["elapsed_seconds"] = time.perf_counter() - start
        partial_path.write_text(json.dumps(payload))

    checkpoint_path = args.out / "checkpoint.pt"
    if args.resume and checkpoint_path.is_file() and "pretrain" in payload:
        checkpoint = with_new_head(train.build_model(args.model), len(SOURCE_CLASSES), args.seed)
        checkpoint.load_state_dict(torch.load(checkpoint_path))
        checkpoint.eval()
    else:
        checkpoint, payload["pretrain"] = pretrain(args, domains.source, log)
        torch.save(checkpoint.state_dict(), checkpoint_path)
        payload["exactness"] = exactness(checkpoint, domains, args)
        save()
    if "source_accuracies" not in payload:
        payload["source_accuracies"] = source_accuracies(checkpoint, domains, args)
        save()
    log(f"checkpoint: source test accuracy {payload['pretrain']['final_accuracy']:.4f}; exactness "
        f"{json.dumps(payload['exactness'])}")

    tasks = (["dp"] if args.dp else []) + [f"batch {b}" for b in args.batch_sizes]
    tasks.sort(key=lambda t: 0 if t == "batch 1" else 1 if t == "dp" else 2)  # the longest first
    if args.workers == 1:
        results = [run_task(task, args) for task in tasks]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(args.workers, len(tasks))) as pool:
            results = pool.starmap(run_task, [(task, args) for task in tasks])
    by_task = dict(zip(tasks, results))
    payload["dp_runs"] = by_task.get("dp", {}).get("dp_runs", [])
    payload["runs"] = [r for b in args.batch_sizes for r in by_task[f"batch {b}"]["runs"]]
    for result in results:
        payload["step0"].update(result.get("step0", {}))
    meta["wall_seconds"] = time.perf_counter() - start
    meta["loadavg_end"] = os.getloadavg()
    meta["lr_grids"] = {str(b): grid_for(args, b) for b in args.batch_sizes}
    partial_path.unlink(missing_ok=True)
    for task in tasks:
        _task_path(args, task).unlink(missing_ok=True)
    training_report.write_outputs(payload, args.out, args.doc, finetune_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
