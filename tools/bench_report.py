"""The pages tools/bench.py writes from the runs' results files.

- The summary (docs/bench.md): "is NormProp faster than BatchNorm?" on one screen. One table of the
  current ratios against their targets, a row per (model, torch threads), a column per target ratio
  of both modes; "current" is, per cell, the newest run (by its date) that measured that ratio,
  and the cell cites it in the runs list below the table. Then a plot of the training step's
  NormProp/BN (eager and compiled) and the folded inference ratio (eager) per model, written as a
  PNG next to the page (docs/bench_summary.png; matplotlib, the ``bench`` extra: without it the page
  says the plot was not drawn), and a link to the per-run page.
- The per-run page (docs/bench-runs.md, the summary's name + "-runs"): every run's tables of times,
  page faults, peak memory and ratios per model and device, each ratio judged against its target,
  and its profiles.

It only reads the results (the JSON lists of runs that tools/bench.py appends to), so the pages can
be rebuilt without measuring again: ``python tools/bench.py --report-only --json FILES... --write PAGE``.
The hand-written notes below NOTES_MARKER in an existing page are kept when it is rewritten, on
either page.
"""

from __future__ import annotations

import datetime
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

#: Text from this line on in an existing page (the summary or the per-run page) is kept when the
#: page is re-rendered (the hand-written analysis of the numbers above it).
NOTES_MARKER = "<!-- notes: kept by tools/bench.py when it rewrites this file -->"
#: The project's targets for compiled ratios, per device. The GPU train target holds for one setting
#: only (GPU_TARGET_SETTING); the others hold for every model and input.
TARGETS = {
    "train normprop/bn": {"cpu": 1.00, "cuda": 0.85},
    "train normprop/floor": {"cpu": 1.05, "cuda": 1.05},
    "infer normprop_folded/bn_folded": {"cpu": 1.01, "cuda": 1.01},
    # the user's module tree (docs/method.md section 9) against the one flat GraphModule: free
    "train normprop/normprop_flat": {"cpu": 1.02, "cuda": 1.02},
}
GPU_TARGET_SETTING = {"model": "resnet50", "batch_size": 128, "amp": "bf16"}
#: The targets for eager ratios (issue 19), per device and model: a model or device not listed has
#: none (its ratios are still shown).
_DEPTHWISE = ("mobilenet_v3_large", "efficientnet_b0")
EAGER_TARGETS = {
    "train normprop/bn": {"cpu": {"resnet18": 0.90, "resnet50": 0.90, **dict.fromkeys(_DEPTHWISE, 0.95)}},
    "train normprop/floor": {"cpu": {"resnet18": 1.05, "resnet50": 1.05}},
    "infer normprop_folded/bn_folded": {"cpu": dict.fromkeys(("resnet18", "resnet50", *_DEPTHWISE), 1.01)},
}


def target_for(key: str | None, mode: str, device: str, model: str, machine_info: dict[str, Any]) -> float | None:
    """The target of a ratio (a TARGETS key) in ``mode`` ("eager" or "compiled") for ``model`` in a
    run on ``device`` ("cpu" or "cuda") with ``machine_info`` (its input setting), or None where none
    is set: an eager ratio outside EAGER_TARGETS, the GPU NormProp/BN target outside its setting."""
    if key is None:
        return None
    if mode == "eager":
        return EAGER_TARGETS.get(key, {}).get(device, {}).get(model)
    if key == "train normprop/bn" and device == "cuda":
        setting = {"model": model, "batch_size": machine_info["batch_size"], "amp": machine_info["amp"]}
        if setting != GPU_TARGET_SETTING:
            return None
    return TARGETS[key][device]


#: What a profile's top ops are sorted by, per device (the profiler's key, which tools/bench.py
#: sorts by, and its name on the page): on CUDA the host time of an op is its launch.
PROFILE_SORT = {"cpu": ("self_cpu_time_total", "self CPU time"), "cuda": ("self_device_time_total", "self CUDA time")}

