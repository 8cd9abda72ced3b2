"""``normprop_fx.summary``: the audit table of a conversion, built from its records."""

from __future__ import annotations

import torch
from tabulate import tabulate
from torch import nn

from .convert import conversion_report
from .passes.calibration_sample import MAX_SAMPLES
from .records import NORMPROP_INIT, ConversionReport
from .statistics import measure_layer_statistics


def _number(x: float) -> str:
    text = f"{x:.4f}"
    return "0.0000" if text == "-0.0000" else text


def _initialization_lines(report: ConversionReport, tablefmt: str) -> list[str]:
    """How each BatchNorm's replacement was initialized, grouped by reason (docs/method.md section 8)."""
    inits = report.initializations
    if not inits:
        return []
    trained = sum(i.trained for i in inits)
    lines = [f"Initialization: {trained} of {len(inits)} BatchNorms keep their trained function exactly, "
             f"{len(inits) - trained} get the paper's initialization (gamma_init, beta 0, normalized activation)."]
    groups: dict[tuple[str, str], list[str]] = {}
    for i in inits:
        groups.setdefault((i.init, i.reason), []).append(i.path)
    rows = [[init, len(paths), ", ".join(paths[:3]) + (f" ... ({len(paths) - 3} more)" if len(paths) > 3 else ""), reason]
            for (init, reason), paths in groups.items()]
    lines.append(tabulate(rows, headers=["init", "BatchNorms", "which", "why"], tablefmt=tablefmt, disable_numparse=True))
    return lines


def _module_tree_lines(report: ConversionReport, tablefmt: str) -> list[str]:
    """Where the conversion lives in the user's module tree (docs/method.md section 9)."""
    tree = report.module_tree
    if tree is None:
        return []
    if tree.flat and not tree.rebuilt:
        return [f"Module tree: one flat GraphModule (flat=True): {tree.root_type}'s class and its modules' forwards are not kept."]
    if tree.flat:
        return [f"Module tree: one flat GraphModule, as a last resort: {tree.rebuilt[0].reason}."]
    head = (f"Module tree: {tree.root_type} keeps its class and forward" if tree.class_kept
            else f"Module tree: the forward of {tree.root_type} itself is rebuilt as a GraphModule")
    lines = [f"{head}; {tree.swapped} modules replaced at their own names, {len(tree.rebuilt)} rebuilt as GraphModules"
             + (f", {len(tree.inlined)} module calls inlined into their caller's" if tree.inlined else "")
             + (":" if tree.rebuilt or tree.inlined else ".")]
    rows = [[r.path or "(root)", r.type, "rebuilt", r.reason] for r in tree.rebuilt]
    rows += [[r.path, r.type, "inlined", r.reason] for r in tree.inlined]
    if rows:
        lines.append(tabulate(rows, headers=["module", "class", "how", "why"], tablefmt=tablefmt, disable_numparse=True))
    return lines


def _precision_lines(report: ConversionReport) -> list[str]:
    """How much the constants the Gaussian sample set may move with its seed (docs/method.md section 6)."""
    p = report.calibration_precision
    if p is None:
        return []
    line = (f"Calibration precision: the least precise correction the Gaussian sample set is {p.consumer}'s: "
            f"its {p.samples} samples' own mean squares spread with coefficient of variation {p.spread:.2f} "
            f"(the largest {p.largest:.1f}x their median), so its scale has a relative standard error of "
            f"{100 * p.scale_error:.1f}%: an estimate of how far another calibration_seed moves it (docs/method.md section 6)")
    if p.wanted > p.samples:
        line += (f"; ~{p.wanted} samples would make it {100 * p.scale_error * (p.samples / p.wanted) ** 0.5:.1f}%"
                 + (" (calibration_samples=)" if p.wanted <= MAX_SAMPLES else
                    ": no affordable sample does, the samples' scales have drifted apart with depth"))
    return [line + "."]


