"""FSDP2 per block (issue 16): ``fully_shard`` on every block and every stage of a converted
ResNet, then on its root, with 2 gloo processes on 127.0.0.1 (a free port, bounded in time by
test_distributed's _spawn). Each rank runs its half of the batch; the gathered gradients equal
those of one process on the whole batch.

This needs convert() to return the user's module tree: on the flat GraphModule of
``convert(..., flat=True)`` the graph calls ``layer1.0.conv1`` directly, the blocks' forwards
(and so their FSDP pre-forward all-gathers) never run, and the convolution fails with "got mixed
torch.Tensor and DTensor". So the workers assert the class and the blocks before sharding, and a
forward hook on each block records that it ran, with its parameters all-gathered, in the FSDP
forward.

FSDP2 on CPU, as read from torch/distributed/fsdp/_fully_shard (torch 2.14): a CPU device mesh
(``init_device_mesh("cpu", ...)`` over a gloo group) is all it needs; the parameters stay fp32
(no MixedPrecisionPolicy), default ``reshard_after_forward``. For fp32 gradients FSDP2 reduces
with ReduceOp.AVG (_get_gradient_divide_factors), so each rank's loss is the mean cross-entropy
of its own samples: the average over the 2 ranks of those is the full-batch mean.

Gradient error of a parameter: ||g_fsdp - g_one||_2 / ||g_one||_2 over that parameter's tensor;
the bound is 1e-6 for every parameter (float32, the dtype of real training).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import normprop_fx
from normprop_fx.layers import NormPropConv2d
from test_distributed import TIMEOUT_S, WORLD, _free_port, _spawn

BATCH = 4  # split 2 + 2 over the ranks
SIZE = 32
STAGES = ("layer1", "layer2", "layer3", "layer4")
BOUND = 1e-6
CASES = ("torchvision_resnet18", "timm_resnet18")


def _build(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The converted model, a global batch and its labels: the same in every process."""
    torch.manual_seed(0)
    if case == "timm_resnet18":
        import timm

        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        import torchvision

        model = torchvision.models.resnet18(weights=None, num_classes=10)
    converted = normprop_fx.convert(model, example_inputs=torch.randn(1, 3, SIZE, SIZE))
    return converted, torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 10, (BATCH,))


def _root_class(case: str) -> type[nn.Module]:
    if case == "timm_resnet18":
        from timm.models.resnet import ResNet
    else:
        from torchvision.models import ResNet
    return ResNet


def _blocks(model: nn.Module) -> list[str]:
    return [f"{stage}.{name}" for stage in STAGES for name, _ in model.get_submodule(stage).named_children()]


def _check_tree(case: str, model: nn.Module) -> None:
    """The converted model is the user's ResNet with its stages and blocks at their paths (not
    convert(..., flat=True)'s GraphModule, whose blocks' forwards never run)."""
    assert isinstance(model, _root_class(case)) and not isinstance(model, torch.fx.GraphModule), type(model)
    assert all(type(model.get_submodule(stage)) is nn.Sequential for stage in STAGES)
    blocks = _blocks(model)
    assert len(blocks) == 8, blocks
    for path in blocks:
        assert isinstance(model.get_submodule(f"{path}.conv1"), NormPropConv2d), path
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """For every case: fully_shard each block, each stage, then the root; forward/backward of
    this rank's half of the batch (its mean loss: FSDP averages the gradients over the ranks);
    torch.save the full gradients and parameters and the forward hooks' record."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        mesh = init_device_mesh("cpu", (world,))
        for case in CASES:
            model, x, y = _build(case)
            _check_tree(case, model)
            # per block and stage: for each call of its forward, whether its parameters were
            # all-gathered (plain tensors, not DTensor shards) when it returned
            fired: dict[str, list[bool]] = {}
            blocks = _blocks(model)
            for path in (*blocks, *STAGES):
                model.get_submodule(path).register_forward_hook(
                    lambda module, args, output, path=path: fired.setdefault(path, []).append(
                        not any(isinstance(p, DTensor) for p in module.parameters())))
            for path in (*blocks, *STAGES):
                fully_shard(model.get_submodule(path), mesh=mesh)
            fully_shard(model, mesh=mesh)
            assert isinstance(model.get_submodule("layer1.0").conv1.weight, DTensor)

            model.train()
            F.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
            torch.save({"grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()},
                        "params": {n: p.detach().full_tensor() for n, p in model.named_parameters()},
                        "fired": fired}, Path(out) / f"{case}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case's record from every rank."""
    out = tmp_path_factory.mktemp("fsdp")
    _spawn(_fsdp_worker, _free_port(), str(out))
    return {case: [torch.load(out / f"{case}_rank{r}.pt") for r in range(WORLD)] for case in CASES}


@pytest.fixture(scope="module")
def one_process() -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Every case's converted model and its gradients of the whole batch, in this process."""
    found = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in CASES:
            model, x, y = _build(case)
            model.train()
            F.cross_entropy(model(x), y).backward()
            found[case] = model, {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    finally:
        torch.set_num_threads(threads)
    return found


@pytest.mark.parametrize("case", CASES)
def test_converted_resnet_keeps_its_class_and_blocks(case, one_process):
    model, _ = one_process[case]
    _check_tree(case, model)
    # the rebuilt blocks (a GraphModule of their forward, at their own path) are blocks
    rebuilt = {r.path for r in model.normprop_report.module_tree.rebuilt}
    assert rebuilt <= set(_blocks(model)), rebuilt


@pytest.mark.parametrize("case", CASES)
def test_every_block_forward_runs_under_fsdp(case, fsdp_runs, one_process):
    # each block once, with its parameters all-gathered (its FSDP pre-forward hook ran); each
    # stage once, its blocks' parameters sharded again by then (reshard_after_forward)
    expected = {**{path: [True] for path in _blocks(one_process[case][0])}, **{stage: [False] for stage in STAGES}}
    for record in fsdp_runs[case]:
        assert record["fired"] == expected, record["fired"]


@pytest.mark.parametrize("case", CASES)
def test_fsdp_gradients_equal_one_process(case, fsdp_runs, one_process):
    model, expected = one_process[case]
    for record in fsdp_runs[case]:
        assert record["grads"].keys() == expected.keys()
        # every process converted the same model
        assert all(torch.equal(record["params"][n], p.detach()) for n, p in model.named_parameters())
        errors = {n: ((record["grads"][n] - g).norm() / g.norm()).item() for n, g in expected.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= BOUND, (worst, errors[worst])
    assert all(torch.equal(fsdp_runs[case][0]["grads"][n], fsdp_runs[case][1]["grads"][n]) for n in expected)
