"""Training: the stabilizers in normprop_fx.training, the Fashion-MNIST loader, and
tools/train.py on synthetic data (the real dataset is never needed here)."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from helpers import check_page_rebuilds
from helpers import fake_fashion_mnist as _fake_fashion_mnist

import normprop_fx
from normprop_fx.datasets import (
    DatasetFormatError,
    DatasetNotFoundError,
    load_fashion_mnist,
    read_idx,
)
from normprop_fx.training import adaptive_clip_grad_, classifier_name, param_groups

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    """tools/NAME.py as ``import NAME`` gives it (tools/ is on pytest's pythonpath): one copy shared by every
    test module, so classes pickle and compare as the same classes (tests/test_finetune.py imports them too)."""
    return importlib.import_module(name)


train_tool = _load_tool("train")
report = _load_tool("training_report")


def _synthetic_data(n_train: int = 256, n_test: int = 128, seed: int = 0):
    """16x16 images in 10 classes, each a brightness level and a stripe frequency plus noise: learnable in a
    few steps, also through global average pooling."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(16.0).reshape(1, 1, 16, 1)
    classes = torch.arange(10.0).reshape(10, 1, 1, 1)
    patterns = ((classes - 4.5) / 3 + torch.sin(rows * (0.3 + 0.25 * classes))).expand(10, 1, 16, 16)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        return patterns[y] + 0.8 * torch.randn(n, 1, 16, 16, generator=g), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return train_tool.Data(train_x, train_y, test_x, test_y, test_x[:32], "synthetic")


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return train_tool.SmallResNet((4, 8))


@pytest.mark.parametrize("variant", ["bn", "np", "np+stab"])
def test_loss_decreases_at_batch_16(variant):
    settings = train_tool.TrainSettings(epochs=3, progress=False, trained_threshold=0.0)
    result = train_tool.train_run(_tiny_resnet(), variant, 16, 0.05, _synthetic_data(), settings, log=lambda _: None)
    assert result.status == "trained", result.detail
    losses = [e["train_loss"] for e in result.epochs]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.final_accuracy > 0.2  # twice chance


def test_normprop_trains_at_batch_size_1():
    settings = train_tool.TrainSettings(epochs=3, steps_per_epoch=40, progress=False, trained_threshold=0.0)
    result = train_tool.train_run(_tiny_resnet(), "np", 1, 0.01, _synthetic_data(), settings, log=lambda _: None)
    assert result.status == "trained", result.detail
    losses = [e["train_loss"] for e in result.epochs]
    assert all(e["steps"] == 40 for e in result.epochs)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert result.stats_init["normprop"] and result.stats_end["normprop"]


def test_batchnorm1d_at_batch_size_1_is_reported_as_an_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    settings = train_tool.TrainSettings(epochs=1, steps_per_epoch=3, progress=False)
    bn = train_tool.train_run(model, "bn", 1, 0.01, _synthetic_data(), settings, log=lambda _: None)
    assert bn.status == "error" and "more than 1 value per channel" in bn.detail
    np_run = train_tool.train_run(model, "np", 1, 0.01, _synthetic_data(), settings, log=lambda _: None)
    assert np_run.status == "trained", np_run.detail


@pytest.mark.parametrize("name", ["small_resnet:4,8", "torchvision:resnet18", "timm:resnet10t"])
def test_models_take_one_channel_and_give_ten_classes(name):
    model = train_tool.build_model(name).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        train_tool.build_model("no_such_model")


def test_batchnorm_statistics_differ_between_eval_and_train_mode():
    model = _tiny_resnet()
    x = _synthetic_data().stats_x * 3 + 1  # far from the initial running statistics (0, 1)
    eval_stats = train_tool.batchnorm_output_statistics(model, x, train_mode=False)
    train_stats = train_tool.batchnorm_output_statistics(model, x, train_mode=True)
    assert [s["path"] for s in eval_stats] == [s["path"] for s in train_stats] and len(eval_stats) == 6
    assert abs(train_stats[0]["std"] - 1) < 0.05 and eval_stats[0]["std"] > 1.5
    assert torch.equal(model.bn1.running_mean, torch.zeros(4))  # measuring never moved them


# ----------------------------------------------------------------------------- stabilizers


def test_param_groups_split_weights_from_scales():
    converted = normprop_fx.convert(_tiny_resnet())
    groups = param_groups(converted, 1e-3)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 1e-3 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all(n.endswith(".weight") for n in by_name["decay"]["param_names"])
    assert {n.rpartition(".")[2] for n in by_name["no_decay"]["param_names"]} == {"gamma", "beta", "bias"}
    named = dict(converted.named_parameters())
    assert sorted(by_name["decay"]["param_names"] + by_name["no_decay"]["param_names"]) == sorted(named)
    optimizer = torch.optim.SGD(groups, lr=0.1)  # torch accepts the extra keys
    assert len(optimizer.param_groups) == 2
    everything = param_groups(converted, 1e-3, decay_scale_params=True)
    assert [g["name"] for g in everything] == ["decay"]
    with pytest.raises(normprop_fx.InvalidOptionError):
        param_groups(converted, -1.0)


def test_classifier_is_the_last_plain_linear():
    assert classifier_name(normprop_fx.convert(_tiny_resnet())) == "fc"
    assert classifier_name(nn.Conv2d(1, 1, 1)) is None


def _with_gradients(model: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_agc_clips_each_unit_relative_to_its_norm():
    model = nn.Sequential(normprop_fx.NormPropConv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))
    before = _with_gradients(model, 100.0)
    clip = 0.01
    adaptive_clip_grad_(model, clip)
    layer = model[0]
    rows = layer.weight.grad.flatten(1).norm(dim=1)
    assert torch.allclose(rows, clip * layer.weight.detach().flatten(1).norm(dim=1), rtol=1e-4)
    joint = torch.sqrt(layer.gamma.grad ** 2 + layer.beta.grad ** 2)
    assert torch.allclose(joint, clip * torch.sqrt(layer.gamma.detach() ** 2 + layer.beta.detach() ** 2), rtol=1e-4)
    assert (layer.beta.grad != 0).all()  # beta = 0 at init is clipped with gamma, not frozen
    # direction kept, classifier untouched by default
    cos = torch.nn.functional.cosine_similarity(layer.weight.grad.flatten(1), before["0.weight"].flatten(1))
    assert torch.allclose(cos, torch.ones(8), atol=1e-5)
    assert torch.equal(model[2].weight.grad, before["2.weight"])


def test_agc_leaves_small_gradients_and_matches_timm_on_plain_weights():
    from timm.utils.agc import adaptive_clip_grad

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))
    small = _with_gradients(model, 1e-6)
    adaptive_clip_grad_(model, 0.01, exclude=())
    assert all(torch.equal(p.grad, small[n]) for n, p in model.named_parameters())
    _with_gradients(model, 10.0)
    adaptive_clip_grad_(model, 0.01, exclude=())
    ours = [p.grad.clone() for p in model.parameters()]
    _with_gradients(model, 10.0)
    adaptive_clip_grad(model.parameters(), 0.01)
    assert all(torch.allclose(a, p.grad) for a, p in zip(ours, model.parameters()))
    with pytest.raises(normprop_fx.InvalidOptionError):
        adaptive_clip_grad_(model, 0.0)


