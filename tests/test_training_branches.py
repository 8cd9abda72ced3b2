"""A user module whose forward branches on ``self.training`` (issue 20, finding 3): the trace in
one mode would freeze it wherever the conversion rewrites the forward that holds it. The model is
traced in both modes (passes/trace.py); a module whose own ops differ is kept as a leaf, with a
warning, so its forward follows train()/eval() again."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import normprop_fx
from normprop_fx import NormPropWarning, conversion_report

X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class MyDropPath(nn.Module):
    """A hand-written drop-path, as in many research repositories."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand_like(x[:, :1, :1, :1]) > self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Its functional relu is fused into the conv, so its forward is rebuilt from the trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.drop = MyDropPath(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.relu(self.bn(self.conv(x))))


class BranchingBlock(Block):
    """The branch is in the block's own forward, next to its BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        if self.training:
            y = y * (torch.rand_like(y[:, :1, :1, :1]) > 0.5).to(y.dtype) * 2
        return x + y


class Net(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


def _convert(model: nn.Module, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = normprop_fx.convert(model, example_inputs=X, **kwargs)
    return converted, [str(w.message) for w in caught if issubclass(w.category, NormPropWarning)]


def _follows_the_mode(converted: nn.Module) -> None:
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(X), converted(X)), "eval() must not drop"
    converted.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(converted(X), converted(X)), "train() must drop"


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_hand_written_drop_path_follows_the_mode_after_conversion(mode, flat):
    model = getattr(Net(Block), mode)()
    converted, messages = _convert(model, flat=flat)
    _follows_the_mode(converted)
    assert any("'block.drop' (MyDropPath) branches on self.training" in m for m in messages), messages
    report = conversion_report(converted)
    assert "block.drop" in report.leaf_modules
    assert report.batchnorms_found == 1 and not report.left  # the block's BatchNorm is converted
    assert any("block.drop" in w for w in report.warnings)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_block_that_branches_itself_is_kept_and_its_batchnorm_reported(mode):
    model = getattr(Net(BranchingBlock), mode)()
    converted, messages = _convert(model)
    _follows_the_mode(converted)
    assert any("'block' (BranchingBlock)" in m and "its 1 BatchNorm(s) are replaced inside it" in m for m in messages), messages
    report = conversion_report(converted)
    assert "block" in report.leaf_modules and not report.left
    assert [(r.path, r.replacement) for r in report.rewrites if r.path.startswith("block.")] == [
        ("block.bn", "OpaqueNormPropAffine")]


def test_the_user_models_modes_are_restored_exactly():
    model = Net(Block).train()
    model.block.bn.eval()  # a mixed model: one BatchNorm frozen in eval
    before = {name: m.training for name, m in model.named_modules()}
    with pytest.warns(NormPropWarning, match="branches on self.training"):  # Block's drop path
        normprop_fx.convert(model, example_inputs=X, inplace=False)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_a_model_that_traces_in_one_mode_only_converts_as_before():
    class EvalOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                return torch.rand(x.shape[0], 4)  # a Proxy shape: not traceable in train mode
            return self.bn(self.conv(x))

    converted, messages = _convert(EvalOnly().eval())
    assert conversion_report(converted).left == []
    assert not any("branches on self.training" in m for m in messages)


def test_auxiliary_heads_called_in_training_only_are_not_leaves():
    """GoogLeNet's root runs aux1/aux2 in training only: the root decides that, not the heads,
    so no head becomes a leaf; the root keeps its class and forward, so no warning either."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 64, 64))
    messages = [str(w.message) for w in caught]
    assert type(converted) is type(model)
    assert not any("branches on self.training" in m for m in messages), messages
    assert conversion_report(converted).leaf_modules == ()


def test_a_tensor_made_in_forward_is_not_a_mode_switch_and_leaves_nothing_on_the_model():
    """torch.fx keeps such a tensor on the root as _tensor_constant<k>, numbered per trace: the two
    traces name it differently, which is no difference of the graph; the second's is removed again."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(x))) * torch.tensor([2.0])

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Scaled()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model = Outer()
    converted, messages = _convert(model, inplace=True)
    assert not any("branches on self.training" in m for m in messages), messages
    assert conversion_report(converted).leaf_modules == ()
    assert not [n for n in vars(model) if n.startswith("_tensor_constant") and n != "_tensor_constant0"]
