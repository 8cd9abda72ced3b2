#!/usr/bin/env python3
"""How long ``normprop_fx.convert`` takes, this checkout against another commit, side by side.

    python tools/convert_time.py --base e7e2be9 resnet50 efficientnet_b0 [--rounds 3] [--pixels 224]

Each torchvision model is built once (``torch.manual_seed(0)``, no weights) and converted with
``gamma_init=1`` on a ``(2, 3, P, P)`` example input by this checkout's package and by the one at
``--base`` (``tools/bench_ab.py``'s ``normprop_fx_base``), alternately, ``--rounds`` times, one
thread. Printed per model: the median seconds of each, their ratio, and the calibration samples
this checkout used. Exit status 2 on a bad argument.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import common


def main(argv: list[str] | None = None) -> int:
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="torchvision model names")
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pixels", type=int, default=224)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.pixels < 1:
        parser.error("--rounds and --pixels must be at least 1")
    import torch
    import torchvision

    import bench_ab
    import normprop_fx

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as where:
        base = bench_ab.base_package(args.base, Path(where))
        for name in args.models:
            torch.manual_seed(0)
            model = torchvision.models.get_model(name)
            example = torch.empty(2, 3, args.pixels, args.pixels)
            times: dict[str, list[float]] = {"base": [], "this": []}
            for _ in range(args.rounds):
                for key, package in (("base", base), ("this", normprop_fx)):
                    start = time.perf_counter()
                    converted = package.convert(model, gamma_init=1.0, example_inputs=example)
                    times[key].append(time.perf_counter() - start)
            b, t = statistics.median(times["base"]), statistics.median(times["this"])
            print(f"{name}: convert s (median of {args.rounds}): {args.base} {b:.2f}, this checkout {t:.2f}, "
                  f"ratio {t / b:.2f}; calibration samples {converted.normprop_report.calibration_samples}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
