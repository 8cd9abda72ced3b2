"""tools/finetune.py: its variants are built as documented (FrozenBN and NormProp exact keep the
checkpoint's function, GroupNorm as Opacus' fix builds it with the BN's affine), and the tool runs
end to end on fake Fashion-MNIST files, writing results, curves and a page that rebuilds."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import check_page_rebuilds, fake_fashion_mnist
from torch import nn

import finetune  # tools/ is on pytest's pythonpath
import finetune_report
import normprop_fx
import train
from normprop_fx.model_check import randomize_batchnorms, relative_l2



def _checkpoint() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(train.SmallResNet((4, 8), num_classes=5), torch.randn(16, 1, 14, 14))


def test_frozen_bn_and_exact_normprop_keep_the_checkpoint_function_and_share_the_head() -> None:
    checkpoint = _checkpoint()
    target = train.Data(torch.randn(8, 1, 14, 14), torch.zeros(8).long(), torch.empty(0), torch.empty(0),
                        torch.empty(0), "")
    args = finetune.parse_args(["--eval-batch", "4"])
    x = torch.randn(6, 1, 14, 14)
    with torch.no_grad():
        expected = finetune.make_model(checkpoint, "bn", 3, args, target).eval()(x)
        for variant in ("frozen_bn", "np", "np+stab"):
            model = finetune.make_model(checkpoint, variant, 3, args, target)
            assert relative_l2(model.eval()(x), expected) < 1e-5, variant
            assert relative_l2(model.train()(x), expected) < 1e-5, variant  # no batch statistics
        other_seed = finetune.make_model(checkpoint, "np", 4, args, target).eval()(x)
        assert relative_l2(other_seed, expected) > 1e-2  # the head changes with the seed
        recalibrated = finetune.make_model(checkpoint, "np_recal", 3, args, target)
        assert relative_l2(recalibrated.eval()(x), expected) > 1e-3  # recalibrated on the target images
    frozen = finetune.make_model(checkpoint, "frozen_bn", 3, args, target)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(p.numel() for p in frozen.parameters()) < sum(p.numel() for p in checkpoint.parameters())
    assert [n for n, _ in checkpoint.named_parameters()][-1] == "fc.bias"  # checkpoint left as it was


def test_groupnorm_variant_is_opacus_fix_with_the_batchnorm_affine() -> None:
    pytest.importorskip("opacus")
    checkpoint = _checkpoint()
    gn = finetune.opacus_groupnorm(copy.deepcopy(checkpoint))
    bns = {n: m for n, m in checkpoint.named_modules() if isinstance(m, nn.BatchNorm2d)}
    gns = {n: m for n, m in gn.named_modules() if isinstance(m, nn.GroupNorm)}
    assert gns.keys() == bns.keys()
    for name, bn in bns.items():
        assert gns[name].num_groups == math.gcd(32, bn.num_features)
        assert torch.equal(gns[name].weight, bn.weight) and torch.equal(gns[name].bias, bn.bias)


def test_class_subset_renumbers_labels() -> None:
    labels = torch.tensor([5, 1, 9, 5, 7, 0])
    images = torch.arange(6).reshape(6, 1, 1, 1)
    x, y = finetune.class_subset(images, labels, (5, 6, 7, 8, 9), None, 0)
    assert x.flatten().tolist() == [0, 2, 3, 4] and y.tolist() == [0, 4, 0, 2]


def _exit_status(argv: list[str], capsys) -> tuple[int, str]:
    """finetune.main(argv) in this process: its exit status and stderr."""
    try:
        status = finetune.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def test_tool_end_to_end_on_fake_idx_files(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("opacus")
    fake_fashion_mnist(tmp_path, n_train=160, n_test=60)
    out, doc = tmp_path / "out", tmp_path / "doc" / "finetune.md"
    status, err = _exit_status([
        "--data-dir", str(tmp_path), "--quick", "--pretrain-size", "64", "--finetune-size", "8", "--test-size", "20",
        "--batch-sizes", "2,4", "--small-batch-sizes", "2", "--small-batch-grid", "1", "--lrs", "0.01,0.1",
        "--variants", "bn,frozen_bn,gn,np,np_recal", "--dp-size", "16", "--dp-batch", "8", "--dp-variants", "np,gn",
        "--out", str(out), "--doc", str(doc)], capsys)
    assert status == 0, err
    payload = json.loads((out / "results.json").read_text())
    runs = payload["runs"]
    # batch 2: the top 1 lr of the grid, batch 4: both; then seed 1 at the best; 5 variants
    assert len(runs) == 5 * (2 + 3) and {r["lr"] for r in runs if r["batch_size"] == 2} == {0.025}
    assert all(sum(e["steps"] for e in r["epochs"]) * r["batch_size"] == 8 for r in runs)  # same image budget
    exact = payload["exactness"]
    assert exact["source"]["predictions_differing"] == 0 and exact["target"]["predictions_differing"] == 0
    step0 = payload["step0"]
    assert step0["np/0"] == step0["bn/0"] == step0["frozen_bn/0"] and step0["np/1"] == step0["bn/1"]
    assert {r["variant"] for r in payload["dp_runs"]} == {"np", "gn"}
    np_dp = next(r for r in payload["dp_runs"] if r["variant"] == "np")
    assert np_dp["grad_sample_modes"] == {"NormPropConv2d": "functorch", "Linear": "hooks"}
    assert 0 < np_dp["epsilon"] <= 8.0 + 1e-6 and np_dp["noise_multiplier"] > 0
    rows = finetune_report.targets(payload)
    # step 0; at batch 2 and 4 NormProp exact and the best exact configuration; DP
    assert rows[0][2] is True and len(rows) == 1 + 2 * 2 + 1
    assert rows[1][0].startswith("batch 2: NormProp exact >=") and "best NormProp exact configuration" in rows[2][0]
    check_page_rebuilds(doc, "finetune.py", [out / "curves.png", out / "lr_grid.png"],
                        lambda: finetune_report.main([str(out / "results.json"), "--doc", str(doc)]))


def test_tool_refuses_bad_arguments_and_a_missing_dataset(tmp_path, capsys) -> None:
    status, err = _exit_status(["--dp-size", "10", "--finetune-size", "20"], capsys)
    assert status == 2 and "--dp-size" in err
    status, err = _exit_status(["--variants", "np,bogus"], capsys)
    assert status == 2 and "bogus" in err
    status, err = _exit_status(["--data-dir", str(tmp_path / "nowhere"), "--quick", "--no-dp", "--variants", "np"],
                               capsys)
    assert status == 1 and "apt-get install dataset-fashion-mnist" in err
