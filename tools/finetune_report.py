#!/usr/bin/env python3
"""Tables, target checks, plots and the markdown page of a tools/finetune.py run.

Everything here reads the ``results.json`` payload tools/finetune.py writes, so the page can be
rebuilt without training again (tools/training_report.py does the same for tools/train.py, and
its helpers are reused here):

    python tools/finetune_report.py docs/finetune/results.json --doc docs/finetune.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

import training_report
from training_report import _cell, _finish_axis, _save, best_run

#: tools/finetune.py's variant labels (finetune.py imports torch; the report reads them from here)
VARIANT_LABELS = {
    "bn": "BN (train mode)",
    "frozen_bn": "FrozenBN",
    "gn": "GroupNorm (Opacus fix)",
    "np": "NormProp exact",
    "np+stab": "NormProp exact + stabilizers",
    "np_keepgb+stab": "NormProp exact + stabilizers, no gamma/beta decay",
    "np_fixedgb+stab": "NormProp exact, gamma/beta frozen + stabilizers",
    "np_recal": "NormProp exact, recalibrated",
    "np_scratch+stab": "NormProp from scratch + stabilizers",
}
#: The variants NormProp exact must match or beat at small batches (the issue's baselines).
BASELINES = ("bn", "frozen_bn", "gn")
#: The NormProp variants that start from the exact conversion (the second row of each target).
EXACT_NORMPROP = ("np", "np+stab", "np_keepgb+stab", "np_fixedgb+stab", "np_recal")
SMALL_BATCH_POINTS = 0.0
LARGE_BATCH_POINTS = 0.5


def _label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _by(runs: list[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in keys), []).append(run)
    return groups


def seed_summary(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """For one variant (at one batch size): the seed-0 grid's best lr and the final accuracies of
    every seed at that lr (a diverged or collapsed seed counts with its accuracy, NaN as 0)."""
    grid = [r for r in runs if r["seed"] == 0]
    best = best_run(grid)
    if best is None:
        return None
    at_best = sorted((r for r in runs if r["lr"] == best["lr"]), key=lambda r: r["seed"])
    accs = [r["final_accuracy"] if r["status"] in ("trained", "collapsed") else 0.0 for r in at_best]
    return {"lr": best["lr"], "accuracies": accs, "mean": statistics.fmean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "step0": statistics.fmean(r["step0_accuracy"] for r in at_best),
            "seconds": statistics.fmean(r["train_seconds"] for r in at_best), "runs": at_best}


def _mean_cell(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "no run trained"
    return f"{_pct(summary['mean'])} ± {_pct(summary['sd'])}"


def exactness_table(payload: dict[str, Any]) -> str:
    rows = []
    for where, row in payload["exactness"].items():
        what = ("source task (classes 0-4), the checkpoint's head" if where == "source"
                else "target task (classes 5-9), the new head of seed 0, before any step")
        rows.append([what, row["images"], _pct(row["bn_accuracy"]), _pct(row["np_accuracy"]),
                     row["predictions_differing"], f"{row['max_logit_difference']:.1e}"])
    headers = ["test set", "images", "BN checkpoint (eval) %", "NormProp exact %", "predictions differing",
               "max |logit difference|"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def source_table(payload: dict[str, Any]) -> str:
    """Each variant's starting point on the source task (the checkpoint's head)."""
    accuracies = payload.get("source_accuracies")
    if not accuracies:
        return "(not measured in this run)"
    rows = [[_label(v), _pct(a)] for v, a in accuracies.items()]
    return tabulate(rows, ["starting point (before fine-tuning)", "source-task test accuracy %"], tablefmt="github",
                    disable_numparse=True)


def summary_table(payload: dict[str, Any]) -> str:
    """Variants x batch sizes: mean ± sd of the final test accuracy over the seeds at the best lr."""
    groups = _by(payload["runs"], "variant", "batch_size")
    batch_sizes = sorted({b for _, b in groups})
    variants = [v for v in VARIANT_LABELS if any((v, b) in groups for b in batch_sizes)]
    rows = []
    for v in variants:
        row = [_label(v)]
        for b in batch_sizes:
            s = seed_summary(groups.get((v, b), []))
            row.append(f"{_mean_cell(s)} (lr {s['lr']:g})" if s else "-")
        rows.append(row)
    return tabulate(rows, ["variant", *[f"batch {b}" for b in batch_sizes]], tablefmt="github", disable_numparse=True)


def grid_tables(payload: dict[str, Any]) -> str:
    """One table per batch size: the seed-0 grid, then the seeds at the best lr."""
    groups = _by(payload["runs"], "batch_size", "variant")
    out = []
    for batch_size in sorted({b for b, _ in groups}):
        variants = [v for v in VARIANT_LABELS if (batch_size, v) in groups]
        lrs = sorted({r["lr"] for v in variants for r in groups[(batch_size, v)] if r["seed"] == 0})
        rows = []
        for v in variants:
            runs = groups[(batch_size, v)]
            by_lr = {r["lr"]: r for r in runs if r["seed"] == 0}
            s = seed_summary(runs)
            rows.append([_label(v), *[_cell(by_lr[lr]) if lr in by_lr else "-" for lr in lrs],
                         f"{s['lr']:g}" if s else "-", _pct(s["step0"]) if s else "-",
                         ", ".join(_pct(a) for a in s["accuracies"]) if s else "-", _mean_cell(s),
                         f"{s['seconds']:.1f}" if s else "-"])
        steps = next(iter(groups[(batch_size, variants[0])]))["epochs"]
        steps_text = f", {steps[0]['steps']} steps per pass" if steps else ""
        headers = ["variant", *[f"lr {lr:g}" for lr in lrs], "best lr", "step 0 %", "seeds at best lr %",
                   "mean ± sd %", "train s"]
        out.append(f"**Batch size {batch_size}**{steps_text}\n\n"
                   + tabulate(rows, headers, tablefmt="github", disable_numparse=True))
    return "\n\n".join(out)


def _modes_text(modes: dict[str, str]) -> str:
    by_mode: dict[str, list[str]] = {}
    for module_type, mode in modes.items():
        by_mode.setdefault(mode, []).append(module_type)
    return "; ".join(f"{mode}: {', '.join(sorted(types))}" for mode, types in sorted(by_mode.items()))


def dp_table(payload: dict[str, Any]) -> str:
    groups = _by(payload.get("dp_runs", []), "variant")
    if not groups:
        return "(no DP-SGD runs)"
    lrs = sorted({r["lr"] for runs in groups.values() for r in runs if r["seed"] == 0})
    rows = []
    for v in [v for v in VARIANT_LABELS if (v,) in groups]:
        runs = groups[(v,)]
        by_lr = {r["lr"]: r for r in runs if r["seed"] == 0}
        s = seed_summary(runs)
        eps = max(r["epsilon"] for r in runs)
        rows.append([_label(v), *[_cell(by_lr[lr]) if lr in by_lr else "-" for lr in lrs],
                     f"{s['lr']:g}" if s else "-", _pct(s["step0"]) if s else "-",
                     ", ".join(_pct(a) for a in s["accuracies"]) if s else "-", _mean_cell(s),
                     f"{eps:.2f}", f"{runs[0]['noise_multiplier']:.3f}", _modes_text(runs[0]["grad_sample_modes"]),
                     f"{s['seconds']:.0f}" if s else "-"])
    headers = ["variant", *[f"lr {lr:g}" for lr in lrs], "best lr", "step 0 %", "seeds at best lr %", "mean ± sd %",
               "epsilon spent", "noise multiplier", "per-sample gradients (Opacus mode: module types)", "train s"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def targets(payload: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; met is None when the runs needed are missing."""
    rows: list[tuple[str, str, bool | None]] = []
    ex = payload["exactness"]
    step0 = payload["step0"]
    seeds = sorted({k.split("/")[1] for k in step0 if k.startswith("np/")})
    equal = [step0.get(f"np/{s}") == step0.get(f"bn/{s}") for s in seeds if f"bn/{s}" in step0]
    measured = (f"source: {_pct(ex['source']['np_accuracy'])} vs {_pct(ex['source']['bn_accuracy'])}, "
                f"{ex['source']['predictions_differing']} of {ex['source']['images']} predictions differ; target "
                f"(new head, seeds {', '.join(seeds)}): " + ", ".join(
                    f"{_pct(step0[f'np/{s}'])} vs {_pct(step0[f'bn/{s}'])}" for s in seeds if f"bn/{s}" in step0))
    met = (ex["source"]["predictions_differing"] == 0 and ex["target"]["predictions_differing"] == 0
           and bool(equal) and all(equal))
    rows.append(("step 0: NormProp exact accuracy = the BN checkpoint's eval accuracy (to the last image)", measured, met))
    groups = _by(payload["runs"], "variant", "batch_size")
    for b in sorted({b for _, b in groups}):
        summaries = {v: seed_summary(groups.get((v, b), [])) for v in VARIANT_LABELS if (v, b) in groups}
        exact = {v: s for v, s in summaries.items() if v in EXACT_NORMPROP and s is not None}
        best_exact = max(exact, key=lambda v: exact[v]["mean"]) if exact else None
        for who, np_v in (("NormProp exact", "np"), ("best NormProp exact configuration", best_exact)):
            if np_v is None:
                continue
            name = who if np_v == "np" and who == "NormProp exact" else f"{who} ({_label(np_v)})"
            if b <= 4:
                others = {v: summaries[v] for v in BASELINES if v in summaries}
                goal = f"batch {b}: {name} >= the best of BN, FrozenBN and GroupNorm (mean of seeds)"
                margin = SMALL_BATCH_POINTS
            else:
                others = {v: s for v, s in summaries.items() if v != np_v}
                goal = f"batch {b}: {name} within {LARGE_BATCH_POINTS} points of the best other variant (mean of seeds)"
                margin = LARGE_BATCH_POINTS
            rows.append(_compare(goal, summaries.get(np_v), others, margin))
    dp = _by(payload.get("dp_runs", []), "variant")
    if dp:
        np_s = seed_summary(dp.get(("np",), []))
        others = {v: seed_summary(dp[(v,)]) for v in ("gn", "frozen_bn") if (v,) in dp}
        eps = max(r["epsilon"] for r in payload["dp_runs"])
        rows.append(_compare(f"DP-SGD at epsilon {payload['meta']['settings']['dp_epsilon']:g} (spent: {eps:.2f}): "
                             "NormProp exact >= GroupNorm-fixed and >= FrozenBN (mean of seeds)", np_s, others, 0.0))
    return rows


