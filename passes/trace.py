"""Passes 1 and 3: trace a model into a torch.fx GraphModule; find the ``training=`` flags it froze.

NormProp layers and frozen BatchNorms are always leaves; user-supplied leaf modules (types or
qualified names) are too. When tracing fails, the error names the innermost module whose forward could not be
traced and says how to make it a leaf.

The trace is flat, but it remembers the module tree it flattened: every call of a module it
traced into is a :class:`ModuleCall` (which module, the graph nodes it was given and returned),
and every node's ``meta["nn_module_stack"]`` names the calls it was made in (torch.fx's own
record). ``passes.hierarchy`` writes the converted graph back into the user's modules from these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from torch import fx, nn
from torch.utils import _pytree as pytree

from normprop_fx.batchnorm_state import frozen_batchnorm_types
from normprop_fx.errors import InvalidOptionError, UntraceableModelError

from .describe import owner_module_path
from .patterns import training_flag
from .graph_utils import NORMPROP_MODULES, owner_stack

LeafSpec = type | str

#: Key of ``GraphModule.meta`` under which :func:`trace` leaves the :class:`ModuleCall` records.
MODULE_CALLS = "normprop_module_calls"


@dataclass
class ModuleCall:
    """One call of a module that the trace went into (not a leaf), as the graph saw it.

    ``key`` is torch.fx's ``nn_module_stack`` key of the call: the qualified name, with ``@k``
    for the k-th repeated call of the same module. ``args``, ``kwargs`` and ``output`` are the
    call's values with every traced value as its graph node; ``opaque`` is set when one of them is
    neither a node nor a plain constant (an object the graph cannot name), so the call's
    boundary is unknown.
    """

    key: str
    path: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None
    opaque: bool = False


def _as_nodes(value: Any) -> tuple[Any, bool]:
    """``value`` with each Proxy replaced by its node; also whether every leaf was a node or a
    plain constant."""
    plain = True

    def node_of(leaf: Any) -> Any:
        nonlocal plain
        if isinstance(leaf, fx.Proxy):
            return leaf.node
        if not isinstance(leaf, (int, float, bool, str, type(None), type(Ellipsis), slice)):
            plain = False
        return leaf

    return pytree.tree_map(node_of, value), plain


@cache
def library_notrace_registries() -> tuple[tuple[type[nn.Module], ...], tuple[Any, ...]]:
    """Modules and functions that timm registers as not traceable by torch.fx (its own
    ``register_notrace_module`` / ``register_notrace_function``: ``Conv2dSame``, ``BatchNormAct2d``,
    padding helpers, window reshapes, ...). torch.fx keeps them opaque, as timm's own feature
    extraction does, so models that use them trace. Empty when timm is not installed."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    modules = tuple(m for m in timm_fx.get_notrace_modules() if isinstance(m, type))
    return modules, tuple(timm_fx.get_notrace_functions())


@cache
def mode_dependent_modules() -> tuple[type[nn.Module], ...]:
    """Modules outside torch.nn whose forward branches on ``self.training``.

    torch.fx would trace through them and freeze the trace-time mode into the graph (stochastic
    depth that never turns off in eval, or never turns on in training), so they stay leaves.
    One row a class; libraries that are not installed are skipped.
    """
    found: list[type[nn.Module]] = []
    try:
        from torchvision.ops import StochasticDepth

        found.append(StochasticDepth)
    except ImportError:
        pass
    try:
        from timm.layers import DropBlock2d, DropPath

        found += [DropPath, DropBlock2d]
    except ImportError:
        pass
    return tuple(found)


