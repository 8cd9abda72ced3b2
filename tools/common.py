"""What the command-line tools in tools/ share: the argument parser, option types, models by name,
the hand-written notes of the pages they rewrite, and the names of tools/train.py's variants.

Every tool is run as ``python tools/NAME.py``, which puts tools/ on sys.path, so a tool imports
this module as ``import common`` (pytest puts tools/ there too: ``pythonpath`` in pyproject.toml).
Nothing here imports torch, torchvision or timm before a function needs them:
tools/distributed_report.py renders without them, and tools/zoo.py's parent process loads them
only to list a source's models (its workers build the models).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# ----------------------------------------------------------------------------- command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2.

    ``print_errors=False`` exits with status 2 and prints nothing (tools/train.py under torchrun:
    every rank parses the same command line, rank 0 alone says what is wrong with it)."""

    def __init__(self, *args: Any, print_errors: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.print_errors = print_errors

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if self.print_errors else None)


def gamma_init(text: str) -> str | float:
    """``--gamma-init``: "paper" (the paper's 1/1.21 for ReLU, docs/method.md) or a finite positive number."""
    if text == "paper":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'paper' or a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be 'paper' or a positive number, got {text!r}")
    return value


def positive_numbers(kind: type) -> Callable[[str], list[Any]]:
    """An argparse type: comma-separated finite positive numbers of ``kind`` (int or float), as a list."""
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(not (math.isfinite(v) and v > 0) for v in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
        return values
    return parse


# ----------------------------------------------------------------------------- models by name


class UnknownModelError(ValueError):
    """A model name that no source has; the message says so, with close names when there are some."""


def torchvision_names() -> list[str]:
    """torchvision's classification models (its list_models of torchvision.models), sorted."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_names() -> list[str]:
    """timm's models, sorted; none when timm is not installed."""
    try:
        import timm
    except ImportError:
        return []
    return sorted(timm.list_models())


def find_model(spec: str) -> tuple[str, str]:
    """(source, name) of ``[torchvision:|timm:]NAME``: a bare NAME is torchvision's when it has one,
    else timm's. Raises UnknownModelError for an unknown source or name."""
    source, _, name = spec.rpartition(":")
    if source not in ("", "torchvision", "timm"):
        raise UnknownModelError(f"unknown model source {source!r} in {spec!r}: use torchvision:NAME or timm:NAME")
    tv_names = torchvision_names() if source in ("", "torchvision") else []
    if name in tv_names:
        return "torchvision", name
    timm = timm_names() if source in ("", "timm") else []
    if name in timm:
        return "timm", name
    close = difflib.get_close_matches(name, sorted(set(tv_names + timm)), n=3)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    where = {"": "torchvision classification or timm", "torchvision": "torchvision classification", "timm": "timm"}[source]
    raise UnknownModelError(f"unknown model {name!r}: not a {where} model name{hint}")


def create_model(source: str, name: str, *, pretrained: bool = False, **kwargs: Any) -> Any:
    """The model ``name`` of ``source``: "torchvision" (get_model; with ``pretrained`` its default
    weights, downloaded), "timm" (create_model) or "python" (``name`` is ``package.module.factory``,
    any importable callable, called with ``kwargs``). ``kwargs`` go to the builder (num_classes=...)."""
    if source == "torchvision":
        import torchvision.models

        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=pretrained, **kwargs)
    if source == "python":
        import importlib

        module_name, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module_name), attr)(**kwargs)
    raise ValueError(f"unknown model source {source!r} in {source + ':' + name!r}")


def default_input_size(source: str, name: str, model: Any) -> tuple[int, ...]:
    """The per-sample input size a model is made for: for torchvision the crop size of its default
    weights' transforms (224 for resnet50, 600 for efficientnet_b7; read from the weights' table,
    nothing is downloaded), 224x224 for a model without weights; timm's pretrained_cfg input_size."""
    if source == "torchvision":
        import torchvision.models

        try:
            crop = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size
            side = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
        except (ValueError, AttributeError, TypeError, IndexError):  # no weights, or no crop in their transforms
            side = 224
        return (3, side, side)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", getattr(model, "default_input_size", (3, 224, 224))))


# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what ``platform.processor()`` says where there is none."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ----------------------------------------------------------------------------- memory


def reset_peak_memory() -> None:
    """Start this process's peak resident memory (VmHWM) afresh at its current size (Linux >= 4.0:
    writing 5 to /proc/self/clear_refs), so that each measurement has its own peak; nothing elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gb() -> float | None:
    """This process's peak resident memory since the last reset, in GiB (None where /proc has none)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 2**20 if found else None


def resident_memory_gb(pid: int | str = "self") -> float:
    """The resident memory of process ``pid`` (this one by default) now, in GiB (0 where /proc has none)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


# ----------------------------------------------------------------------------- pages with notes

#: The markers around the hand-written notes of a page that a tool rewrites (training_report.py,
#: distributed_report.py): what is between them is kept.
NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def notes_in(page: Path) -> str | None:
    """The text between the first NOTES_START and the first NOTES_END of ``page`` (empty when
    NOTES_END comes first); None when there is no such file or a marker is missing."""
    if not page.is_file():
        return None
    text = page.read_text()
    start, end = text.find(NOTES_START), text.find(NOTES_END)
    if start < 0 or end < 0:
        return None
    return text[start + len(NOTES_START):end]


# ----------------------------------------------------------------------------- tools/train.py's variants

#: The variants tools/train.py trains, in the order its reports list them, and their labels there.
VARIANTS = ("bn", "bn+stab", "np", "np+stab")
VARIANT_LABELS = {"bn": "BN", "bn+stab": "BN + stabilizers", "np": "NormProp", "np+stab": "NormProp + stabilizers"}