def _compare(goal: str, np_s: dict[str, Any] | None, others: dict[str, dict[str, Any] | None],
             margin: float) -> tuple[str, str, bool | None]:
    others = {v: s for v, s in others.items() if s is not None}
    if np_s is None or not others:
        return goal, "runs missing", None
    best_v = max(others, key=lambda v: others[v]["mean"])
    text = (f"{_pct(np_s['mean'])} vs {_pct(others[best_v]['mean'])} ({_label(best_v)}); "
            + ", ".join(f"{_label(v)} {_pct(s['mean'])}" for v, s in others.items() if v != best_v))
    return goal, text, 100 * np_s["mean"] >= 100 * others[best_v]["mean"] - margin - 1e-9


def targets_text(payload: dict[str, Any]) -> str:
    rows = [(g, m, {True: "met", False: "MISSED", None: "n/a"}[ok]) for g, m, ok in targets(payload)]
    return tabulate(rows, ["target", "measured", "result"], tablefmt="github", disable_numparse=True)


def accuracy_tables(payload: dict[str, Any]) -> str:
    """Every table of the page but the targets (the name training_report.write_outputs calls)."""
    return "\n\n".join([exactness_table(payload), source_table(payload), summary_table(payload), grid_tables(payload),
                        dp_table(payload)])


