#!/usr/bin/env python3
"""Measure tools/train.py on several processes against one process, and write docs/distributed.md.

    .venv/bin/python tools/distributed_report.py --out docs/distributed --doc docs/distributed.md

Runs the same short Fashion-MNIST training twice: under torchrun on --nproc processes (gloo on
127.0.0.1, each process trains on global batch / nproc samples) and as a plain one-process
tools/train.py, with the same global batch, learning rate, initial weights and data order. Keeps
each run's results.json and full output under --out and renders the page: time per step, final
test accuracy and train loss per variant, and whether the NormProp runs of both match (their
gradients are equal, so they should, to rounding). --report-only re-renders the page from --out.

Exit status: 0 on success, 1 when a training run fails, 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tabulate import tabulate

import common
from common import NOTES_END, NOTES_START, VARIANT_LABELS

ROOT = Path(__file__).resolve().parents[1]
# the documented run: a few minutes on 2 shared CPU cores
DEFAULT_TRAIN_OPTIONS = "--variants bn,np,np+stab --batch-sizes 128 --lrs 0.01,0.03 --epochs 3 --no-progress"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (default 2)")
    p.add_argument("--train-options", default=DEFAULT_TRAIN_OPTIONS,
                   help=f"tools/train.py options of both runs (default {DEFAULT_TRAIN_OPTIONS!r})")
    p.add_argument("--data-dir", default=None, help="passed to tools/train.py --data-dir")
    p.add_argument("--out", type=Path, default=Path("docs/distributed"),
                   help="folder for each run's results.json and output (default docs/distributed)")
    p.add_argument("--doc", type=Path, default=None, help="write the markdown page there")
    p.add_argument("--report-only", action="store_true", help="do not train: render the page from --out")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a training run may take (default 1800)")
    args = p.parse_args(argv)
    if args.nproc < 2:
        p.error("--nproc must be at least 2 (the one-process run is always made)")
    train_options = shlex.split(args.train_options)
    for option in ("--out", "--doc", "--data-dir", "--device", "--sync-bn"):
        if option in train_options:
            p.error(f"--train-options must not set {option} (this tool sets it, or the run is a CPU one)")
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The two tools/train.py command lines, without --out (given per run)."""
    options = shlex.split(args.train_options) + (["--data-dir", args.data_dir] if args.data_dir else [])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return {f"{args.nproc}proc": [*torchrun, "tools/train.py", *options], "1proc": [sys.executable, "tools/train.py", *options]}