class NormPropTracer(fx.Tracer):
    """An fx.Tracer that keeps NormProp modules and the user's leaf modules opaque and
    remembers which module it was inside when tracing failed."""

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: Iterable[str] = ()) -> None:
        library_modules, library_functions = library_notrace_registries()
        super().__init__(autowrap_functions=library_functions)
        # frozen BatchNorms are BatchNorms to replace, not arithmetic to trace into
        self.leaf_types = leaf_types + mode_dependent_modules() + library_modules + frozen_batchnorm_types()
        self.leaf_names = frozenset(leaf_names)
        self.failed_module: str | None = None
        self.module_calls: list[ModuleCall] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, NORMPROP_MODULES):
            return True
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
            count = self.num_calls.get(path, 0)
            record = None
            if not self.is_leaf_module(m, path):
                (node_args, node_kwargs), plain = _as_nodes((args, kwargs))
                record = ModuleCall(f"{path}@{count}" if count else path, path, m, node_args, node_kwargs, opaque=not plain)
                self.module_calls.append(record)
            output = super().call_module(m, forward, args, kwargs)
            if record is not None:
                record.output, plain = _as_nodes(output)
                record.opaque = record.opaque or not plain
            return output
        except Exception:
            if self.failed_module is None:
                try:
                    self.failed_module = self.path_of_module(m)
                except NameError:
                    self.failed_module = f"<unnamed {type(m).__name__}>"
            raise


def split_leaf_modules(model: nn.Module, leaf_modules: Sequence[LeafSpec]) -> tuple[tuple[type, ...], tuple[str, ...]]:
    """Validate ``leaf_modules`` against ``model``: module classes, or qualified names that exist."""
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    types, names = [], []
    known = dict(model.named_modules())
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str):
            if spec not in known:
                raise InvalidOptionError(
                    f"leaf_modules: the model has no submodule '{spec}' "
                    "(give qualified names as in model.named_modules(), or module classes)"
                )
            names.append(spec)
        else:
            raise InvalidOptionError(
                f"leaf_modules: {spec!r} is neither an nn.Module subclass nor a qualified module name"
            )
    return tuple(types), tuple(names)


def leaf_module_paths(model: nn.Module, leaf_types: tuple[type, ...], leaf_names: tuple[str, ...]) -> tuple[str, ...]:
    """Qualified names of the user's leaf modules as they occur in ``model``."""
    return tuple(
        name for name, m in model.named_modules() if name and (name in leaf_names or isinstance(m, leaf_types))
    )


#: The name prefix under which torch.fx keeps, on the root, a tensor a forward created while traced.
FX_CONSTANT = "_tensor_constant"
#: ``gm.meta`` key: the paths of the modules whose traced graph differs between train and eval
#: mode ('' for the root), found by :func:`trace`; the others are kept as leaves.
MODE_DEPENDENT = "normprop_mode_dependent"


