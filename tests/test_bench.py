"""tools/bench.py end to end on a tiny input: what it records and renders, and its argument errors;
tools/bench_report.py's two pages (the summary and the per-run page) from synthetic results."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import bench_report
import pytest
import torch
import torch._inductor.config as inductor_config

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench.py"


def load_bench():
    """tools/bench.py as a module, for its functions (registered in sys.modules, where its
    dataclass looks its module up)."""
    spec = importlib.util.spec_from_file_location("bench_tool", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_tool"] = bench
    spec.loader.exec_module(bench)
    return bench


def load_tool(name: str):
    """tools/<name>.py as a module (one that needs no sys.modules entry, unlike tools/bench.py)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_tiny_run_records_times_page_faults_and_the_allocator(tmp_path):
    results, page, runs_page = tmp_path / "r.json", tmp_path / "bench.md", tmp_path / "bench-runs.md"
    done = run_bench("--models", "resnet18", "--batch-size", "2", "--image-size", "32", "--rounds", "2", "--iters", "1",
                     "--warmup", "0", "--modes", "eager", "--workloads", "train", "--json", str(results), "--write", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(results.read_text())
    (res,) = run["results"]
    keys = {f"train/{v}/eager" for v in ("bn", "normprop", "floor", "floor_bias")}
    assert set(res["median_ms"]) == keys and set(res["page_faults_per_step"]) == keys
    assert all(len(v) == 2 and min(v) > 0 for v in res["all_ms"].values())
    assert run["machine"]["malloc"].startswith(("glibc mallopt", "default"))
    text = runs_page.read_text()  # --write's page is the summary; the runs' tables are next to it
    assert "minor page faults/step" in text and f"- allocator: {run['machine']['malloc']}" in text
    assert "| train normprop / bn (eager)" in text and "| train normprop / floor_bias (eager)" in text
    summary = page.read_text()
    (cells,) = summary_table(summary).values()  # the one row: resnet18, 1 thread, eager train measured only
    assert cells[0].endswith("[1]") and "(<= 0.90, " in cells[0] and cells[2:] == ["not measured"] * 4
    assert f"- [1] {run['machine']['date']}, torch {torch.__version__}" in summary


def test_eager_run_profiles_the_eager_step(tmp_path):
    """--profile with --modes eager records the eager step's top ops, under "variant, eager", and
    the runs page titles it so."""
    results, page = tmp_path / "r.json", tmp_path / "bench.md"
    done = run_bench("--models", "resnet18", "--batch-size", "2", "--image-size", "32", "--rounds", "1", "--iters", "1",
                     "--warmup", "1", "--modes", "eager", "--workloads", "train", "--train-variants", "floor,normprop",
                     "--profile", "--profile-variants", "normprop", "--json", str(results), "--write", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(results.read_text())
    (res,) = run["results"]
    assert set(res["profile"]) == {"normprop, eager"} and "convolution" in res["profile"]["normprop, eager"]
    assert "Top ops of one eager train step, normprop (torch.profiler" in (tmp_path / "bench-runs.md").read_text()


def test_compiled_run_applies_and_records_inductor_config_and_profiles_the_variants_asked_for(tmp_path):
    results, page = tmp_path / "r.json", tmp_path / "bench.md"
    done = run_bench("--models", "resnet18", "--batch-size", "2", "--image-size", "32", "--rounds", "1", "--iters", "1",
                     "--warmup", "1", "--modes", "compiled", "--workloads", "train",
                     "--train-variants", "floor_bias,normprop,normprop_inductor_defaults", "--profile", "--profile-variants",
                     "floor_bias", "--inductor-config", "cpp.max_horizontal_fusion_size=8", "--peak-memory", "--json", str(results),
                     "--write", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(results.read_text())
    (res,) = run["results"]
    assert run["machine"]["inductor_config"] == {"cpp.max_horizontal_fusion_size": 8}
    assert set(res["median_ms"]) == {f"train/{v}/compiled" for v in ("floor_bias", "normprop", "normprop_inductor_defaults")}
    assert set(res["profile"]) == {"floor_bias"} and "convolution" in res["profile"]["floor_bias"]
    # a training step holds at least its input batch's activations: 2 x 64 x 16 x 16 floats after the stem
    assert set(res["peak_memory_mib"]) == set(res["median_ms"]) and min(res["peak_memory_mib"].values()) > 2 * 64 * 16 * 16 * 4 / 2**20
    text = (tmp_path / "bench-runs.md").read_text()
    assert "peak tensor MiB (one step)" in text
    assert "- inductor config (all variants): `cpp.max_horizontal_fusion_size=8`" in text
    assert "| train normprop / normprop_inductor_defaults (compiled)" in text
    assert "| train normprop / bn (compiled)" in text and "not measured" in text  # a target row stays, unmeasured
    assert "| train floor_bias / floor" not in text  # a diagnostic row of variants not run is left out
    assert "Top ops of one compiled train step, floor_bias" in text


def test_inductor_settings_are_parsed_and_set():
    bench = load_bench()
    settings = dict(map(bench.inductor_setting, ["reorder_for_peak_memory=False", "cpp.max_horizontal_fusion_size=3"]))
    assert settings == {"reorder_for_peak_memory": False, "cpp.max_horizontal_fusion_size": 3}
    with inductor_config.patch(settings):  # restores both afterwards
        inductor_config.reorder_for_peak_memory, inductor_config.cpp.max_horizontal_fusion_size = True, 16
        bench.apply_inductor_config(settings)
        assert inductor_config.reorder_for_peak_memory is False
        assert inductor_config.cpp.max_horizontal_fusion_size == 3


def test_report_only_renders_results_recorded_before_page_faults_were(tmp_path):
    old = json.loads((ROOT / "docs" / "bench_results.json").read_text())
    for run in old:
        run["machine"].pop("malloc", None)
        for res in run["results"]:
            res.pop("page_faults_per_step", None)
    results, page = tmp_path / "old.json", tmp_path / "bench.md"
    results.write_text(json.dumps(old))
    done = run_bench("--report-only", "--json", str(results), "--write", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not recorded" in (tmp_path / "bench-runs.md").read_text()


def test_bad_arguments_exit_2(capsys):
    # one run of the command line itself (the exit status), the rest through parse_args in
    # this process: each run of the tool imports torch and torchvision again (~5 s)
    assert run_bench("--models", "resnet_nonexistent", "--report-only").returncode == 2
    bench = load_bench()

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args(list(args))
        assert exit_.value.code == 2, args
        return capsys.readouterr().err

    refused("--rounds", "0", "--report-only")
    refused("--profile-variants", "bn,batchnorm", "--report-only")
    refused("--train-variants", "bn,nothing", "--report-only")
    refused("--train-variants", ",", "--report-only")
    for refinement in ("--profile-shapes", "--kernel-profile"):  # each refines --profile, and does nothing alone
        assert "pass --profile too" in refused(refinement, "--report-only"), refinement
    for setting in ("no_such_setting=1", "cpp.no_such_setting=1", "reorder_for_peak_memory=1",
                    "reorder_for_peak_memory=maybe", "reorder_for_peak_memory"):
        assert "--inductor-config" in refused("--inductor-config", setting, "--report-only"), setting


def test_gpu_recipe_steps_run_in_bf16_and_channels_last_on_cpu():
    """The GPU defaults (bf16 autocast, channels_last) through the same make_step, on the CPU:
    the one part of the GPU run that can be checked without a GPU."""
    bench = load_bench()
    args = bench.parse_args(["--models", "resnet18", "--device", "cpu", "--amp", "bf16", "--channels-last",
                             "--batch-size", "2", "--image-size", "32", "--modes", "eager"])
    built = bench.build_models("resnet18", ["train", "infer"], ["bn", "normprop"])
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (2,))
    seen: list[torch.Tensor] = []
    for workload, variants in (("train", built["train"]), ("infer", built["infer"])):
        for variant, model in variants.items():
            hook = model.register_forward_hook(lambda m, i, o: seen.append(o))
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            bench.make_step(workload, model, "eager", args, x, y)()
            hook.remove()
            assert seen.pop().dtype == torch.bfloat16, (workload, variant)  # the logits: autocast took the Linear
            first_filters = next(p for p in model.parameters() if p.dim() == 4)
            assert first_filters.is_contiguous(memory_format=torch.channels_last), (workload, variant)
            assert not first_filters.is_contiguous(), (workload, variant)
            after = dict(model.named_parameters())
            assert all(torch.isfinite(p).all() for p in after.values()), (workload, variant)
            changed = any(not torch.equal(before[n], p) for n, p in after.items())
            assert changed == (workload == "train"), (workload, variant)
    # a CUDA run's profile is sorted by device time: a key the profiler takes (zero time on CPU)
    table = bench.profile_top_ops(bench.make_step("train", built["train"]["normprop"], "eager", args, x, y), "cuda")
    assert "Name" in table and "aten::" in table


def test_gpu_targets_are_judged_on_cuda_runs_and_listed_unmeasured_without_one(tmp_path):
    targets_run = json.loads((ROOT / "docs" / "bench_targets.json").read_text())[0]
    results, page, runs_page = tmp_path / "r.json", tmp_path / "bench.md", tmp_path / "bench-runs.md"
    results.write_text(json.dumps([targets_run]))
    assert run_bench("--report-only", "--json", str(results), "--write", str(page)).returncode == 0
    cuda_section = runs_page.read_text().split("## CUDA")[1]
    assert "| train normprop / bn (compiled, resnet50, batch 128, bf16) | not measured" in " ".join(cuda_section.split())
    assert "<= 0.85" in cuda_section and "<= 1.05" in cuda_section and "<= 1.01" in cuda_section
    assert f"--json {tmp_path / 'bench_gpu.json'} {results} --write {page}" in cuda_section

    # the same times, recorded as a CUDA run at the GPU target's setting and at another batch size
    for batch, gpu_target in ((128, True), (64, False)):
        run = json.loads(json.dumps(targets_run))
        run["machine"].update(device="NVIDIA H100 80GB HBM3", batch_size=batch, amp="bf16")
        results.write_text(json.dumps([run]))
        assert run_bench("--report-only", "--json", str(results), "--write", str(page)).returncode == 0
        cpu_section, cuda_section = runs_page.read_text().split("## CUDA")
        assert "Not measured: no such device" in cpu_section
        by_model = dict(part.split("\n", 1) for part in cuda_section.split("### ")[1:])
        rows = {name: next(line for line in text.splitlines() if line.startswith("| train normprop / bn (compiled)"))
                for name, text in by_model.items()}
        assert ("<= 0.85" in rows["resnet50"]) == gpu_target, rows["resnet50"]
        assert "<= 1.00" not in rows["resnet50"] and "<= 0.85" not in rows["resnet18"]  # 0.85 is resnet50's only
        assert ("missed" in rows["resnet50"]) == gpu_target  # the CPU times, 0.926 by the per-round ratio
        assert "<= 1.05" in next(line for line in by_model["resnet18"].splitlines()
                                 if line.startswith("| train normprop / floor (compiled)"))
        summary = summary_table(page.read_text())
        assert ("(<= 0.85, missed) [1]" in summary[("cuda", "resnet50", "1")][3]) == gpu_target
        assert summary[("cuda", "resnet18", "1")][3].endswith("[1]") and "<=" not in summary[("cuda", "resnet18", "1")][3]


def test_profile_by_input_shapes_splits_an_op_by_the_shapes_it_ran_on():
    """--profile-shapes: one row per op and input shapes, so two convs of one step are told apart."""
    bench = load_bench()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 5, 1))
    x = torch.randn(2, 3, 9, 9)
    table = bench.profile_top_ops(lambda: model(x), "cpu", by_shapes=True)
    assert "Input Shapes" in table
    assert "[[2, 3, 9, 9], [4, 3, 3, 3]" in table and "[[2, 4, 7, 7], [5, 4, 1, 1]" in table
    assert "Input Shapes" not in bench.profile_top_ops(lambda: model(x), "cpu")


# --- rendering from synthetic results ----------------------------------------------------------


def synthetic_result(model: str, ratios: dict[str, tuple[float, float, float]]) -> dict:
    """One model's results in which, per mode, NormProp's train step takes (NormProp/BN,
    NormProp/floor) times the reference's and its folded inference (folded NormProp/folded BN)
    times, in every one of 3 rounds: ``ratios`` is mode -> those three."""
    bn, floor, bn_folded = [100.0, 110.0, 90.0], [102.0, 104.0, 93.0], [50.0, 40.0, 60.0]  # ms per round
    times: dict[str, list[float]] = {}
    for mode, (over_bn, over_floor, folded) in ratios.items():
        normprop = [t * over_bn for t in bn]
        times |= {f"train/bn/{mode}": bn, f"train/normprop/{mode}": normprop,
                  f"train/floor/{mode}": [t / over_floor for t in normprop],
                  f"infer/bn_folded/{mode}": bn_folded, f"infer/normprop_folded/{mode}": [t * folded for t in bn_folded]}
    return {"model": model, "median_ms": {k: statistics.median(v) for k, v in times.items()}, "all_ms": times,
            "warmup_s": dict.fromkeys(times, 1.0)}


def synthetic_run(date: str, torch_version: str, results: list[dict], threads: int = 1,
                  command: str = "tools/bench.py") -> dict:
    machine = {"date": date, "cpu": "test CPU", "logical_cpus": 2, "threads": threads, "loadavg_start": [1.0, 1.0, 1.0],
               "torch": torch_version, "torchvision": "0.29", "python": "3.11", "device": "cpu", "batch_size": 16,
               "image_size": 128, "amp": "none", "channels_last": False, "rounds": 3, "iters": 1, "warmup": 1,
               "command": command}
    return {"machine": machine, "results": results}


def summary_table(text: str) -> dict[tuple[str, str, str], list[str]]:
    """The summary page's table: (device, model, threads) -> its six ratio cells."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(("| cpu ", "| cuda "))]
    return {tuple(row[:3]): row[3:] for row in rows}


def ratio_row(text: str, label: str) -> list[str]:
    """The cells of the ratio row ``label`` (e.g. "train normprop / bn (eager)") of a per-run table."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_eager_ratios_are_judged_against_the_eager_targets_per_model():
    eager_and_compiled = {"eager": (0.85, 1.07, 1.005), "compiled": (0.97, 1.02, 1.02)}
    run = synthetic_run("2026-12-01T00:00:00", "2.14.1", [
        synthetic_result("resnet18", eager_and_compiled),
        synthetic_result("mobilenet_v3_large", {"eager": (0.97, 1.2, 0.99)}),
        synthetic_result("resnet34", {"eager": (0.80, 1.0, 1.0)})])
    text = bench_report.render([run], ["resnet18", "mobilenet_v3_large", "resnet34"], "gpu command")
    resnet18, mobilenet, resnet34 = (part for part in text.split("### ")[1:])
    assert ratio_row(resnet18, "train normprop / bn (eager)")[2:] == ["0.850", "<= 0.90", "met"]
    assert ratio_row(resnet18, "train normprop / floor (eager)")[2:] == ["1.070", "<= 1.05", "missed"]
    assert ratio_row(resnet18, "infer normprop_folded / bn_folded (eager)")[2:] == ["1.005", "<= 1.01", "met"]
    assert ratio_row(resnet18, "train normprop / bn (compiled)")[2:] == ["0.970", "<= 1.00", "met"]  # unchanged
    assert ratio_row(mobilenet, "train normprop / bn (eager)")[2:] == ["0.970", "<= 0.95", "missed"]
    assert ratio_row(mobilenet, "train normprop / floor (eager)")[2:] == ["1.200", "", ""]  # resnet18 and resnet50 only
    assert "(compiled)" not in mobilenet  # no target row of a mode the run did not measure
    assert ratio_row(resnet34, "train normprop / bn (eager)")[2:] == ["0.800", "", ""]  # no target, still shown


def test_summary_takes_each_cell_from_the_newest_run_that_measured_it():
    def without(result: dict, workload: str) -> dict:
        """``result`` without the times of ``workload`` ("infer" or "train")."""
        keep = {k: v for k, v in result["all_ms"].items() if not k.startswith(workload)}
        return result | {"all_ms": keep, "median_ms": {k: result["median_ms"][k] for k in keep}}

    old = synthetic_run("2026-11-25T04:00:00", "2.15.0+cu132", [
        synthetic_result("resnet18", {"eager": (0.85, 1.02, 1.00), "compiled": (0.95, 1.00, 1.00)}),
        synthetic_result("mobilenet_v3_large", {"eager": (0.97, 1.10, 1.02)}),
        synthetic_result("resnet34", {"eager": (0.80, 1.00, 1.00)})], command="tools/bench.py --json old.json")
    new = synthetic_run("2026-11-30T06:00:00", "2.14.1+cu130",
                        [without(synthetic_result("resnet18", {"compiled": (0.90, 0.96, 1.0)}), "infer")],
                        command="tools/bench.py --json new.json")
    two_threads = synthetic_run("2026-11-20T00:00:00", "2.15.0+cu132",
                                [synthetic_result("resnet18", {"eager": (0.70, 1.0, 1.0)})], threads=2)
    runs = [new, two_threads, old]  # not in date order: the dates decide
    text = bench_report.render_summary(runs, ["resnet101", "resnet18"], "bench-runs.md", "(plot)",
                                       ["new.json", "threads.json", "old.json"])
    table = summary_table(text)
    assert list(table) == [("cpu", "resnet18", "1"), ("cpu", "resnet18", "2"), ("cpu", "resnet34", "1"),
                           ("cpu", "mobilenet_v3_large", "1")]  # MODELS' order, then threads
    # the newest run measured compiled training only: the rest of the row comes from the older run
    assert table[("cpu", "resnet18", "1")] == [
        "0.850 (<= 0.90, met) [2]", "1.020 (<= 1.05, met) [2]", "1.000 (<= 1.01, met) [2]",
        "0.900 (<= 1.00, met) [1]", "0.960 (<= 1.05, met) [1]", "1.000 (<= 1.01, met) [2]"]
    assert table[("cpu", "resnet18", "2")][0] == "0.700 (<= 0.90, met) [3]"
    assert table[("cpu", "mobilenet_v3_large", "1")][:3] == [
        "0.970 (<= 0.95, missed) [2]", "1.100 [2]", "1.020 (<= 1.01, missed) [2]"]  # NormProp/floor: no eager target
    assert table[("cpu", "resnet34", "1")][:3] == ["0.800 [2]", "1.000 [2]", "1.000 [2]"]  # no targets, still shown
    assert "Not measured: resnet101." in text
    runs_list = text.split("## Runs")[1]
    assert runs_list.index("- [1] 2026-11-30T06:00:00, torch 2.14.1+cu130") < runs_list.index(
        "- [2] 2026-11-25T04:00:00, torch 2.15.0+cu132") < runs_list.index("- [3] 2026-11-20T00:00:00")
    assert "in `new.json`: `tools/bench.py --json new.json`" in runs_list
    assert "- Targets: 9 of the 11 cells with a target are met." in text


def test_both_pages_keep_their_notes_and_the_plot_is_written(tmp_path):
    page = tmp_path / "docs" / "bench.md"
    runs = [synthetic_run("2026-11-25T04:00:00", "2.15.0", [synthetic_result("resnet50", {"eager": (0.95, 1.0, 1.0)})])]
    written = bench_report.write_pages(page, runs, ["resnet50"], [tmp_path / "r.json"])
    runs_page, png = tmp_path / "docs" / "bench-runs.md", tmp_path / "docs" / "bench_summary.png"
    assert written == [page, runs_page, png]
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    summary = page.read_text()
    assert "](bench_summary.png)" in summary and "](bench-runs.md)" in summary
    assert "](bench.md)" in runs_page.read_text() and "### resnet50" in runs_page.read_text()
    for doc in (page, runs_page):
        doc.write_text(doc.read_text() + f"KEEP the notes of {doc.name}\n")
    first_png = png.read_bytes()
    runs.append(synthetic_run("2026-11-30T04:00:00", "2.14.1", [synthetic_result("resnet18", {"eager": (0.8, 1.0, 1.0)})]))
    bench_report.write_pages(page, runs, ["resnet50"], [tmp_path / "r.json"])
    for doc in (page, runs_page):
        text = doc.read_text()
        assert text.count(bench_report.NOTES_MARKER) == 1 and text.endswith(f"KEEP the notes of {doc.name}\n")
        assert "resnet18" in text.split(bench_report.NOTES_MARKER)[0]  # re-rendered above the notes
    assert png.read_bytes() != first_png  # the new run is drawn
    bench_report.write_pages(page, runs, ["resnet50"], [tmp_path / "r.json"])
    assert page.read_text().endswith("KEEP the notes of bench.md\n")


def test_without_matplotlib_the_summary_says_the_plot_was_not_drawn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    page = tmp_path / "bench.md"
    runs = [synthetic_run("2026-11-25T04:00:00", "2.15.0", [synthetic_result("resnet50", {"eager": (0.95, 1.0, 1.0)})])]
    assert bench_report.write_pages(page, runs, ["resnet50"], [tmp_path / "r.json"]) == [page, tmp_path / "bench-runs.md"]
    text = page.read_text()
    assert "Plot not drawn: matplotlib is not installed" in text and "bench_summary.png" not in text
    assert not (tmp_path / "bench_summary.png").exists() and "0.950 (<= 0.90, missed) [1]" in text


def test_default_models_are_the_resnet_depth_sweep_then_the_depthwise_models():
    bench = load_bench()
    assert bench.MODELS == ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "efficientnet_b0")
    assert bench.parse_args(["--device", "cpu"]).models == bench.MODELS  # all torchvision names: parse_args checks


