#!/usr/bin/env python
"""Seed spread of NormProp + stabilizers at fixed learning rates: accuracy and layer std.

tools/train.py runs one seed over a learning-rate grid; this runs one learning rate per batch size
(by default the best ones of docs/training.md) over several seeds: NormProp + stabilizers with
and without weight decay on gamma/beta, and the BN original at its own best rate. It writes a
markdown page with the final test accuracy and the range of the layer output std at the end, per
seed, plus the spread over seeds.
It answers whether a difference between two configurations is larger than seed noise.

    .venv/bin/python tools/training_seeds.py --seeds 0,1,2,3,4 --doc docs/training/seeds.md

Exit status: 0 on success, 1 when the dataset is missing, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from normprop_fx.datasets import DatasetNotFoundError

import common
import train

#: name -> TrainSettings.decay_scale_params ("default": what tools/train.py's stabilizers use)
CONFIGS = {"no decay on gamma/beta": False, "decay on gamma/beta (default)": True}
BN_CONFIG = "BN, no stabilizers"


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds >= 0, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], help="comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument("--batch-sizes", type=common.positive_numbers(int), default=[128, 8, 1])
    p.add_argument("--lr", type=float, default=1.0,
                   help="learning rate at batch 128, scaled by (batch/128)^1/2 as in train.py (default 1)")
    p.add_argument("--bn-lrs", type=common.positive_numbers(float), default=[0.1, 0.0075, 0.00265],
                   help="BN's learning rate for each of --batch-sizes (default: its best ones in docs/training.md, "
                        "0.1,0.0075,0.00265); BN runs without stabilizers, as its best row there")
    p.add_argument("--no-bn", action="store_true", help="no BN runs")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bs1-steps", type=int, default=400)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--stats-batch", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--std-range", type=common.positive_numbers(float), default=[0.5, 2.0], help="the target's std range")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results there")
    p.add_argument("--doc", type=Path, default=None, help="write the markdown page there")
    p.add_argument("--report-only", action="store_true", help="do not train: render --json into --doc")
    args = p.parse_args(argv)
    if len(args.std_range) != 2:
        p.error("--std-range takes two numbers")
    if not (args.no_bn or args.report_only) and len(args.bn_lrs) != len(args.batch_sizes):
        p.error("--bn-lrs needs one learning rate per batch size")
    return args


def _one_run(batch_size: int, lr: float, variant: str, config: str, decay: bool, seed: int,
             args: argparse.Namespace, data: train.Data) -> dict[str, Any]:
    settings = train.TrainSettings(epochs=args.epochs, seed=seed, decay_scale_params=decay, progress=False,
                                   steps_per_epoch=args.bs1_steps if batch_size == 1 else None)
    torch.manual_seed(seed)
    result = train.train_run(train.build_model("small_resnet"), variant, batch_size, lr, data, settings,
                             "small_resnet", log=lambda *_: None)
    # NormProp: every NormProp layer's output; BN: every BatchNorm's output in eval mode.
    layers = result.stats_end.get("normprop" if variant.startswith("np") else "eval", [])
    stds = [s["std"] for s in layers]
    worst = max(layers, key=lambda s: s["std"], default=None)
    row = {"batch_size": batch_size, "lr": lr, "config": config, "seed": seed,
           "status": result.status, "accuracy": result.final_accuracy,
           "std_min": min(stds, default=float("nan")), "std_max": max(stds, default=float("nan")),
           "worst_layer": worst["path"] if worst else "", "max_gamma": result.max_scale_end}
    print(f"bs {batch_size} lr {lr:.3g} {config} seed {seed}: {result.status}, acc {row['accuracy']:.3f}, "
          f"std {row['std_min']:.2f}-{row['std_max']:.2f} ({row['worst_layer']})", flush=True)
    return row


def run(args: argparse.Namespace, data: train.Data) -> list[dict[str, Any]]:
    rows = []
    for index, batch_size in enumerate(args.batch_sizes):
        lr = args.lr * (batch_size / 128) ** 0.5
        for config, decay in CONFIGS.items():
            rows += [_one_run(batch_size, lr, "np+stab", config, decay, seed, args, data) for seed in args.seeds]
        if not args.no_bn:
            rows += [_one_run(batch_size, args.bn_lrs[index], "bn", BN_CONFIG, False, seed, args, data)
                     for seed in args.seeds]
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, seconds: float) -> str:
    lo, hi = args.std_range
    out = [
        "# Seed spread of accuracy and layer std: NormProp + stabilizers and BN",
        "",
        f"Produced by `{command}` ({seconds / 60:.1f} min, torch threads 1). Model small_resnet, the setup of",
        "[training.md](../training.md) (same data subset, epochs, schedule, stabilizers) at one learning rate",
        "per batch size; the seed sets the initial weights and the data order. Stabilizers: "
        "`param_groups(model, 5e-4, decay_scale_params=...)` + `adaptive_clip_grad_(model, 0.01)`; *decay on "
        "gamma/beta* is `decay_scale_params=True`, what tools/train.py uses by default. *BN*: the BatchNorm "
        "original at its own best learning rate of training.md, for the accuracy spread it is compared with. Std: every NormProp layer's output (BN: every BatchNorm's output in eval "
        "mode) on the fixed batch of test images, at the end of training.",
        "",
        "| batch | lr | variant | seed | status | test acc % | layer std min-max | worst layer | max gamma |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r['batch_size']} | {r['lr']:.3g} | {r['config']} | {r['seed']} | {r['status']} | "
                   f"{100 * r['accuracy']:.1f} | {r['std_min']:.2f}-{r['std_max']:.2f} | {r['worst_layer']} | "
                   f"{r['max_gamma']:.2f} |")
    out += ["", "## Spread over seeds", "",
            f"| batch | variant | seeds | test acc % mean (min-max) | max layer std median (min-max) | "
            f"seeds with every std in [{lo:g}, {hi:g}] |",
            "|---|---|---|---|---|---|"]
    for batch_size in dict.fromkeys(r["batch_size"] for r in rows):
        for config in dict.fromkeys(r["config"] for r in rows):
            group = [r for r in rows if r["batch_size"] == batch_size and r["config"] == config]
            acc = [100 * r["accuracy"] for r in group]
            top = [r["std_max"] for r in group]
            within = sum(lo <= r["std_min"] and r["std_max"] <= hi for r in group)
            out.append(f"| {batch_size} | {config} | {len(group)} | {statistics.fmean(acc):.1f} ({min(acc):.1f}-"
                       f"{max(acc):.1f}) | {statistics.median(top):.2f} ({min(top):.2f}-{max(top):.2f}) | "
                       f"{within} of {len(group)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.report_only:
        if args.json is None or args.doc is None:
            print("training_seeds.py: error: --report-only needs --json and --doc", file=sys.stderr)
            return 2
        saved = json.loads(args.json.read_text())
        args.doc.write_text(render(saved["rows"], args, saved["command"], saved["seconds"]))
        print(f"wrote {args.doc}")
        return 0
    train_args = train.parse_args(["--train-size", str(args.train_size), "--test-size", str(args.test_size),
                                   "--stats-batch", str(args.stats_batch)]
                                  + (["--data-dir", args.data_dir] if args.data_dir else []))
    try:
        data = train.load_data(train_args)
    except DatasetNotFoundError as error:
        print(f"training_seeds.py: error: {error}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    rows = run(args, data)
    seconds = time.perf_counter() - start
    command = "python tools/training_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    page = render(rows, args, command.strip(), seconds)
    print(page)
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command.strip(), "seconds": seconds, "rows": rows}, indent=1))
    if args.doc is not None:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(page)
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