# ----------------------------------------------------------------------------- data


def test_idx_files_round_trip(tmp_path):
    _fake_fashion_mnist(tmp_path)
    split = load_fashion_mnist("test", tmp_path)
    assert split.images.shape == (48, 1, 28, 28) and split.images.dtype == torch.uint8
    assert split.labels.dtype == torch.int64 and len(split.subset(10)) == 10
    labels = read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert torch.equal(labels.long(), split.labels)


def test_missing_or_broken_dataset_gives_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DatasetFormatError):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", tmp_path)


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *args],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_tool_without_dataset_says_how_to_install(tmp_path):
    result = _run_tool("--data-dir", str(tmp_path / "nowhere"), "--quick")
    assert result.returncode == 1
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    bad = _run_tool("--lrs", "0.1,-1")
    assert bad.returncode == 2 and "positive" in bad.stderr


def test_tool_end_to_end_on_fake_idx_files(tmp_path):
    pytest.importorskip("matplotlib")
    _fake_fashion_mnist(tmp_path)
    out, doc = tmp_path / "out", tmp_path / "doc" / "training.md"
    result = _run_tool("--data-dir", str(tmp_path), "--quick", "--batch-sizes", "16,1", "--bs1-steps", "8",
                       "--no-progress", "--out", str(out), "--doc", str(doc))
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "results.json").read_text())
    runs = payload["runs"]
    # bn, np, np+stab at both batch sizes (bn+stab only at 128 by default), 2 learning rates each
    assert len(runs) == 12 and {r["variant"] for r in runs} == {"bn", "np", "np+stab"}
    assert {r["lr"] for r in runs if r["batch_size"] == 1} == {0.000884, 0.00884}
    assert all(e["steps"] == 8 for r in runs if r["batch_size"] == 1 for e in r["epochs"])
    check_page_rebuilds(doc, "train.py", [out / "accuracy.png", out / "layer_statistics.png"],
                        lambda: report.main([str(out / "results.json"), "--doc", str(doc)]))


def test_stable_range_and_best_run():
    runs = [{"lr": lr, "status": s, "final_accuracy": a} for lr, s, a in
            [(0.01, "trained", 0.6), (0.03, "trained", 0.7), (0.1, "diverged", math.nan),
             (0.3, "trained", 0.8), (1.0, "collapsed", 0.1)]]
    assert report.stable_range(runs) == (0.01, 0.03, 2)
    assert report.best_run(runs)["lr"] == 0.3
    assert report.best_run([runs[2]]) is None
    assert report.best_run([runs[4]])["lr"] == 1.0


def test_seed_spread_tool_on_fake_idx_files(tmp_path):
    _fake_fashion_mnist(tmp_path)
    doc, raw = tmp_path / "seeds.md", tmp_path / "seeds.json"
    tool = str(ROOT / "tools" / "training_seeds.py")
    result = subprocess.run(
        [sys.executable, tool, "--data-dir", str(tmp_path), "--seeds", "0,1", "--batch-sizes", "16,1",
         "--epochs", "1", "--bs1-steps", "4", "--train-size", "64", "--test-size", "32", "--stats-batch", "16",
         "--bn-lrs", "0.01,0.001", "--json", str(raw), "--doc", str(doc)],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(raw.read_text())["rows"]
    # 2 batch sizes x (NormProp with 2 stabilizer settings + BN) x 2 seeds, each with its layer std range
    assert len(rows) == 12 and {r["seed"] for r in rows} == {0, 1}
    assert all(r["status"] in ("trained", "collapsed") and 0 < r["std_min"] <= r["std_max"] for r in rows)
    assert {r["config"] for r in rows if r["lr"] in (0.01, 0.001)} == {"BN, no stabilizers"}
    text = doc.read_text()
    assert "## Spread over seeds" in text and "| 16 | decay on gamma/beta (default) | 2 |" in text
    rerendered = subprocess.run([sys.executable, tool, "--report-only", "--json", str(raw), "--doc", str(doc)],
                                check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert rerendered.returncode == 0 and doc.read_text() == text
    bad = subprocess.run([sys.executable, tool, "--seeds", "a"], check=False, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "integers" in bad.stderr
