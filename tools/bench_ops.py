"""Times the single eager ops the NormProp modules can write one affine pass with, side by side.

The eager forms (normprop_fx/eager.py) compute each constant affine that is left, ``x * a + c``, in
one native op. Which op is not a matter of taste: on CPU a ternary kernel (``torch.addcmul`` with
two 0-dim tensors) takes about twice a binary one with a Python scalar (``torch.add(c, x,
alpha=a)``), and writing into ``x`` (``out=x``) saves the new tensor. This tool times the
candidates on one activation-sized tensor, interleaved, and prints the median time of each, so
that a claim in a docstring can be checked on any machine:

    python tools/bench_ops.py --threads 1 --rounds 15 --json docs/bench_ops.json

Exit status: 0 on success, 2 for a bad argument.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import common


def machine_line() -> str:
    """The CPU model, the date and the load average at the start (the machine is shared)."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S')}, {common.cpu_model()}, torch {torch.__version__}, load average {load}"


def candidates(x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The ops, each computing ``x * a + c`` (or a bound: a copy, a plain add) on ``x``'s shape."""
    a, c = 1.2112, -0.1273
    at, ct = torch.tensor(a), torch.tensor(c)
    channels = x.shape[1]
    scale = torch.rand(channels, 1, 1) + 0.5
    shift = torch.randn(channels, 1, 1)
    work, small = x.clone(), torch.tensor(-1e-4)
    return {
        "addcmul(c, x, a), 0-dim tensors": lambda: torch.addcmul(ct, x, at),
        "add(c, x, alpha=a)": lambda: torch.add(ct, x, alpha=a),
        "x * a + c (two ops)": lambda: x * a + c,
        # (in place, a ~ 1 and c ~ 0, so that the repeated calls keep the values where they are)
        "add(c, x, alpha=a, out=x), in place": lambda: torch.add(small, work, alpha=1.0001, out=work),
        "x.mul_(a).add_(c), in place": lambda: work.mul_(1.0001).add_(-1e-4),
        "addcmul(shift, x, scale), per channel": lambda: torch.addcmul(shift, x, scale),
        "(x * scale).add_(shift), per channel": lambda: (x * scale).add_(shift),
        "x + c (bound: one binary op)": lambda: x + c,
        "x.clone() (bound: one copy)": lambda: x.clone(),
    }


def main(argv: list[str] | None = None) -> int:
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16,256,32,32", help="the tensor's shape, comma-separated (resnet50's "
                   "layer1 output at batch 16, 128 px)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=10, help="calls per op per round")
    p.add_argument("--json", type=Path, help="append the run to this JSON list")
    args = p.parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        p.error(f"--shape: integers separated by commas, got {args.shape!r}")
    if len(shape) != 4 or min(shape) < 1 or args.threads < 1 or args.rounds < 1 or args.iters < 1:
        p.error("--shape needs 4 positive sizes (N, C, H, W); --threads, --rounds, --iters must be positive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ops = candidates(torch.randn(shape))
    times: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(args.rounds):
        names = list(ops)
        names = names[r % len(names):] + names[:r % len(names)]  # rotated: no op always first
        for name in names:
            ops[name]()
            start = time.perf_counter()
            for _ in range(args.iters):
                ops[name]()
            times[name].append((time.perf_counter() - start) / args.iters * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{machine_line()}, {args.threads} thread(s), shape {shape}, {args.rounds} rounds of {args.iters} calls")
    width = max(map(len, medians))
    for name, ms in medians.items():
        print(f"{name:<{width}}  {ms:7.3f} ms")
    if args.json:
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        runs.append({"machine": machine_line(), "torch": torch.__version__, "python": platform.python_version(),
                     "threads": args.threads, "shape": list(shape), "rounds": args.rounds, "iters": args.iters,
                     "command": "python tools/bench_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "median_ms": medians})
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
