#!/usr/bin/env python3
"""Two runs of the layer-statistics sweep side by side, model by model.

    python tools/compare_statistics.py e7e2be9:docs/zoo-statistics.jsonl docs/zoo-statistics.jsonl [--all]

Each argument is a results file of ``tools/zoo.py --check statistics`` (the last row of a model
wins), or ``REV:PATH`` for that file at a git revision. For every model measured in both, and
whose row differs (``--all``: every such model), one line: the NormProp layers within the bounds
(std in [0.7, 1.4], |mean| < 0.3), the smallest and largest layer std, whether the worst layer is
within [0.5, 2.0], the spread of the correction constants over the calibration seeds (target
5%), and the calibration samples, before -> after. Then the totals over the models of both: how
many meet each target, and the layers within. Exit status 2 on a bad argument.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
from zoo import load_results

#: the fields a line compares, and how each is printed
FIELDS = (("within", "{}"), ("min_std", "{:.3f}"), ("max_std", "{:.3f}"), ("seed_spread", "{:.3f}"),
          ("calibration_samples", "{}"))


def read(spec: str) -> dict[str, dict[str, Any]]:
    """The statistics rows of a results file, or of ``REV:PATH`` in git, by model."""
    path = Path(spec)
    if not path.exists():
        rev, _, name = spec.partition(":")
        if not name:
            raise ValueError(f"{spec}: no such file (REV:PATH reads a file at a git revision)")
        shown = subprocess.run(["git", "show", f"{rev}:{name}"], capture_output=True, text=True)
        if shown.returncode:
            raise ValueError(f"{spec}: {shown.stderr.strip()}")
        with tempfile.TemporaryDirectory() as where:
            path = Path(where) / "results.jsonl"
            path.write_text(shown.stdout)
            return _measured(load_results(path))
    return _measured(load_results(path))


def _measured(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The statistics rows that measured layers."""
    return {m: r for m, r in rows.items() if r.get("check") == "statistics" and r.get("layers")}


def targets(row: dict[str, Any]) -> tuple[bool, bool]:
    """(worst layer within [0.5, 2.0], constants within 5% over the seeds) of a row."""
    spread = row.get("seed_spread")
    return bool(row.get("worst_within_range")), spread is None or spread <= 0.05


def line(model: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    cells = []
    for field, fmt in FIELDS:
        a, b = before.get(field), after.get(field)
        cells.append(f"{field} {'-' if a is None else fmt.format(a)} -> {'-' if b is None else fmt.format(b)}")
    (wa, sa), (wb, sb) = targets(before), targets(after)
    marks = f"worst in range {'yes' if wa else 'no'} -> {'yes' if wb else 'no'}; spread target {'yes' if sa else 'no'} -> {'yes' if sb else 'no'}"
    return f"{model} (of {after['layers']} layers): " + ", ".join(cells) + f"; {marks}"


def main(argv: list[str] | None = None) -> int:
    parser = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--all", action="store_true", help="a line for every model measured in both")
    args = parser.parse_args(argv)
    try:
        before, after = read(args.before), read(args.after)
    except ValueError as err:
        parser.error(str(err))
    both = sorted(set(before) & set(after))
    if not both:
        parser.error("no model is measured in both files")
    changed = 0
    for model in both:
        a, b = before[model], after[model]
        differs = any(a.get(f) != b.get(f) for f, _ in FIELDS)
        changed += differs
        if differs or args.all:
            print(line(model, a, b))
    print(f"models measured in both: {len(both)}, rows that differ: {changed}")
    for name, rows in (("before", before), ("after", after)):
        met = [targets(rows[m]) for m in both]
        within = sum(rows[m]["within"] for m in both)
        layers = sum(rows[m]["layers"] for m in both)
        print(f"{name}: worst layer in range {sum(w for w, _ in met)} of {len(both)}, constants within 5% "
              f"{sum(s for _, s in met)} of {len(both)}, both {sum(w and s for w, s in met)}; "
              f"layers within {within} of {layers} ({100 * within / layers:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
