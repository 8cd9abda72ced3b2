"""The detection recipe (README, "Trained networks"): a torchvision Faster R-CNN whose ResNet-50
backbone uses FrozenBatchNorm2d, as torchvision builds it when weights are loaded, with its
backbone body converted to NormProp. The body's outputs equal the frozen original's, the layers
torchvision froze stay frozen, and a train step on two images runs with a finite loss.

No weights are downloaded: the frozen BatchNorms get trained-looking statistics and affines
(``randomize_batchnorms``) instead.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normprop_fx
from normprop_fx.model_check import ROUNDING_FLOOR_FACTOR, randomize_batchnorms, relative_l2

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402


def test_faster_rcnn_with_a_converted_frozen_bn_backbone() -> None:
    torch.manual_seed(0)
    trunk = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    randomize_batchnorms(trunk, torch.randn(4, 3, 96, 96))
    backbone = _resnet_fpn_extractor(trunk, trainable_layers=3)  # conv1 and layer1 frozen, as with weights
    model = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=160)

    original_body = model.backbone.body
    converted = normprop_fx.convert(original_body)
    report = normprop_fx.conversion_report(converted)
    assert report.batchnorms_found == report.converted == 53 and not report.left
    assert all(i.trained for i in report.initializations)
    x = torch.randn(2, 3, 128, 160, dtype=torch.float64)
    body64 = copy.deepcopy(original_body).double()
    with torch.no_grad():
        expected64, actual64 = body64(x), normprop_fx.convert(body64)(x)
        expected, actual = original_body(x.float()), converted(x.float())
    assert list(actual) == list(expected)  # the same OrderedDict of feature maps
    for key in expected:
        assert relative_l2(actual64[key], expected64[key]) <= 1e-10, key
        # float32: a random-weight ResNet-50 amplifies rounding to ~3e-5 by itself; the conversion
        # rounds no worse than the original (see normprop_fx.model_check.ROUNDING_FLOOR_FACTOR)
        floor = relative_l2(expected[key], expected64[key])
        assert relative_l2(actual[key], expected64[key]) <= ROUNDING_FLOOR_FACTOR * max(floor, 1e-7), key

    # torchvision froze conv1 and layer1 by their conv weights: their gamma/beta stay frozen too
    params = dict(converted.named_parameters())
    assert not params["conv1.gamma"].requires_grad and not params["layer1.0.conv1.beta"].requires_grad
    assert params["layer2.0.conv1.gamma"].requires_grad and params["layer4.2.conv3.beta"].requires_grad

    model.backbone.body = converted
    model.train()
    images = [torch.rand(3, 120, 150), torch.rand(3, 140, 130)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 70.0], [30.0, 40.0, 120.0, 110.0]]), "labels": torch.tensor([2, 1])},
    ]
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert params["layer2.0.conv1.gamma"].grad is not None and torch.isfinite(params["layer2.0.conv1.gamma"].grad).all()
    assert params["conv1.gamma"].grad is None
