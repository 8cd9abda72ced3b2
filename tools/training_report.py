#!/usr/bin/env python3
"""Tables, target checks, plots and the markdown report of a tools/train.py run.

Everything here reads the ``results.json`` payload that tools/train.py writes, so a report can
be rebuilt without training again:

    python tools/training_report.py docs/training/results.json --doc docs/training.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from common import NOTES_END, NOTES_START, VARIANT_LABELS, VARIANTS, notes_in

STD_BAND = (0.5, 2.0)
PARITY_POINTS = 0.5


def run_metadata(args: argparse.Namespace, data_description: str) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "command": " ".join([".venv/bin/python", "tools/train.py", *sys.argv[1:]]),
        "settings": settings,
        "data": data_description,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "machine": (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                    f"torch threads {torch.get_num_threads()}, os.cpu_count {os.cpu_count()}, "
                    f"load average at start {tuple(round(x, 2) for x in os.getloadavg())}"),
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }


def count_corrections(converted: torch.nn.Module) -> dict[str, int]:
    """How many moment-propagation modules a conversion of the model contains (0 before the
    propagation pass lands)."""
    import normprop_fx

    kinds = {"Standardize": normprop_fx.Standardize, "NormalizedActivation": normprop_fx.NormalizedActivation,
             "NormPropAffine": normprop_fx.NormPropAffine, "NormProp layers": normprop_fx.NormPropLayer}
    counts = {name: 0 for name in kinds}
    for name, module in converted.named_modules():
        for kind, cls in kinds.items():
            # NormalizedActivation inside a NormProp layer or NormPropAffine is not a standalone one
            if isinstance(module, cls) and not (kind == "NormalizedActivation" and name.endswith(".activation")):
                counts[kind] += 1
    return counts


# ----------------------------------------------------------------------------- analysis


def _groups(payload: dict[str, Any]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in payload["runs"]:
        groups.setdefault((run["model"], run["batch_size"], run["variant"]), []).append(run)
    for runs in groups.values():
        runs.sort(key=lambda r: r["lr"])
    return groups


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the highest final test accuracy, preferring runs that trained over runs
    that collapsed; None when every run diverged or failed."""
    finished = [r for r in runs if r["status"] in ("trained", "collapsed")]
    return max(finished, key=lambda r: (r["status"] == "trained", r["final_accuracy"])) if finished else None


def stable_range(runs: list[dict[str, Any]]) -> tuple[float, float, int] | None:
    """The widest run of consecutive grid learning rates that all trained: (low, high, count)."""
    best: tuple[float, float, int] | None = None
    start = None
    for i, run in enumerate(runs + [{"status": "end"}]):
        if run["status"] == "trained":
            start = i if start is None else start
            continue
        if start is not None:
            count = i - start
            if best is None or count > best[2]:
                best = (runs[start]["lr"], runs[i - 1]["lr"], count)
            start = None
    return best


def _cell(run: dict[str, Any]) -> str:
    if run["status"] == "trained":
        return f"{100 * run['final_accuracy']:.1f}"
    if run["status"] == "collapsed":
        return f"{100 * run['final_accuracy']:.1f} (collapsed)"
    if run["status"] == "diverged":
        step = re.search(r"step (\d+)", run["detail"])
        return f"diverged (step {step.group(1)})" if step else "diverged"
    return "error"


def _range_text(rng: tuple[float, float, int] | None) -> str:
    if rng is None:
        return "none"
    low, high, count = rng
    return f"{low:g}-{high:g} ({count} values, x{high / low:.0f})" if count > 1 else f"{low:g} only"


def _mean_epoch_seconds(runs: list[dict[str, Any]]) -> str:
    seconds = [e["seconds"] for r in runs for e in r["epochs"]]
    return f"{sum(seconds) / len(seconds):.1f}" if seconds else "-"


