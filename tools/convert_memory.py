#!/usr/bin/env python3
"""Peak memory of ``normprop_fx.convert`` relative to the model's parameter memory.

    python tools/convert_memory.py torchvision:resnet50 torchvision:efficientnet_b7 timm:regnety_320 \\
        [--pixels N] [--json docs/conversion-memory.json]

Each measurement runs in a fresh process (spawned), so nothing of an earlier one is counted: the
model is built (``torch.manual_seed(0)``, no weights downloaded, train mode as built), its resident
memory is read, the process's peak resident memory is reset to it (Linux: ``/proc/self/clear_refs``),
the model is converted with ``gamma_init=1`` on an example input of the model's own input size
(``--pixels`` overrides it), and the peak is read. Reported per model, for ``inplace=False`` and
``inplace=True`` (one process each):

* ``added``: peak minus the resident memory before ``convert``, in GiB: what the conversion needs
  on top of the model it was given (with ``inplace=False`` that includes the copy it returns);
* ``ratio``: ``added`` over the bytes of the model's parameters and buffers;
* ``sample forward``: in a third process, what a plain eager no-grad forward of the original model
  on as many samples as the conversion's calibration sample started with adds to the peak: the
  part of ``added`` that running the calibration sample needs at all (it grows later, where the
  maps are smaller and within the start's memory: docs/method.md section 6).

The targets (issue 20): ratio <= 2.5 with a copy, <= 1.5 in place. Exit status 2 on a bad argument.
"""

from __future__ import annotations

import json
import multiprocessing
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import common

#: ratio targets: (peak - before) / parameter memory
TARGETS = {False: 2.5, True: 1.5}


def _build(spec: str, pixels: int | None) -> tuple[Any, tuple[int, ...], str]:
    import torch

    source, name = common.find_model(spec)
    torch.manual_seed(0)
    model = common.create_model(source, name)
    shape = common.default_input_size(source, name, model)
    if pixels:
        shape = (shape[0], pixels, pixels)
    return model, tuple(shape), f"{source}:{name}"


def _settled() -> float:
    """The resident memory now, the peak reset to it."""
    import gc

    gc.collect()
    before = common.resident_memory_gb()
    common.reset_peak_memory()
    return before


def measure_forward(spec: str, samples: int, pixels: int | None) -> float:
    """GiB a no-grad eager forward of the original on ``samples`` N(0, I) samples adds to the peak."""
    import torch

    torch.set_num_threads(1)
    model, shape, _ = _build(spec, pixels)
    x = torch.randn(samples, *shape)
    before = _settled()
    with torch.no_grad():
        model.eval()(x)
    return _peak() - before


def _peak() -> float:
    peak = common.peak_memory_gb()
    if peak is None:
        raise RuntimeError("this system has no /proc/self/status VmHWM: peak memory cannot be read")
    return peak


def measure(spec: str, inplace: bool, pixels: int | None) -> dict[str, Any]:
    """One conversion's memory, in this (fresh) process."""
    import warnings

    import torch

    import normprop_fx

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model, shape, key = _build(spec, pixels)
    tensors = list(model.parameters()) + list(model.buffers())
    parameter_gb = sum(t.numel() * t.element_size() for t in tensors) / 2**30
    before = _settled()
    start = time.perf_counter()
    converted = normprop_fx.convert(model, gamma_init=1.0, inplace=inplace, example_inputs=torch.empty(2, *shape))
    seconds = time.perf_counter() - start
    peak = _peak()
    report = converted.normprop_report
    samples = report.calibration_samples
    # A sample that grew during propagation started smaller: the start is what ran at the first,
    # largest maps (docs/method.md section 6), so the plain forward below is of the start.
    grown = re.search(r"grown from (\d+)", report.assumptions[-1] if report.assumptions else "")
    added = peak - before
    return {"model": key, "inplace": inplace, "input_shape": list(shape),
            "parameter_gb": round(parameter_gb, 3), "before_gb": round(before, 3), "peak_gb": round(peak, 3),
            "added_gb": round(added, 3), "ratio": round(added / parameter_gb, 3),
            "target": TARGETS[inplace], "met": added / parameter_gb <= TARGETS[inplace],
            "calibration_samples": samples, "start_samples": int(grown.group(1)) if grown else samples,
            "seconds": round(seconds, 1)}


def _child(conn: Any, function: Any, args: tuple[Any, ...]) -> None:
    try:
        conn.send(function(*args))
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        conn.send(RuntimeError(f"{type(err).__name__}: {err}"))


def run_isolated(function: Any, *args: Any) -> Any:
    """``function(*args)`` in a spawned process of its own; an exception there is raised here
    as a RuntimeError."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_child, args=(child, function, args))
    process.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = RuntimeError(f"the process died (exit status {process.exitcode})")
    finally:
        process.join()
    if isinstance(result, RuntimeError):
        raise result
    return result


def measure_model(spec: str, pixels: int | None) -> list[dict[str, Any]]:
    """The rows of one model: its conversion with a copy and in place, each with the sample forward."""
    rows = []
    for inplace in (False, True):
        try:
            rows.append(run_isolated(measure, spec, inplace, pixels))
        except RuntimeError as err:
            rows.append({"model": spec, "inplace": inplace, "error": str(err)})
    samples = {r["start_samples"] for r in rows if "error" not in r}
    if samples:
        try:
            forward = run_isolated(measure_forward, spec, samples.pop(), pixels)
        except RuntimeError as err:
            forward = None
            print(f"convert_memory.py: the sample forward of {spec} failed: {err}", file=sys.stderr)
        for r in rows:
            if "error" not in r and forward is not None:
                r["sample_forward_gb"] = round(forward, 3)
    return rows


def _samples(row: dict[str, Any]) -> str:
    start = row.get("start_samples", row["calibration_samples"])
    return str(start) if start == row["calibration_samples"] else f"{start}, grown to {row['calibration_samples']}"


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | input | inplace | parameters GiB | added by convert GiB | ratio (target) | calibration samples | "
             "their plain forward GiB | convert s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | {r['inplace']} | - | - | {r['error']} | - | - | - |")
            continue
        verdict = "met" if r["met"] else "**not met**"
        forward = f"{r['sample_forward_gb']:.3f}" if r.get("sample_forward_gb") is not None else "-"
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input_shape'][1:]))} | {r['inplace']} | "
                     f"{r['parameter_gb']:.3f} | {r['added_gb']:.3f} | {r['ratio']:.2f} (<= {r['target']:g}: {verdict}) | "
                     f"{_samples(r)} | {forward} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="SOURCE:NAME", help="e.g. torchvision:resnet50 timm:regnety_320")
    parser.add_argument("--pixels", type=int, default=None, help="input side instead of the model's own")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the command here")
    args = parser.parse_args(argv)
    if args.pixels is not None and args.pixels <= 0:
        parser.error(f"--pixels must be positive, got {args.pixels}")
    for spec in args.models:
        try:
            common.find_model(spec)
        except common.UnknownModelError as err:
            parser.error(str(err))
    rows = []
    for spec in args.models:
        rows += measure_model(spec, args.pixels)
        print("\n".join(json.dumps(r) for r in rows[-2:]), flush=True)
    print(table(rows))
    if args.json:
        command = "python tools/convert_memory.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        machine = {"command": command, "python": platform.python_version(), "processor": platform.processor() or platform.machine()}
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
