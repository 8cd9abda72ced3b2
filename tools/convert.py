#!/usr/bin/env python3
"""Convert a torchvision or timm model to NormProp and print the audit table.

    python tools/convert.py --model resnet18
    python tools/convert.py --model timm:efficientnet_b0 --gamma-init 1 --save effnet_np.pt
    python tools/convert.py --model resnet50 --pretrained          # a trained checkpoint (downloads it)
    python tools/convert.py --model resnet50 --randomize-bn        # trained-looking BNs, offline

Builds the model (without pretrained weights unless --pretrained), converts it, prints every
rewrite and every BatchNorm left, then runs a forward and backward pass in train mode on
standardized random input and prints the measured output statistics. When a layer keeps a
trained BatchNorm's function (--pretrained, --randomize-bn, or the model's own trained state),
it also prints how far the converted model's eval outputs are from the original's. Exit status:
0 on success, 1 when the conversion or the check fails (or the weights cannot be downloaded),
2 on a bad argument or an unknown model name.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import NoReturn

import torch
from torch import nn

import common
from normprop_fx.passes.initialization import INIT_OPTIONS


def _fail(message: str, status: int) -> NoReturn:
    print(f"convert.py: error: {message}", file=sys.stderr)
    sys.exit(status)


def _input_size(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 224 or 3,224,224, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return (3, dims[0], dims[0]) if len(dims) == 1 else dims


def build_model(spec: str, pretrained: bool = False) -> tuple[nn.Module, tuple[int, ...], str]:
    """The model for ``[torchvision:|timm:]NAME`` (pretrained weights only when asked: they are
    downloaded), its default per-sample input size, and where it came from. Exits with status 2
    for an unknown name, 1 when the weights cannot be had."""
    try:
        source, name = common.find_model(spec)
    except common.UnknownModelError as err:
        _fail(str(err), 2)
    model = _pretrained_or_fail(lambda: common.create_model(source, name, pretrained=pretrained), spec)
    return model, common.default_input_size(source, name, model), f"{source}:{name}"


def _pretrained_or_fail(build, spec: str) -> nn.Module:  # noqa: ANN001
    try:
        return build()
    except Exception as err:  # no network, no weights for this model, a broken cache...
        _fail(f"{spec}: could not build it with its weights ({type(err).__name__}: {err}); without network, "
              "use --randomize-bn for trained-looking BatchNorms instead", 1)


def _exactness_line(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> str:
    from normprop_fx.model_check import relative_l2

    with torch.no_grad():
        error = relative_l2(converted.eval()(x), original.eval()(x))
    return (f"  eval outputs vs the original's: relative L2 {error:.2e} (the layers that keep a trained "
            "BatchNorm compute its eval-mode function)")


def _forward_backward_check(model: nn.Module, x: torch.Tensor) -> tuple[list[str], bool]:
    """Train-mode forward and backward on ``x``; lines to print and whether all was finite."""
    from normprop_fx.model_check import backward_coverage, floating_outputs

    model.train()
    outputs = floating_outputs(model(x))
    coverage = backward_coverage(model, outputs)
    params, missing, nonfinite = coverage.trainable, coverage.missing, coverage.nonfinite
    out = outputs[0].detach().float()
    lines = [
        f"forward + backward in train mode on N(0, I) input of shape {tuple(x.shape)}:",
        f"  output {tuple(out.shape)}: mean {out.mean().item():+.4f}, std {out.std().item():.4f}, "
        f"finite: {bool(torch.isfinite(out).all())}",
        f"  gradients: {len(params) - len(missing)}/{len(params)} parameters reached, "
        f"{len(nonfinite)} with non-finite values",
    ]
    if missing:
        lines.append(f"  no gradient: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return lines, bool(torch.isfinite(out).all()) and not nonfinite


def main(argv: list[str] | None = None) -> int:
    parser = common.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="torchvision or timm model name; prefix torchvision: or timm: to choose")
    parser.add_argument("--init", choices=INIT_OPTIONS, default="auto",
                        help="keep trained BatchNorms' functions (auto: per BatchNorm, as trained or not), or not")
    parser.add_argument("--pretrained", action="store_true", help="build the model with its pretrained weights (downloads them)")
    parser.add_argument("--randomize-bn", action="store_true",
                        help="give every BatchNorm trained-looking statistics and affine first (a stand-in for a checkpoint)")
    parser.add_argument("--gamma-init", type=common.gamma_init, default="paper", help="'paper' (1/1.21 for ReLU) or a positive number")
    parser.add_argument("--measure", action="store_true",
                        help="add nominal vs measured output mean/std per NormProp layer to the audit table")
    parser.add_argument("--input-size", type=_input_size, default=None, help="per-sample input shape, e.g. 224 or 3,224,224 (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size of the random check input (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="PATH", help="write the converted model (torch.save of the GraphModule)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    import normprop_fx

    torch.manual_seed(args.seed)
    model, default_size, source = build_model(args.model, args.pretrained)
    input_size = args.input_size or default_size
    if args.randomize_bn:
        from normprop_fx.model_check import randomize_batchnorms

        try:
            randomize_batchnorms(model, torch.randn(16, *input_size), args.seed)
        except Exception as err:  # the model does not run on that input
            _fail(f"{source}: --randomize-bn could not run it on input {(16, *input_size)}: {type(err).__name__}: {err}", 1)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", normprop_fx.NormPropWarning)
            converted = normprop_fx.convert(
                model, init=args.init, gamma_init=args.gamma_init,
                example_inputs=torch.empty(2, *input_size, device="meta"),
            )
    except normprop_fx.NormPropError as err:
        _fail(f"{source}: {err}", 1)
    seconds = time.perf_counter() - start
    print(f"{source}: converted in {seconds:.2f} s")
    print(normprop_fx.summary(converted, measure=args.measure))
    for w in caught:
        print(f"warning: {w.message}")
    print()

    x = torch.randn(args.batch_size, *input_size)
    try:
        exact = []
        if any(i.trained for i in normprop_fx.conversion_report(converted).initializations):
            exact = [_exactness_line(model, converted, x)]
        lines, finite = _forward_backward_check(converted, x)
        lines += exact
        stats = normprop_fx.measure_layer_statistics(converted.eval(), x)
    except Exception as err:  # a model that converts but does not run is a failed check
        _fail(f"{source}: forward/backward on input {tuple(x.shape)} failed: {type(err).__name__}: {err}", 1)
    print("\n".join(lines))
    if stats:
        means = [s.mean for s in stats]
        stds = [s.std for s in stats]
        print(
            f"  NormProp layer outputs ({len(stats)} layers): mean in [{min(means):+.3f}, {max(means):+.3f}], "
            f"std in [{min(stds):.3f}, {max(stds):.3f}] "
            + ("(nominal: mean 0, std 1 with gamma_init=1)" if not exact else "(trained layers: no nominal moments)")
        )
    if args.save:
        torch.save(converted, args.save)
        print(f"saved to {args.save}: load with torch.load({args.save!r}, weights_only=False) after import normprop_fx")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
