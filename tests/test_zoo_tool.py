"""normprop_fx.check_model on tiny models of known behaviour, and tools/zoo.py end to end
(worker processes, crash/timeout isolation, resume, --redo, the docs writer)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zoo_models

import normprop_fx
from normprop_fx.errors import InvalidOptionError

ROOT = Path(__file__).resolve().parents[1]


def _check(factory, shape=(3, 8, 8)):
    torch.manual_seed(0)
    return normprop_fx.check_model(factory(), shape, name=factory.__name__)


def test_small_bn_model_passes_every_check():
    check = _check(zoo_models.Small)
    assert (check.traced, check.batchnorms_found, check.converted, check.left) == (True, 1, 1, 0)
    assert check.forward_ok and check.backward_ok and check.batch_independent and check.passed
    assert check.batch_max_relative_difference < 1e-12
    # one conv -> BN -> ReLU on N(0, I) input at gamma_init=1: the NormProp layer's output is
    # standardized by construction, up to sampling noise over 4 * 8 * 8 * 8 values
    assert check.layers_measured == 1 and check.worst_std_layer == "conv"
    assert check.worst_std_deviation < 0.15 and check.worst_abs_mean < 0.15
    assert check.within_std_target and check.failures == []
    assert check.conversion_seconds > 0
    row = check.to_dict()
    assert row["passed"] is True and row["input_shape"] == [3, 8, 8]
    json.dumps(row)  # a results-file line


def test_untraceable_model_is_a_trace_failure():
    check = _check(zoo_models.Untraceable)
    assert check.traced is False and not check.passed
    assert check.reason.startswith("trace: UntraceableModelError")
    assert check.forward_ok is None and check.batchnorms_found is None


def test_error_in_converted_forward_is_a_forward_failure():
    check = _check(zoo_models.RaisesAfterConversion)
    assert check.traced and check.left == 0
    assert check.forward_ok is False and not check.passed
    assert check.reason.startswith("forward: RuntimeError: boom")


def test_batch_dependent_op_is_caught():
    check = _check(zoo_models.BatchDependent)
    assert check.left == 0 and check.forward_ok and check.backward_ok
    assert check.batch_independent is False and not check.passed
    assert check.batch_max_relative_difference > 1e-3
    assert check.reason.startswith("batch dependence:")


def test_non_finite_gradient_is_a_backward_failure():
    check = _check(zoo_models.NonFiniteGradient)
    assert check.forward_ok and check.backward_ok is False and not check.passed
    assert check.reason.startswith("backward: non-finite gradient")


def test_parameter_unused_by_the_original_too_is_not_a_failure():
    check = _check(zoo_models.UnusedParameters)
    assert check.backward_ok and check.passed


def test_uncalled_batchnorm_is_left_with_its_reason():
    check = _check(zoo_models.UncalledBatchNorm)
    assert (check.batchnorms_found, check.converted, check.left) == (2, 1, 1)
    assert check.left_reasons == {"never called by the model's forward": 1}
    assert check.batch_independent and not check.passed
    assert check.reason.startswith("BN left: 1 of 2, e.g. spare_bn")


def test_bad_options_raise():
    with pytest.raises(InvalidOptionError):
        normprop_fx.check_model(zoo_models.Small(), (3, 0, 8))
    with pytest.raises(InvalidOptionError):
        normprop_fx.check_model(zoo_models.Small(), (3, 8, 8), batch_size=1)


def _zoo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "zoo.py"), *args],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_isolates_failures_resumes_and_writes_docs(tmp_path):
    pytest.importorskip("tqdm", reason="tools/zoo.py needs the zoo extra: pip install -e .[zoo]")
    results, docs = tmp_path / "results.jsonl", tmp_path / "zoo.md"
    models = [f"python:zoo_models.{f}" for f in ("Small", "NoBatchNorm", "Untraceable", "Crashes", "Hangs", "Hog")]
    common = ["--results", str(results), "--small-size", "8", "--timeout", "10", "--memory-limit-gb", "2"]
    first = _zoo("--models", *models, "--jobs", "2", *common, "--write-docs", str(docs))
    assert first.returncode == 0, first.stderr
    assert "6 to check with 2 worker(s)" in first.stdout
    rows = {r["model"].rpartition(".")[2]: r for r in _rows(results)}
    assert sorted(rows) == ["Crashes", "Hangs", "Hog", "NoBatchNorm", "Small", "Untraceable"]
    assert rows["Small"]["passed"] and rows["Small"]["input_shape"] == [3, 8, 8]
    assert rows["Small"]["threads"] == 1 and len(rows["Small"]["loadavg"]) == 3
    assert rows["NoBatchNorm"]["has_bn"] is False and "traced" not in rows["NoBatchNorm"]
    assert rows["Untraceable"]["traced"] is False
    assert rows["Crashes"]["failures"][0].startswith("worker crashed:")
    assert "signal 9" in rows["Crashes"]["failures"][0]
    assert rows["Hangs"]["failures"] == ["timeout: no result within 10 s"]
    assert rows["Hog"]["failures"][0].startswith("memory: the worker's resident memory reached")
    # each row its own peak (the worker's VmHWM, reset per model), the Hog's its reading when stopped
    assert 0 < rows["Small"]["peak_memory_gb"] < 2 and 0 < rows["NoBatchNorm"]["peak_memory_gb"] < 2

    text = docs.read_text()
    assert text.index("## Summary") < text.index("## Failures by category") < text.index("## Models with BatchNorm")
    assert "| trace | 1 |" in text and "| worker crashed | 1 |" in text and "| timeout | 1 |" in text
    assert "| python:zoo_models.Small | 8x8 | yes | 1 / 1 / 0 | yes | yes | yes | yes |" in text
    small = next(line for line in text.splitlines() if line.startswith("| python:zoo_models.Small |"))
    assert small.split(" | ")[13] == f"{rows['Small']['peak_memory_gb']:.1f}"  # the peak GiB column
    assert "| >= 2." in text  # the Hog's: at least what it had reached when stopped
    assert "## Models without BatchNorm (1, not checked)" in text and "python:zoo_models.NoBatchNorm" in text
    assert "python tools/zoo.py --models python:zoo_models.Small" in text

    again = _zoo("--models", *models[:2], *common)
    assert again.returncode == 0 and "2 already in" in again.stdout and "0 to check" in again.stdout
    assert len(_rows(results)) == 6
    redo = _zoo("--models", models[0], "--redo", *common)
    assert redo.returncode == 0 and "1 to check" in redo.stdout
    assert len(_rows(results)) == 7 and _rows(results)[-1]["model"] == models[0]


def test_bad_arguments_are_exit_2_one_line(tmp_path):
    for args in (["--jobs", "0"], ["--models", "nosource"], ["--models", "python:zoo_models.Small", "--exclude", "*Small"]):
        result = _zoo(*args, "--results", str(tmp_path / "r.jsonl"))
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_check_statistics_measures_every_layer_over_the_seeds():
    """model_check.check_statistics: the seed-0 conversion's layers measured over 32 samples, the
    corrections compared over 3 calibration seeds; the model given is left as it was."""
    from normprop_fx.model_check import SEED_SPREAD_TARGET, check_statistics

    torch.manual_seed(0)
    model = zoo_models.Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = check_statistics(model, (3, 8, 8), name="Small")
    assert check.failures == [] and check.layers == 1 and check.within == 1 and check.passed
    assert 0.7 < check.min_std == check.max_std < 1.4 and check.min_std_layer == "conv"
    assert check.calibration_samples >= 8 and check.corrections == 0 and check.seed_spread is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    row = check.to_dict()
    assert row["passed"] and row["worst_within_range"] and row["input_shape"] == [3, 8, 8]

    # a model whose corrections are measured on the sample: they move between seeds, a little
    from test_calibration_sample import _se_net

    se = check_statistics(_se_net(), (3, 16, 16))
    assert se.corrections > 0 and se.seed_spread is not None and 0 < se.seed_spread < SEED_SPREAD_TARGET
    assert se.layers == 2 and se.seed_spread_at.endswith("input_correction")
    # with the seed-0 report's estimate of where that comes from (none for Small: nothing measured)
    assert check.calibration_error is None and se.calibration_error_at == "4 (NormPropConv2d)"
    assert 0 < se.calibration_error < SEED_SPREAD_TARGET
    with pytest.raises(InvalidOptionError):
        check_statistics(model, (3, 8, 8), seeds=0)


def test_expected_range_of_normal_draws():
    """The expected range of n standard normal values: 2 / sqrt(pi) for 2, 3 / sqrt(pi) for 3
    (closed forms), and a Monte Carlo estimate for 5."""
    from normprop_fx.model_check import expected_range

    assert expected_range(1) == 0.0
    assert expected_range(2) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-6)
    assert expected_range(3) == pytest.approx(3 / math.sqrt(math.pi), rel=1e-6)
    draws = torch.randn(200_000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert expected_range(5) == pytest.approx(float((draws.max(1).values - draws.min(1).values).mean()), rel=0.01)


def test_statistics_measured_in_batches_equal_one_batch():
    from normprop_fx.statistics import measure_layer_statistics

    torch.manual_seed(0)
    converted = normprop_fx.convert(zoo_models.Small(), gamma_init=1.0, example_inputs=torch.empty(2, 3, 8, 8)).eval()
    x = torch.randn(13, 3, 8, 8) * 3 + 1
    whole, batched = measure_layer_statistics(converted, x), measure_layer_statistics(converted, x, batch_size=4)
    assert [s.path for s in whole] == [s.path for s in batched] == ["conv"]
    assert batched[0].mean == pytest.approx(whole[0].mean, rel=1e-5, abs=1e-6)
    assert batched[0].std == pytest.approx(whole[0].std, rel=1e-5)


def test_statistics_sweep_draws_and_writes_its_section(tmp_path):
    pytest.importorskip("tqdm", reason="tools/zoo.py needs the zoo extra: pip install -e .[zoo]")
    results, docs = tmp_path / "stats.jsonl", tmp_path / "zoo.md"
    models = [f"python:zoo_models.{f}" for f in ("Small", "NoBatchNorm", "Untraceable")]
    common = ["--models", *models, "--results", str(results), "--timeout", "60", "--memory-limit-gb", "2"]
    run = _zoo(*common, "--check", "statistics", "--draw", "2", "--seed", "3")
    assert run.returncode == 0, run.stderr
    assert "2 models selected" in run.stdout
    rows = {r["model"]: r for r in _rows(results)}
    assert sorted(rows) == sorted(random.Random(3).sample(models, 2)) == [models[0], models[2]]
    again = _zoo(*common, "--check", "statistics", "--draw", "2", "--seed", "3", "--no-check")
    assert again.returncode == 0 and "2 already in" in again.stdout  # the same draw
    small, untraceable = rows[models[0]], rows[models[2]]
    assert small["check"] == "statistics" and small["input_shape"] == [3, 8, 8] and small["layers"] == 1
    assert small["passed"] and not untraceable["passed"] and untraceable["failures"][0].startswith("convert")
    page = _zoo("--models", *models, "--results", str(results), "--no-check", "--statistics-results", str(results),
                "--write-docs", str(docs))
    assert page.returncode == 0, page.stderr
    text = docs.read_text()
    assert "## Layer statistics at each model's own input size" in text
    assert "--check statistics --draw 2 --seed 3" in text  # the command that made the rows


@pytest.mark.parametrize("factory", [zoo_models.Small, zoo_models.UnusedParameters])
def test_check_in_place_finds_what_the_copy_finds(factory):
    """check_model(inplace=True) (tools/zoo.py: one copy of the weights less) gives the row the
    copying check gives; the original's train-mode probe leaves its BatchNorm statistics as they
    were, so the conversion still takes them as untrained."""
    copied, in_place = _check(factory), None
    torch.manual_seed(0)
    model = factory()
    in_place = normprop_fx.check_model(model, (3, 8, 8), name=factory.__name__, inplace=True)
    # equal rows: had the probe left statistics behind, the BatchNorm would have counted as trained
    # and its layer would not be at the gamma_init=1 statistics the copy measures
    assert in_place.to_dict() | {"conversion_seconds": None} == copied.to_dict() | {"conversion_seconds": None}


def test_amplified_rounding_is_told_from_batch_dependence():
    """A network ill-conditioned at its input (a rounding-level change moves its output by O(1),
    as timm's efficientnet_l2 at init does at some inputs) differs alone vs in a batch by O(1)
    because a matmul sums in another order at another batch size. Swapping the other sample
    leaves it bit for bit, and a 1e-15 change of its own input moves it as much: not batch
    dependence, and the row says which samples were ill-conditioned. A real batch dependence
    (test_batch_dependent_op_is_caught) fails the swap."""
    check = _check(zoo_models.IllConditioned)
    assert check.batch_max_relative_difference > 1e-3  # the raw alone-vs-batch difference
    assert check.ill_conditioned and all(s["rounding_sensitivity"] > 1e-3 for s in check.ill_conditioned)
    assert check.batch_independent and check.passed and not check.failures
    dependent = _check(zoo_models.BatchDependent)
    assert not dependent.batch_independent and dependent.ill_conditioned == []


def test_compare_statistics_lines_up_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tools/compare_statistics.py: a line per model whose row changed, totals over the models of
    both runs (the last row of a model wins), and a clear error for a file that is not there."""
    import compare_statistics

    def row(model: str, within: int, low: float, high: float, spread: float, samples: int) -> str:
        return json.dumps({"model": model, "check": "statistics", "layers": 10, "within": within, "min_std": low,
                           "max_std": high, "seed_spread": spread, "calibration_samples": samples,
                           "worst_within_range": 0.5 <= low and high <= 2.0})

    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    before.write_text("\n".join([row("a", 9, 0.9, 2.5, 0.2, 8), row("b", 10, 0.9, 1.1, 0.01, 8),
                                 row("only_before", 10, 0.9, 1.1, 0.01, 8)]) + "\n")
    after.write_text("\n".join([row("a", 1, 0.9, 9.0, 0.5, 8), row("b", 10, 0.9, 1.1, 0.01, 8),
                                row("a", 10, 0.9, 1.5, 0.04, 32)]) + "\n")
    assert compare_statistics.main([str(before), str(after)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("a (of 10 layers): within 9 -> 10") and "calibration_samples 8 -> 32" in out[0]
    assert "worst in range no -> yes; spread target no -> yes" in out[0]
    assert out[1] == "models measured in both: 2, rows that differ: 1"
    assert out[2].startswith("before: worst layer in range 1 of 2, constants within 5% 1 of 2, both 1; layers within 19 of 20")
    assert out[3].startswith("after: worst layer in range 2 of 2, constants within 5% 2 of 2, both 2; layers within 20 of 20")
    with pytest.raises(SystemExit) as exit_info:
        compare_statistics.main([str(tmp_path / "missing.jsonl"), str(after)])
    assert exit_info.value.code == 2 and "missing.jsonl: no such file" in capsys.readouterr().err


def test_convert_time_refuses_a_bad_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """tools/convert_time.py: a bad count is one line and exit status 2, before anything is built."""
    import convert_time

    with pytest.raises(SystemExit) as exit_info:
        convert_time.main(["resnet18", "--base", "HEAD", "--rounds", "0"])
    assert exit_info.value.code == 2 and "--rounds and --pixels must be at least 1" in capsys.readouterr().err