#: The ratios reported per model: (label, numerator, denominator, target key or None), per mode.
RATIOS = (
    ("train normprop / bn", "train/normprop", "train/bn", "train normprop/bn"),
    ("train normprop / floor", "train/normprop", "train/floor", "train normprop/floor"),
    ("train floor_bias / floor (a learned bias alone)", "train/floor_bias", "train/floor", None),
    ("train normprop / floor_bias", "train/normprop", "train/floor_bias", None),
    ("train floor_weight_norm / floor (the weight normalization alone)", "train/floor_weight_norm", "train/floor", None),
    ("train normprop / floor_weight_norm (all of NormProp but the weight normalization)", "train/normprop",
     "train/floor_weight_norm", None),
    ("train normprop / normprop_inductor_defaults", "train/normprop", "train/normprop_inductor_defaults", None),
    ("train normprop / normprop_flat (module tree vs flat graph)", "train/normprop", "train/normprop_flat",
     "train normprop/normprop_flat"),
    ("infer normprop_folded / bn_folded", "infer/normprop_folded", "infer/bn_folded", "infer normprop_folded/bn_folded"),
    ("infer normprop / bn, unfolded", "infer/normprop", "infer/bn", None),
)


def ratio_of_medians(res: dict[str, Any], a: str, b: str) -> float | None:
    med = res["median_ms"]
    return med[a] / med[b] if a in med and b in med else None


