"""Data-parallel training with torch.distributed: 2 gloo processes on 127.0.0.1 (a free port,
bounded in time). DDP gradients of a NormProp conversion equal the single-process full-batch
gradients; a BatchNorm model's do not (each rank normalizes with its own batch statistics).
tools/train.py runs under torchrun, matches the one-process run for NormProp, and only rank 0
writes files."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import normprop_fx
from test_training import _fake_fashion_mnist, _load_tool, train_tool  # tools/train.py, loaded once

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 120  # a hung collective fails the test after this long instead of blocking CI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_without_launcher() -> dict[str, str]:
    """This process's environment without the variables of a launcher that may have started it."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in names}


# ----------------------------------------------------------------------------- gradients


def _cases() -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """Models with one global batch of 8 each, built the same way in every process. In float64
    the DDP and full-batch gradients of a NormProp network differ only by rounding (~1e-16);
    resnet18 runs in float32 too, the dtype of real training."""
    import torchvision

    torch.manual_seed(0)
    small = train_tool.SmallResNet((8, 16, 32))
    small_x, small_y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    resnet18 = torchvision.models.resnet18(num_classes=10)
    r18_x, r18_y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    r18_np = normprop_fx.convert(resnet18, example_inputs=r18_x[:1])
    return {
        "small_resnet_bn_float64": (small.double(), small_x.double(), small_y),
        "small_resnet_np_float64": (normprop_fx.convert(small).double(), small_x.double(), small_y),
        "resnet18_bn_float64": (copy.deepcopy(resnet18).double(), r18_x.double(), r18_y),
        "resnet18_np_float64": (copy.deepcopy(r18_np).double(), r18_x.double(), r18_y),
        "resnet18_np_float32": (r18_np, r18_x, r18_y),
    }


_CASE_NAMES = {"small_resnet_bn_float64", "small_resnet_np_float64", "resnet18_bn_float64", "resnet18_np_float64",
               "resnet18_np_float32"}


def _gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _gradient_worker(rank: int, world: int, port: int, out: str) -> None:
    """For every case: the DDP gradients of this rank's part of the batch, how far they are from
    the full-batch gradients of one process (computed here, without DDP), and whether they are
    rank 0's exactly. Written to out/rank{rank}.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    found = {}
    try:
        for name, (model, x, y) in _cases().items():
            full_batch = _gradients(copy.deepcopy(model), x, y)
            # tools/train.py's split of a global batch and its DDP wrapper
            index = train_tool.rank_shard(torch.arange(len(y)), rank, world)
            net = train_tool.wrap_ddp(model.train())
            F.cross_entropy(net(x[index]), y[index]).backward()
            ddp = {n: p.grad for n, p in model.named_parameters()}
            whole, worst = _relative(ddp, full_batch)
            flat = torch.cat([g.flatten() for g in ddp.values()])
            rank0 = flat.clone()
            dist.broadcast(rank0, src=0)
            found[name] = {"whole": whole, "worst": worst, "same_as_rank0": torch.equal(flat, rank0)}
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(found))


def _spawn(fn, *args) -> None:
    """Run fn(rank, WORLD, *args) in WORLD fresh processes; fail (not hang) after TIMEOUT_S."""
    context = mp.start_processes(fn, args=(WORLD, *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a worker failed
            if time.monotonic() >= deadline:
                pytest.fail(f"the {WORLD} gloo processes did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(relative difference of the whole gradient vectors, the largest one of a single tensor)."""
    assert a.keys() == b.keys()
    flat_a = torch.cat([a[n].double().flatten() for n in b])
    flat_b = torch.cat([b[n].double().flatten() for n in b])
    whole = ((flat_a - flat_b).norm() / flat_b.norm()).item()
    worst = max(((a[n].double() - b[n].double()).norm() / b[n].double().norm().clamp_min(1e-30)).item() for n in b)
    return whole, worst