# ----------------------------------------------------------------------------- plots

COLORS = {"bn": "tab:blue", "frozen_bn": "tab:cyan", "gn": "tab:green", "np": "tab:red", "np+stab": "tab:orange",
          "np_keepgb+stab": "tab:brown", "np_fixedgb+stab": "tab:olive", "np_recal": "tab:purple", "np_scratch+stab": "tab:gray"}


def _mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Images seen and the mean test accuracy over ``runs`` (step 0 included), up to the shortest run."""
    length = min(len(r["epochs"]) for r in runs)
    steps = [e["steps"] for e in runs[0]["epochs"][:length]]
    xs = [0] + [sum(steps[: i + 1]) * runs[0]["batch_size"] for i in range(length)]
    ys = [statistics.fmean(r["step0_accuracy"] for r in runs)]
    ys += [statistics.fmean(r["epochs"][i]["test_accuracy"] for r in runs) for i in range(length)]
    return xs, [100 * y for y in ys]


def write_plots(payload: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by(payload["runs"], "batch_size", "variant")
    batch_sizes = sorted({b for b, _ in groups})
    dp = _by(payload.get("dp_runs", []), "variant")
    panels = len(batch_sizes) + (1 if dp else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    for ax, b in zip(axes[0], batch_sizes):
        for v in VARIANT_LABELS:
            s = seed_summary(groups.get((b, v), []))
            if s is None or any(not r["epochs"] for r in s["runs"]):
                continue
            xs, ys = _mean_curve(s["runs"])
            ax.plot(xs, ys, "o-", color=COLORS[v], ms=3, label=f"{_label(v)} (lr {s['lr']:g})")
        ax.set_ylabel("test accuracy % (mean of seeds)")
        _finish_axis(ax, f"fine-tuning, batch {b} (best lr each)", "fine-tuning images seen")
    if dp:
        ax = axes[0][-1]
        for v in VARIANT_LABELS:
            s = seed_summary(dp.get((v,), []))
            if s is None or any(not r["epochs"] for r in s["runs"]):
                continue
            xs, ys = _mean_curve(s["runs"])
            ax.plot(xs, ys, "o-", color=COLORS[v], ms=3, label=f"{_label(v)} (lr {s['lr']:g})")
        eps = payload["meta"]["settings"]["dp_epsilon"]
        _finish_axis(ax, f"DP-SGD, epsilon {eps:g}, batch ~{payload['dp_runs'][0]['batch_size']}",
                     "expected images seen (Poisson batches)")
    paths = [_save(fig, out / "curves.png")]

    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(4.6 * len(batch_sizes), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batch_sizes):
        for v in VARIANT_LABELS:
            runs = sorted((r for r in groups.get((b, v), []) if r["seed"] == 0), key=lambda r: r["lr"])
            if runs:
                ax.plot([r["lr"] for r in runs],
                        [100 * r["final_accuracy"] if r["status"] in ("trained", "collapsed") else 0.0 for r in runs],
                        "o-", color=COLORS[v], ms=3, label=_label(v))
        ax.set_xscale("log")
        ax.set_ylabel("final test accuracy % (seed 0)")
        _finish_axis(ax, f"learning-rate grid, batch {b}", "learning rate (diverged: 0)")
    paths.append(_save(fig, out / "lr_grid.png"))
    return paths


# ----------------------------------------------------------------------------- the page


def _resumed_text(meta: dict[str, Any]) -> str:
    before = meta.get("resumed_from")
    if not before:
        return ""
    return (f"It reused (`--resume`) the {before['seconds'] / 60:.1f} min of runs of an earlier invocation "
            f"(`{before['command']}`, {before['date']}, commit {before['commit'] or 'unknown'}) and added the "
            "rest; every run is seeded on its own, so one invocation of the command gives the same runs.\n\n")


def write_doc(payload: dict[str, Any], doc: Path, plots: list[Path]) -> None:
    meta, s = payload["meta"], payload["meta"]["settings"]
    pre = payload["pretrain"]
    grids = "; ".join(f"batch {b}: {', '.join(f'{lr:g}' for lr in g)}" for b, g in meta.get("lr_grids", {}).items())
    images = "\n".join(f"![{p.stem}]({os.path.relpath(p, doc.parent)})" for p in plots)
    budget = s["finetune_size"] * s["epochs"]
    text = f"""# Fine-tuning a trained BatchNorm network: NormProp against BN, FrozenBN and GroupNorm

