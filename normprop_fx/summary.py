"""``normprop_fx.summary``: the audit table of a conversion, built from its records."""

from __future__ import annotations

from tabulate import tabulate
from torch import nn

from .convert import conversion_report


def _number(x: float) -> str:
    text = f"{x:.4f}"
    return "0.0000" if text == "-0.0000" else text


def summary(converted: nn.Module, *, tablefmt: str = "simple") -> str:
    """One row per rewrite, one per BatchNorm left with its reason, then the totals."""
    report = conversion_report(converted)
    rewrite_rows = [
        [
            r.path,
            " + ".join(r.original),
            r.replacement,
            r.activation,
            _number(r.gamma_init),
            _number(r.c_mean),
            _number(r.c_std),
            _number(r.jacobian_gain),
            "; ".join(r.notes),
        ]
        for r in report.rewrites
    ]
    parts = [f"NormProp conversion of {report.model} (gamma_init={report.gamma_init})", ""]
    if rewrite_rows:
        parts.append(
            tabulate(
                rewrite_rows,
                headers=["layer", "original", "replacement", "activation", "gamma init",
                         "c_mean", "c_std", "gain", "notes"],
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
    parts.append("")
    parts.append(
        f"BatchNorm found: {report.batchnorms_found}, converted: {report.converted}, left: {len(report.left)}"
    )
    if report.leaf_modules:
        parts.append(f"Leaf modules (not traced): {', '.join(report.leaf_modules)}")
    parts.extend(f"Assumed: {a}." for a in report.assumptions)
    parts.extend(f"Warning: {w}." for w in report.warnings)
    return "\n".join(parts)
