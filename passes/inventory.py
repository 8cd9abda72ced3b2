"""Pass 4: account for every BatchNorm module of the original model, including those the graph
does not show (inside leaf modules, traced into functional calls, or never called)."""

from __future__ import annotations

from torch import fx, nn

from normprop_fx.records import LeftBatchNorm

from .patterns import BATCH_NORM_TYPES

#: The reason of a BatchNorm that the traced forward never calls (e.g. an auxiliary head that only
#: runs in the other train/eval mode).
NEVER_CALLED = "never called by the model's forward"


def batchnorm_modules(model: nn.Module, *, remove_duplicate: bool = True) -> dict[str, nn.Module]:
    """Every BatchNorm module of ``model`` by qualified name (each object once, unless
    ``remove_duplicate=False``: then under each of its names)."""
    return {
        name: m for name, m in model.named_modules(remove_duplicate=remove_duplicate)
        if isinstance(m, BATCH_NORM_TYPES)
    }


def batchnorms_outside_graph(
    model: nn.Module, gm: fx.GraphModule, leaf_paths: tuple[str, ...]
) -> list[LeftBatchNorm]:
    """BatchNorms of ``model`` that ``gm`` never calls as a module, each with the reason."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    attrs = {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    left = []
    for path, bn in batchnorm_modules(model).items():
        if path in called:
            continue
        leaf = next((p for p in leaf_paths if path.startswith(p + ".")), None)
        opaque = next((p for p in sorted(called, key=len) if path.startswith(f"{p}.")), None)
        if leaf is not None:
            reason = f"inside leaf module '{leaf}', which is not traced"
        elif opaque is not None:
            reason = (
                f"inside '{opaque}' ({type(model.get_submodule(opaque)).__name__}), which torch.fx keeps "
                "opaque (a library's not-traceable registry or a mode-dependent module)"
            )
        elif path in attrs or any(a.startswith(path + ".") for a in attrs):
            reason = (
                f"{type(bn).__name__}.forward was traced into functional calls "
                "(a BatchNorm subclass with its own forward), so there is no module call to replace"
            )
        elif any(p.startswith(path + ".") or p == path for p in called):
            reason = "its forward was traced through"
        else:
            reason = NEVER_CALLED
        left.append(LeftBatchNorm(path, type(bn).__name__, reason))
    return left
