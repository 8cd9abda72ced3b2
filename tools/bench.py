"""Benchmark: BatchNorm original vs NormProp conversion vs the no-norm floor.

For each model (--models, any torchvision classification model; by default the ResNet depth sweep
resnet18, resnet34, resnet50, resnet101, then mobilenet_v3_large and efficientnet_b0) it times
(a) a training step (forward, backward, SGD step) and (b) inference, eager and torch.compile'd, for

    train:  bn (the original), normprop (convert), floor (every BatchNorm -> nn.Identity),
            floor_bias (every BatchNorm -> a learned per-channel bias: the floor plus what
            NormProp's beta costs on its own, to split NormProp's cost over the floor);
            on request (--train-variants): normprop_inductor_defaults, the conversion compiled
            without the inductor options normprop_fx.compile adds on CPU (normprop_fx/compile.py);
            normprop_flat, the conversion as one flat GraphModule (convert(flat=True)): what
            keeping the user's module tree costs; floor_weight_norm, the floor with the weights
            of NormProp's layers normalized as NormProp does and nothing else: the cost that
            any exact eager form of NormProp pays, to split what the rest costs
    infer:  bn, normprop, floor (eval mode, unfolded),
            bn_folded (torch.fx.experimental.optimization.fuse: conv-BN folded into the conv),
            normprop_folded (normprop_fx.fold)

Variants are interleaved: every round runs each variant for --iters steps, in a rotated order,
and the reported time is the median over --rounds rounds of the time per step. Ratios come from
the same run: the ratio of medians, and the median over rounds of the per-round ratio. Results
are appended per model to --json as they are measured, so an interrupted run keeps what it has.

--write PAGE renders every --json file into three files (tools/bench_report.py): PAGE, the summary
(docs/bench.md: the current ratios against their targets in one table, each cell from the newest
run that measured it), the per-run page next to it (PAGE's stem + "-runs.md": docs/bench-runs.md,
every run's tables and profiles) and the summary's plot (stem + "_summary.png":
docs/bench_summary.png; it needs matplotlib, the ``bench`` extra). Both pages keep their
hand-written notes. --report-only renders without measuring.

CPU (default when no GPU): fp32, --threads 1 (the machine is shared), small inputs.

Allocator (--malloc-tuning, on by default): glibc malloc hands a freed buffer above its mmap
threshold back to the OS, and the next allocation faults it in again page by page. The threshold
adapts to what the process freed before, so which variant pays depends on the allocator's
history, not on the variant. The tuning fixes the thresholds (mmap at glibc's maximum, 32 MiB;
trimming off) for every variant alike, as jemalloc or tcmalloc would, and the report gives each
variant's minor page faults per step, so what is left of the effect is visible (what it cost
before the tuning: docs/bench-runs.md, closing note, "Earlier changes").

Code: the command line becomes a frozen BenchConfig once (parse_args); tune_environment sets
threads, allocator and compiler options for every variant alike; measure_model times one model;
tools/bench_report.py renders the pages from the results files.

GPU: pass --device cuda; the defaults then are the GPU target's setting (docs/bench.md): batch 128, 224x224,
bf16 autocast, channels_last. For example, on a CUDA machine:

    python tools/bench.py --device cuda --json docs/bench_gpu.json docs/bench_targets_torch2.14.json \
        docs/bench_infer_torch2.14.json docs/bench_profile_shapes_torch2.14.json docs/bench_tree.json \
        docs/bench_results.json docs/bench_targets.json docs/bench_kernels.json \
        docs/bench_kernels_no_peak_memory_reorder.json docs/bench_peak_memory.json --write docs/bench.md

(the run appends to the first --json file; --write renders all of them, so the CPU runs stay;
docs/bench-runs.md, while it has no CUDA run, gives this command in its CUDA section). The GPU
NormProp/BN target (<= 0.85) is judged for resnet50 at batch 128 in bf16 only; the other compiled
targets for every model and input. Eager ratios have targets on CPU for resnet18, resnet50,
mobilenet_v3_large and efficientnet_b0 only (bench_report.EAGER_TARGETS); the other models' ratios
are shown without one.

Exit status: 0 on success, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import ctypes
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

import normprop_fx
from normprop_fx.compile import CPU_TRAINING_OPTIONS

import bench_report
import common

MODELS = bench_report.MODELS  # the default --models
MODES = ("eager", "compiled")


# --- the environment ---------------------------------------------------------------------------


#: glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def tune_malloc() -> str:
    """Fix glibc malloc's mmap and trim thresholds (module docstring); returns what was done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return "default (no glibc to tune)"
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 2 GiB" if done else "default (mallopt refused)"