def median_of_paired_ratios(res: dict[str, Any], a: str, b: str) -> float | None:
    """Median over rounds of a/b measured in the same round: robust to load that changes
    between rounds on a shared machine."""
    times = res["all_ms"]
    if a not in times or b not in times:
        return None
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def fmt_ratio(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def verdict(value: float | None, target: float | None) -> str:
    if value is None or target is None:
        return ""
    return "met" if value <= target else "missed"


def device_of(machine_info: dict[str, Any]) -> str:
    """"cpu" or "cuda": the kind of device a run measured on (its record names the GPU)."""
    return "cpu" if machine_info["device"] == "cpu" else "cuda"


def render(runs: list[dict[str, Any]], requested: list[str], gpu_command: str, summary: str | None = None) -> str:
    """The per-run page: every run, by device. ``gpu_command`` is what the CUDA section, when no CUDA
    run is among ``runs``, gives as the command that measures it; ``summary``, the summary page's
    address relative to this one, is linked at the top."""
    out = ["# Benchmark runs: BatchNorm vs NormProp vs no-norm floor", ""]
    if summary is not None:
        out += [f"The current ratios against their targets, in one table and a plot: [{summary}]({summary}).", ""]
    out.append("Written by `tools/bench.py` from its results files; every number below comes from the run(s) listed. "
               "Times are medians over interleaved rounds of the time per step, in ms. Ratios come from the same "
               "run, two ways: the ratio of the two medians, and the median over rounds of the ratio measured within "
               "one round (robust to load that changes between rounds); the verdict uses the latter. `floor` = the same network with every BatchNorm replaced by `nn.Identity`; "
               "`floor_bias` (training) = every BatchNorm replaced by a learned per-channel bias, what NormProp's beta "
               "costs by itself; minor page faults per step show what the allocator cost each variant; "
               "`bn_folded` = `torch.fx.experimental.optimization.fuse` (conv-BN folding) of the eval model; "
               "`normprop_folded` = `normprop_fx.fold` of the conversion. Compiled = `torch.compile` (inductor, "
               "default mode) via `normprop_fx.compile`.")
    out.append("")
    by_device: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_device.setdefault(device_of(run["machine"]), []).append(run)
    for device in ("cpu", "cuda"):
        out.append(f"## {device.upper()}")
        out.append("")
        device_runs = by_device.get(device, [])
        if not device_runs:
            out += render_unmeasured_targets(device, gpu_command)
            continue
        for run in device_runs:
            m = run["machine"]
            out.append(f"Run of {m['date']}: `{m['command']}`")
            out.append("")
            out.append(f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, device {m['device']}; "
                       f"torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}")
            out.append(f"- torch threads: {m['threads']}; load average (1, 5, 15 min) at start: "
                       f"{', '.join(f'{v:.2f}' for v in m['loadavg_start'])} (the machine is shared)")
            out.append(f"- input: batch {m['batch_size']}, {m['image_size']}x{m['image_size']}, amp {m['amp']}, "
                       f"channels_last {m['channels_last']}; {m['rounds']} rounds x {m['iters']} steps per variant, "
                       f"{m['warmup']} warm-up steps")
            if "malloc" in m:
                out.append(f"- allocator: {m['malloc']}")
            if m.get("inductor_config"):
                out.append("- inductor config (all variants): "
                           + ", ".join(f"`{k}={v!r}`" for k, v in m["inductor_config"].items()))
            out.append("")
            for res in run["results"]:
                out += render_model(res, device, m)
        measured = {res["model"] for run in device_runs for res in run["results"]}
        missing = [name for name in requested if name not in measured]
        if missing:
            out.append(f"Not measured on {device.upper()}: {', '.join(missing)} (see the closing note).")
            out.append("")
    return "\n".join(out) + "\n"


def render_unmeasured_targets(device: str, gpu_command: str) -> list[str]:
    """The section of a device no run measured: its target rows, each "not measured"."""
    out = ["Not measured: no such device was available for the runs behind this file."]
    if device == "cuda":
        out[0] += (f" Measure it on a CUDA machine with `{gpu_command}` (its defaults: batch 128, 224x224, "
                   "bf16 autocast, channels_last).")
    rows = []
    for label, _num, _den, key in RATIOS:
        if key is not None:
            setting = ""
            if device == "cuda" and key == "train normprop/bn":
                g = GPU_TARGET_SETTING
                setting = f", {g['model']}, batch {g['batch_size']}, {g['amp']}"
            rows.append([f"{label} (compiled{setting})", "not measured", f"<= {TARGETS[key][device]:.2f}"])
    for label, _num, _den, key in RATIOS:
        for model, target in EAGER_TARGETS.get(key, {}).get(device, {}).items():
            rows.append([f"{label} (eager, {model})", "not measured", f"<= {target:.2f}"])
    return out + ["", tabulate(rows, headers=["target ratio", "median of per-round ratios", "target"],
                               tablefmt="github", disable_numparse=True), ""]


def render_model(res: dict[str, Any], device: str, machine_info: dict[str, Any]) -> list[str]:
    """One model's tables from a run on ``device`` with ``machine_info`` (its input setting)."""
    med = res["median_ms"]
    out = [f"### {res['model']}", ""]
    if "sizes" in res:
        sz = res["sizes"]
        out.append(f"Parameters {sz['parameters']:,}; NormProp normalizes {sz['normprop_weight_elements']:,} weight "
                   f"elements per step; the BatchNorms reduce over {sz['batchnorm_input_elements']:,} activation "
                   f"elements per step at this input size. Load average at the end of this model: "
                   f"{', '.join(f'{v:.2f}' for v in res['loadavg_end'])}.")
        out.append("")
    rows = []
    faults = res.get("page_faults_per_step", {})
    peaks = res.get("peak_memory_mib", {})
    for key in med:
        workload, variant, mode = key.split("/")
        rows.append([workload, variant, mode, f"{med[key]:.1f}", f"{res['warmup_s'][key]:.1f}",
                     f"{faults[key]:.0f}" if key in faults else "not recorded"] + ([f"{peaks[key]:.0f}"] if peaks else []))
    headers = ["workload", "variant", "mode", "median ms/step", "warm-up s", "minor page faults/step (median)"]
    out.append(tabulate(rows, headers=headers + (["peak tensor MiB (one step)"] if peaks else []),
                        tablefmt="github", disable_numparse=True))
    out.append("")
    ratio_rows = []
    measured_modes = {key.rsplit("/", 1)[1] for key in med}
    for mode in ("compiled", "eager"):
        if mode not in measured_modes:
            continue  # no target row of a mode the run did not measure
        for label, num, den, target_key in RATIOS:
            a, b = f"{num}/{mode}", f"{den}/{mode}"
            target = target_for(target_key, mode, device, res["model"], machine_info)
            paired = median_of_paired_ratios(res, a, b)
            if paired is None and target is None:
                continue  # a diagnostic ratio of variants this run did not measure
            ratio_rows.append([f"{label} ({mode})", fmt_ratio(ratio_of_medians(res, a, b)), fmt_ratio(paired),
                               "" if target is None else f"<= {target:.2f}", verdict(paired, target)])
    out.append(tabulate(ratio_rows, headers=["ratio", "of medians", "median of per-round ratios", "target", "verdict (per-round)"],
                        tablefmt="github", disable_numparse=True))
    out.append("")
    for key, table in res.get("profile", {}).items():
        variant, _, mode = key.partition(", ")  # "normprop" (compiled) or "normprop, eager"
        out += [f"Top ops of one {mode or 'compiled'} train step, {variant} (torch.profiler, by {PROFILE_SORT[device][1]}):",
                "", "```", table, "```", ""]
    return out


# --- the summary page --------------------------------------------------------------------------

#: The benchmark's models in the order the summary lists and plots them: the ResNet depth sweep,
#: then the two depthwise models (tools/bench.py's default --models).
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "efficientnet_b0")
#: The summary table's columns, the target ratios of both modes: (mode, target key, header).
SUMMARY_COLUMNS = tuple(
    (mode, key, f"{mode} {header}") for mode in ("eager", "compiled") for key, header in (
        ("train normprop/bn", "train NormProp/BN"), ("train normprop/floor", "train NormProp/floor"),
        ("infer normprop_folded/bn_folded", "infer folded NormProp/folded BN")))