Produced by this command (from the repository root; it took {meta.get('wall_seconds', meta.get('elapsed_seconds', 0.0)) / 60:.1f} min, in {s.get('workers', 1)} worker processes of {s['threads']} torch thread each):

```
{meta['command']}
```

{_resumed_text(meta)}Every number below comes from that run ({meta['date']}, commit {meta['commit'] or 'unknown'}); the raw
records are in `{os.path.relpath(Path(s['out']) / 'results.json', doc.parent)}`, and
`.venv/bin/python tools/finetune_report.py {s['out']}/results.json --doc {doc}` rebuilds this page from them.

## Setup

- Data: {meta['data']}.
- Checkpoint: `{s['model']}` (tools/train.py's `SmallResNet`, BatchNorm after every conv) with a 5-way head,
  trained by `train.train_run` on the pretraining images: batch {s['pretrain_batch']}, lr {s['pretrain_lr']:g},
  {s['pretrain_epochs']} epochs, SGD momentum {s['momentum']}, weight decay {s['weight_decay']}, cosine schedule;
  source test accuracy {_pct(pre['final_accuracy'])}%.
- Fine-tuning: a new 5-way head (the same initial head for every variant of a seed), every parameter trained,
  {s['finetune_size']} images x {s['epochs']} passes = {budget} images at every batch size (batches in a seeded
  order, the same for every variant), SGD momentum {s['momentum']}, weight decay {s['weight_decay']} on every
  parameter (torch's default; the `+ stabilizers` variants: `normprop_fx.param_groups`, with gamma/beta decayed
  or, "no gamma/beta decay", not, and `adaptive_clip_grad_(model, {s['clip_factor']})`), cosine decay of the lr to 0.
  Test accuracy on the target test images after each pass; "step 0" is before the first step.
- Variants: BN in train mode (batch statistics; running statistics updated, used at test time); FrozenBN
  (torchvision `FrozenBatchNorm2d` with the checkpoint's statistics and affine: only convs and head train);
  GroupNorm (`opacus.validators.ModuleValidator.fix`: `GroupNorm(gcd(32, C), C)`, the BN's affine copied in);
  NormProp exact (`normprop_fx.convert(model, init="trained")`), with the stabilizers, with them but no decay on
  gamma/beta, with gamma/beta frozen (only the weights and the head train) and the stabilizers, and recalibrated (`normprop_fx.recalibrate(model, images)` on the {s['finetune_size']} fine-tuning
  images before the first step); NormProp from scratch (`convert(fresh model, init="normprop")`, paper
  initialization, stabilizers), which shows what the checkpoint is worth.
- Learning rates: one grid per batch size (the batch-32 grid scaled by (batch/32)^1/2): {grids}. Every variant
  runs the grid at seed 0; its best rate (highest final accuracy) then runs seeds 1..{s['seeds'] - 1}. A seed
  changes the head's initialization and the batch order. Means are over the {s['seeds']} seeds at the best rate.
- DP-SGD: Opacus `PrivacyEngine(accountant="rdp").make_private_with_epsilon(target_epsilon={s['dp_epsilon']:g},
  target_delta={s['dp_delta']:g}, epochs={s['dp_epochs']}, max_grad_norm={s['dp_clip']:g}, poisson_sampling=True)`
  on {s['dp_size']} images, expected batch {s['dp_batch']} (sample rate {s['dp_batch'] / s['dp_size']:.3f}), SGD
  momentum {s['momentum']}, no weight decay, constant lr from the grid {', '.join(f'{lr:g}' for lr in s['dp_lrs'])}.
- A run *diverged* when its loss became non-finite, *collapsed* when its final accuracy is below
  {100 * s['collapse_below']:.0f}% (chance is 20%). "train s" is the training time of a run (evaluation excluded).
- Machine: {meta['machine']}; load average at the end {tuple(round(x, 2) for x in meta.get('loadavg_end', ()))}
  (2 cores shared with other jobs: timings are indicative).

## Step 0: the conversion is exact

{exactness_table(payload)}

Each variant's starting point on the source task (classes 0-4, the checkpoint's head; the recalibrated
one after `recalibrate` on the {s['finetune_size']} target images): what of the checkpoint's function it keeps.

{source_table(payload)}

## Final test accuracy, mean ± sd over seeds at each variant's best learning rate (%)

{summary_table(payload)}

## Targets

{targets_text(payload)}

## Learning-rate grids (seed 0) and seeds

{grid_tables(payload)}

## DP-SGD at epsilon {s['dp_epsilon']:g}

{dp_table(payload)}

## Curves

{images}

## Notes

{training_report.notes_block(doc)}
"""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    return training_report.rebuild_main(argv, "tools/finetune.py", sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