def test_floor_weight_norm_normalizes_the_weights_normprop_does_and_nothing_else():
    """The floor_weight_norm variant: the floor (BatchNorms -> Identity) with the weight of each
    layer NormProp normalizes, at the NormProp layer's path, normalized as NormProp does; every
    other module as in the floor. Its output is the floor's with those weights normalized."""
    import normprop_fx
    import torchvision

    bench = load_bench()
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10)
    converted = normprop_fx.convert(original)
    variant = bench.TRAIN_VARIANTS["floor_weight_norm"](original, converted)
    normprop_paths = {p for p, m in converted.named_modules() if isinstance(m, normprop_fx.NormPropLayer)}
    wrapped = {p: m for p, m in variant.named_modules() if isinstance(m, bench.WeightNormalized)}
    assert set(wrapped) == normprop_paths and len(wrapped) == 20
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, normprop_fx.NormPropLayer)) for m in variant.modules())
    assert all(isinstance(original.get_submodule(p), torch.nn.Conv2d) for p in wrapped)  # the original is untouched

    expected = bench.without_batchnorm(original)
    with torch.no_grad():
        for path, module in wrapped.items():
            w = module.layer.weight
            expected.get_submodule(path).weight.copy_(w / w.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1))
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(variant.eval()(x), expected.eval()(x), rtol=1e-4, atol=1e-5)
    variant.train()(x).sum().backward()
    assert all(m.gamma.grad is not None and m.layer.weight.grad is not None for m in wrapped.values())


