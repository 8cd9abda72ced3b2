#!/usr/bin/env python3
"""Sweep torchvision and timm models through normprop_fx.check_model; write docs/zoo.md.

    python tools/zoo.py --source torchvision --results zoo-torchvision.jsonl --write-docs docs/zoo.md
    python tools/zoo.py --source timm --include 'resnet*' --exclude '*_gn' --jobs 2 --results zoo-timm.jsonl
    python tools/zoo.py --source torchvision --check trained --results zoo-trained.jsonl

Per model (no pretrained weights, seeded): build it on the meta device and count BatchNorms
(models without any are listed, not checked); otherwise build it for real, pick the input
size (the small one, else the model's default, the first the *original* model runs on), and
run normprop_fx.check_model at gamma_init=1 (``--check init``, the default), or, with
``--check trained``, normprop_fx.model_check.check_trained_conversion: every BatchNorm gets
trained-looking statistics and affine, and the converted model's eval outputs must equal the
original's (docs/method.md section 8). ``--write-docs`` with ``--trained-results`` adds the trained
check's rows to the same page. Each model runs in a worker process with a
timeout, so a crash, an OOM kill or a hang is a row with its reason. Results are appended to a
JSON-lines file, one line a model; a rerun skips models already there unless --redo.
Exit status: 0 when the sweep ran (whatever the models did), 2 on a bad argument.
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import queue
import random
import re
import shlex
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import common

SOURCES = ("torchvision", "timm")
#: The project's targets (docs/zoo.md): share of BN models that pass every check, per source.
TARGETS = {"torchvision": 1.00, "timm": 0.98}
#: share of converted models whose root keeps the user's class and forward (issue 16)
CLASS_KEPT_GOAL = 0.95
#: Seconds a new worker may take to import torch, torchvision and timm.
STARTUP_TIMEOUT = 300
#: How often the parent looks at a running model's time and memory.
POLL_SECONDS = 0.5


# --------------------------------------------------------------------------- model lists


def model_names(source: str) -> list[str]:
    """``source:name`` for every classification model of torchvision, or every timm model."""
    names = common.torchvision_names() if source == "torchvision" else common.timm_names()
    return [f"{source}:{n}" for n in names]


def select(keys: Iterable[str], include: list[str], exclude: list[str]) -> list[str]:
    """Keys whose bare name or ``source:name`` matches an include glob (all if none) and no exclude glob."""
    def matches(key: str, globs: list[str]) -> bool:
        bare = key.partition(":")[2]
        return any(fnmatch.fnmatchcase(bare, g) or fnmatch.fnmatchcase(key, g) for g in globs)

    return [k for k in keys if (not include or matches(k, include)) and not matches(k, exclude)]


# --------------------------------------------------------------------------- one model (in a worker)


def _build(key: str, meta: bool = False) -> Any:
    """The model of ``source:name`` (no pretrained weights), on the meta device when ``meta``."""
    import torch

    source, _, name = key.partition(":")
    if meta:
        with torch.device("meta"):
            return common.create_model(source, name)
    return common.create_model(source, name)


def _candidate_shapes(key: str, model: Any, small: int) -> list[tuple[int, ...]]:
    """Per-sample input shapes to try, smallest first: ``small`` (raised to the model's minimum)
    unless the model needs a fixed size, then the model's default."""
    source, _, name = key.partition(":")
    if source == "torchvision":
        import torchvision.models

        try:
            minimum = max(next(iter(torchvision.models.get_model_weights(name))).meta.get("min_size", (1, 1)))
        except (ValueError, StopIteration):  # a model without published weights
            minimum = 1
        side = max(small, minimum)
        return list(dict.fromkeys([(3, side, side), common.default_input_size(source, name, model)]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = common.default_input_size(source, name, model)
    if cfg.get("fixed_input_size"):
        return [default]
    minimum = cfg.get("min_input_size") or (3, 1, 1)
    first = (default[0], max(small, minimum[1]), max(small, minimum[2]))
    return list(dict.fromkeys([first, default]))


def _input_shape(key: str, model: Any, small: int) -> tuple[tuple[int, ...], list[str]]:
    """The first candidate shape the original model runs on (batch 2, in train mode, where some
    models run more, e.g. auxiliary heads, and in eval mode), and what failed before it."""
    import torch

    from normprop_fx.model_check import dropout_off

    tried = []
    training = model.training
    # A train-mode forward updates the BatchNorms' running statistics, and init="auto" would then
    # count them as trained (docs/method.md section 8): the probe leaves every buffer as it was.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    for shape in _candidate_shapes(key, model, small):
        try:
            with torch.no_grad():
                x = torch.randn(2, *shape)
                dropout_off(model.train())(x)
                model.eval()(x)
            return shape, tried
        except Exception as err:  # noqa: BLE001 - any failure means: try the next size
            tried.append(f"{shape}: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
        finally:
            model.train(training)  # convert traces in the mode the model was built in
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
    raise RuntimeError("the original model runs on none of the input sizes tried: " + " | ".join(tried))


def check_one(key: str, options: dict[str, Any]) -> dict[str, Any]:
    """The result row of one model; exceptions become the row's reason."""
    import torch
    from normprop_fx.passes.inventory import batchnorm_modules

    import normprop_fx

    start = time.perf_counter()
    row: dict[str, Any] = {"model": key, "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg())}
    try:
        torch.manual_seed(options["seed"])
        try:
            probe = _build(key, meta=True)
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta: count on the real one
            probe = _build(key)
        row["has_bn"] = bool(batchnorm_modules(probe))
        del probe
        if row["has_bn"]:
            torch.manual_seed(options["seed"])
            model = _build(key)
            if options.get("check") == "statistics":  # at the model's own resolution, not the small one
                source, _, name = key.partition(":")
                shape, tried = tuple(common.default_input_size(source, name, model)), []
            else:
                shape, tried = _input_shape(key, model, options["small_size"])
            torch.manual_seed(options["seed"])
            if options.get("check") == "statistics":
                from normprop_fx.model_check import check_statistics

                row["check"] = "statistics"
                result = check_statistics(model, shape, name=key)
            elif options.get("check") == "trained":
                from normprop_fx.model_check import check_trained_conversion

                row["check"] = "trained"
                result = check_trained_conversion(model, shape, name=key, seed=options["seed"])
            else:
                # the model is built for this check alone: converted in place, one copy of the weights less
                result = normprop_fx.check_model(model, shape, name=key, gamma_init=options["gamma_init"], inplace=True)
            row.update(result.to_dict())
            row["smaller_sizes_failed"] = tried
    except Exception as err:  # noqa: BLE001 - a model that cannot be built is a row
        row["failures"] = [f"model: {type(err).__name__}: {' '.join(str(err).split())[:400]}"]
        row["passed"] = False
        row.setdefault("has_bn", None)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _worker(conn: Connection, threads: int) -> None:
    import warnings

    import torch

    import normprop_fx  # noqa: F401 - imported before "ready", like the model libraries
    for library in SOURCES:  # convert() uses both (timm's and torchvision's layer types)
        try:
            __import__(library)
        except ImportError:
            pass
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    conn.send("ready")  # imports done: the per-model timeout starts counting after this
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        key, options = message
        common.reset_peak_memory()
        try:
            row = check_one(key, options)
        except BaseException as err:  # noqa: BLE001 - anything at all is a row
            row = {"model": key, "passed": False, "has_bn": None,
                   "failures": [f"worker: {type(err).__name__}: {err}"], "trace": traceback.format_exc()[-2000:]}
        peak = common.peak_memory_gb()
        if peak is not None:
            row["peak_memory_gb"] = round(peak, 2)
        conn.send(row)


class _WorkerSlot:
    """One worker process; restarted after a timeout or a crash."""

    def __init__(self, threads: int, memory_limit_gb: float) -> None:
        self.threads = threads
        self.memory_limit_gb = memory_limit_gb
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, self.threads), daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        if not (parent.poll(STARTUP_TIMEOUT) and parent.recv() == "ready"):
            raise RuntimeError(f"a worker process did not start within {STARTUP_TIMEOUT} s")

    def run(self, key: str, options: dict[str, Any], timeout: float) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            if self.process is None or not self.process.is_alive():
                self._start()
            assert self.conn is not None and self.process is not None
            self.conn.send((key, options))
            reason = self._wait(timeout)
            if reason is None:
                row = self.conn.recv()
                if self.memory_limit_gb and self._resident_gb() > self.memory_limit_gb / 2:
                    self.stop()  # start the next model in a fresh process, not in a bloated one
                return row
        except RuntimeError as err:  # the worker did not start
            reason = f"worker crashed: {err}"
        except (EOFError, OSError):
            assert self.process is not None
            self.process.join(5)
            code = self.process.exitcode
            how = f"exit status {code}"
            if code is not None and code < 0:
                how = f"killed by signal {-code}" + (", e.g. by the OOM killer" if code == -9 else "")
            reason = f"worker crashed: the worker process died ({how})"
        self.stop()
        return {"model": key, "passed": False, "has_bn": None, "failures": [reason],
                "seconds": round(time.perf_counter() - start, 3)}

    def _wait(self, timeout: float) -> str | None:
        """None when the result is ready; the reason when the model ran out of time or memory.
        (Watched from outside: an address-space rlimit inside the worker breaks oneDNN.)"""
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        while not self.conn.poll(min(POLL_SECONDS, max(deadline - time.monotonic(), 0))):
            if time.monotonic() >= deadline:
                return f"timeout: no result within {timeout:g} s"
            resident = self._resident_gb()
            if self.memory_limit_gb and resident > self.memory_limit_gb:
                return (f"memory: the worker's resident memory reached {resident:.1f} GiB, over "
                        f"--memory-limit-gb {self.memory_limit_gb:g}")
        return None

    def _resident_gb(self) -> float:
        """Resident set size of the worker (Linux /proc; 0 where it cannot be read)."""
        return common.resident_memory_gb(self.process.pid) if self.process is not None else 0.0

    def stop(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()  # the worker this slot started, by its own handle
            self.process.join(5)
        if self.conn is not None:
            self.conn.close()
        self.process, self.conn = None, None

    def close(self) -> None:
        if self.process is not None and self.process.is_alive() and self.conn is not None:
            try:
                self.conn.send(None)
                self.process.join(10)
            except OSError:
                pass
        self.stop()


def sweep(keys: list[str], results: Path, options: dict[str, Any], *, jobs: int, timeout: float,
          threads: int, memory_limit_gb: float) -> None:
    """Check every key, ``jobs`` at a time, appending each row to ``results`` as it comes."""
    from tqdm import tqdm

    todo: queue.Queue[str] = queue.Queue()
    for key in keys:
        todo.put(key)
    done: queue.Queue[dict[str, Any]] = queue.Queue()

    def serve() -> None:
        slot = _WorkerSlot(threads, memory_limit_gb)
        try:
            while True:
                try:
                    key = todo.get_nowait()
                except queue.Empty:
                    return
                done.put(slot.run(key, options, timeout))
        finally:
            slot.close()

    workers = [threading.Thread(target=serve, daemon=True) for _ in range(min(jobs, len(keys)))]
    for w in workers:
        w.start()
    with results.open("a") as out, tqdm(total=len(keys), unit="model", dynamic_ncols=True) as bar:
        for _ in keys:
            row = done.get()
            out.write(json.dumps(row) + "\n")
            out.flush()
            bar.set_postfix_str(row["model"], refresh=False)
            bar.update()
    for w in workers:
        w.join()


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Rows by model key; the last line of a model wins (a --redo appends a newer one)."""
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                print(f"zoo.py: warning: {path}:{number} is not JSON (an interrupted write?); ignored",
                      file=sys.stderr)
                continue
            rows[row["model"]] = row
    return rows


# --------------------------------------------------------------------------- docs


def _category(row: dict[str, Any]) -> str:
    reasons = [f for f in row.get("failures", []) if not f.startswith("statistics")]
    return reasons[0].split(":", 1)[0] if reasons else ""


def _reason_key(row: dict[str, Any]) -> str:
    """The row's first failure with numbers, quoted names and source locations blanked out."""
    reasons = [f for f in row.get("failures", []) if not f.startswith("statistics")] or row.get("failures", [""])
    text = re.sub(r" \[[\w.]+:\d+\]$", "", reasons[0])
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"e\.g\. \S+ \(", "e.g. … (", text)
    text = re.sub(r"(?<![\w.])\d+(\.\d+)?(e[-+]?\d+)?(?![\w.])", "N", text)
    return text[:160]


def _class_kept(rows: list[dict[str, Any]]) -> str:
    """'kept / recorded' of the rows that record class_kept (converted models)."""
    known = [r for r in rows if r.get("class_kept") is not None]
    if not known:
        return "not recorded"
    kept = sum(bool(r["class_kept"]) for r in known)
    verdict = "met" if kept / len(known) >= CLASS_KEPT_GOAL else "**not met**"
    unknown = len(rows) - len(known)
    return f"{_pct(kept, len(known))} ({verdict})" + (f"; {unknown} not recorded" if unknown else "")


def _by_source(rows: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(source, its rows) for each source that has rows, in SOURCES order: a summary table's lines."""
    for source in SOURCES:
        mine = [r for r in rows if r["model"].startswith(source + ":")]
        if mine:
            yield source, mine


def _peak(row: dict[str, Any]) -> str:
    """The worker's peak resident memory on the model (a model stopped for memory: what it had
    reached then, from its reason), '-' for rows swept before it was recorded."""
    if row.get("peak_memory_gb") is not None:
        return f"{row['peak_memory_gb']:.1f}"
    stopped = re.search(r"memory reached ([\d.]+) GiB", " ".join(row.get("failures", [])))
    return f">= {stopped.group(1)}" if stopped else "-"


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def _yes(value: Any) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value]


def _pct(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.1f}%)" if whole else f"{part}"


def _error(value: Any) -> str:
    return f"{value:.1e}" if isinstance(value, (int, float)) else "-"


def _over_tolerance(row: dict[str, Any]) -> str:
    """Which of the trained check's tolerances a row misses, with its numbers."""
    from normprop_fx.model_check import ROUNDING_FLOOR_FACTOR, TRAINED_RTOL_FLOAT32, trained_float64_tolerance

    misses = []
    float64_tol = trained_float64_tolerance(row.get("float64_computes_in") or [])
    if row.get("error_float64") is not None and row["error_float64"] > float64_tol:
        misses.append(f"float64 {row['error_float64']:.1e} > {float64_tol:g}")
    if row.get("error_float32") is not None and row["error_float32"] > TRAINED_RTOL_FLOAT32 and not row.get("at_rounding_floor"):
        misses.append(f"float32 {row['error_float32']:.1e} > {TRAINED_RTOL_FLOAT32:g} and its rounding over "
                      f"{ROUNDING_FLOOR_FACTOR:g}x the original's")
    if row.get("train_eval_difference") is not None and row["train_eval_difference"] > TRAINED_RTOL_FLOAT32:
        misses.append(f"train vs eval {row['train_eval_difference']:.1e}")
    return "; ".join(misses) or "over the tolerance"


def _trained_section(trained: dict[str, dict[str, Any]], keys: list[str], command: str | None) -> list[str]:
    """The trained-weights check (docs/method.md section 8): summary per source, failures, the command."""
    from normprop_fx.model_check import ROUNDING_FLOOR_FACTOR, TRAINED_RTOL_FLOAT32, TRAINED_RTOL_FLOAT64

    rows = [trained[k] for k in keys if k in trained and trained[k].get("has_bn") is not False]
    lines = ["## Trained weights: exact conversion", "",
             ("Every BatchNorm given trained-looking statistics and affine (`randomize_batchnorms`: statistics "
              "measured on its own input, over 16 samples, or up to 64 for 4096 values a channel, "
              "then perturbed; weight U(0.5, 1.5), bias N(0, 0.2^2)), converted with "
              "the default `init='auto'`, eval outputs compared with the original's on N(0, I) input "
              f"(relative L2). A model **passes** when every BatchNorm kept its function, float64 is within "
              f"{TRAINED_RTOL_FLOAT64:g}, train mode equals eval mode, and float32 is within {TRAINED_RTOL_FLOAT32:g} "
              f"or, where the original's own float32 forward is already that far from its float64 one (random-weight "
              f"BatchNorm networks amplify rounding), the conversion's distance to the float64 original is within "
              f"{ROUNDING_FLOOR_FACTOR:g}x the original's. A model whose float64 forward computes in float32 in "
              f"places (timm's efficientvit casts its linear attention to float32) has no float64 results there: "
              f"its float64 error is held to {TRAINED_RTOL_FLOAT32:g}, and the table counts it."), "",
             "| source | models checked | **pass** (target) | float32 <= 1e-5 | at the rounding floor | "
             "float64 <= 1e-10 | float64 forward in float32 in places | worst float64 | "
             "worst ratio of float32 roundings, converted / original |",
             "|---|---|---|---|---|---|---|---|---|"]
    for source, mine in _by_source(rows):
        n = len(mine)
        passed = sum(bool(r.get("passed")) for r in mine)
        verdict = "met" if passed / n >= TARGETS[source] else "**not met**"
        strict = sum(r.get("error_float32") is not None and r["error_float32"] <= TRAINED_RTOL_FLOAT32 for r in mine)
        floor = sum(bool(r.get("passed")) and r["error_float32"] > TRAINED_RTOL_FLOAT32 for r in mine)
        f64 = [r["error_float64"] for r in mine if r.get("error_float64") is not None]
        ratios = [r["converted_rounding"] / r["original_rounding"] for r in mine
                  if r.get("converted_rounding") is not None and r.get("original_rounding")]
        lines.append(f"| {source} | {n} | {passed} ({100 * passed / n:.2f}%) (target {TARGETS[source]:.0%}: {verdict}) | "
                     f"{_pct(strict, n)} | {floor} | {_pct(sum(e <= TRAINED_RTOL_FLOAT64 for e in f64), n)} | "
                     f"{sum(bool(r.get('float64_computes_in')) for r in mine)} | "
                     f"{_error(max(f64, default=None))} | {max(ratios, default=0):.2f}x |")
    failed = [r for r in rows if not r.get("passed")]
    lines += [""]
    if failed:
        lines += ["Models that do not pass (the original's own rounding: its float32 eval outputs against its "
                  "float64 ones):", "",
                  "| model | float32 | float64 | original's own rounding | ratio of roundings | reason |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(failed, key=lambda r: r["model"]):
            ratio = (f"{r['converted_rounding'] / r['original_rounding']:.2f}x"
                     if r.get("converted_rounding") is not None and r.get("original_rounding") else "-")
            reason = (r.get("failures") or [_over_tolerance(r)])[0].replace("|", "\\|")
            lines.append(f"| {r['model']} | {_error(r.get('error_float32'))} | {_error(r.get('error_float64'))} | "
                         f"{_error(r.get('original_rounding'))} | {ratio} | {reason} |")
        lines.append("")
    if command:
        lines += ["Made with:", "", "```", command, "```", ""]
    return lines


def _statistics_section(rows: list[dict[str, Any]], command: str | None) -> list[str]:
    """The layer statistics at each model's own input size and the seed spread of its corrections."""
    from normprop_fx.model_check import MEAN_TARGET, SEED_SPREAD_TARGET, STD_TARGET, WORST_STD_RANGE, expected_seed_spread

    rows = sorted((r for r in rows if r.get("has_bn") is not False), key=lambda r: r["model"])
    measured = [r for r in rows if r.get("layers")]
    low, high = WORST_STD_RANGE
    lines = ["## Layer statistics at each model's own input size", "",
             (f"Each model converted at `gamma_init=1` on its own input size (timm's `pretrained_cfg`, torchvision's "
              f"weights' crop size) once per calibration seed (0, 1, 2); every NormProp layer's output measured in eval "
              f"mode over 32 N(0, I) samples on the seed-0 conversion (`normprop_fx.model_check.check_statistics`). "
              f"Targets: >= 95% of all layers with std in [{STD_TARGET[0]}, {STD_TARGET[1]}] and |mean| < {MEAN_TARGET}; "
              f"every model's worst layer std within [{low}, {high}]; correction constants within "
              f"{SEED_SPREAD_TARGET:.0%} across the seeds."), "",
             "| source | models | measured | layers within | worst layer in range | constants within the seed target | failed |",
             "|---|---|---|---|---|---|---|"]
    for source, mine in _by_source(rows):
        ok = [r for r in mine if r.get("layers")]
        layers, within = sum(r["layers"] for r in ok), sum(r["within"] for r in ok)
        spread = [r for r in ok if r.get("seed_spread") is None or r["seed_spread"] <= SEED_SPREAD_TARGET]
        lines.append(f"| {source} | {len(mine)} | {len(ok)} | {_pct(within, layers)} of {layers} | "
                     f"{_pct(sum(bool(r.get('worst_within_range')) for r in ok), len(ok))} | {_pct(len(spread), len(ok))} | "
                     f"{len(mine) - len(ok)} |")

    def expected(r: dict[str, Any]) -> float | None:
        return expected_seed_spread(r.get("calibration_error"), r.get("seeds", 3))

    layers, within = sum(r["layers"] for r in measured), sum(r["within"] for r in measured)
    share = within / layers if layers else 0.0
    lines += ["", f"All layers: {within} of {layers} within ({share:.1%}; target 95%: "
              f"{'met' if share >= 0.95 else '**not met**'}). The rows are the models the commands below have "
              "checked so far; rerunning them resumes where they stopped. Where the deepest residual networks miss, "
              "their samples' own scales have spread apart with depth, which no constant correction undoes "
              "([docs/method.md](method.md) section 6, measured with `tools/calibration_stability.py --per-sample`).", "",
              *_precision_agreement(measured, expected, SEED_SPREAD_TARGET),
              "| model | input | calibration samples | layers within | std min (layer) | std max (layer) | worst abs(mean) | "
              "seed spread (correction) | expected from the report (correction) | reason |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("layers"):
            reason = (r.get("failures") or ["-"])[0].replace("|", "\\|")
            lines.append(f"| {r['model']} | - | - | - | - | - | - | - | - | {reason} |")
            continue
        flag = "" if r.get("worst_within_range") else " **out**"
        spread = ("-" if r.get("seed_spread") is None else
                  f"{r['seed_spread']:.1%}{'' if r['seed_spread'] <= SEED_SPREAD_TARGET else ' **over**'} ({r['seed_spread_at']})")
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input_shape'][1:]))} | {r.get('calibration_samples')} | "
                     f"{r['within']} / {r['layers']} | {r['min_std']:.3f} ({r['min_std_layer']}){flag} | "
                     f"{r['max_std']:.3f} ({r['max_std_layer']}) | {r['worst_abs_mean']:.3f} | {spread} | "
                     + ("not recorded" if "calibration_error" not in r else "none set by the sample" if expected(r) is None
                        else f"{expected(r):.1%} ({r['calibration_error_at']})") + " | |")
    if command:
        lines += ["", "Made with:", "", "```", command, "```"]
    return lines + [""]


def _precision_agreement(rows: list[dict[str, Any]], expected: Any, target: float) -> list[str]:
    """How well the seed-0 report's precision line (``ConversionReport.calibration_precision``)
    tells, from one conversion, which models' constants move past the seed target."""
    known = [r for r in rows if "calibration_error" in r]
    if not known:
        return []
    def over(value: float | None) -> bool:
        return value is not None and value > target
    both = sum(over(expected(r)) and over(r.get("seed_spread")) for r in known)
    missed = sum(not over(expected(r)) and over(r.get("seed_spread")) for r in known)
    false = sum(over(expected(r)) and not over(r.get("seed_spread")) for r in known)
    ratios = sorted(r["seed_spread"] / expected(r) for r in known if r.get("seed_spread") and expected(r))
    median = ratios[len(ratios) // 2] if ratios else float("nan")
    return [(f"**Expected from the report**: one conversion's report says how precisely the Gaussian sample set its least "
             f"precise correction (`ConversionReport.calibration_precision`, the audit's \"Calibration precision\" line): "
             f"the relative standard error of its scale, from the samples' own spread; times the expected range of "
             f"the seeds' normal draws (1.69 for 3) it is the spread to expect. Of the {len(known)} rows that record it, "
             f"{both + missed} have constants over the {target:.0%} seed target; the seed-0 report expects over "
             f"{target:.0%} for {both} of them and for {false} others. Measured over expected, median over the rows: "
             f"{median:.2f} (the measured spread is the largest over every constant, and later constants inherit "
             f"earlier ones' errors)."), ""]


def _memory_section(memory: dict[str, Any]) -> list[str]:
    """tools/convert_memory.py's measurements: convert's peak memory over the parameter memory."""
    import convert_memory

    return ["## Conversion memory", "",
            ("What `normprop_fx.convert` adds to a process's peak resident memory, over the bytes of the model's "
             "parameters and buffers, each measured in a fresh process (`tools/convert_memory.py`; with "
             "`inplace=False` the copy it returns is part of it). Targets: 2.5x with a copy, 1.5x in place. "
             "One run each: the same conversion's peak moves by up to ~10% from run to run (how the C heap's "
             "freed blocks lie when the peak comes; resnet50 in place: 0.175-0.194 GiB over five runs at d42afcf "
             "and 54ae70a), so compare changes by repeated runs, not by one row."), "",
            convert_memory.table(memory["rows"]), "", "Made with:", "", "```", memory["machine"]["command"], "```", ""]


def render_docs(rows: list[dict[str, Any]], command: str, selected: int | None = None,
                trained: dict[str, dict[str, Any]] | None = None, trained_command: str | None = None,
                statistics: list[dict[str, Any]] | None = None, statistics_command: str | None = None,
                memory: dict[str, Any] | None = None) -> str:
    """docs/zoo.md: summary counts per source first, then failures, then the table, then the command.
    ``trained`` (rows of ``--check trained`` by model) adds its section and a column; ``statistics``
    (every row of a ``--check statistics`` results file) a section of its own."""
    lines = ["# Model-zoo sweep", "",
             ("Every model through `normprop_fx.check_model` at `gamma_init=1` on N(0, I) input, "
             "no pretrained weights. Generated by `tools/zoo.py`; do not edit by hand."), ""]
    header = ["source", "models swept", "with BN", "without BN", "traced", "no BN left", "forward OK",
              "backward OK", "batch-independent", "**pass** (target)", "std within [0.7, 1.4], abs(mean) < 0.3",
              f"class kept (goal {CLASS_KEPT_GOAL:.0%})"]
    lines += ["## Summary", ""]
    if selected is not None and selected > len(rows):
        lines += [f"**A partial sweep: {len(rows)} of the {selected} models selected have results.**", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for source, mine in _by_source(rows):
        bn = [r for r in mine if r.get("has_bn") is not False]
        n = len(bn)
        passed = sum(bool(r.get("passed")) for r in bn)
        target = TARGETS[source]
        verdict = "met" if n and passed / n >= target else "**not met**"
        cells = [source, str(len(mine)), str(n), str(len(mine) - n),
                 _pct(sum(r.get("traced") is True for r in bn), n),
                 _pct(sum(r.get("left") == 0 and bool(r.get("batchnorms_found")) for r in bn), n),
                 _pct(sum(r.get("forward_ok") is True for r in bn), n),
                 _pct(sum(r.get("backward_ok") is True for r in bn), n),
                 _pct(sum(r.get("batch_independent") is True for r in bn), n),
                 f"{_pct(passed, n)} (target {target:.0%}: {verdict})",
                 _pct(sum(r.get("within_std_target") is True for r in bn), n),
                 _class_kept(bn)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ("A model **passes** when it has BatchNorm, none is left after conversion, and forward, "
              "backward (a finite gradient for every parameter the original model trains) and batch "
              "independence (train mode, float64, each sample alone vs in a batch of 2, tolerance "
              "1e-6 of the output scale) are OK. The std column is the per-layer target at init. "
              "**Class kept**: the converted model is of the user's class with its own forward (its root "
              "not rebuilt as a GraphModule, docs/method.md section 9), of the models converted; rows "
              "swept before that was recorded count as not known."), ""]
    ill = [r for r in rows if r.get("ill_conditioned")]
    if ill:
        lines += [("**Ill-conditioned at init** (a sample's alone-vs-batch difference is amplified rounding, not batch "
                   "dependence: with the other sample replaced it is bit for bit the same, and a 1e-15 relative change "
                   "of its own input moves it as much; `model_check._ill_conditioned`): " + ", ".join(
                       f"{r['model']} ({max(s['alone_vs_batch'] for s in r['ill_conditioned']):.1e} alone vs batch, "
                       f"{max(s['rounding_sensitivity'] for s in r['ill_conditioned']):.1e} from a 1e-15 change)"
                       for r in ill) + "."), ""]
    if trained:
        lines += _trained_section(trained, [r["model"] for r in rows], trained_command)
    if statistics:
        lines += _statistics_section(statistics, statistics_command)
    if memory:
        lines += _memory_section(memory)
    failed = [r for r in rows if r.get("has_bn") is not False and not r.get("passed")]
    if failed:
        lines += ["## Failures by category", "", "| category | models | examples |", "|---|---|---|"]
        for category, count in Counter(_category(r) for r in failed).most_common():
            examples = [r["model"] for r in failed if _category(r) == category][:4]
            lines.append(f"| {category or 'statistics only'} | {count} | {', '.join(examples)} |")
        lines += ["", "## Failure reasons", "",
                  ("The first failure of each model that does not pass, numbers and quoted names blanked out "
                   "to group alike reasons."), "", "| models | reason | examples |", "|---|---|---|"]
        for reason, count in Counter(_reason_key(r) for r in failed).most_common():
            examples = [r["model"] for r in failed if _reason_key(r) == reason][:3]
            lines.append(f"| {count} | {reason.replace('|', chr(92) + '|')} | {', '.join(examples)} |")
        lines.append("")
    columns = ["model", "input", "traced", "BN found / converted / left", "fwd", "bwd", "batch-indep.",
               "pass", "worst abs(std-1) (layer)", "worst abs(mean)", "std target", "convert s", "total s",
               "peak GiB", "class kept", "reason", *(["trained: pass (float32 / float64)"] if trained else [])]
    lines += ["## Models with BatchNorm", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted((r for r in rows if r.get("has_bn") is not False), key=lambda r: r["model"]):
        counts = (f"{r['batchnorms_found']} / {r['converted']} / {r['left']}"
                  if r.get("batchnorms_found") is not None else "-")
        worst = (f"{r['worst_std_deviation']:.3f} ({r['worst_std_layer']})"
                 if r.get("worst_std_deviation") is not None else "-")
        mean = f"{r['worst_abs_mean']:.3f}" if r.get("worst_abs_mean") is not None else "-"
        shape = "x".join(map(str, r["input_shape"][1:])) if r.get("input_shape") else "-"
        convert_s = f"{r['conversion_seconds']:.2f}" if r.get("conversion_seconds") is not None else "-"
        reason = (r.get("failures") or [""])[0].replace("|", "\\|")
        cells = [r["model"], shape, _yes(r.get("traced")), counts, _yes(r.get("forward_ok")),
                 _yes(r.get("backward_ok")), _yes(r.get("batch_independent")), _yes(bool(r.get("passed"))),
                 worst, mean, _yes(r.get("within_std_target")), convert_s, f"{r.get('seconds', 0):.1f}",
                 _peak(r), _yes(r.get("class_kept")), reason]
        if trained:
            t = trained.get(r["model"])
            cells.append("-" if t is None else f"{_yes(bool(t.get('passed')))} ({_error(t.get('error_float32'))} / "
                                               f"{_error(t.get('error_float64'))})")
        lines.append("| " + " | ".join(cells) + " |")
    without = sorted(r["model"] for r in rows if r.get("has_bn") is False)
    lines += ["", f"## Models without BatchNorm ({len(without)}, not checked)", "",
              ", ".join(without) if without else "none", ""]
    seconds = [r.get("seconds", 0.0) for r in rows]
    checked = sorted((r for r in rows if r.get("has_bn") is not False), key=lambda r: -r.get("seconds", 0.0))
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    loads = [r["loadavg"][0] for r in rows if "loadavg" in r]
    lines += ["## How this was made", "", "```", command, "```", "",
              (f"{len(rows)} models, {sum(seconds):.0f} s of worker time in all; a model with BatchNorm took "
               f"{_median([r.get('seconds', 0.0) for r in checked]):.1f} s (median), one without "
               f"{_median([r.get('seconds', 0.0) for r in rows if r.get('has_bn') is False]):.1f} s. "
               f"Torch threads per worker: {', '.join(map(str, threads)) or '-'}; 1-minute load average "
               f"while it ran: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} (a shared machine). "
               "Slowest: " + ", ".join(f"{r['model']} {r.get('seconds', 0.0):.0f} s" for r in checked[:8]) + "."),
              ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _recorded_command(results: Path) -> str | None:
    """The commands that added rows to a results file (its ``.cmd`` file beside it), if any."""
    path = results.with_suffix(results.suffix + ".cmd")
    return path.read_text().strip() if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = common.ArgumentParser(prog="zoo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=(*SOURCES, "all"), default="all")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="only models whose name (or source:name) matches; repeatable")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip these; repeatable")
    parser.add_argument("--models", nargs="+", default=None, metavar="SOURCE:NAME",
                        help="check exactly these models (timm:resnet50d, or python:my.module.factory for any "
                        "importable function that returns a model) instead of a source's list")
    parser.add_argument("--results", type=Path, default=Path("zoo-results.jsonl"),
                        help="JSON-lines file the rows are appended to (default zoo-results.jsonl)")
    parser.add_argument("--sample-every", type=int, default=1, metavar="N",
                        help="keep every Nth of the selected models, in name order (a partial sweep; default 1: all)")
    parser.add_argument("--redo", action="store_true", help="check models again even if the results file has them")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a model may take (default 600)")
    parser.add_argument("--memory-limit-gb", type=float, default=6,
                        help="resident memory a worker may reach before its model is stopped and made a "
                        "'memory' row, 0 for no limit (default 6: four people share 24 GiB here)")
    parser.add_argument("--small-size", type=int, default=64,
                        help="input side tried first (default 64); the model's default when the original fails on it")
    parser.add_argument("--check", choices=("init", "trained", "statistics"), default="init",
                        help="init: check_model at --gamma-init (default); trained: exact conversion of "
                        "trained-looking BatchNorms; statistics: layer statistics at the model's own input size "
                        "and the spread of the corrections over 3 calibration seeds (model_check.check_statistics)")
    parser.add_argument("--trained-results", type=Path, default=None,
                        help="with --write-docs: a results file of --check trained rows to add to the page")
    parser.add_argument("--statistics-results", type=Path, default=None,
                        help="with --write-docs: a results file of --check statistics rows to add to the page")
    parser.add_argument("--conversion-memory", type=Path, default=None, metavar="FILE",
                        help="with --write-docs: the JSON of tools/convert_memory.py to add to the page")
    parser.add_argument("--draw", type=int, default=None, metavar="N",
                        help="check N of the selected models drawn at random with --seed (after --sample-every)")
    parser.add_argument("--gamma-init", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true",
                        help="check nothing: only report (and --write-docs) the results already in the file")
    parser.add_argument("--write-docs", type=Path, metavar="PATH",
                        help="write the summary and table of the selected models' results (e.g. docs/zoo.md)")
    args = parser.parse_args(argv)
    for flag in ("jobs", "threads", "small_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not (args.timeout > 0 and args.gamma_init > 0 and args.memory_limit_gb >= 0):
        parser.error("--timeout and --gamma-init must be positive, --memory-limit-gb at least 0")

    if args.models:
        bad = [k for k in args.models if k.partition(":")[0] not in (*SOURCES, "python") or not k.partition(":")[2]]
        if bad:
            parser.error(f"--models takes SOURCE:NAME with SOURCE one of {', '.join(SOURCES)} or python "
                         f"(python:module.factory), got {bad[0]!r}")
        keys = select(args.models, args.include, args.exclude)
    else:
        sources = SOURCES if args.source == "all" else (args.source,)
        keys = select([k for s in sources for k in model_names(s)], args.include, args.exclude)
    if args.sample_every < 1:
        parser.error("--sample-every must be at least 1")
    keys = keys[:: args.sample_every]
    if args.draw is not None:
        if args.draw < 1:
            parser.error("--draw must be at least 1")
        keys = sorted(random.Random(args.seed).sample(keys, min(args.draw, len(keys))))
    if not keys:
        parser.error("no model matches the source and filters")

    existing = load_results(args.results)
    todo = [] if args.no_check else keys if args.redo else [k for k in keys if k not in existing]
    print(f"zoo.py: {len(keys)} models selected, {sum(k in existing for k in keys)} already in {args.results}, "
          f"{len(todo)} to check with {args.jobs} worker(s) x {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    options = {"seed": args.seed, "small_size": args.small_size, "gamma_init": args.gamma_init, "check": args.check}
    if todo:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            parser.error("the progress bar needs tqdm: pip install -e .[zoo]")
        args.results.parent.mkdir(parents=True, exist_ok=True)
        sweep(todo, args.results, options, jobs=args.jobs, timeout=args.timeout, threads=args.threads,
              memory_limit_gb=args.memory_limit_gb)
        with args.results.with_suffix(args.results.suffix + ".cmd").open("a") as record:
            record.write("python tools/zoo.py " + shlex.join(argv) + "\n")  # how these rows were made

    results = load_results(args.results)
    rows = [results[k] for k in keys if k in results]
    passed = sum(bool(r.get("passed")) for r in rows)
    with_bn = sum(r.get("has_bn") is not False for r in rows)
    print(f"zoo.py: {len(rows)} models, {with_bn} with BatchNorm (or unknown), {passed} pass")
    if args.write_docs:
        command = "python tools/zoo.py " + shlex.join(argv)
        args.write_docs.parent.mkdir(parents=True, exist_ok=True)
        trained, trained_command = None, None
        if args.trained_results is not None:
            if not args.trained_results.exists():
                parser.error(f"--trained-results {args.trained_results}: no such file")
            trained = load_results(args.trained_results)
            trained_command = _recorded_command(args.trained_results)
        statistics, statistics_command = None, None
        if args.statistics_results is not None:
            if not args.statistics_results.exists():
                parser.error(f"--statistics-results {args.statistics_results}: no such file")
            statistics = list(load_results(args.statistics_results).values())
            statistics_command = _recorded_command(args.statistics_results)
        memory = None
        if args.conversion_memory is not None:
            if not args.conversion_memory.exists():
                parser.error(f"--conversion-memory {args.conversion_memory}: no such file")
            memory = json.loads(args.conversion_memory.read_text())
        made = _recorded_command(args.results)
        if made:  # the sweeps that made the rows, then the command that wrote the page
            command = f"{made}\n{command}"
        args.write_docs.write_text(render_docs(rows, command, selected=len(keys), trained=trained,
                                               trained_command=trained_command, statistics=statistics,
                                               statistics_command=statistics_command, memory=memory))
        print(f"zoo.py: wrote {args.write_docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
