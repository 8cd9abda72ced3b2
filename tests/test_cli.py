"""tools/convert.py as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def test_resnet18_converts_and_runs(tmp_path):
    saved = tmp_path / "resnet18_normprop.pt"
    result = _run("--model", "resnet18", "--save", str(saved))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = [line for line in out.splitlines() if "NormPropConv2d" in line and "(BatchNorm2d)" in line]  # rewrite table
    assert len(rows) == 20
    assert "BatchNorm found: 20, converted: 20, left: 0" in out
    assert "gradients: 62/62 parameters reached, 0 with non-finite values" in out
    assert "output (2, 1000)" in out and "finite: True" in out
    loaded = torch.load(saved, weights_only=False)
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_gamma_init_and_input_size_options():
    result = _run("--model", "torchvision:resnet18", "--gamma-init", "1", "--input-size", "3,64,64")
    assert result.returncode == 0, result.stderr
    assert "gamma_init=1.0)" in result.stdout and "(2, 3, 64, 64)" in result.stdout
    assert "1.0000" in [c for line in result.stdout.splitlines() if "layer1.0.conv1 " in line for c in line.split()]


def test_timm_model():
    result = _run("--model", "timm:resnet10t", "--input-size", "64")
    assert result.returncode == 0, result.stderr
    assert "timm:resnet10t" in result.stdout and "BatchNorm found:" in result.stdout


def test_unknown_model_is_exit_2_one_line():
    result = _run("--model", "resnet1")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'resnet1'" in lines[0] and "resnet18" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_arguments_are_exit_2_one_line():
    for args in (["--model", "resnet18", "--gamma-init", "-1"],
                 ["--model", "resnet18", "--input-size", "abc"],
                 ["--model", "resnet18", "--batch-size", "0"],
                 ["--model", "foo:resnet18"],
                 ["--model", "resnet18", "--init", "pretrained"],
                 []):
        result = _run(*args)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_randomize_bn_keeps_the_trained_function_and_says_how_exact():
    result = _run("--model", "resnet18", "--randomize-bn", "--input-size", "64")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Initialization: 20 of 20 BatchNorms keep their trained function exactly" in out
    line = next(l for l in out.splitlines() if "eval outputs vs the original's" in l)
    assert float(line.split("relative L2 ")[1].split()[0]) <= 1e-5


def test_init_normprop_on_randomized_bn_warns():
    result = _run("--model", "resnet18", "--randomize-bn", "--init", "normprop", "--input-size", "64")
    assert result.returncode == 0, result.stderr
    assert "warning: init='normprop' discards the trained function of 20 of 20 BatchNorms" in result.stdout