def accuracy_tables(payload: dict[str, Any]) -> str:
    """One table per (model, batch size): final test accuracy (%) per learning rate and variant."""
    out = []
    groups = _groups(payload)
    for model, batch_size in dict.fromkeys((m, b) for m, b, _ in groups):
        variants = [v for v in VARIANTS if (model, batch_size, v) in groups]
        lrs = sorted({r["lr"] for v in variants for r in groups[(model, batch_size, v)]})
        rows = []
        for v in variants:
            runs = groups[(model, batch_size, v)]
            by_lr = {r["lr"]: r for r in runs}
            best = best_run(runs)
            rows.append([VARIANT_LABELS[v], *[_cell(by_lr[lr]) if lr in by_lr else "-" for lr in lrs],
                         f"{best['lr']:g}" if best else "-",
                         f"{100 * best['final_accuracy']:.1f}" if best else "-",
                         _range_text(stable_range(runs)), _mean_epoch_seconds(runs),
                         f"{best['max_scale_end']:.2f}" if best else "-"])
        headers = ["variant", *[f"lr {lr:g}" for lr in lrs], "best lr", "best acc %", "stable lr range",
                   "s / epoch", "max gamma (best)"]
        steps = next(iter(groups[(model, batch_size, variants[0])]))["epochs"]
        steps_text = f", {steps[0]['steps']} steps per epoch" if steps else ""
        out.append(f"**{model}, batch size {batch_size}**{steps_text}\n\n"
                   + tabulate(rows, headers, tablefmt="github", disable_numparse=True))
    return "\n\n".join(out)


def _np_std_range(run: dict[str, Any], when: str) -> tuple[float, float] | None:
    stats = run[f"stats_{when}"].get("normprop", [])
    return (min(s["std"] for s in stats), max(s["std"] for s in stats)) if stats else None