def inductor_setting(item: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> (KEY, the literal VALUE), for a KEY that torch._inductor.config has, with
    a VALUE of the type the setting has now (ValueError otherwise)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{item!r} is not KEY=VALUE")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"{item!r}: VALUE must be a Python literal (True, 4, 'x', ...)") from None
    config, leaf = inductor_config_holder(key)
    if config is None or not hasattr(config, leaf):
        raise ValueError(f"torch._inductor.config has no setting {key!r}")
    current = getattr(config, leaf)
    if current is not None and value is not None and not isinstance(value, type(current)):
        raise ValueError(f"{key} is a {type(current).__name__}, got {value!r}")
    return key, value


def inductor_config_holder(key: str) -> tuple[Any, str]:
    """For ``"a.b.c"``: (torch._inductor.config.a.b, "c"); the holder is None if a part is missing."""
    config: Any = torch._inductor.config
    *parents, leaf = key.split(".")
    for part in parents:
        config = getattr(config, part, None)
    return config, leaf


def apply_inductor_config(settings: dict[str, Any]) -> None:
    for key, value in settings.items():
        config, leaf = inductor_config_holder(key)
        setattr(config, leaf, value)


def tune_environment(config: BenchConfig) -> str:
    """Set up this process for a run, for every variant alike: torch threads (CPU), the allocator,
    the inductor options asked for, room for the recompilations of many variants. Returns what
    was done to the allocator (recorded with the run)."""
    if config.device == "cpu":
        torch.set_num_threads(config.threads)
    malloc = tune_malloc() if config.malloc_tuning else "default (--no-malloc-tuning)"
    if config.kernel_profile:
        torch._inductor.config.cpp.enable_kernel_profile = True
    apply_inductor_config(dict(config.inductor_config))
    for limit in ("cache_size_limit", "recompile_limit"):  # 8 models of one class get compiled
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    return malloc


# --- the command line --------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """One run's settings, resolved once from the command line (parse_args): the device's defaults
    filled in, the comma-separated lists split, the inductor settings parsed. Nothing changes it
    afterwards; what the run finds out (the allocator's state) is passed along beside it."""

    models: tuple[str, ...]
    device: str  # "cpu" or "cuda"
    batch_size: int
    image_size: int
    amp: str  # "bf16" or "none"
    channels_last: bool
    rounds: int
    iters: int
    warmup: int
    modes: tuple[str, ...]
    workloads: tuple[str, ...]
    threads: int
    seed: int
    malloc_tuning: bool
    json: tuple[Path, ...]
    write: Path | None
    report_only: bool
    profile: bool
    train_variants: tuple[str, ...]
    profile_variants: tuple[str, ...]
    profile_shapes: bool
    kernel_profile: bool
    peak_memory: bool
    inductor_config: Mapping[str, Any]  # KEY -> VALUE for torch._inductor.config


def _split(text: str) -> tuple[str, ...]:
    return tuple(item for item in text.split(",") if item)


def parse_args(argv: list[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated torchvision model names; default: {','.join(MODELS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, help="default: 128 on cuda, 16 on cpu")
    p.add_argument("--image-size", type=int, help="default: 224 on cuda, 128 on cpu")
    p.add_argument("--amp", choices=("bf16", "none"), help="autocast dtype; default: bf16 on cuda, none on cpu")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: on for cuda, off for cpu")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    p.add_argument("--iters", type=int, default=1, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    p.add_argument("--workloads", default="train,infer", help="train, infer or both")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="fix glibc malloc's mmap/trim thresholds for all variants alike (see above); default: on")
    p.add_argument("--json", type=Path, nargs="+", default=[Path("bench_results.json")],
                   help="results files: a run appends to the first (per model, as it goes); --write renders them all")
    p.add_argument("--write", type=Path, metavar="PAGE",
                   help="render --json into the summary PAGE (e.g. docs/bench.md), the per-run page next to it "
                        "(docs/bench-runs.md: PAGE's stem + '-runs.md') and the summary plot (stem + '_summary.png')")
    p.add_argument("--report-only", action="store_true", help="do not measure; only render --json into --write's pages")
    p.add_argument("--profile", action="store_true",
                   help="also record the top ops of one train step of each --profile-variants, in each of --modes (torch.profiler)")
    p.add_argument("--train-variants", default=",".join(DEFAULT_TRAIN_VARIANTS),
                   help=f"train variants, comma-separated, of {','.join(TRAIN_VARIANTS)}; default: {','.join(DEFAULT_TRAIN_VARIANTS)}")
    p.add_argument("--profile-variants", default="bn,normprop",
                   help="train variants --profile records, comma-separated; default: bn,normprop")
    p.add_argument("--profile-shapes", action="store_true",
                   help="with --profile: one row per op and input shapes (record_shapes), to tell which "
                        "convolution_backward calls differ between variants")
    p.add_argument("--kernel-profile", action="store_true",
                   help="with --profile: one profiler row per inductor-generated CPU kernel "
                        "(torch._inductor.config.cpp.enable_kernel_profile; adds a little overhead to every kernel)")
    p.add_argument("--peak-memory", action="store_true",
                   help="also record the peak tensor memory of one step of every variant, above what was allocated "
                        "before it (torch.profiler memory events; CPU and CUDA allocators)")
    p.add_argument("--inductor-config", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (dotted for sub-configs, e.g. cpp.simdlen) to the Python "
                        "literal VALUE for every variant alike; repeatable; recorded with the run")
    args = p.parse_args(argv)
    train_variants, profile_variants = _split(args.train_variants), _split(args.profile_variants)
    if not train_variants or not set(train_variants) <= set(TRAIN_VARIANTS):
        p.error(f"--train-variants takes {','.join(TRAIN_VARIANTS)}, got {','.join(train_variants) or 'none'}")
    if not set(profile_variants) <= set(TRAIN_VARIANTS):
        p.error(f"--profile-variants takes {','.join(TRAIN_VARIANTS)}, got {','.join(profile_variants)}")
    try:
        inductor_config = dict(inductor_setting(item) for item in args.inductor_config)
    except ValueError as err:
        p.error(f"--inductor-config: {err}")
    models, modes, workloads = _split(args.models), _split(args.modes), _split(args.workloads)
    known = common.torchvision_names()
    for name in models:
        if name not in known:
            p.error(f"unknown torchvision model {name!r}")
    if not set(modes) <= set(MODES) or not set(workloads) <= {"train", "infer"}:
        p.error("--modes takes eager,compiled and --workloads takes train,infer")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    gpu = device == "cuda"
    if (args.profile_shapes or args.kernel_profile) and not args.profile:
        p.error("--profile-shapes and --kernel-profile refine --profile: pass --profile too")
    if args.kernel_profile and gpu:
        p.error("--kernel-profile is for inductor's CPU kernels; on CUDA --profile lists every kernel already")
    batch_size = args.batch_size or (128 if gpu else 16)
    image_size = args.image_size or (224 if gpu else 128)
    if min(batch_size, image_size, args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        p.error("sizes, rounds, iters and threads must be positive")
    return BenchConfig(
        models=models, device=device, batch_size=batch_size, image_size=image_size,
        amp=args.amp or ("bf16" if gpu else "none"),
        channels_last=gpu if args.channels_last is None else args.channels_last,
        rounds=args.rounds, iters=args.iters, warmup=args.warmup, modes=modes, workloads=workloads,
        threads=args.threads, seed=args.seed, malloc_tuning=args.malloc_tuning, json=tuple(args.json),
        write=args.write, report_only=args.report_only, profile=args.profile, train_variants=train_variants,
        profile_variants=profile_variants, profile_shapes=args.profile_shapes, kernel_profile=args.kernel_profile,
        peak_memory=args.peak_memory, inductor_config=MappingProxyType(inductor_config),
    )


# --- the variants ------------------------------------------------------------------------------


def replace_batchnorms(model: nn.Module, replacement: Callable[[nn.modules.batchnorm._BatchNorm], nn.Module]) -> nn.Module:
    """A copy of ``model`` with every BatchNorm replaced by ``replacement(that BatchNorm)``."""
    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            copied.set_submodule(name, replacement(module))
    return copied


def without_batchnorm(model: nn.Module) -> nn.Module:
    """The no-norm floor: every BatchNorm replaced by nn.Identity."""
    return replace_batchnorms(model, lambda _bn: nn.Identity())


class ChannelBias(nn.Module):
    """``x + bias`` on dim 1, the bias learned: what a BatchNorm becomes in the floor_bias variant."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.reshape(-1, *([1] * (x.dim() - 2)))


def with_bias_for_batchnorm(model: nn.Module) -> nn.Module:
    """floor_bias: every BatchNorm replaced by a learned per-channel bias."""
    return replace_batchnorms(model, lambda bn: ChannelBias(bn.num_features))


class WeightNormalized(nn.Module):
    """A Conv/Linear of the floor whose weight NormProp's own weight normalization computes
    (``gamma_i * W_i / sqrt(||W_i||^2 + eps)``, normprop_fx.weight_norm, with gamma learned), and
    nothing else of NormProp: what the floor_weight_norm variant puts where NormProp has a layer."""

    def __init__(self, layer: nn.Module, eps: float) -> None:
        super().__init__()
        self.layer, self.eps = layer, eps
        self.gamma = nn.Parameter(torch.ones(layer.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = normprop_fx.layers.normalized_weight(self.layer.weight, self.gamma, self.eps)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)


def with_weight_normalization(original: nn.Module, converted: nn.Module) -> nn.Module:
    """floor_weight_norm: the floor with the weight of every layer that NormProp normalizes
    normalized as NormProp does (:class:`WeightNormalized`): the part of NormProp's cost that
    any exact eager form of it pays, so that normprop/floor_weight_norm is what the rest costs.
    The layers are found at the NormProp layers' paths; one that is not there is an error."""
    floor = without_batchnorm(original)
    for path, layer in converted.named_modules():
        if isinstance(layer, normprop_fx.NormPropLayer):
            plain = floor.get_submodule(path)
            if not isinstance(plain, (nn.Linear, nn.modules.conv._ConvNd)) or plain.weight.shape != layer.weight.shape:
                raise RuntimeError(f"floor_weight_norm: no layer of NormProp layer {path}'s shape at {path}, found {plain!r}")
            floor.set_submodule(path, WeightNormalized(plain, layer.eps))
    return floor


#: The training variants: name -> the model, from (the BN original, its conversion).
TRAIN_VARIANTS: dict[str, Callable[[nn.Module, nn.Module], nn.Module]] = {
    "bn": lambda original, converted: copy.deepcopy(original),
    "normprop": lambda original, converted: copy.deepcopy(converted),
    "floor": lambda original, converted: without_batchnorm(original),
    "floor_bias": lambda original, converted: with_bias_for_batchnorm(original),
    # The floor plus NormProp's weight normalization alone. Only on request.
    "floor_weight_norm": with_weight_normalization,
    # The conversion compiled with inductor's own settings for what normprop_fx.compile changes
    # on CPU (normprop_fx/compile.py): the same-run A/B of that choice. Only on request.
    "normprop_inductor_defaults": lambda original, converted: copy.deepcopy(converted),
    # The same conversion as one flat GraphModule: the same-run A/B of the module tree.
    "normprop_flat": lambda original, converted: normprop_fx.convert(original, flat=True),
}
DEFAULT_TRAIN_VARIANTS = ("bn", "normprop", "floor", "floor_bias")


def compile_kwargs(variant: str) -> dict[str, Any]:
    """What ``normprop_fx.compile`` gets besides the model, per variant."""
    if variant == "normprop_inductor_defaults":
        return {"options": {key: getattr(torch._inductor.config, key) for key in CPU_TRAINING_OPTIONS}}
    return {}


def build_models(name: str, workloads: list[str], train_variants: Sequence[str] = DEFAULT_TRAIN_VARIANTS) -> dict[str, dict[str, nn.Module]]:
    original = common.create_model("torchvision", name)
    converted = normprop_fx.convert(original)
    built: dict[str, dict[str, nn.Module]] = {"reference": {"original": original, "converted": converted}}
    if "train" in workloads:
        built["train"] = {variant: TRAIN_VARIANTS[variant](original, converted) for variant in train_variants}
    if "infer" in workloads:
        built["infer"] = {
            "bn": copy.deepcopy(original).eval(),
            "normprop": copy.deepcopy(converted).eval(),
            "floor": without_batchnorm(original).eval(),
            "bn_folded": fuse(copy.deepcopy(original).eval()),
            "normprop_folded": normprop_fx.fold(converted),
        }
    return built


def normalization_sizes(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """What each kind of normalization works on per step: the elements every BatchNorm reduces
    over (its input, for this batch), and the weights NormProp normalizes (O(#weights))."""
    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
             for m in original.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            original.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    normalized = sum(m.weight.numel() for m in converted.modules() if isinstance(m, normprop_fx.NormPropLayer))
    return {"batchnorm_input_elements": sum(seen), "normprop_weight_elements": normalized,
            "parameters": sum(p.numel() for p in original.parameters())}


def make_step(workload: str, model: nn.Module, mode: str, config: BenchConfig, x: torch.Tensor, y: torch.Tensor,
              compile_keywords: dict[str, Any] | None = None) -> Callable[[], None]:
    device = torch.device(config.device)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = normprop_fx.compile(model, **(compile_keywords or {})) if mode == "compiled" else model
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if config.amp == "bf16" else contextlib.nullcontext()
    )
    if workload == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(run(x), y)
            loss.backward()
            optimizer.step()

        return train_step

    model.eval()

    def infer_step() -> None:
        with torch.inference_mode(), autocast:
            run(x)

    return infer_step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- measuring ---------------------------------------------------------------------------------


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_model(name: str, config: BenchConfig) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    built = build_models(name, config.workloads, config.train_variants)
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=config.device)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (config.batch_size,), device=config.device)
    reference = built.pop("reference")
    sizes = normalization_sizes(copy.deepcopy(reference["original"]).to(config.device), reference["converted"], x)
    steps: dict[str, Callable[[], None]] = {}
    warmup_s: dict[str, float] = {}
    for workload, variants in built.items():
        for variant, model in variants.items():
            for mode in config.modes:
                key = f"{workload}/{variant}/{mode}"
                step = make_step(workload, model if mode == "eager" else copy.deepcopy(model), mode, config, x, y,
                                 compile_kwargs(variant))
                t0 = time.perf_counter()
                for _ in range(config.warmup):
                    step()
                sync(config.device)
                warmup_s[key] = time.perf_counter() - t0
                steps[key] = step
                print(f"  {name} {key}: warm-up {warmup_s[key]:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {key: [] for key in steps}
    faults: dict[str, list[float]] = {key: [] for key in steps}
    keys = list(steps)
    for r in range(config.rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            sync(config.device)
            f0, t0 = minor_page_faults(), time.perf_counter()
            for _ in range(config.iters):
                steps[key]()
            sync(config.device)
            times[key].append((time.perf_counter() - t0) / config.iters)
            faults[key].append((minor_page_faults() - f0) / config.iters)
    result = {
        "model": name,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "all_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
        "page_faults_per_step": {k: statistics.median(v) for k, v in faults.items()},
        "warmup_s": warmup_s,
        "sizes": sizes,
        "loadavg_end": os.getloadavg(),
    }
    if config.peak_memory:
        result["peak_memory_mib"] = {key: peak_step_memory(step) for key, step in steps.items()}
    if config.profile and "train" in built:
        # keyed by variant for a compiled step (as the older results files are), "variant, eager"
        # for an eager one
        result["profile"] = {
            v if mode == "compiled" else f"{v}, eager": profile_top_ops(steps[f"train/{v}/{mode}"], config.device, config.profile_shapes)
            for mode in config.modes for v in config.profile_variants if f"train/{v}/{mode}" in steps
        }
    return result


def profiler_activities() -> list[Any]:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


def peak_step_memory(step: Callable[[], None]) -> float:
    """Peak of the tensor memory one ``step()`` allocates over what was allocated before it, in MiB,
    from torch.profiler's memory events (every device's allocations summed in time order)."""
    from torch.profiler import profile

    with profile(activities=profiler_activities(), profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def profile_top_ops(step: Callable[[], None], device: str, by_shapes: bool = False, rows: int = 16) -> str:
    """The top ops of one ``step()``, by self time on ``device``; with ``by_shapes`` one row per op
    and input shapes (then the table lists more rows, since each op splits into several)."""
    from torch.profiler import profile

    with profile(activities=profiler_activities(), record_shapes=by_shapes) as prof:
        step()
    return prof.key_averages(group_by_input_shape=by_shapes).table(
        sort_by=bench_report.PROFILE_SORT[device][0], row_limit=2 * rows if by_shapes else rows, max_name_column_width=110)


def machine(config: BenchConfig, malloc: str) -> dict[str, Any]:
    """The run's record of where and how it measured (the page's lines above each run's tables)."""
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": common.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if config.device == "cuda" else "cpu",
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "amp": config.amp,
        "channels_last": config.channels_last,
        "rounds": config.rounds,
        "iters": config.iters,
        "warmup": config.warmup,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "malloc": malloc,
        "inductor_config": dict(config.inductor_config),
    }
    return info


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    results_file = config.json[0]
    runs: list[dict[str, Any]] = json.loads(results_file.read_text()) if results_file.exists() else []
    if not config.report_only:
        malloc = tune_environment(config)
        run = {"machine": machine(config, malloc), "results": []}
        runs.append(run)
        for name in config.models:
            print(f"{name}: building and warming up", file=sys.stderr, flush=True)
            run["results"].append(measure_model(name, config))
            results_file.write_text(json.dumps(runs, indent=1))
            print("\n".join(bench_report.render_model(run["results"][-1], config.device, run["machine"])), flush=True)
    if config.write:
        sources = [str(results_file)] * len(runs)
        for extra in config.json[1:]:
            extra_runs = json.loads(extra.read_text())
            runs += extra_runs
            sources += [str(extra)] * len(extra_runs)
        requested = list(dict.fromkeys(res["model"] for run in runs for res in run["results"])) or list(config.models)
        requested += [m for m in config.models if m not in requested]
        written = bench_report.write_pages(config.write, runs, requested, list(config.json), sources)
        print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
