"""What the ops that ``normprop_fx.fold`` leaves beside the convs cost, in eager inference.

A folded NormProp network is its BN-folded original's convs and activations plus what fold could
not fold away (``folded.fold_report`` lists it): shifts kept in front of zero-padded convs
(``ConstantAffine``), the SE gate's shift (``fold.gated_affine``) and the map of a shift moved
behind a strided conv (``ShiftedInputConv``). This tool times, interleaved in rotated order in one
process, the BN-folded model (``bn``), the folded NormProp model (``normprop``) and the folded
model with one kind of those ops removed:

- ``no_shifts``: every kept ``ConstantAffine`` dropped, and every ``ShiftedInputConv`` reduced to
  its conv;
- ``no_gate_shifts``: every ``gated_affine`` reduced to the plain product ``x * gate``;
- ``neither``: both.

The reduced models compute a different function (the tool says by how much): they are the bound
on what making those ops free could gain, not a form to use. Ratios are medians of per-round
ratios to ``bn``. Same input as tools/bench.py's CPU default: batch 16, 128x128, fp32, in
``torch.no_grad``.

    python tools/fold_parts.py --models efficientnet_b0,mobilenet_v3_large --threads 1 --rounds 11

Exit status: 0 on success, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate
from torch import fx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402  (tools/bench.py: conv-BN folding as its bn_folded)

import normprop_fx  # noqa: E402
from normprop_fx.fold import ConstantAffine, ShiftedInputConv, gated_affine  # noqa: E402

VARIANTS = ("bn", "normprop", "no_shifts", "no_gate_shifts", "neither")


def without(folded: fx.GraphModule, *, shifts: bool, gate_shifts: bool) -> tuple[fx.GraphModule, int]:
    """A copy of ``folded`` with the kept shifts and/or the gates' shifts removed, and how many
    ops were removed."""
    gm = copy.deepcopy(folded)
    removed = 0
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if shifts and isinstance(module, ConstantAffine):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif shifts and isinstance(module, ShiftedInputConv):
            node.target = f"{node.target}.conv"
        elif gate_shifts and node.op == "call_function" and node.target is gated_affine:
            with gm.graph.inserting_before(node):
                product = gm.graph.call_function(torch.mul, (node.args[0], node.args[1]))
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
        else:
            continue
        removed += 1
    gm.recompile()
    return gm, removed


def measure(name: str, rounds: int) -> dict:
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)().eval()
    x = torch.randn(16, 3, 128, 128)
    folded = normprop_fx.fold(normprop_fx.convert(original, example_inputs=(x[:2],)).eval())
    models: dict[str, torch.nn.Module] = {"bn": bench.fuse(original), "normprop": folded}
    removed = {}
    for k, shifts, gates in (("no_shifts", True, False), ("no_gate_shifts", False, True), ("neither", True, True)):
        models[k], removed[k] = without(folded, shifts=shifts, gate_shifts=gates)
    with torch.no_grad():
        reference = folded(x)
        change = {k: ((models[k](x) - reference).abs().max() / reference.abs().max()).item() for k in removed}
        for k in VARIANTS:
            models[k](x), models[k](x)
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for r in range(rounds):
            for k in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                start = time.perf_counter()
                models[k](x), models[k](x)
                times[k].append((time.perf_counter() - start) / 2 * 1000)
    ratios = {k: statistics.median(a / b for a, b in zip(times[k], times["bn"], strict=True)) for k in VARIANTS[1:]}
    return {"model": name, "all_ms": times, "ratios_to_bn": ratios, "ops_removed": removed, "output_change": change}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="efficientnet_b0,mobilenet_v3_large", help="torchvision model names, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--json", type=Path, help="append the run to this JSON list")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if not hasattr(torchvision.models, m)]
    if unknown or not models or args.rounds < 1 or args.threads < 1:
        p.error(f"unknown model(s) {unknown}" if unknown else "give a model; rounds and threads must be positive")
    torch.set_num_threads(args.threads)
    results = []
    for name in models:
        results.append(measure(name, args.rounds))
        print(f"{name}: done", file=sys.stderr, flush=True)
    rows = [[r["model"], *(f"{r['ratios_to_bn'][k]:.3f}" for k in VARIANTS[1:]),
             ", ".join(f"{k}: {n} ops, output moved {r['output_change'][k]:.2g}" for k, n in r["ops_removed"].items())]
            for r in results]
    print(f"eager folded inference, batch 16, 128 px, {args.threads} thread(s), {args.rounds} rounds; time / bn (conv-BN folded), "
          "medians of per-round ratios")
    print(tabulate(rows, headers=["model", *(f"{k}/bn" for k in VARIANTS[1:]), "removed (a different function)"],
                   tablefmt="github", disable_numparse=True))
    if args.json:
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        runs.append({"command": "python tools/fold_parts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "threads": args.threads, "torch": torch.__version__, "results": results})
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
