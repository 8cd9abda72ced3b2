"""tools/bench.py end to end on a tiny input: what it records and renders, and its argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_tiny_run_records_times_page_faults_and_the_allocator(tmp_path):
    results, page = tmp_path / "r.json", tmp_path / "bench.md"
    done = run_bench("--models", "resnet18", "--batch-size", "2", "--image-size", "32", "--rounds", "2", "--iters", "1",
                     "--warmup", "0", "--modes", "eager", "--workloads", "train", "--json", str(results), "--write", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(results.read_text())
    (res,) = run["results"]
    keys = {f"train/{v}/eager" for v in ("bn", "normprop", "floor", "floor_bias")}
    assert set(res["median_ms"]) == keys and set(res["page_faults_per_step"]) == keys
    assert all(len(v) == 2 and min(v) > 0 for v in res["all_ms"].values())
    assert run["machine"]["malloc"].startswith(("glibc mallopt", "default"))
    text = page.read_text()
    assert "minor page faults/step" in text and f"- allocator: {run['machine']['malloc']}" in text
    assert "| train normprop / bn (eager)" in text and "| train normprop / floor_bias (eager)" in text


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
    assert "not recorded" in page.read_text()


def test_bad_arguments_exit_2():
    assert run_bench("--models", "resnet_nonexistent", "--report-only").returncode == 2
    assert run_bench("--rounds", "0", "--report-only").returncode == 2