def train(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    for name, command in run_commands(args).items():
        with tempfile.TemporaryDirectory() as scratch:  # train.py's plots stay out of the repository
            full = [*command, "--out", scratch]
            print(f"+ {shlex.join(full)}", flush=True)
            start = time.perf_counter()
            process = subprocess.Popen(full, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True)
            try:
                stdout, stderr = process.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers
                process.communicate()
                print(f"distributed_report.py: {name} run took over {args.timeout:g} s; stopped", file=sys.stderr)
                return 1
            seconds = time.perf_counter() - start
            output = stdout + (f"\n--- stderr ---\n{stderr}" if stderr.strip() else "")
            print(output)
            if process.returncode != 0:
                print(f"distributed_report.py: {name} run failed with exit status {process.returncode}", file=sys.stderr)
                return 1
            (args.out / name).mkdir(exist_ok=True)
            shutil.copy(Path(scratch) / "results.json", args.out / name / "results.json")
        (args.out / name / "output.txt").write_text(output)
        (args.out / name / "run.json").write_text(json.dumps(
            {"command": _display(command), "wall_seconds": seconds,
             "date": datetime.datetime.now().isoformat(timespec="seconds"),
             "report_command": shlex.join([".venv/bin/python", "tools/distributed_report.py", *sys.argv[1:]]),
             "train_options": args.train_options, "nproc": args.nproc}, indent=1))
    return 0


def _display(command: list[str]) -> str:
    """A command line as typed from the repository root (torchrun's default port instead of the
    free one this tool picked)."""
    words = [".venv/bin/python" if w == sys.executable else w for w in command]
    if words[1:3] == ["-m", "torch.distributed.run"]:
        words = [".venv/bin/torchrun", *words[3:]]
    if "--master-port" in words:
        i = words.index("--master-port")
        del words[i:i + 2]
    return shlex.join(words)


# ----------------------------------------------------------------------------- analysis


def seconds_per_step(run: dict[str, Any]) -> float:
    steps = sum(e["steps"] for e in run["epochs"])
    return sum(e["seconds"] for e in run["epochs"]) / steps if steps else float("nan")


def compare(many: dict[str, Any], one: dict[str, Any]) -> list[dict[str, Any]]:
    """Per run (variant, batch size, lr) present in both payloads: how far the multi-process run is
    from the one-process one. A run "matches" when both end the same way (trained, diverged, ...)
    with the same final test accuracy."""
    single = {(r["variant"], r["batch_size"], r["lr"]): r for r in one["runs"]}
    rows = []
    for run in many["runs"]:
        other = single.get((run["variant"], run["batch_size"], run["lr"]))
        if other is None:
            continue
        pairs = list(zip(run["epochs"], other["epochs"]))
        loss = max((abs(a["train_loss"] - b["train_loss"]) / abs(b["train_loss"]) for a, b in pairs), default=None)
        same_end = run["status"] == other["status"] and len(run["epochs"]) == len(other["epochs"])
        rows.append({"variant": run["variant"], "batch_size": run["batch_size"], "lr": run["lr"],
                     "accuracy": (_accuracy(run), _accuracy(other)), "loss_difference": loss,
                     "epochs_other_accuracy": sum(a["test_accuracy"] != b["test_accuracy"] for a, b in pairs),
                     "match": same_end and run["final_accuracy"] == other["final_accuracy"]})
    return rows


def _accuracy(run: dict[str, Any]) -> str:
    if run["status"] in ("trained", "collapsed"):
        return f"{100 * run['final_accuracy']:.2f}" + (" (collapsed)" if run["status"] == "collapsed" else "")
    step = re.search(r"step (\d+)", run.get("detail", ""))
    return f"{run['status']} (step {step.group(1)})" if step else run["status"]


def results_table(payloads: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, payload in payloads.items():
        dist = payload["meta"].get("distributed", {})
        world = dist.get("world_size", 1)
        where = f"{world} ({dist['backend']}, CPU)" if dist.get("backend") else "1 (plain, CPU)"
        for run in payload["runs"]:
            last = run["epochs"][-1] if run["epochs"] else None
            rows.append([VARIANT_LABELS[run["variant"]], where, str(run["batch_size"]), str(run["batch_size"] // world),
                         f"{run['lr']:g}", f"{1000 * seconds_per_step(run):.0f}", _accuracy(run),
                         f"{last['train_loss']:.4f}" if last else "-"])
    headers = ["variant", "processes", "global batch", "batch per process", "lr", "ms / step", "final test acc %",
               "last epoch train loss"]
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def comparison_table(rows: list[dict[str, Any]], nproc: int) -> str:
    table = [[VARIANT_LABELS[r["variant"]], str(r["batch_size"]), f"{r['lr']:g}", r["accuracy"][0], r["accuracy"][1],
              "yes" if r["match"] else "no",
              "-" if r["loss_difference"] is None else f"{r['loss_difference']:.1e}", str(r["epochs_other_accuracy"])]
             for r in rows]
    headers = ["variant", "global batch", "lr", f"final test acc %, {nproc} processes", "final test acc %, 1 process",
               "same end", "max relative train-loss difference (epoch means)", "epochs with another test accuracy"]
    return tabulate(table, headers, tablefmt="github", disable_numparse=True)


def gpu_commands(options: str) -> list[tuple[str, str]]:
    """The commands of the GPU rows: the same training with nccl, and BN with SyncBatchNorm."""
    words = shlex.split(options)
    if "--variants" in words:
        i = words.index("--variants")
        del words[i:i + 2]
    base = ".venv/bin/torchrun --nproc-per-node 1 tools/train.py --device cuda"
    return [("NormProp and BN, nccl, 1 GPU", f"{base} {options} --out docs/distributed/gpu"),
            ("BN + SyncBatchNorm, nccl, 1 GPU", f"{base} {shlex.join(words)} --variants bn --sync-bn "
             "--out docs/distributed/gpu_syncbn")]


def _load(payload: dict[str, Any]) -> str:
    return str(tuple(round(x, 2) for x in payload["meta"].get("loadavg_end", ())))


def render(payloads: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]], outputs: dict[str, str],
           out_rel: str, notes: str = "") -> str:
    """The page, from each run's results.json payload, run.json record and output (keyed by
    "<N>proc" and "1proc")."""
    record = runs["1proc"]
    command, train_options, nproc = record["report_command"], record["train_options"], record["nproc"]
    many, one = payloads[f"{nproc}proc"], payloads["1proc"]
    rows = compare(many, one)
    np_rows = [r for r in rows if r["variant"].startswith("np")]
    bn_rows = [r for r in rows if r["variant"].startswith("bn")]
    verdict = (f"{sum(r['match'] for r in np_rows)} of {len(np_rows)} NormProp runs on {nproc} processes match "
               f"their one-process run, {sum(r['match'] for r in bn_rows)} of {len(bn_rows)} BN runs")
    gpu = "\n".join(f"| {name} | not measured (no GPU lent) | `{cmd}` |" for name, cmd in gpu_commands(train_options))
    logs = "\n\n".join(f"### `{runs[name]['command']}`\n\n{runs[name]['wall_seconds']:.0f} s wall, "
                       f"{runs[name]['date']}\n\n```\n{outputs[name].rstrip()}\n```" for name in payloads)
    meta = one["meta"]
    return f"""# Training on several processes: NormProp vs BatchNorm under torchrun

Produced by this command (from the repository root):

```
{command}
```

It runs tools/train.py twice with the same options (`{train_options}`): under
`torchrun --nproc-per-node {nproc}` (DistributedDataParallel, gloo on 127.0.0.1, each process trains on
global batch / {nproc} samples of every global batch) and as a plain one-process run. Same initial
weights, data order, global batch and learning rate. Each run's results.json and full output are in
`{out_rel}/`; the same command with `--report-only` rebuilds this page from them.

- Data: {meta['data']}.
- Machine, {nproc} processes: {many['meta']['machine']}; load average at the end {_load(many)}.
- Machine, 1 process: {meta['machine']}; load average at the end {_load(one)}.
- Timings are noisy: this machine has 2 CPU cores shared with other jobs, and the {nproc} processes of the
  distributed run (one torch thread each) compete with each other and with those jobs for the 2 cores.
  "ms / step" is training time only (evaluation excluded), the slowest process's, averaged over the run.

## Result

{verdict} (end the same way with the same final test accuracy).

{results_table(payloads)}
| NormProp / BN, nccl on GPU | not measured | | | | | | |

{comparison_table(rows, nproc)}

NormProp has no batch statistics: DDP's averaged gradient over {nproc} parts of a batch is the
full-batch gradient (tests/test_distributed.py checks it to rounding), so every step is the
one-process step up to float32 rounding; how far two runs drift apart over many steps depends on
how much the run amplifies such differences (see the notes). BatchNorm normalizes each process's part with that part's own mean and
variance, so its loss, gradients and running statistics are those of a batch of
global / {nproc}: not the same training.

### Not measured: GPU (nccl)

No GPU was lent to this session. These commands would measure it (one process per GPU; with one
GPU SyncBatchNorm has no other process to synchronize with, use `--nproc-per-node 2` or more on a
machine with that many GPUs):

| run | status | command |
|---|---|---|
{gpu}

## Notes

{NOTES_START}
{notes or "(No notes yet: what is written between these markers is kept when the page is rebuilt.)"}
{NOTES_END}

## Full output

{logs}
"""


def preserved_notes(doc: Path) -> str:
    """The text between the notes markers of an existing page (kept when the page is rebuilt)."""
    notes = (common.notes_in(doc) or "").strip()
    return "" if notes.startswith("(No notes yet") else notes


def report(args: argparse.Namespace) -> int:
    names = [f"{args.nproc}proc", "1proc"]
    missing = [n for n in names if not (args.out / n / "run.json").is_file()]
    if missing:
        print(f"distributed_report.py: error: no runs {', '.join(missing)} under {args.out}", file=sys.stderr)
        return 1
    payloads = {n: json.loads((args.out / n / "results.json").read_text()) for n in names}
    runs = {n: json.loads((args.out / n / "run.json").read_text()) for n in names}
    outputs = {n: (args.out / n / "output.txt").read_text() for n in names}
    print(comparison_table(compare(payloads[names[0]], payloads[names[1]]), args.nproc))
    if args.doc is not None:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(render(payloads, runs, outputs, os.path.relpath(args.out, args.doc.parent),
                                   preserved_notes(args.doc)))
        print(f"wrote {args.doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.report_only:
        status = train(args)
        if status:
            return status
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