def test_bench_ab_refuses_bad_arguments(capsys):
    """tools/bench_ab.py: a commit that is not one, an unknown model, a non-positive count: exit 2
    with the reason (checked before anything is built or timed)."""
    tool = load_tool("bench_ab")
    for args, reason in ((["--base", "no-such-commit-here"], "not a commit"), (["--base", "HEAD", "--models", "resnet_x"], "unknown model"),
                         (["--base", "HEAD", "--rounds", "0"], "positive"), (["--base", "HEAD", "--workload", "nope"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_:
            tool.main(args)
        assert exit_.value.code == 2, args
        assert reason in capsys.readouterr().err, args


def test_fold_parts_removes_each_kind_of_kept_op(capsys):
    """tools/fold_parts.py: on a folded model with a kept shift (stride 1), a shift moved behind a
    strided conv and an SE gate's shift, each reduced variant removes its kind and changes the
    output (a different function, the bound it stands for); bad arguments exit 2."""
    import normprop_fx
    from torch import nn
    from torchvision.ops import SqueezeExcitation

    tool = load_tool("fold_parts")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.SiLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.SiLU(),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(8), nn.SiLU(),
                          SqueezeExcitation(8, 2), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = normprop_fx.fold(normprop_fx.convert(model, example_inputs=x).eval())
    with torch.no_grad():
        reference = folded(x)
        for shifts, gates, count in ((True, False, 2), (False, True, 1), (True, True, 3)):
            reduced, removed = tool.without(folded, shifts=shifts, gate_shifts=gates)
            assert removed == count, (shifts, gates)
            assert not torch.allclose(reduced(x), reference)
    for args, reason in ((["--models", "resnet_x"], "unknown model"), (["--rounds", "0"], "positive")):
        with pytest.raises(SystemExit) as exit_:
            tool.main(args)
        assert exit_.value.code == 2, args
        assert reason in capsys.readouterr().err, args


def test_bench_ops_times_each_candidate_and_appends_its_run(tmp_path, capsys):
    """tools/bench_ops.py: every candidate op computes what its name says (the in-place ones
    too), each gets a median, and the run is appended to the JSON list; a bad shape exits 2."""
    tool = load_tool("bench_ops")
    x = torch.randn(2, 3, 4, 5)
    ops = tool.candidates(x)
    a, c = 1.2112, -0.1273
    for name in ("addcmul(c, x, a), 0-dim tensors", "add(c, x, alpha=a)", "x * a + c (two ops)"):
        torch.testing.assert_close(ops[name](), x * a + c)
    out = tmp_path / "ops.json"
    for _ in range(2):
        assert tool.main(["--shape", "2,3,4,5", "--rounds", "2", "--iters", "1", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())
    assert len(runs) == 2 and set(runs[0]["median_ms"]) == set(ops)
    assert all(ms > 0 for ms in runs[0]["median_ms"].values())
    assert "add(c, x, alpha=a)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        tool.main(["--shape", "2,3"])
    assert err.value.code == 2
