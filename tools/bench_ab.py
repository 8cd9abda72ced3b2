"""Eager training step of the conversion now against the conversion at an earlier commit, side by
side in one process, with the BatchNorm original and the no-norm floor.

``--workload`` picks the training step, eager (default) or compiled, or the inference of the
folded forms (``fold``; bn: conv-BN fused), eager or compiled.

A change to how NormProp modules compute (issue 19: the eager form, normprop_fx/eager.py) is best
judged against the code before it on the same machine in the same run: tools/bench.py times one
version. This tool extracts ``normprop_fx`` and ``passes`` at ``--base`` (``git archive``) into a
temporary package ``normprop_fx_base``, converts each model with both versions, and times a
training step (forward, backward, SGD) of bn, normprop (this checkout), normprop_base and floor,
interleaved in rotated order, for ``--rounds`` rounds; the ratios are medians of per-round
ratios. Same input as tools/bench.py's CPU default: batch 16, 128x128, fp32.

    python tools/bench_ab.py --base 0d7105e --models resnet18,resnet50 --threads 1 --rounds 7

Exit status: 0 on success, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402  (tools/bench.py: the floor variant)

import normprop_fx  # noqa: E402

VARIANTS = ("bn", "normprop", "normprop_base", "floor")


def base_package(commit: str, where: Path) -> object:
    """``normprop_fx`` (with ``passes`` inside, as setuptools installs it) at ``commit``, importable
    as ``normprop_fx_base``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "normprop_fx", "passes"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    package = where / "normprop_fx_base"
    (where / "normprop_fx").rename(package)
    (where / "passes").rename(package / "passes")
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bnormprop_fx\b", "normprop_fx_base", path.read_text()))
    sys.path.insert(0, str(where))
    return importlib.import_module("normprop_fx_base")


#: What is timed: (training?, folded?, compiled?)
WORKLOADS = {"train-eager": (True, False, False), "train-compiled": (True, False, True),
             "infer-folded-eager": (False, True, False), "infer-folded-compiled": (False, True, True)}


def measure(name: str, base: object, rounds: int, workload: str) -> dict[str, list[float]]:
    training, folded, compiled = WORKLOADS[workload]
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)()
    example = (torch.randn(2, 3, 128, 128),)
    models = {
        "bn": original,
        "normprop": normprop_fx.convert(original, example_inputs=example),
        "normprop_base": base.convert(original, example_inputs=example),
        "floor": bench.without_batchnorm(original),
    }
    if folded:  # bn: conv-BN folded (torch.fx.experimental.optimization.fuse), as tools/bench.py's bn_folded
        models = {"bn": bench.fuse(original.eval()), "normprop": normprop_fx.fold(models["normprop"]),
                  "normprop_base": base.fold(models["normprop_base"]), "floor": models["floor"].eval()}
    if compiled:  # as tools/bench.py compiles them: normprop_fx.compile (its CPU options for NormProp), each version its own
        models = {k: (base.compile if k == "normprop_base" else normprop_fx.compile)(m) for k, m in models.items()}
    x, y = torch.randn(16, 3, 128, 128), torch.randint(0, 1000, (16,))
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()} if training else {}

    def step(k: str) -> None:
        if not training:
            with torch.no_grad():
                models[k](x)
            return
        model = models[k].train()
        optimizers[k].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizers[k].step()

    for k in VARIANTS:
        step(k), step(k)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(rounds):
        for k in VARIANTS[r % 4:] + VARIANTS[:r % 4]:
            start = time.perf_counter()
            step(k), step(k)
            times[k].append((time.perf_counter() - start) / 2 * 1000)
    return times


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the earlier commit (anything git archive takes)")
    p.add_argument("--models", default="resnet18,resnet50", help="torchvision model names, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="train-eager",
                   help="the training step, eager (default) or compiled, or inference of the folded forms (bn: conv-BN fused), eager or compiled")
    p.add_argument("--json", type=Path, help="append the run to this JSON list")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if not hasattr(torchvision.models, m)]
    if unknown or args.rounds < 1 or args.threads < 1:
        p.error(f"unknown model(s) {unknown}" if unknown else "rounds and threads must be positive")
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True, text=True)
    if commit.returncode:
        p.error(f"--base {args.base!r} is not a commit of this repository")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "normprop_fx", "passes"],
                             capture_output=True, text=True).stdout.strip()
    if changed:  # the checkout's package is what runs as normprop: HEAD and the changes not committed
        head += " + uncommitted changes"
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = base_package(args.base, Path(tmp))
        for name in models:
            times = measure(name, base, args.rounds, args.workload)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios = {"normprop/bn": paired(times, "normprop", "bn"), "normprop_base/bn": paired(times, "normprop_base", "bn"),
                      "normprop/normprop_base": paired(times, "normprop", "normprop_base"),
                      "normprop/floor": paired(times, "normprop", "floor"), "normprop_base/floor": paired(times, "normprop_base", "floor")}
            rows.append([name, *(f"{med[k]:.1f}" for k in VARIANTS), *(f"{v:.3f}" for v in ratios.values())])
            results.append({"model": name, "all_ms": times, "ratios": ratios})
            print(f"{name}: done", file=sys.stderr, flush=True)
    headers = ["model", *(f"{k} ms" for k in VARIANTS), *ratios]
    print(f"{args.workload}, batch 16, 128 px, {args.threads} thread(s), {args.rounds} rounds; normprop = {head}, "
          f"normprop_base = {commit.stdout.strip()}; ratios: medians of per-round ratios")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    if args.json:
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        runs.append({"command": "python tools/bench_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "head": head, "base": commit.stdout.strip(), "workload": args.workload, "threads": args.threads, "torch": torch.__version__,
                     "results": results})
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