def summary(
    converted: nn.Module,
    *,
    tablefmt: str = "simple",
    measure: bool = False,
    measure_input: torch.Tensor | None = None,
    seed: int = 0,
) -> str:
    """One row per rewrite, one per BatchNorm left with its reason, the scale corrections and
    normalized standalone activations, then the totals.

    ``measure=True`` adds, per NormProp layer, the nominal output mean/std (0 / 1 at gamma = 1)
    next to the measured ones from one forward pass on N(0, I) input of the shape the
    conversion used (or on ``measure_input``), without gradients and in the model's mode.
    """
    report = conversion_report(converted)
    measured: dict[str, str] = {}
    if measure or measure_input is not None:
        if measure_input is None:
            generator = torch.Generator().manual_seed(seed)
            measure_input = torch.randn(report.input_shapes[0], generator=generator)
        reference = next(iter(converted.parameters()), None)
        if reference is not None:
            measure_input = measure_input.to(reference.device, reference.dtype)
        for stat in measure_layer_statistics(converted, measure_input):
            measured.setdefault(stat.path, f"{stat.mean:+.3f} / {stat.std:.3f}")
    rewrite_rows = [
        [
            r.path,
            " + ".join(r.original),
            r.replacement,
            r.activation,
            _number(r.gamma_init) if r.init == NORMPROP_INIT else "trained",
            _number(r.c_mean),
            _number(r.c_std),
            _number(r.jacobian_gain),
            *([("0 / 1") if r.init == NORMPROP_INIT else "- (trained)", measured.get(r.path, "-")] if measured else []),
            "; ".join(r.notes),
        ]
        for r in report.rewrites
    ]
    parts = [f"NormProp conversion of {report.model} (init={report.init}, gamma_init={report.gamma_init})",
             *_initialization_lines(report, tablefmt), ""]
    if rewrite_rows:
        parts.append(
            tabulate(
                rewrite_rows,
                headers=["layer", "original", "replacement", "activation", "gamma init",
                         "c_mean", "c_std", "gain",
                         *(["nominal mean / std", "measured mean / std"] if measured else []), "notes"],
                tablefmt=tablefmt,
                disable_numparse=True,
            )
        )
    else:
        parts.append("No pattern was rewritten.")
    parts.append("")
    if report.left:
        parts.append(
            tabulate(
                [[b.path, b.type, b.reason] for b in report.left],
                headers=["BatchNorm left", "type", "reason"],
                tablefmt=tablefmt,
            )
        )
    elif report.batchnorms_found:
        parts.append("No BatchNorm left unconverted.")
    else:
        parts.append("The model has no BatchNorm module: nothing to convert.")
    for rows, headers in (
        ([[a.path, a.original, a.activation] for a in report.normalized_activations],
         ["normalized activation", "original", "activation"]),
        ([[c.path, c.consumer, c.mean, c.scale, "estimated" if c.estimated else "structural", c.reason]
          for c in report.corrections],
         ["scale correction", "feeds", "mean", "scale", "kind", "reason"]),
    ):
        if rows:
            parts.extend(["", tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)])
    parts.append("")
    parts.append(
        f"BatchNorm found: {report.batchnorms_found}, converted: {report.converted}, left: {len(report.left)}; "
        f"scale corrections: {len(report.corrections)}, normalized standalone activations: "
        f"{len(report.normalized_activations)}"
    )
    if report.estimated_ops:
        parts.append("Moments estimated (by a Gaussian probe, or measured on the Gaussian sample) at:")
        parts.extend(f"  {op}" for op in report.estimated_ops)
    if report.unknown_moments:
        parts.append("Moments unknown (values computed from these get no correction):")
        parts.extend(f"  {op}" for op in report.unknown_moments)
    parts.extend(_precision_lines(report))
    parts.extend(_module_tree_lines(report, tablefmt))
    if report.leaf_modules:
        parts.append(f"Leaf modules (not traced): {', '.join(report.leaf_modules)}")
    parts.extend(f"Assumed: {a}." for a in report.assumptions)
    parts.extend(f"Warning: {w}." for w in report.warnings)
    return "\n".join(parts)
