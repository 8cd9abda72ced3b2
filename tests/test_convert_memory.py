"""tools/convert_memory.py: convert's peak memory over the model's parameter memory, each
measurement in a fresh process, and its section of docs/zoo.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_zoo_tool import _zoo

ROOT = Path(__file__).resolve().parents[1]


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_memory.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_measures_copy_and_in_place_and_the_sample_forward(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "memory.json"
    result = _tool("timm:resnet10t", "--pixels", "32", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["command"].startswith("python tools/convert_memory.py timm:resnet10t --pixels 32")
    copy, in_place = data["rows"]
    assert (copy["inplace"], in_place["inplace"]) == (False, True)
    for row in data["rows"]:
        assert row["model"] == "timm:resnet10t" and row["input_shape"] == [3, 32, 32]
        assert 0 < row["parameter_gb"] < 0.1 and row["added_gb"] > 0 and row["calibration_samples"] >= 8
        assert row["ratio"] == pytest.approx(row["added_gb"] / row["parameter_gb"], rel=0.05)  # of rounded GiB
        assert row["met"] == (row["ratio"] <= row["target"]) and row["sample_forward_gb"] >= 0
    assert (copy["target"], in_place["target"]) == (2.5, 1.5)
    assert "| timm:resnet10t | 32x32 | True |" in result.stdout

    # docs/zoo.md's section, from the same file
    docs = tmp_path / "zoo.md"
    page = _zoo("--models", "python:zoo_models.Small", "--results", str(tmp_path / "none.jsonl"), "--no-check",
                "--conversion-memory", str(out), "--write-docs", str(docs))
    assert page.returncode == 0, page.stderr
    text = docs.read_text()
    assert "## Conversion memory" in text and "| timm:resnet10t | 32x32 | False |" in text
    assert "python tools/convert_memory.py timm:resnet10t --pixels 32" in text


def test_bad_arguments_are_exit_2_one_line():
    for args in (["foo:bar"], ["timm:resnet10t", "--pixels", "0"], []):
        result = _tool(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_release_freed_heap_is_safe_to_call_anywhere():
    """normprop_fx.heap: glibc's malloc_trim where there is one (Linux CI), else nothing; it never
    raises and frees nothing that is still in use."""
    import sys

    import torch

    from normprop_fx.heap import _malloc_trim, release_freed_heap

    if sys.platform.startswith("linux"):
        assert _malloc_trim() is not None
    kept = torch.arange(1000.0)
    release_freed_heap()
    assert torch.equal(kept, torch.arange(1000.0))