def trace(
    model: nn.Module,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """Symbolically trace ``model``; also return the qualified names of its leaf modules.

    A module whose forward branches on ``self.training`` (a hand-written drop-path) would be
    frozen in the trace-time mode wherever the conversion rewrites the forward that holds it. So
    the model is traced in the other mode too, and every module whose own ops differ between the
    two graphs is made a leaf (its forward then runs as written, in the mode of the moment) and
    the model traced again; ``gm.meta[MODE_DEPENDENT]`` lists them (with '' when the root's own
    forward is one: it cannot be a leaf). A model that does not trace in the other mode is taken
    as it traced in its own.

    Raises UntraceableModelError naming the module at fault, InvalidOptionError for a bad
    ``leaf_modules`` entry.
    """
    leaf_types, leaf_names = split_leaf_modules(model, leaf_modules)
    gm = _trace(model, leaf_types, leaf_names, concrete_args)
    branching = _mode_dependent_modules(model, gm, leaf_types, leaf_names, concrete_args)
    if any(branching):
        leaf_names = leaf_names + tuple(p for p in branching if p)
        gm = _trace(model, leaf_types, leaf_names, concrete_args)
    gm.meta[MODE_DEPENDENT] = branching
    return gm, leaf_module_paths(model, leaf_types, leaf_names)


def _trace(model: nn.Module, leaf_types: tuple[type, ...], leaf_names: tuple[str, ...],
           concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    tracer = NormPropTracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:
        raise _untraceable(model, tracer.failed_module, err) from err
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training  # not gm.train(): that would reset every submodule's own mode
    gm.meta[MODULE_CALLS] = tracer.module_calls
    return gm


def _mode_dependent_modules(model: nn.Module, gm: fx.GraphModule, leaf_types: tuple[type, ...],
                            leaf_names: tuple[str, ...], concrete_args: dict[str, Any] | None) -> list[str]:
    """The outermost modules called in both modes whose own ops (the nodes their forward makes
    outside any module it calls) differ between ``gm`` and a trace of ``model`` in the other mode.
    A module called in one mode only is not one of them: its caller's forward, which decided
    that, is (torchvision GoogLeNet's root, which runs its auxiliary heads in training only)."""
    modes = {m: m.training for m in model.modules()}
    attributes = set(vars(model))
    try:
        model.train(not model.training)
        other = _trace(model, leaf_types, leaf_names, concrete_args)
    except UntraceableModelError:
        return []
    finally:
        for m, training in modes.items():
            m.training = training
        for name in set(vars(model)) - attributes:  # the tensors torch.fx kept on the root for it
            if name.startswith(FX_CONSTANT):
                delattr(model, name)
    ops, other_ops = _own_ops(gm), _own_ops(other)
    called = {c.path for c in gm.meta[MODULE_CALLS]} & {c.path for c in other.meta[MODULE_CALLS]} | {""}
    differ = sorted(p for p in called if ops.get(p, []) != other_ops.get(p, []))
    # the outermost ones (a leaf holds its submodules); the root cannot be a leaf, so not above
    return [p for p in differ if not any(q and p.startswith(q + ".") for q in differ)]


def _own_ops(gm: fx.GraphModule) -> dict[str, list[tuple[str, str]]]:
    """Per module path, the (op, target) of the nodes made by its own forward, in order."""
    ops: dict[str, list[tuple[str, str]]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        stack = owner_stack(node)
        path = stack[next(reversed(stack))][0] if stack else ""
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
        if node.op == "get_attr" and target.startswith(FX_CONSTANT):
            target = FX_CONSTANT  # numbered per trace: _tensor_constant0 in one, _tensor_constant1 in the next
        ops.setdefault(path, []).append((node.op, target))
    return ops


def frozen_training_flags(gm: fx.GraphModule) -> list[str]:
    """Calls in ``gm`` whose train/eval flag the trace fixed to a constant, e.g. an
    ``F.rrelu(x, training=self.training)`` or ``F.batch_norm(x, ..., self.training)`` inside a
    traced custom module: they no longer follow train()/eval(). The flag is found as a
    ``training=`` keyword, or where patterns.TRAINING_FLAGS says a function takes it."""
    found = []
    for node in gm.graph.nodes:
        flag = training_flag(node)
        if isinstance(flag, bool):
            owner = owner_module_path(node)
            where = f" in module '{owner}'" if owner else ""
            found.append(
                f"{node.name}{where} was traced with training={flag} and keeps it in train() and "
                f"eval(): make that module a leaf (leaf_modules=[...]) to keep its mode switch"
            )
    return found


def _untraceable(model: nn.Module, path: str | None, err: Exception) -> UntraceableModelError:
    cause = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    if path:
        module = model.get_submodule(path) if not path.startswith("<") else None
        type_name = type(module).__name__ if module is not None else path
        return UntraceableModelError(
            f"torch.fx could not trace module '{path}' ({type_name}): {cause}. "
            f"Make it a leaf module: convert(model, leaf_modules=['{path}']) "
            f"or leaf_modules=[{type_name}]. A BatchNorm inside a leaf module is replaced in place by "
            "a standardizing affine calibrated on the Gaussian sample (its trained function kept, where "
            "it has one); one that cannot be is left and listed in the report with the reason.",
            module_path=path,
        )
    return UntraceableModelError(
        f"torch.fx could not trace the forward of {type(model).__name__} itself: {cause}. "
        "The top-level forward cannot be a leaf: move the data-dependent code into a submodule "
        "and pass it in leaf_modules=, or fix the branching inputs with concrete_args=.",
        module_path="",
    )