def targets(payload: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; met is None when the runs needed are missing."""
    rows: list[tuple[str, str, bool | None]] = []
    groups = _groups(payload)
    for model, batch_size in dict.fromkeys((m, b) for m, b, _ in groups):
        bn = best_run(groups.get((model, batch_size, "bn"), []))
        for v in ("np", "np+stab"):
            if (model, batch_size, v) not in groups or (model, batch_size, "bn") not in groups:
                continue  # no comparison without both sides
            npr = best_run(groups[(model, batch_size, v)])
            margin = PARITY_POINTS if batch_size >= 128 else 0.0
            goal = f"batch {batch_size}: {VARIANT_LABELS[v]} best >= BN best" + (f" - {margin} points" if margin else "")
            if npr is None:
                rows.append((goal, f"{VARIANT_LABELS[v]}: no run trained", False))
            elif bn is None:
                rows.append((goal, f"{100 * npr['final_accuracy']:.1f} vs BN: no run trained", True))
            else:
                a, b = 100 * npr["final_accuracy"], 100 * bn["final_accuracy"]
                rows.append((goal, f"{a:.1f} (lr {npr['lr']:g}) vs {b:.1f} (lr {bn['lr']:g})", a >= b - margin))
        if (model, batch_size, "np+stab") in groups and (model, batch_size, "bn") in groups:
            r_np = stable_range(groups[(model, batch_size, "np+stab")])
            r_bn = stable_range(groups[(model, batch_size, "bn")])
            rows.append((f"batch {batch_size}: stable lr range of NormProp + stabilizers at least as wide as BN's",
                         f"{_range_text(r_np)} vs {_range_text(r_bn)}",
                         (r_np[2] if r_np else 0) >= (r_bn[2] if r_bn else 0)))
        for v in ("np", "np+stab"):
            best = best_run(groups.get((model, batch_size, v), []))
            if best is None:
                continue
            low, high = _np_std_range(best, "end") or (float("nan"), float("nan"))
            goal = f"batch {batch_size}: {VARIANT_LABELS[v]} (best lr) layer output std in [{STD_BAND[0]}, {STD_BAND[1]}] at the end"
            rows.append((goal, f"{low:.2f}-{high:.2f}", STD_BAND[0] <= low and high <= STD_BAND[1]))
    return rows


def targets_text(payload: dict[str, Any]) -> str:
    rows = [(goal, measured, {True: "met", False: "MISSED", None: "n/a"}[met]) for goal, measured, met in targets(payload)]
    return tabulate(rows, ["target", "measured", "result"], tablefmt="github", disable_numparse=True)


def statistics_table(payload: dict[str, Any]) -> str:
    """Per best-lr run: the range of per-layer output mean and std, at init and at the end."""
    rows = []
    for (model, batch_size, variant), runs in _groups(payload).items():
        best = best_run(runs)
        if best is None:
            continue
        for when in ("init", "end"):
            for kind, stats in best[f"stats_{when}"].items():
                if not stats:
                    continue
                what = {"normprop": "NormProp layer outputs", "eval": "BN outputs, eval mode (running stats)",
                        "train": "BN outputs, train mode (batch stats)"}[kind]
                means = [s["mean"] for s in stats]
                stds = [s["std"] for s in stats]
                rows.append([model, batch_size, VARIANT_LABELS[variant], f"{best['lr']:g}", when, what, len(stats),
                             f"{min(means):.2f} .. {max(means):.2f}", f"{min(stds):.2f} .. {max(stds):.2f}"])
    headers = ["model", "batch", "variant", "lr", "when", "measured at", "layers", "mean range", "std range"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


# ----------------------------------------------------------------------------- plots


def write_plots(payload: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(payload)
    keys = list(dict.fromkeys((m, b) for m, b, _ in groups))
    colors = {"bn": "tab:blue", "bn+stab": "tab:cyan", "np": "tab:red", "np+stab": "tab:orange"}
    paths = []

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, (model, batch_size) in zip(axes[0], keys):
        for v in VARIANTS:
            best = best_run(groups.get((model, batch_size, v), []))
            if best is None:
                continue
            epochs = [e["epoch"] for e in best["epochs"]]
            acc = [100 * e["test_accuracy"] for e in best["epochs"]]
            ax.plot(epochs, acc, "o-", color=colors[v], label=f"{VARIANT_LABELS[v]} (lr {best['lr']:g})")
        ax.set_ylabel("test accuracy %")
        _finish_axis(ax, f"{model}, batch {batch_size} (best lr each)",
                     "epoch" if batch_size != 1 else "epoch (fixed steps)")
    paths.append(_save(fig, out / "accuracy.png"))

    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.4 * len(keys)), squeeze=False)
    for row, (model, batch_size) in zip(axes, keys):
        ax_np, ax_bn = row
        for v, ax, curves in (
            ("np", ax_np, (("init", "normprop", ":"), ("end", "normprop", "-"))),
            ("np+stab", ax_np, (("end", "normprop", "--"),)),
            ("bn", ax_bn, (("end", "eval", "-"), ("end", "train", "--"))),
        ):
            best = best_run(groups.get((model, batch_size, v), []))
            if best is None:
                continue
            for when, kind, style in curves:
                stats = best[f"stats_{when}"].get(kind, [])
                name = {"normprop": "", "eval": " eval mode", "train": " train mode"}[kind]
                ax.plot([s["std"] for s in stats], style, marker=".", color=colors[v],
                        label=f"{VARIANT_LABELS[v]}{name} std, {when} (lr {best['lr']:g})")
                ax.plot([s["mean"] for s in stats], style, color="gray", alpha=0.6)
        for ax, title in ((ax_np, "NormProp layer outputs"), (ax_bn, "BN outputs at the end")):
            ax.axhspan(*STD_BAND, color="green", alpha=0.07)
            _finish_axis(ax, f"{title}, batch {batch_size} (gray: means)", "layer (call order)")
    paths.append(_save(fig, out / "layer_statistics.png"))
    return paths


def _finish_axis(ax: Any, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the document


def _preserved_notes(doc: Path) -> str:
    notes = notes_in(doc)
    return "(No notes yet: add them between the markers; a rerun keeps them.)" if notes is None else notes.strip("\n")


def notes_block(doc: Path) -> str:
    """The page's notes between their markers, as the page at ``doc`` has them (a rerun keeps them)."""
    return f"{NOTES_START}\n{_preserved_notes(doc)}\n{NOTES_END}"


def write_outputs(payload: dict[str, Any], out: Path, doc: Path | None, report: Any) -> None:
    """Write a finished run: ``out``/results.json, the tables and targets on stdout, the plots and,
    with ``doc``, the page; ``report`` is the module that renders them (this one for
    tools/train.py, finetune_report for tools/finetune.py)."""
    import json

    (out / "results.json").write_text(json.dumps(payload, indent=1))
    print(report.accuracy_tables(payload))
    print(report.targets_text(payload))
    plots = report.write_plots(payload, out)
    if doc is not None:
        report.write_doc(payload, doc, plots)
        print(f"wrote {doc}")
    print(f"wrote {out / 'results.json'} and {', '.join(str(p) for p in plots)}")


def rebuild_main(argv: list[str] | None, tool: str, report: Any) -> int:
    """The command line that rebuilds ``tool``'s page from its results.json with ``report``."""
    import json

    p = argparse.ArgumentParser(description=f"Rebuild the {tool} report from results.json")
    p.add_argument("results", type=Path)
    p.add_argument("--doc", type=Path, required=True)
    args = p.parse_args(argv)
    payload = json.loads(args.results.read_text())
    plots = report.write_plots(payload, args.results.parent)
    report.write_doc(payload, args.doc, plots)
    print(f"wrote {args.doc}")
    return 0


def write_doc(payload: dict[str, Any], doc: Path, plots: list[Path]) -> None:
    meta, s = payload["meta"], payload["meta"]["settings"]
    grids = "; ".join(f"batch {b}: {', '.join(f'{lr:g}' for lr in g)}" for b, g in meta["lr_grids"].items())
    corrections = meta["corrections"]
    counts = ", ".join(f"{n} {c}" for n, c in corrections.items())
    propagation = ("present" if corrections.get("Standardize", 0) else "absent (the moment-propagation pass had not "
                   "landed: the residual adds get no scale correction and the ReLU after each add stays a plain ReLU)")
    exponent = {"sqrt": "1/2", "linear": "1", "none": "0"}[s["lr_scaling"]]
    if s.get("stab_decay_gamma", False):
        stab_groups = (f"`normprop_fx.param_groups(model, {s['weight_decay']}, decay_scale_params=True)` (weight "
                       "decay on every parameter, gamma/beta/biases included)")
    else:
        stab_groups = (f"`normprop_fx.param_groups(model, {s['weight_decay']})` (weight decay on conv/linear "
                       "weights only, none on gamma/beta/biases)")
    images = "\n".join(f"![{p.stem}]({os.path.relpath(p, doc.parent)})" for p in plots)
    text = f"""# Training parity on Fashion-MNIST: BatchNorm vs NormProp

Produced by this command (from the repository root; it took {meta['wall_seconds'] / 60:.1f} min on one thread):

```
{meta['command']}
```

Every number below comes from that run ({meta['date']}, commit {meta['commit'] or 'unknown'}); the raw
per-epoch records are in `{os.path.relpath(Path(s['out']) / 'results.json', doc.parent)}`, and
`.venv/bin/python tools/training_report.py {s['out']}/results.json --doc {doc}` rebuilds this page from them.

## Setup

- Data: {meta['data']}. Install the data with `apt-get install dataset-fashion-mnist`.
- Model: `{s['model']}` (tools/train.py `SmallResNet`: 3x3 stem, one BasicBlock per stage with
  BatchNorm, stride 2 from the second stage, global average pooling, linear classifier). NormProp
  = `normprop_fx.convert(model, gamma_init={s['gamma_init']!r})` of the same initial weights.
  Moment-propagation modules in the converted model: {counts} -> corrections {propagation}.
- Training: SGD, momentum {s['momentum']}, weight decay {s['weight_decay']}, cosine decay to 0 over the
  run, no warm-up, cross-entropy, {s['epochs']} epochs, seed {s['seed']} for weights and data order (the
  same for every variant). Batch size 1 runs {s['bs1_steps']} steps (= images) per epoch, not full
  epochs. A last batch shorter than the batch size is dropped.
- Learning-rate grid (the same for every variant of a batch size; the batch-128 grid scaled by
  (batch/128)^{exponent}): {grids}.
- Stabilizers (`+ stabilizers`): {stab_groups} and
  `normprop_fx.adaptive_clip_grad_(model, {s['clip_factor']})` after every backward (unit-wise AGC:
  weight rows, joint (gamma_i, beta_i) pairs, the classifier excluded). Without them: plain
  `SGD(model.parameters(), weight_decay={s['weight_decay']})`.
- A run *diverged* when its loss became non-finite (it stops there), *collapsed* when its final test
  accuracy is below {100 * s['collapse_below']:.0f}% (chance is 10%); the *stable lr range* is the widest run of consecutive grid values that
  neither diverged nor collapsed. "s / epoch" is the mean training time of an epoch (evaluation
  excluded) over all runs of that row.
- Machine: {meta['machine']}; load average at the end {tuple(round(x, 2) for x in meta['loadavg_end'])}
  (2 cores shared with other jobs, so timings are indicative).

## Final test accuracy (%)

{accuracy_tables(payload)}

## Targets

{targets_text(payload)}

## Test accuracy over epochs and layer statistics

{images}

Layer statistics on a fixed batch of {s['stats_batch']} test images. NormProp: every NormProp layer's
output (after the normalized activation) at init and at the end of training
(`normprop_fx.measure_layer_statistics`). BN: every BatchNorm's output at the end, in eval mode
(running statistics) and in train mode (the batch's own statistics).

{statistics_table(payload)}

## Notes

{notes_block(doc)}
"""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    return rebuild_main(argv, "tools/train.py", sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