#: The summary plot's panels: (mode, target key, title).
SUMMARY_PLOT = (
    ("eager", "train normprop/bn", "train step, eager: NormProp / BN"),
    ("compiled", "train normprop/bn", "train step, compiled: NormProp / BN"),
    ("eager", "infer normprop_folded/bn_folded", "inference, eager: folded NormProp / folded BN"),
)
PLOT_ALT = "NormProp/BN per training step, eager and compiled, and folded inference, eager, per model"
#: The summary's plot line where there is no plot (matplotlib is an optional extra).
PLOT_NOT_DRAWN = "Plot not drawn: matplotlib is not installed (`pip install -e \".[bench]\"`)."
#: (numerator, denominator) of the ratio each target key names.
_RATIO_PARTS = {key: (num, den) for _label, num, den, key in RATIOS if key is not None}


@dataclass(frozen=True)
class Cell:
    """One current ratio of the summary: the median of its per-round ratios, its target (None where
    none is set) and the index, in the runs rendered, of the run it comes from."""

    value: float
    target: float | None
    run: int


#: A summary row: (device, model, torch threads).
Row = tuple[str, str, int]


def run_date(run: dict[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(run["machine"]["date"])


def current_cells(runs: list[dict[str, Any]]) -> dict[Row, dict[tuple[str, str], Cell]]:
    """Row -> (mode, target key) -> the Cell from the newest run (by machine.date) that measured that
    ratio; of two runs with the same date, the later one in ``runs``. A row only for what was measured."""
    cells: dict[Row, dict[tuple[str, str], Cell]] = {}
    for i in sorted(range(len(runs)), key=lambda i: run_date(runs[i])):  # older first: newer ones overwrite
        m = runs[i]["machine"]
        for res in runs[i]["results"]:
            for mode, key, _header in SUMMARY_COLUMNS:
                num, den = _RATIO_PARTS[key]
                value = median_of_paired_ratios(res, f"{num}/{mode}", f"{den}/{mode}")
                if value is not None:
                    target = target_for(key, mode, device_of(m), res["model"], m)
                    cells.setdefault((device_of(m), res["model"], m["threads"]), {})[(mode, key)] = Cell(value, target, i)
    return cells


def summary_models(cells: dict[Row, Any], requested: list[str]) -> list[str]:
    """The models the summary lists and plots: those of MODELS that were requested or measured, in
    MODELS' order, then any others in the order they were requested or measured."""
    seen = list(dict.fromkeys([*requested, *(model for _device, model, _threads in cells)]))
    return [m for m in MODELS if m in seen] + [m for m in seen if m not in MODELS]


def summary_rows(cells: dict[Row, Any], models: list[str]) -> list[Row]:
    """The rows of ``cells``: CPU before CUDA, by model in the order of ``models``, then by threads."""
    return sorted(cells, key=lambda row: (row[0] != "cpu", models.index(row[1]), row[2]))


def cited_runs(runs: list[dict[str, Any]], cells: dict[Row, dict[tuple[str, str], Cell]]) -> list[int]:
    """The indices of the runs the cells come from, newest first: the summary's "Runs" list, whose
    position + 1 is the number a cell cites."""
    cited = {cell.run for row in cells.values() for cell in row.values()}
    return sorted(cited, key=lambda i: run_date(runs[i]), reverse=True)


def fmt_cell(cell: Cell | None, number: dict[int, int]) -> str:
    """``0.873 (<= 0.90, met) [2]``: the ratio, its target and verdict, the number of its run."""
    if cell is None:
        return "not measured"
    judged = "" if cell.target is None else f" (<= {cell.target:.2f}, {verdict(cell.value, cell.target)})"
    return f"{cell.value:.3f}{judged} [{number[cell.run]}]"


def summary_answer(cells: dict[Row, dict[tuple[str, str], Cell]]) -> list[str]:
    """The lines that answer the page's question from the cells: NormProp/BN per training step in each
    mode, and how many of the targets the cells have are met."""
    out = []
    for mode in ("eager", "compiled"):
        values = [row[(mode, "train normprop/bn")].value for row in cells.values() if (mode, "train normprop/bn") in row]
        if values:
            faster = sum(v < 1 for v in values)
            out.append(f"- Training step, {mode}: NormProp takes {min(values):.2f}-{max(values):.2f}x BatchNorm's time; "
                       f"faster (below 1) in {faster} of {len(values)} rows.")
        else:
            out.append(f"- Training step, {mode}: not measured.")
    judged = [cell for row in cells.values() for cell in row.values() if cell.target is not None]
    met = sum(cell.value <= cell.target for cell in judged)
    out.append(f"- Targets: {met} of the {len(judged)} cells with a target are met.")
    return out


def render_summary(runs: list[dict[str, Any]], requested: list[str], runs_page: str, plot: str,
                   sources: list[str] | None = None) -> str:
    """The summary page: the current ratios against their targets, in one table whose every cell
    cites the run it comes from, the list of those runs, ``plot`` (the markdown of the plot, or the
    line saying why there is none) and a link to ``runs_page``. ``sources``: the results file of
    each run, named in the runs list."""
    cells = current_cells(runs)
    models = summary_models(cells, requested)
    cited = cited_runs(runs, cells)
    number = {run: k + 1 for k, run in enumerate(cited)}
    out = ["# Benchmark summary: is NormProp faster than BatchNorm?", ""]
    out.append("Written by `tools/bench.py` from its results files, with every run's tables, profiles and notes in "
               f"[{runs_page}]({runs_page}). A cell is the current ratio of NormProp's time per step to the "
               "reference's: the median over interleaved rounds of the ratio measured within one round, from the "
               "newest run that measured it ([n]: its number in the runs list below). Below 1 NormProp is faster. "
               "In brackets: the target and whether the ratio meets it; a ratio without brackets has no target. "
               "`floor` = the same network with every BatchNorm replaced by `nn.Identity`; folded = conv-BN "
               "folding of the eval model (BN) and `normprop_fx.fold` (NormProp). Compiled = `torch.compile` "
               "via `normprop_fx.compile`.")
    out += ["", *summary_answer(cells), ""]
    table = [[device, model, threads, *(fmt_cell(cells[(device, model, threads)].get((mode, key)), number)
                                        for mode, key, _header in SUMMARY_COLUMNS)]
             for device, model, threads in summary_rows(cells, models)]
    out.append(tabulate(table, headers=["device", "model", "threads", *(h for _m, _k, h in SUMMARY_COLUMNS)],
                        tablefmt="github", disable_numparse=True))
    out.append("")
    measured = {model for _device, model, _threads in cells}
    missing = [model for model in models if model not in measured]
    if missing:
        out += [f"Not measured: {', '.join(missing)}.", ""]
    if not any(device == "cuda" for device, _model, _threads in cells):
        out += [f"CUDA: not measured; the command that measures it is in [{runs_page}]({runs_page}), section CUDA.", ""]
    out += ["## Runs", "", "The runs the cells come from, newest first:", ""]
    for run in cited:
        out.append(f"- [{number[run]}] {describe_run(runs[run]['machine'])}"
                   + (f", in `{sources[run]}`" if sources else "") + f": `{runs[run]['machine']['command']}`")
    out += ["", "## Plot", "", plot, "", f"Every run's tables, profiles and notes: [{runs_page}]({runs_page}).", ""]
    return "\n".join(out)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def describe_run(m: dict[str, Any]) -> str:
    """One line of where and how a run measured, for the summary's runs list."""
    return (f"{m['date']}, torch {m['torch']}, {m['device']} ({m['cpu']}, {plural(m['threads'], 'thread')}), "
            f"batch {m['batch_size']}, {m['image_size']}x{m['image_size']}, amp {m['amp']}, "
            f"{plural(m['rounds'], 'round')} of {plural(m['iters'], 'step')} per variant")


def draw_summary_plot(cells: dict[Row, dict[tuple[str, str], Cell]], models: list[str], png: Path) -> None:
    """Draw the summary plot into ``png``: a panel per SUMMARY_PLOT ratio, its value per model (x) with one
    marker per (device, threads), and each model's target as a short dashed line. Raises ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(device, threads) for device, _model, threads in cells}, key=lambda s: (s[0] != "cpu", s[1]))
    devices = list(dict.fromkeys(device for device, _threads in settings)) or ["cpu"]
    at_gpu_setting = {"batch_size": GPU_TARGET_SETTING["batch_size"], "amp": GPU_TARGET_SETTING["amp"]}
    fig, axes = plt.subplots(1, len(SUMMARY_PLOT), figsize=(5 * len(SUMMARY_PLOT), 4.2), squeeze=False)
    for ax, (mode, key, title) in zip(axes[0], SUMMARY_PLOT):
        ax.axhline(1.0, color="black", linewidth=0.6, alpha=0.4)
        for device, style in zip(devices, ("--", ":")):
            targets = [(x, target_for(key, mode, device, model, at_gpu_setting)) for x, model in enumerate(models)]
            targets = [(x, t) for x, t in targets if t is not None]
            ax.hlines([t for _x, t in targets], [x - 0.35 for x, _t in targets], [x + 0.35 for x, _t in targets],
                      colors="tab:red", linestyles=style, label=f"target ({device})" if targets else None)
        for (device, threads), marker in zip(settings, "osD^v<>p*"):
            points = [(x, cells[(device, model, threads)][(mode, key)].value) for x, model in enumerate(models)
                      if (mode, key) in cells.get((device, model, threads), {})]
            if points:
                ax.plot(*zip(*points), linestyle="none", marker=marker, label=f"{device}, {plural(threads, 'thread')}")
        measured = {model for (_device, model, _threads), row in cells.items() if (mode, key) in row}
        labels = [model if model in measured else f"{model}\n(not measured)" for model in models]
        ax.set_xticks(range(len(models)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("median of per-round ratios")
        ax.grid(alpha=0.3, axis="y")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110, metadata={"Software": None})  # no version stamp: a re-render gives the same file
    plt.close(fig)


# --- writing the pages -------------------------------------------------------------------------


def runs_page_for(page: Path) -> Path:
    """The per-run page written next to the summary ``page``: docs/bench.md -> docs/bench-runs.md."""
    return page.with_name(f"{page.stem}-runs.md")


def plot_for(page: Path) -> Path:
    """The summary plot written next to the summary ``page``: docs/bench.md -> docs/bench_summary.png."""
    return page.with_name(f"{page.stem}_summary.png")


def write_keeping_notes(page: Path, text: str) -> None:
    """Write ``text`` into ``page``, followed by its notes (from NOTES_MARKER on) if it has some."""
    page.parent.mkdir(parents=True, exist_ok=True)
    old = page.read_text() if page.exists() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else NOTES_MARKER + "\n"
    page.write_text(text + "\n" + notes)


def write_pages(page: Path, runs: list[dict[str, Any]], requested: list[str], json_files: list[Path],
                sources: list[str] | None = None) -> list[Path]:
    """Render ``runs`` into the summary ``page``, the per-run page next to it (runs_page_for) and the
    summary plot (plot_for), keeping each page's notes; returns what was written. ``json_files`` are
    the results files the runs came from (the first one is what a run appends to): the CUDA section's
    command, while no CUDA run is among them, names them all. ``sources``: each run's file."""
    runs_page, png = runs_page_for(page), plot_for(page)
    gpu_results = json_files[0].parent / "bench_gpu.json"
    gpu_command = " ".join(["python tools/bench.py --device cuda --json", str(gpu_results),
                            *(str(p) for p in json_files if p != gpu_results), "--write", str(page)])
    write_keeping_notes(runs_page, render(runs, requested, gpu_command, summary=page.name))
    cells = current_cells(runs)
    try:
        draw_summary_plot(cells, summary_models(cells, requested), png)
        plot, drawn = f"![{PLOT_ALT}]({png.name})", [png]
    except ImportError:
        plot, drawn = PLOT_NOT_DRAWN, []
    write_keeping_notes(page, render_summary(runs, requested, runs_page.name, plot, sources))
    return [page, runs_page, *drawn]
