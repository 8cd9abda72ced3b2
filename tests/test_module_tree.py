"""convert() returns the user's model with its module tree (issue 16, item 2): timm's and
torchvision's APIs, hooks, pickling and copies work on the converted model as on the original.

Each model is converted once per module (the ``conversions`` cache); a test that changes a
model (reset_classifier, set_grad_checkpointing, train steps) works on a deep copy.
"""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass, field

import pytest
import timm
import torch
import torchvision
from helpers import build_zoo_model, dropout_off
from timm.models import group_parameters
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import normprop_fx
from normprop_fx import NormPropLayer

SIZE = 64  # every model here ends in global pooling: a small input runs every layer
EXAMPLE = torch.zeros(1, 3, SIZE, SIZE)  # convert() reads only its shape
X = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

slow = pytest.mark.slow
TIMM_MODELS = [
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    pytest.param("resnet50d", marks=slow),
    pytest.param("regnety_008", marks=slow),
]
#: torchvision model -> a block whose output feature extraction is asked for
TORCHVISION_MODELS = {
    "resnet50": "layer2",
    "mobilenet_v3_large": "features.6",
    "efficientnet_b0": "features.3",
    "densenet121": "features.denseblock2",
}
TORCHVISION_PARAMS = [
    "resnet50",
    "densenet121",  # its root's functional relu stays as written (no NormProp layer reads it)
    pytest.param("mobilenet_v3_large", marks=slow),
    pytest.param("efficientnet_b0", marks=slow),
]


@dataclass
class Case:
    """A model as built, its conversion, and what the model was before."""

    original: nn.Module
    converted: nn.Module
    #: the original's state and module classes before the conversion
    state_before: dict[str, torch.Tensor] = field(default_factory=dict)
    classes_before: dict[str, type] = field(default_factory=dict)

    @property
    def tree(self):
        return self.converted.normprop_report.module_tree


