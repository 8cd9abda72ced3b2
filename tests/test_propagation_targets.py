"""Issue 3 target: with gamma_init=1 and N(0, I) input at init, every NormProp layer's measured
output std is within [0.7, 1.4] and |mean| < 0.3, on 13 zoo models (torchvision and timm).

All 13 pass; a change to the moment propagation that puts one layer of one of them off target
turns the suite red, with the layers and their numbers in the message.
"""

from __future__ import annotations

import pytest
import torch
from helpers import dropout_off

import normprop_fx

STD_RANGE = (0.7, 1.4)
MAX_ABS_MEAN = 0.3

MODELS = [
    ("torchvision", "resnet50", 224),
    ("torchvision", "densenet121", 224),
    ("torchvision", "mobilenet_v3_large", 224),
    ("torchvision", "efficientnet_b0", 224),
    ("torchvision", "regnet_y_800mf", 224),
    ("torchvision", "inception_v3", 299),
    ("timm", "resnet50d", 224),
    ("timm", "efficientnet_b0", 224),
    ("timm", "mobilenetv3_large_100", 224),
    ("timm", "rexnet_100", 224),
    ("timm", "regnety_008", 224),
    ("timm", "dla34", 224),
    ("timm", "cspresnet50", 256),
]


def _build(source: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


@pytest.mark.parametrize(("source", "name", "size"), MODELS, ids=[f"{s}:{n}" for s, n, _ in MODELS])
def test_every_normprop_layer_is_standardized_at_init(source, name, size):
    model = _build(source, name)
    converted = normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, size, size))
    report = normprop_fx.conversion_report(converted)
    assert not report.left, [b.reason for b in report.left]
    dropout_off(converted)
    torch.manual_seed(1)
    stats = normprop_fx.measure_layer_statistics(converted, torch.randn(4, 3, size, size))
    assert len(stats) >= report.converted
    misses = [
        f"{s.path}: mean {s.mean:+.3f}, std {s.std:.3f}"
        for s in stats
        if not (STD_RANGE[0] <= s.std <= STD_RANGE[1] and abs(s.mean) < MAX_ABS_MEAN)
    ]
    stds = [s.std for s in stats]
    assert not misses, f"{len(misses)} of {len(stats)} layers off target (std in [{min(stds):.3f}, {max(stds):.3f}]): {misses[:5]}"
