"""How much the correction constants move between calibration seeds, and the layer statistics at init.

    python tools/calibration_stability.py timm:lcnet_050:224 torchvision:resnet50:224 [--seeds 3] [--samples N]

For each SOURCE:NAME:PIXELS the model is built (torch.manual_seed(0), no weights downloaded) and
converted with gamma_init=1 once per calibration seed (``convert(calibration_seed=)``; ``--samples``
sets ``calibration_samples``, the default lets the shapes decide). Printed per model: the sample
size used, the largest relative spread (max - min) / mean of any correction constant over the
seeds and where, and per seed the NormProp layers outside std [0.7, 1.4] / |mean| < 0.3 with the
least and the largest std, measured over 32 N(0, I) samples (torch.manual_seed(1)); then, per
seed, the report's least precise correction (``ConversionReport.calibration_precision``): the
relative standard error of its scale that the samples' own spread gives, the estimate of how far
another seed moves it.

``--per-sample`` adds, for the seed-0 conversion's layer with the largest std, how the 32 samples'
own second moments of that layer's input spread (min, median, max over samples, relative to
their mean), next to the same module's input in the original model in train mode on the same
32 samples (BatchNorm with batch statistics). A wide NormProp spread next to a narrow BatchNorm one
says that the layer's std over the samples is set by a few samples (docs/method.md section 6).
"""

from __future__ import annotations

import argparse
import warnings

import torch

import normprop_fx
from normprop_fx.model_check import within_target
from normprop_fx.statistics import correction_spread, measure_layer_statistics


def build(source: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        import timm
        return timm.create_model(name, num_classes=10)
    import torchvision
    return torchvision.models.get_model(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="SOURCE:NAME:PIXELS, SOURCE timm or torchvision")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=None, help="calibration_samples (default: from the shapes)")
    parser.add_argument("--per-sample", action="store_true", help="the per-sample spread at the worst layer's input")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    for spec in args.models:
        source, name, pixels = spec.split(":")
        model, side = build(source, name), int(pixels)
        torch.manual_seed(1)
        test = torch.randn(32, 3, side, side)
        converted_models, stats, used, errors = [], [], "", []
        for seed in range(args.seeds):
            converted = normprop_fx.convert(model, gamma_init=1.0, example_inputs=torch.empty(2, 3, side, side),
                                            calibration_seed=seed, calibration_samples=args.samples).eval()
            used = converted.normprop_report.calibration_samples
            precision = converted.normprop_report.calibration_precision
            if precision is not None:
                errors.append(f"{100 * precision.scale_error:.1f}% at {precision.consumer} ({precision.samples} samples, "
                              f"cv {precision.spread:.2f})")
            converted_models.append(converted)
            layers = measure_layer_statistics(converted, test)
            outside = sum(not within_target(s) for s in layers)
            stats.append(f"{outside}/{len(layers)} outside, std {min(s.std for s in layers):.3f}..{max(s.std for s in layers):.3f}")
            if seed == 0:
                worst = max(layers, key=lambda s: s.std).path
        spread, where = correction_spread(converted_models)
        print(f"{spec}: {used} samples; constants spread {spread:.3f} at {where}; " + "; ".join(stats), flush=True)
        if errors:
            print("  least precise correction per seed (scale's relative standard error, from the report): "
                  + "; ".join(errors), flush=True)
        if args.per_sample:
            for label, net in (("NormProp, eval", converted_models[0].eval()), ("original, train", model.train())):
                low, mid, high = per_sample_spread(net, worst, test)
                print(f"  input of {worst}, {label}: per-sample second moment / its mean over the 32 samples: "
                      f"min {low:.3f}, median {mid:.3f}, max {high:.3f}", flush=True)


def per_sample_spread(model: torch.nn.Module, path: str, x: torch.Tensor) -> tuple[float, float, float]:
    """Min, median and max over the samples of ``x`` of each sample's mean square of the input of
    module ``path``, divided by their mean; one batch, no gradients."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    squares = seen[0].double().pow(2).flatten(1).mean(1)
    squares = squares / squares.mean()
    return squares.min().item(), squares.median().item(), squares.max().item()


if __name__ == "__main__":
    main()