@contextlib.contextmanager
def _one_thread():
    """torch on one thread, as the workers (and tools/train.py by default): on a busy 2-core machine
    these small models run many times slower on 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory) -> list[dict[str, dict]]:
    """Every rank's record of every case."""
    out = tmp_path_factory.mktemp("ddp_gradients")
    _spawn(_gradient_worker, _free_port(), str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_vs_full_batch(ddp_records) -> dict[str, dict]:
    return ddp_records[0]


def test_ddp_leaves_every_rank_the_same_gradient(ddp_records):
    assert all(record.keys() == _CASE_NAMES for record in ddp_records)
    assert all(record[case]["same_as_rank0"] for record in ddp_records for case in _CASE_NAMES)


@pytest.mark.parametrize(("case", "bound"), [("small_resnet_np_float64", 1e-10), ("resnet18_np_float64", 1e-10),
                                           ("resnet18_np_float32", 1e-6)])
def test_ddp_gradients_of_normprop_equal_the_full_batch_ones(case, bound, ddp_vs_full_batch):
    assert ddp_vs_full_batch[case]["whole"] <= bound, ddp_vs_full_batch[case]


@pytest.mark.parametrize("case", ["small_resnet_bn_float64", "resnet18_bn_float64"])
def test_ddp_gradients_of_batchnorm_differ_from_the_full_batch_ones(case, ddp_vs_full_batch):
    # each rank normalized its 4 samples with their own mean and variance
    assert ddp_vs_full_batch[case]["whole"] > 1e-2, ddp_vs_full_batch[case]


def test_rank_shard_is_the_distributed_sampler_split():
    """Splitting each global batch with rank_shard gives every rank the batches that
    DistributedSampler (no shuffling of its own, over the epoch's permutation) would give it."""
    from torch.utils.data import DistributedSampler

    order = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    global_batches = order.split(12)
    for rank in range(3):
        sampler = DistributedSampler(order.tolist(), num_replicas=3, rank=rank, shuffle=False, drop_last=True)
        per_rank = order[list(sampler)].split(4)
        ours = [train_tool.rank_shard(b, rank, 3) for b in global_batches]
        assert len(per_rank) == len(ours) and all(torch.equal(a, b) for a, b in zip(per_rank, ours))
    parts = [train_tool.rank_shard(global_batches[0], r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == sorted(global_batches[0].tolist())


# ----------------------------------------------------------------------------- tools/train.py


def test_sync_bn_on_cpu_is_refused_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tool.parse_args(["--sync-bn"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sync-bn needs --device cuda" in err and "GPU" in err


def test_batch_sizes_must_split_evenly_over_the_processes(capsys, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert train_tool.parse_args(["--batch-sizes", "128,8"]).batch_sizes == [128, 8]
    with pytest.raises(SystemExit) as exit_info:
        train_tool.parse_args(["--batch-sizes", "128,8,1"])
    assert exit_info.value.code == 2 and "batch size(s) 1 cannot be split evenly over 2" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # the other ranks exit the same way without repeating the line
    with pytest.raises(SystemExit):
        train_tool.parse_args(["--batch-sizes", "128,8,1"])
    assert capsys.readouterr().err == ""


def _run_group(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a new session; on timeout the whole process group (torchrun and its
    workers) is killed and the test fails."""
    process = subprocess.Popen(command, cwd=ROOT, env=_env_without_launcher(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_train_tool_under_torchrun_matches_one_process_and_only_rank0_writes(tmp_path):
    pytest.importorskip("matplotlib")
    data_dir, out, doc, audit = tmp_path / "data", tmp_path / "out", tmp_path / "doc" / "training.md", tmp_path / "audit"
    data_dir.mkdir()
    audit.mkdir()
    _fake_fashion_mnist(data_dir)
    options = ["--data-dir", str(data_dir), "--quick", "--batch-sizes", "16", "--variants", "bn,np", "--lrs", "0.1",
               "--epochs", "2", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    result = _run_group([*torchrun, str(ROOT / "tests" / "audit_writes.py"), str(audit), str(tmp_path),
                         str(ROOT / "tools" / "train.py"), *options, "--out", str(out), "--doc", str(doc)],
                        timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    # only rank 0 printed and wrote: each epoch line once, rank 1 touched nothing under tmp_path
    assert sum("epoch 1/2" in line for line in result.stdout.splitlines()) == 2, result.stdout
    writes = {r: (audit / f"rank{r}.txt").read_text().splitlines() for r in range(WORLD)}
    assert writes[1] == [], writes[1]
    assert any(line.endswith(str(out / "results.json")) for line in writes[0]), writes[0]
    assert {p.name for p in out.iterdir()} == {"results.json", "accuracy.png", "layer_statistics.png"}
    assert doc.is_file()

    payload = json.loads((out / "results.json").read_text())
    meta = payload["meta"]
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo", "device": "cpu", "sync_bn": False}
    assert meta["command"].startswith(".venv/bin/torchrun --nproc-per-node 2 tools/train.py --data-dir")
    runs = {r["variant"]: r for r in payload["runs"]}
    assert all(r["status"] in ("trained", "collapsed") and [e["steps"] for e in r["epochs"]] == [6, 6]
               for r in runs.values())

    # the same runs on one process (this one), the global batch of 16 whole
    args = train_tool.parse_args(options)
    data = train_tool.load_data(args)
    single = {}
    for variant in ("bn", "np"):
        torch.manual_seed(args.seed)
        with _one_thread():
            single[variant] = train_tool.train_run(train_tool.build_model(args.model), variant, 16,
                                               train_tool.lr_grid(args, 16)[0], data, train_tool.run_settings(args, 16), args.model, log=lambda _: None)
    assert single["np"].lr == runs["np"]["lr"]
    for ours, theirs in zip(single["np"].epochs, runs["np"]["epochs"]):
        assert abs(ours["train_loss"] - theirs["train_loss"]) <= 1e-5 * ours["train_loss"], (ours, theirs)
        assert ours["test_accuracy"] == theirs["test_accuracy"], (ours, theirs)
    # BN's loss is computed with each rank's own batch statistics: not the one-process run
    bn_first = single["bn"].epochs[0]["train_loss"]
    assert abs(bn_first - runs["bn"]["epochs"][0]["train_loss"]) > 1e-3 * bn_first


def _payload(world: int, runs: list[tuple[str, float, float]]) -> dict:
    meta = {"data": "synthetic", "machine": "test machine", "loadavg_end": [1.0, 1.0, 1.0],
            "distributed": {"world_size": world, "backend": "gloo" if world > 1 else None}}
    return {"meta": meta, "runs": [
        {"variant": v, "batch_size": 16, "lr": 0.1, "status": "trained", "final_accuracy": acc,
         "epochs": [{"steps": 4, "seconds": 0.2, "train_loss": loss, "test_accuracy": acc}]} for v, loss, acc in runs]}


def test_distributed_report_says_whether_the_runs_match(tmp_path):
    report = _load_tool("distributed_report")
    one = _payload(1, [("bn", 1.0, 0.5), ("np", 1.0, 0.5)])
    same = _payload(2, [("bn", 1.1, 0.45), ("np", 1.0 + 1e-7, 0.5)])
    rows = {r["variant"]: r for r in report.compare(same, one)}
    assert rows["np"]["match"] and not rows["bn"]["match"] and rows["bn"]["epochs_other_accuracy"] == 1
    assert abs(rows["bn"]["loss_difference"] - 0.1) < 1e-12 and rows["bn"]["accuracy"] == ("45.00", "50.00")
    other_accuracy = _payload(2, [("np", 1.0, 0.55)])
    assert not report.compare(other_accuracy, one)[0]["match"]
    diverged = _payload(2, [("np", 1.0, 0.5)])
    diverged["runs"][0]["status"] = "diverged"
    assert not report.compare(diverged, one)[0]["match"]

    record = {"command": "cmd", "wall_seconds": 1.0, "date": "today", "report_command": "report cmd",
              "train_options": "--variants bn,np --lrs 0.1", "nproc": 2}
    runs, outputs = {"2proc": record, "1proc": record}, {"2proc": "out2", "1proc": "out1"}
    text = report.render({"2proc": same, "1proc": one}, runs, outputs, "distributed")
    assert text.splitlines()[5] == "report cmd" and "1 of 1 NormProp runs on 2 processes match" in text
    assert "0 of 1 BN runs" in text
    assert "| 2 (gloo, CPU)  | 16             | 8 " in text and "| 1 (plain, CPU) | 16             | 16 " in text
    assert text.count("not measured (no GPU lent)") == 2 and "--variants bn --sync-bn" in text
    text = report.render({"2proc": other_accuracy, "1proc": one}, runs, outputs, "distributed")
    assert "0 of 1 NormProp runs on 2 processes match" in text

    # --report-only rebuilds the page from --out and keeps its notes
    for name, payload in (("2proc", same), ("1proc", one)):
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / "results.json").write_text(json.dumps(payload))
        (tmp_path / "out" / name / "run.json").write_text(json.dumps(record))
        (tmp_path / "out" / name / "output.txt").write_text(outputs[name])
    doc = tmp_path / "distributed.md"
    options = ["--report-only", "--out", str(tmp_path / "out"), "--doc", str(doc)]
    assert report.main(options) == 0 and "1 of 1 NormProp runs" in doc.read_text()
    doc.write_text(doc.read_text().replace("(No notes yet", "KEEP ME (No notes yet"))
    assert report.main(options) == 0 and "KEEP ME" in doc.read_text() and "out2" in doc.read_text()