def _build(source: str, name: str, seed: int = 0, **kwargs) -> nn.Module:
    """The model by name, seeded, without pretrained weights (``kwargs``: timm's options)."""
    if seed == 0 and not kwargs:
        return build_zoo_model(source, name)
    torch.manual_seed(seed)
    if source == "timm":
        return timm.create_model(name, pretrained=False, **kwargs)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _convert(model: nn.Module, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return normprop_fx.convert(model, example_inputs=EXAMPLE, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is faster, and far faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def conversions():
    """``get(source, name, flat=..., **timm_options)`` -> its Case, built and converted on first use."""
    cache: dict[tuple, Case] = {}

    def get(source: str, name: str, *, flat: bool = False, **build_kwargs) -> Case:
        key = (source, name, flat, tuple(sorted(build_kwargs.items())))
        if key not in cache:
            original = _build(source, name, **build_kwargs)
            state = {k: v.clone() for k, v in original.state_dict().items()}
            classes = {k: type(m) for k, m in original.named_modules()}
            cache[key] = Case(original, _convert(original, flat=flat), state, classes)
        return cache[key]

    return get


@pytest.fixture(scope="module", params=TIMM_MODELS)
def timm_case(request, conversions) -> Case:
    return conversions("timm", request.param)


@pytest.fixture(scope="module", params=TORCHVISION_PARAMS)
def tv_case(request, conversions) -> tuple[str, Case]:
    return request.param, conversions("torchvision", request.param)


@pytest.fixture(scope="module")
def resnet18(conversions) -> Case:
    return conversions("timm", "resnet18")


def _eval(model: nn.Module, x: torch.Tensor = X):
    with torch.no_grad():
        return model.eval()(x)


def _exact(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _to_rounding(a, b) -> None:
    """A traced graph (feature extraction, or the flat conversion) and the module tree: the same
    function, which the two may round differently (the module tree's eager form computes an
    attached input correction inside the module's own affine, standardize.absorbable_correction;
    a graph calls it as a node of its own)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- timm: the model keeps its class, attributes and methods -----------------------------------


def test_timm_root_keeps_its_class_and_attributes(timm_case):
    original, converted = timm_case.original, timm_case.converted
    assert isinstance(converted, type(original)) and type(converted) is type(original)
    assert timm_case.tree.class_kept and not timm_case.tree.flat
    assert converted.pretrained_cfg == original.pretrained_cfg
    assert converted.default_cfg == original.default_cfg
    assert converted.num_classes == original.num_classes
    assert converted.num_features == original.num_features
    assert converted.feature_info == original.feature_info
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert any(isinstance(m, NormPropLayer) for m in converted.modules())


#: The blocks whose forward the conversion rebuilds: in timm's ResNet the residual add that reads a
#: block's uncorrected output back (passes/absorb_corrections.py); in the EfficientNet and
#: MobileNetV3 families none, since every correction goes into the NormProp layer it feeds
#: (passes/attach_corrections.py). (The slow models: whatever is rebuilt is checked.)
REBUILT = {
    "resnet18": {"layer1.1", "layer2.1"},
    "efficientnet_b0": set(),
    "mobilenetv3_large_100": set(),
}


def test_timm_rebuilt_blocks_keep_their_class_name_and_attributes(timm_case):
    original, converted = timm_case.original, timm_case.converted
    arch = original.pretrained_cfg["architecture"]
    if arch in REBUILT:
        assert {r.path for r in timm_case.tree.rebuilt} == REBUILT[arch]
    for path, module in converted.named_modules():
        if path not in {r.path for r in timm_case.tree.rebuilt}:
            assert not isinstance(module, fx.GraphModule), path
    for record in timm_case.tree.rebuilt:
        block, before = converted.get_submodule(record.path), original.get_submodule(record.path)
        assert isinstance(block, fx.GraphModule), record
        assert type(block).__name__ == record.type == type(before).__name__
        for name, value in vars(before).items():
            if name.startswith("_") or name == "training" or isinstance(value, (nn.Module, torch.Tensor)):
                continue
            assert getattr(block, name) == value, f"{record.path}.{name}"


def test_timm_resolve_data_config(timm_case):
    original, converted = timm_case.original, timm_case.converted
    config = timm.data.resolve_data_config(model=converted)
    assert config == timm.data.resolve_data_config(model=original)
    if original.pretrained_cfg["architecture"] == "resnet18":
        assert config["crop_pct"] == 0.95  # resnet18's own, not timm's default 0.875


def test_timm_forward_head_of_forward_features_is_the_forward(timm_case):
    converted = timm_case.converted.eval()
    with torch.no_grad():
        features = converted.forward_features(X)
        _exact(converted.forward_head(features), converted(X))
        pre_logits = converted.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (X.shape[0], _head_width(timm_case.original))


def _head_width(model: nn.Module) -> int:
    """The classifier's input width (MobileNetV3's head has a hidden layer after the features)."""
    return getattr(model, "head_hidden_size", model.num_features)


def _path_of(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def test_timm_get_classifier_and_reset_classifier(timm_case):
    original, converted = timm_case.original, timm_case.converted
    path = _path_of(original, original.get_classifier())
    head = converted.get_classifier()
    assert head is converted.get_submodule(path)
    assert type(head) is type(original.get_classifier())
    assert head.weight.shape == (original.num_classes, _head_width(original))
    assert torch.equal(head.weight, original.get_classifier().weight)

    model = copy.deepcopy(converted)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    assert _eval(model).shape == (X.shape[0], 5)
    model.reset_classifier(0)
    assert _eval(model).shape == (X.shape[0], _head_width(original))


def test_timm_group_matcher(timm_case):
    original, converted = timm_case.original, timm_case.converted
    for coarse in (False, True):
        matcher = converted.group_matcher(coarse=coarse)
        assert matcher == original.group_matcher(coarse=coarse)
        groups = group_parameters(converted, matcher, reverse=True)
        before = group_parameters(original, matcher, reverse=True)
        # the conversion's new parameters (gamma, beta) fall into their layer's group, not a new one
        assert set(groups.values()) == set(before.values())
        shared = groups.keys() & before.keys()
        assert shared and {n: groups[n] for n in shared} == {n: before[n] for n in shared}


def _forward_calls_and_grads(model: nn.Module) -> tuple[int, dict[str, torch.Tensor]]:
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in model.modules()]
    try:
        dropout_off(model.train())
        model.zero_grad()
        model(X).square().mean().backward()
    finally:
        for h in handles:
            h.remove()
    return calls[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_timm_grad_checkpointing_trains_with_the_same_gradients(timm_case):
    plain = copy.deepcopy(timm_case.converted)
    checkpointed = copy.deepcopy(timm_case.converted)
    checkpointed.set_grad_checkpointing()
    plain_calls, plain_grads = _forward_calls_and_grads(plain)
    checkpointed_calls, checkpointed_grads = _forward_calls_and_grads(checkpointed)
    # checkpointing runs the checkpointed segments' forward again in backward
    assert checkpointed_calls > plain_calls, "set_grad_checkpointing() changed nothing in the forward"
    assert plain_grads.keys() == {n for n, _ in plain.named_parameters()}
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# --- timm features_only ------------------------------------------------------------------------

FEATURE_MODELS = ["resnet18", pytest.param("efficientnet_b0", marks=slow)]


@pytest.fixture(scope="module", params=FEATURE_MODELS)
def features_case(request, conversions) -> tuple[Case, Case]:
    return (conversions("timm", request.param, features_only=True),
            conversions("timm", request.param, features_only=True, flat=True))


def test_timm_features_only_keeps_feature_info(features_case):
    case, _ = features_case
    original, converted = case.original, case.converted
    assert type(converted) is type(original)
    info, before = converted.feature_info, original.feature_info
    assert info.channels() == before.channels()
    assert info.reduction() == before.reduction()
    assert info.module_name() == before.module_name()
    assert info.out_indices == before.out_indices


def test_timm_features_only_outputs_match_the_flat_conversion(features_case):
    case, flat_case = features_case
    assert flat_case.tree.flat and isinstance(flat_case.converted, fx.GraphModule)
    outputs, flat = _eval(case.converted), _eval(flat_case.converted)
    assert isinstance(outputs, list) and len(outputs) == len(case.original.feature_info)
    assert [o.shape[1] for o in outputs] == case.original.feature_info.channels()
    assert len(flat) == len(outputs)
    for mine, theirs in zip(outputs, flat):
        _to_rounding(mine, theirs)


# --- torchvision feature extraction ------------------------------------------------------------


def _addressable(query: str, nodes: list[str]) -> bool:
    """create_feature_extractor takes a node name or a module path above nodes (their last one)."""
    return any(n == query or n.startswith(query + ".") for n in nodes)


def test_torchvision_graph_node_names(tv_case):
    name, case = tv_case
    train_nodes, eval_nodes = get_graph_node_names(case.converted)
    block = TORCHVISION_MODELS[name]
    assert _addressable(block, eval_nodes) and _addressable(block, train_nodes)
    # the node names user code wrote for the original's layers still address the converted ones
    original_nodes = get_graph_node_names(case.original)[1]
    layers = {path for path, m in case.original.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    missing = [n for n in original_nodes if n in layers and not _addressable(n, eval_nodes)]
    assert not missing, f"{len(missing)} of the original's layer nodes are gone, e.g. {missing[:3]}"


def test_torchvision_feature_extractor_output_and_block_match_the_model(tv_case):
    name, case = tv_case
    converted, block = case.converted.eval(), TORCHVISION_MODELS[name]
    last = get_graph_node_names(converted)[1][-1]
    extractor = create_feature_extractor(converted, return_nodes={block: "block", last: "out"}).eval()
    seen = []
    handle = converted.get_submodule(block).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            expected = converted(X)
            features = extractor(X)
    finally:
        handle.remove()
    _to_rounding(features["out"], expected)
    assert len(seen) == 1
    _to_rounding(features["block"], seen[0])


def test_torchvision_root_keeps_its_class(tv_case):
    name, case = tv_case
    assert case.tree.class_kept and type(case.converted) is type(case.original), case.tree.rebuilt


def test_torchvision_copies_keep_the_report(tv_case):
    name, case = tv_case
    converted = case.converted
    if case.tree.class_kept:
        assert type(converted) is type(case.original)
    else:
        assert isinstance(converted, fx.GraphModule) and type(converted).__name__ == type(case.original).__name__
    clone = copy.deepcopy(converted)
    assert clone.normprop_report == converted.normprop_report
    _exact(_eval(clone), _eval(converted))


# --- hooks on blocks ---------------------------------------------------------------------------


def test_forward_hooks_fire_on_a_rebuilt_and_on_a_kept_block(resnet18):
    """layer1.0 keeps its class and forward (its input correction is inside its conv1); layer1.1
    is rebuilt (its residual add reads layer1.0's uncorrected output back): hooks fire on both."""
    converted = resnet18.converted
    rebuilt = {r.path for r in resnet18.tree.rebuilt}
    assert "layer1.1" in rebuilt and isinstance(converted.layer1[1], fx.GraphModule)
    assert "layer1.0" not in rebuilt and type(converted.layer1[0]) is type(resnet18.original.layer1[0])
    assert "layer1" not in rebuilt and type(converted.layer1) is nn.Sequential
    seen: dict[str, list] = {}

    def record(key):
        return lambda module, args, output=None: seen.setdefault(key, []).append((args[0], output))

    handles = [
        converted.layer1.register_forward_hook(record("layer1")),
        converted.layer1[0].register_forward_hook(record("layer1.0")),
        converted.layer1[1].register_forward_pre_hook(record("layer1.1 in")),
        converted.layer1[1].register_forward_hook(record("layer1.1")),
        converted.layer2.register_forward_pre_hook(record("layer2 in")),
    ]
    try:
        _eval(converted)
    finally:
        for h in handles:
            h.remove()
    assert {k: len(v) for k, v in seen.items()} == {"layer1": 1, "layer1.0": 1, "layer1.1 in": 1, "layer1.1": 1,
                                                    "layer2 in": 1}
    (kept_in, kept_out), = seen["layer1"]
    (block_in, block_out), = seen["layer1.0"]
    _exact(block_in, kept_in)
    _exact(block_out, seen["layer1.1 in"][0][0])
    _exact(seen["layer1.1"][0][1], kept_out)
    _exact(kept_out, seen["layer2 in"][0][0])


# --- the converted model is the user's model ---------------------------------------------------


def test_inplace_returns_the_model_itself(resnet18):
    model = _build("timm", "resnet18")
    converted = _convert(model, inplace=True)
    assert converted is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.normprop_report.module_tree.class_kept
    _exact(_eval(model), _eval(resnet18.converted))


def test_original_is_unchanged_without_inplace(resnet18):
    original = resnet18.original
    assert resnet18.converted is not original
    assert {k: type(m) for k, m in original.named_modules()} == resnet18.classes_before
    after = original.state_dict()
    assert after.keys() == resnet18.state_before.keys()
    for key, value in resnet18.state_before.items():
        assert torch.equal(after[key], value), key
    assert not hasattr(original, "normprop_report")


def test_conversion_is_deterministic_and_equals_the_flat_conversion(resnet18, conversions):
    again = _convert(_build("timm", "resnet18"))
    mine, twice = resnet18.converted.state_dict(), again.state_dict()
    assert mine.keys() == twice.keys()
    for key in mine:
        assert torch.equal(mine[key], twice[key]), key
    flat = conversions("timm", "resnet18", flat=True).converted
    assert isinstance(flat, fx.GraphModule) and flat.normprop_report.module_tree.flat
    _to_rounding(_eval(resnet18.converted), _eval(flat))
    with torch.no_grad():
        _to_rounding(dropout_off(resnet18.converted.train())(X), dropout_off(flat.train())(X))


def test_pickle_and_torch_save_round_trips(resnet18):
    converted = resnet18.converted
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(pickle.dumps(converted)), torch.load(buffer, weights_only=False)):
        assert type(loaded) is type(converted)
        assert loaded.normprop_report == converted.normprop_report
        _exact(_eval(loaded), _eval(converted))
        for record in resnet18.tree.rebuilt:
            block = loaded.get_submodule(record.path)
            assert isinstance(block, fx.GraphModule) and block.stride == converted.get_submodule(record.path).stride
            assert type(block).__name__ == record.type, f"{record.path} loads as {type(block).__name__}"


def test_state_dict_round_trip_into_a_fresh_conversion(resnet18):
    converted = resnet18.converted
    fresh = _convert(_build("timm", "resnet18", seed=123))
    assert not torch.allclose(_eval(fresh), _eval(converted))
    fresh.load_state_dict(converted.state_dict())
    _exact(_eval(fresh), _eval(converted))


def test_deepcopy_keeps_the_report(resnet18):
    clone = copy.deepcopy(resnet18.converted)
    assert clone.normprop_report == resnet18.converted.normprop_report
    assert normprop_fx.conversion_report(clone).module_tree == resnet18.tree
    _exact(_eval(clone), _eval(resnet18.converted))


def test_fold_equals_the_converted_model(resnet18):
    folded = normprop_fx.fold(resnet18.converted)
    assert not any(isinstance(m, NormPropLayer) for m in folded.modules())
    torch.testing.assert_close(_eval(folded), _eval(resnet18.converted), rtol=1e-4, atol=1e-5)


def test_summary_prints_the_module_tree(resnet18, capsys):
    text = normprop_fx.summary(resnet18.converted)
    print(text)
    printed = capsys.readouterr().out
    assert "NormProp conversion of ResNet" in printed
    assert "Module tree: ResNet keeps its class and forward" in printed
    for record in resnet18.tree.rebuilt:
        assert record.path in printed
    assert normprop_fx.summary(copy.deepcopy(resnet18.converted)) == text
