"""The page tools/bench.py writes (docs/bench.md): tables of times, page faults, peak memory and
ratios per model and device, each ratio judged against its target, from the runs' results files.

It only reads the results (the JSON lists of runs that tools/bench.py appends to), so a page can be
rebuilt without measuring again: ``python tools/bench.py --report-only --json FILES... --write PAGE``.
The hand-written notes below NOTES_MARKER in an existing page are kept when it is rewritten.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from tabulate import tabulate

#: Text from this line on in an existing --write file is kept when the file is re-rendered
#: (the hand-written analysis of the numbers above it).
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


def render(runs: list[dict[str, Any]], requested: list[str], gpu_command: str) -> str:
    """The page: every run, by device. ``gpu_command`` is what the CUDA section, when no CUDA run
    is among ``runs``, gives as the command that measures it."""
    out = ["# Benchmark: BatchNorm vs NormProp vs no-norm floor", ""]
    out.append("Written by `tools/bench.py` from its results file; every number below comes from the run(s) listed. "
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
        by_device.setdefault("cuda" if run["machine"]["device"] != "cpu" else "cpu", []).append(run)
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
    for variant, table in res.get("profile", {}).items():
        out += [f"Top ops of one compiled train step, {variant} (torch.profiler, by {PROFILE_SORT[device][1]}):", "", "```", table, "```", ""]
    return out


def write_page(page: Path, runs: list[dict[str, Any]], requested: list[str], json_files: list[Path]) -> None:
    """Render ``runs`` into ``page``, keeping its notes (from NOTES_MARKER on) if it has some.
    ``json_files`` are the results files the runs came from (the first one is what a run appends
    to): the CUDA section's command, while no CUDA run is among them, names them all."""
    page.parent.mkdir(parents=True, exist_ok=True)
    old = page.read_text() if page.exists() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else NOTES_MARKER + "\n"
    gpu_results = json_files[0].parent / "bench_gpu.json"
    gpu_command = " ".join(["python tools/bench.py --device cuda --json", str(gpu_results),
                            *(str(p) for p in json_files if p != gpu_results), "--write", str(page)])
    page.write_text(render(runs, requested, gpu_command) + "\n" + notes)
