"""Benchmark: BatchNorm original vs NormProp conversion vs the no-norm floor.

For each model it times (a) a training step (forward, backward, SGD step) and (b) inference,
eager and torch.compile'd, for

    train:  bn (the original), normprop (convert), floor (every BatchNorm -> nn.Identity),
            floor_bias (every BatchNorm -> a learned per-channel bias: the floor plus what
            NormProp's beta costs on its own, to split NormProp's cost over the floor);
            on request (--train-variants): normprop_inductor_defaults, the conversion compiled
            without the inductor options normprop_fx.compile adds on CPU (normprop_fx/compile.py)
    infer:  bn, normprop, floor (eval mode, unfolded),
            bn_folded (torch.fx.experimental.optimization.fuse: conv-BN folded into the conv),
            normprop_folded (normprop_fx.fold)

Variants are interleaved: every round runs each variant for --iters steps, in a rotated order,
and the reported time is the median over --rounds rounds of the time per step. Ratios come from
the same run: the ratio of medians, and the median over rounds of the per-round ratio. Results are appended per model to --json as they are measured,
so an interrupted run keeps what it has; --write renders docs/bench.md from that file.

CPU (default when no GPU): fp32, --threads 1 (the machine is shared), small inputs.

Allocator (--malloc-tuning, on by default): glibc malloc hands a freed buffer above its mmap
threshold back to the OS, and the next allocation faults it in again page by page. The threshold
adapts to what the process freed before, so which variant pays depends on the allocator's
history, not on the variant: seen here, 23,000 minor faults (40 ms of a 190 ms step) for the
variant that happened to run first. The tuning fixes the thresholds (mmap at glibc's maximum,
32 MiB; trimming off) for every variant alike, as jemalloc or tcmalloc would, and the report
gives each variant's minor page faults per step, so what is left of the effect is visible.
GPU: pass --device cuda; the defaults then are the issue's targets: batch 128, 224x224,
bf16 autocast, channels_last. For example, on a CUDA machine:

    python tools/bench.py --device cuda --json docs/bench_gpu.json docs/bench_targets_torch2.14.json \
        docs/bench_infer_torch2.14.json docs/bench_profile_shapes_torch2.14.json docs/bench_results.json \
        docs/bench_targets.json docs/bench_kernels.json docs/bench_kernels_no_peak_memory_reorder.json \
        docs/bench_peak_memory.json --write docs/bench.md

(the run appends to the first --json file; --write renders all of them, so the CPU runs stay;
docs/bench.md, while it has no CUDA run, gives this command in its CUDA section). The GPU
NormProp/BN target (<= 0.85) is judged for resnet50 at batch 128 in bf16 only; the other
targets for every model and input.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn
from torch.fx.experimental.optimization import fuse

import normprop_fx
from normprop_fx.compile import CPU_TRAINING_OPTIONS

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0")
MODES = ("eager", "compiled")
#: Text from this line on in an existing --write file is kept when the file is re-rendered
#: (the hand-written analysis of the numbers above it).
NOTES_MARKER = "<!-- notes: kept by tools/bench.py when it rewrites this file -->"
#: The issue's targets for compiled ratios, per device. The GPU train target holds for one setting
#: only (GPU_TARGET_SETTING); the others hold for every model and input.
TARGETS = {
    "train normprop/bn": {"cpu": 1.00, "cuda": 0.85},
    "train normprop/floor": {"cpu": 1.05, "cuda": 1.05},
    "infer normprop_folded/bn_folded": {"cpu": 1.01, "cuda": 1.01},
}
GPU_TARGET_SETTING = {"model": "resnet50", "batch_size": 128, "amp": "bf16"}


def target_for(key: str | None, device: str, model: str, machine_info: dict[str, Any]) -> float | None:
    """The target of a compiled ratio (a TARGETS key) in a run on ``device`` ("cpu" or "cuda"),
    or None where the issue sets none (the GPU NormProp/BN target outside its setting)."""
    if key is None:
        return None
    if key == "train normprop/bn" and device == "cuda":
        setting = {"model": model, "batch_size": machine_info["batch_size"], "amp": machine_info["amp"]}
        if setting != GPU_TARGET_SETTING:
            return None
    return TARGETS[key][device]


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


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
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
    p.add_argument("--write", type=Path, help="render this markdown file from --json (e.g. docs/bench.md)")
    p.add_argument("--report-only", action="store_true", help="do not measure; only render --json into --write")
    p.add_argument("--profile", action="store_true",
                   help="also record the top ops of one compiled train step of each --profile-variants (torch.profiler)")
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
    args.train_variants = [v for v in args.train_variants.split(",") if v]
    args.profile_variants = [v for v in args.profile_variants.split(",") if v]
    if not args.train_variants or not set(args.train_variants) <= set(TRAIN_VARIANTS):
        p.error(f"--train-variants takes {','.join(TRAIN_VARIANTS)}, got {','.join(args.train_variants) or 'none'}")
    if not set(args.profile_variants) <= set(TRAIN_VARIANTS):
        p.error(f"--profile-variants takes {','.join(TRAIN_VARIANTS)}, got {','.join(args.profile_variants)}")
    try:
        args.inductor_config = dict(inductor_setting(item) for item in args.inductor_config)
    except ValueError as err:
        p.error(f"--inductor-config: {err}")
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for name in args.models:
        if not hasattr(torchvision.models, name):
            p.error(f"unknown torchvision model {name!r}")
    if not set(args.modes) <= set(MODES) or not set(args.workloads) <= {"train", "infer"}:
        p.error("--modes takes eager,compiled and --workloads takes train,infer")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    gpu = args.device == "cuda"
    if (args.profile_shapes or args.kernel_profile) and not args.profile:
        p.error("--profile-shapes and --kernel-profile refine --profile: pass --profile too")
    if args.kernel_profile and gpu:
        p.error("--kernel-profile is for inductor's CPU kernels; on CUDA --profile lists every kernel already")
    args.batch_size = args.batch_size or (128 if gpu else 16)
    args.image_size = args.image_size or (224 if gpu else 128)
    args.amp = args.amp or ("bf16" if gpu else "none")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    if min(args.batch_size, args.image_size, args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        p.error("sizes, rounds, iters and threads must be positive")
    return args


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


#: The training variants: name -> the model, from (the BN original, its conversion).
TRAIN_VARIANTS: dict[str, Callable[[nn.Module, nn.Module], nn.Module]] = {
    "bn": lambda original, converted: copy.deepcopy(original),
    "normprop": lambda original, converted: copy.deepcopy(converted),
    "floor": lambda original, converted: without_batchnorm(original),
    "floor_bias": lambda original, converted: with_bias_for_batchnorm(original),
    # The conversion compiled with inductor's own settings for what normprop_fx.compile changes
    # on CPU (normprop_fx/compile.py): the same-run A/B of that choice. Only on request.
    "normprop_inductor_defaults": lambda original, converted: copy.deepcopy(converted),
}
DEFAULT_TRAIN_VARIANTS = ("bn", "normprop", "floor", "floor_bias")


def compile_kwargs(variant: str) -> dict[str, Any]:
    """What ``normprop_fx.compile`` gets besides the model, per variant."""
    if variant == "normprop_inductor_defaults":
        return {"options": {key: getattr(torch._inductor.config, key) for key in CPU_TRAINING_OPTIONS}}
    return {}


def build_models(name: str, workloads: list[str], train_variants: Sequence[str] = DEFAULT_TRAIN_VARIANTS) -> dict[str, dict[str, nn.Module]]:
    original = getattr(torchvision.models, name)()
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


def make_step(workload: str, model: nn.Module, mode: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor,
              compile_keywords: dict[str, Any] | None = None) -> Callable[[], None]:
    device = torch.device(args.device)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = normprop_fx.compile(model, **(compile_keywords or {})) if mode == "compiled" else model
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
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


def measure_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    built = build_models(name, args.workloads, args.train_variants)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=args.device)
    reference = built.pop("reference")
    sizes = normalization_sizes(copy.deepcopy(reference["original"]).to(args.device), reference["converted"], x)
    steps: dict[str, Callable[[], None]] = {}
    warmup_s: dict[str, float] = {}
    for workload, variants in built.items():
        for variant, model in variants.items():
            for mode in args.modes:
                key = f"{workload}/{variant}/{mode}"
                step = make_step(workload, model if mode == "eager" else copy.deepcopy(model), mode, args, x, y,
                                 compile_kwargs(variant))
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    step()
                sync(args.device)
                warmup_s[key] = time.perf_counter() - t0
                steps[key] = step
                print(f"  {name} {key}: warm-up {warmup_s[key]:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {key: [] for key in steps}
    faults: dict[str, list[float]] = {key: [] for key in steps}
    keys = list(steps)
    for r in range(args.rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            sync(args.device)
            f0, t0 = minor_page_faults(), time.perf_counter()
            for _ in range(args.iters):
                steps[key]()
            sync(args.device)
            times[key].append((time.perf_counter() - t0) / args.iters)
            faults[key].append((minor_page_faults() - f0) / args.iters)
    result = {
        "model": name,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "all_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
        "page_faults_per_step": {k: statistics.median(v) for k, v in faults.items()},
        "warmup_s": warmup_s,
        "sizes": sizes,
        "loadavg_end": os.getloadavg(),
    }
    if args.peak_memory:
        result["peak_memory_mib"] = {key: peak_step_memory(step) for key, step in steps.items()}
    if args.profile and "train" in built and "compiled" in args.modes:
        result["profile"] = {v: profile_top_ops(steps[f"train/{v}/compiled"], args.device, args.profile_shapes) for v in args.profile_variants
                             if f"train/{v}/compiled" in steps}
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


#: What a profile's top ops are sorted by, per device: on CUDA the host time of an op is its launch.
PROFILE_SORT = {"cpu": ("self_cpu_time_total", "self CPU time"), "cuda": ("self_device_time_total", "self CUDA time")}


def profile_top_ops(step: Callable[[], None], device: str, by_shapes: bool = False, rows: int = 16) -> str:
    """The top ops of one ``step()``, by self time on ``device``; with ``by_shapes`` one row per op
    and input shapes (then the table lists more rows, since each op splits into several)."""
    from torch.profiler import profile

    with profile(activities=profiler_activities(), record_shapes=by_shapes) as prof:
        step()
    return prof.key_averages(group_by_input_shape=by_shapes).table(
        sort_by=PROFILE_SORT[device][0], row_limit=2 * rows if by_shapes else rows, max_name_column_width=110)


def machine(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "rounds": args.rounds,
        "iters": args.iters,
        "warmup": args.warmup,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "malloc": args.malloc,
        "inductor_config": args.inductor_config,
    }
    return info


# --- the report --------------------------------------------------------------------------------


#: The ratios reported per model: (label, numerator, denominator, target key or None), per mode.
RATIOS = (
    ("train normprop / bn", "train/normprop", "train/bn", "train normprop/bn"),
    ("train normprop / floor", "train/normprop", "train/floor", "train normprop/floor"),
    ("train floor_bias / floor (a learned bias alone)", "train/floor_bias", "train/floor", None),
    ("train normprop / floor_bias", "train/normprop", "train/floor_bias", None),
    ("train normprop / normprop_inductor_defaults", "train/normprop", "train/normprop_inductor_defaults", None),
    ("infer normprop_folded / bn_folded", "infer/normprop_folded", "infer/bn_folded", "infer normprop_folded/bn_folded"),
    ("infer normprop / bn, unfolded", "infer/normprop", "infer/bn", None),
)


def ratio_of_medians(res: dict[str, Any], a: str, b: str) -> float | None:
    med = res["median_ms"]
    return med[a] / med[b] if a in med and b in med else None


def median_of_paired_ratios(res: dict[str, Any], a: str, b: str) -> float | None:
    """Median over rounds of a/b measured in the same round: robust to load that changes
    between rounds on a shared machine."""
    times = res["all_ms"]
    if a not in times or b not in times:
        return None
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def fmt_ratio(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def verdict(value: float | None, target: float | None) -> str:
    if value is None or target is None:
        return ""
    return "met" if value <= target else "missed"


def render(runs: list[dict[str, Any]], requested: list[str], gpu_command: str) -> str:
    """The page: every run, by device. ``gpu_command`` is what the CUDA section, when no CUDA run
    is among ``runs``, gives as the command that measures it."""
    out = ["# Benchmark: BatchNorm vs NormProp vs no-norm floor", ""]
    out.append("Written by `tools/bench.py` from its results file; every number below comes from the run(s) listed. "
               "Times are medians over interleaved rounds of the time per step, in ms. Ratios come from the same "
               "run, two ways: the ratio of the two medians, and the median over rounds of the ratio measured within "
               "one round (robust to load that changes between rounds); the verdict uses the latter. `floor` = the same network with every BatchNorm replaced by `nn.Identity`; "
               "`floor_bias` (training) = every BatchNorm replaced by a learned per-channel bias, what NormProp's beta "
               "costs by itself; minor page faults per step show what the allocator cost each variant; "
               "`bn_folded` = `torch.fx.experimental.optimization.fuse` (conv-BN folding) of the eval model; "
               "`normprop_folded` = `normprop_fx.fold` of the conversion. Compiled = `torch.compile` (inductor, "
               "default mode) via `normprop_fx.compile`.")
    out.append("")
    by_device: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_device.setdefault("cuda" if run["machine"]["device"] != "cpu" else "cpu", []).append(run)
    for device in ("cpu", "cuda"):
        out.append(f"## {device.upper()}")
        out.append("")
        device_runs = by_device.get(device, [])
        if not device_runs:
            out += render_unmeasured_targets(device, gpu_command)
            continue
        for run in device_runs:
            m = run["machine"]
            out.append(f"Run of {m['date']}: `{m['command']}`")
            out.append("")
            out.append(f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, device {m['device']}; "
                       f"torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}")
            out.append(f"- torch threads: {m['threads']}; load average (1, 5, 15 min) at start: "
                       f"{', '.join(f'{v:.2f}' for v in m['loadavg_start'])} (the machine is shared)")
            out.append(f"- input: batch {m['batch_size']}, {m['image_size']}x{m['image_size']}, amp {m['amp']}, "
                       f"channels_last {m['channels_last']}; {m['rounds']} rounds x {m['iters']} steps per variant, "
                       f"{m['warmup']} warm-up steps")
            if "malloc" in m:
                out.append(f"- allocator: {m['malloc']}")
            if m.get("inductor_config"):
                out.append("- inductor config (all variants): "
                           + ", ".join(f"`{k}={v!r}`" for k, v in m["inductor_config"].items()))
            out.append("")
            for res in run["results"]:
                out += render_model(res, device, m)
        measured = {res["model"] for run in device_runs for res in run["results"]}
        missing = [name for name in requested if name not in measured]
        if missing:
            out.append(f"Not measured on {device.upper()}: {', '.join(missing)} (see the closing note).")
            out.append("")
    return "\n".join(out) + "\n"


def render_unmeasured_targets(device: str, gpu_command: str) -> list[str]:
    """The section of a device no run measured: its target rows, each "not measured"."""
    out = ["Not measured: no such device was available for the runs behind this file."]
    if device == "cuda":
        out[0] += (f" Measure it on a CUDA machine with `{gpu_command}` (its defaults: batch 128, 224x224, "
                   "bf16 autocast, channels_last).")
    rows = []
    for label, _num, _den, key in RATIOS:
        if key is not None:
            setting = ""
            if device == "cuda" and key == "train normprop/bn":
                g = GPU_TARGET_SETTING
                setting = f", {g['model']}, batch {g['batch_size']}, {g['amp']}"
            rows.append([f"{label} (compiled{setting})", "not measured", f"<= {TARGETS[key][device]:.2f}"])
    return out + ["", tabulate(rows, headers=["target ratio", "median of per-round ratios", "target"],
                               tablefmt="github", disable_numparse=True), ""]


def render_model(res: dict[str, Any], device: str, machine_info: dict[str, Any]) -> list[str]:
    """One model's tables from a run on ``device`` with ``machine_info`` (its input setting)."""
    med = res["median_ms"]
    out = [f"### {res['model']}", ""]
    if "sizes" in res:
        sz = res["sizes"]
        out.append(f"Parameters {sz['parameters']:,}; NormProp normalizes {sz['normprop_weight_elements']:,} weight "
                   f"elements per step; the BatchNorms reduce over {sz['batchnorm_input_elements']:,} activation "
                   f"elements per step at this input size. Load average at the end of this model: "
                   f"{', '.join(f'{v:.2f}' for v in res['loadavg_end'])}.")
        out.append("")
    rows = []
    faults = res.get("page_faults_per_step", {})
    peaks = res.get("peak_memory_mib", {})
    for key in med:
        workload, variant, mode = key.split("/")
        rows.append([workload, variant, mode, f"{med[key]:.1f}", f"{res['warmup_s'][key]:.1f}",
                     f"{faults[key]:.0f}" if key in faults else "not recorded"] + ([f"{peaks[key]:.0f}"] if peaks else []))
    headers = ["workload", "variant", "mode", "median ms/step", "warm-up s", "minor page faults/step (median)"]
    out.append(tabulate(rows, headers=headers + (["peak tensor MiB (one step)"] if peaks else []),
                        tablefmt="github", disable_numparse=True))
    out.append("")
    ratio_rows = []
    for mode in ("compiled", "eager"):
        for label, num, den, target_key in RATIOS:
            a, b = f"{num}/{mode}", f"{den}/{mode}"
            target = target_for(target_key, device, res["model"], machine_info) if mode == "compiled" else None
            paired = median_of_paired_ratios(res, a, b)
            if paired is None and target is None:
                continue  # a diagnostic ratio of variants this run did not measure
            ratio_rows.append([f"{label} ({mode})", fmt_ratio(ratio_of_medians(res, a, b)), fmt_ratio(paired),
                               "" if target is None else f"<= {target:.2f}", verdict(paired, target)])
    out.append(tabulate(ratio_rows, headers=["ratio", "of medians", "median of per-round ratios", "target", "verdict (per-round)"],
                        tablefmt="github", disable_numparse=True))
    out.append("")
    for variant, table in res.get("profile", {}).items():
        out += [f"Top ops of one compiled train step, {variant} (torch.profiler, by {PROFILE_SORT[device][1]}):", "", "```", table, "```", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results_file = args.json[0]
    runs: list[dict[str, Any]] = json.loads(results_file.read_text()) if results_file.exists() else []
    if not args.report_only:
        if args.device == "cpu":
            torch.set_num_threads(args.threads)
        args.malloc = tune_malloc() if args.malloc_tuning else "default (--no-malloc-tuning)"
        if args.kernel_profile:
            torch._inductor.config.cpp.enable_kernel_profile = True
        apply_inductor_config(args.inductor_config)
        for limit in ("cache_size_limit", "recompile_limit"):  # 8 models of one class get compiled
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 64)
        run = {"machine": machine(args), "results": []}
        runs.append(run)
        for name in args.models:
            print(f"{name}: building and warming up", file=sys.stderr, flush=True)
            run["results"].append(measure_model(name, args))
            results_file.write_text(json.dumps(runs, indent=1))
            print("\n".join(render_model(run["results"][-1], args.device, run["machine"])), flush=True)
    if args.write:
        for extra in args.json[1:]:
            runs += json.loads(extra.read_text())
        requested = list(dict.fromkeys(res["model"] for run in runs for res in run["results"])) or list(args.models)
        requested += [m for m in args.models if m not in requested]
        args.write.parent.mkdir(parents=True, exist_ok=True)
        old = args.write.read_text() if args.write.exists() else ""
        notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else NOTES_MARKER + "\n"
        gpu_results = args.json[0].parent / "bench_gpu.json"
        gpu_command = " ".join(["python tools/bench.py --device cuda --json", str(gpu_results),
                                *(str(p) for p in args.json if p != gpu_results), "--write", str(args.write)])
        args.write.write_text(render(runs, requested, gpu_command) + "\n" + notes)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
