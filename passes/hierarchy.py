"""Pass 14: write the converted graph back into the user's model and its module tree.

Matching and moment propagation run on one flat trace, and the passes edit that flat graph.
The user, though, gave a model of their own class, whose blocks have their own forward, methods,
hooks and attributes (timm's ``forward_features``, ``reset_classifier``, FSDP per block). This
pass puts each edit where the user's model can carry it:

- **swaps**: a module the graph now calls in place of the original at the same qualified name
  (Conv -> NormProp layer, activation -> normalized activation) is set at that name; a module
  the graph no longer calls (a BatchNorm, an activation fused into its layer) becomes
  ``nn.Identity``. The forward that calls them is the user's, unchanged;
- **rebuilt modules**: a module whose own forward changed in a way swaps cannot express (a new
  operation in it: a correction, a normalized activation of a module called twice; a functional
  activation fused away) is replaced, at its own qualified name, by a ``GraphModule`` of its own
  forward, rewritten: its children are still called as modules (they keep their class and
  forward, unless rebuilt themselves). A module called at several places is rebuilt once, for
  all its calls, when every call needs the same edits (a shared block whose functional
  activation is fused into its one NormProp layer); only one whose calls need different edits
  (a correction in front of one call) is inlined. Its parents keep their class and forward.

A rebuilt module takes its call's arguments by the names of the original ``forward``
(``inspect.signature``), returns what the original returned, and keeps the original's class
name and plain attributes (``stride``, ``num_features``...). The root is rebuilt only when its
own forward changed; then the result is a GraphModule, and the report says why.

Nothing is trusted blindly: the candidate model is traced again (flat, with the same tracer) and
compared node by node with the converted graph, by the identity of the modules and tensors it
calls. Where the two differ, the module whose forward holds the difference is rebuilt instead,
and the check runs again; the last resort, the root rebuilt with every module inlined, is the
converted graph itself. The user's model is only changed (swaps installed) once a candidate has
passed, so a failed attempt leaves nothing behind.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from normprop_fx.records import ModuleTree, RebuiltModule

from .graph_utils import RESTORED_FUNCTION, TAKES_OVER, owner_stack
from .trace import FX_CONSTANT, MODULE_CALLS, ModuleCall, NormPropTracer

ROOT = ""


@dataclass(frozen=True)
class Snapshot:
    """The traced graph before any pass edited it: which nodes there were, what each read, and
    how often each module was called."""

    nodes: frozenset[fx.Node]
    args: dict[fx.Node, tuple[tuple, dict]]
    calls: Counter[str]

    @classmethod
    def of(cls, gm: fx.GraphModule) -> Snapshot:
        nodes = list(gm.graph.nodes)
        return cls(
            nodes=frozenset(nodes),
            args={n: (n.args, dict(n.kwargs)) for n in nodes},
            calls=Counter(str(n.target) for n in nodes if n.op == "call_module"),
        )


class _Unbuildable(Exception):
    """A module's forward cannot be rebuilt on its own (the message says why)."""


@dataclass
class _Plan:
    """Which module calls are rebuilt, which are inlined into their caller, and why."""

    rebuilt: dict[str, str] = field(default_factory=dict)  # call key -> reason
    inlined: dict[str, str] = field(default_factory=dict)  # call key -> reason


def restore_hierarchy(
    model: nn.Module,
    gm: fx.GraphModule,
    snapshot: Snapshot,
    tracer_factory: Callable[[], NormPropTracer],
    concrete_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, ModuleTree]:
    """Write the converted flat ``gm`` into ``model`` (changed in place) as this module's
    docstring says; return the model to hand back (``model`` itself unless its own forward had to
    be rebuilt) and the record of what was done.

    ``tracer_factory`` makes the tracer that traced ``model`` (same leaves), for the check."""
    calls = {c.key: c for c in gm.meta.pop(MODULE_CALLS, [])}
    tree = _Tree(model, gm, snapshot, calls)
    plan = _Plan()
    for key, reason in tree.dirty_calls():
        tree.mark(plan, key, reason)
    for _attempt in range(2 * len(calls) + 2):
        try:
            candidate, swaps = tree.build(plan, copy_on_write=True)
            mismatch = _first_mismatch(candidate, gm, tracer_factory(), concrete_args)
        except _Unbuildable as err:
            mismatch = err.args[1], err.args[0]
        if mismatch is None:
            result, swaps = tree.build(plan, copy_on_write=False)
            return result, tree.record(plan, swaps)
        before = (dict(plan.rebuilt), dict(plan.inlined))
        tree.mark(plan, *mismatch, found_wrong=True)
        if (plan.rebuilt, plan.inlined) == before:
            break
    # The root rebuilt with everything inlined is the converted graph itself.
    plan.rebuilt[ROOT] = plan.rebuilt.get(ROOT, "its rewritten forward could not be matched module by module")
    return gm, tree.record(plan, 0, flat=True)


class _Tree:
    """The converted graph seen through the module calls the trace flattened."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, snapshot: Snapshot, calls: dict[str, ModuleCall]) -> None:
        self.model, self.gm, self.snapshot, self.calls = model, gm, snapshot, calls
        self.nodes = [n for n in gm.graph.nodes]
        self.keys = {n: list(owner_stack(n)) for n in self.nodes}
        for n in snapshot.nodes:
            self.keys.setdefault(n, list(owner_stack(n)))
        self.image: dict[fx.Node, fx.Node] = {}  # a replaced node -> the node that took over its readers
        self.taken: dict[fx.Node, list[fx.Node]] = {}  # the reverse, for nodes of the original trace
        for n in self.nodes:
            for old in n.meta.pop(TAKES_OVER, ()):
                self.image[old] = n
                if old in snapshot.nodes:
                    self.taken.setdefault(n, []).append(old)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        output = next(n for n in self.nodes if n.op == "output")
        self.calls[ROOT] = ModuleCall(ROOT, ROOT, model, tuple(placeholders), {}, output.args[0])
        self.parent: dict[str, str] = {}
        for keys in self.keys.values():
            for outer, inner in zip([ROOT, *keys], keys):
                self.parent.setdefault(inner, outer)
        self.called_now = {str(n.target) for n in self.nodes if n.op == "call_module"}
        path_calls = Counter(c.path for k, c in calls.items() if k != ROOT)
        self.repeated = {k for k, c in calls.items() if k != ROOT and path_calls[c.path] > 1}

    # --- analysis -------------------------------------------------------------------------------

    def resolve(self, node: Any) -> Any:
        """The node that now plays ``node``'s role (itself when no pass replaced it)."""
        while isinstance(node, fx.Node) and node in self.image:
            node = self.image[node]
        return node

    def removed(self, path: str) -> bool:
        """The converted graph no longer calls the module at ``path``: it becomes nn.Identity."""
        return path not in self.called_now

    def innermost(self, node: fx.Node) -> str:
        keys = self.keys.get(node) or []
        return keys[-1] if keys else ROOT

    def writer(self, key: str, plan: _Plan | None = None) -> str:
        """The call whose forward carries the code of call ``key``: itself, or its closest caller
        that is not inlined."""
        while plan is not None and key in plan.inlined:
            key = self.parent.get(key, ROOT)
        return key

    def dirty_calls(self) -> Iterable[tuple[str, str]]:
        """The calls whose own forward the passes changed in a way no swap expresses."""
        current = set(self.nodes)
        for n in self.nodes:
            if n in self.snapshot.nodes or n.op in ("placeholder", "output") or self._is_swap(n):
                continue
            if RESTORED_FUNCTION in n.meta:
                continue  # the user's forward still calls the functional dropout, in the mode of the moment
            yield self.innermost(n), f"its forward gains {_describe(n, self.gm)}"
        for n in self.snapshot.nodes - current:
            if n.op == "call_module" and self.removed(str(n.target)):
                continue  # every call of it is gone: nn.Identity at its name
            if self.resolve(n) is not n and (self._is_swap(self.resolve(n)) or RESTORED_FUNCTION in self.resolve(n).meta):
                continue  # its module is swapped at its name, or its forward still makes the call
            what = "one of its calls of" if n.op == "call_module" else "its"
            yield self.innermost(n), f"{what} {n.name} ({n.op} {_target_name(n.target)}) is fused away"

    def _is_swap(self, node: fx.Node) -> bool:
        """A new call of a module at the qualified name of the one call it replaced, with the
        same inputs: a swap (the normalized activation of an activation module called once)."""
        olds = self.taken.get(node, [])
        if node.op != "call_module" or len(olds) != 1:
            return False
        old = olds[0]
        args, kwargs = self.snapshot.args[old]
        same = lambda a, b: a is b or self.resolve(a) is b  # noqa: E731
        return (
            old.op == "call_module" and old.target == node.target and self.snapshot.calls[str(old.target)] == 1
            and len(args) == len(node.args) and all(same(a, b) for a, b in zip(args, node.args))
            and kwargs == dict(node.kwargs)
        )

    def mark(self, plan: _Plan, key: str, reason: str, *, found_wrong: bool = False) -> None:
        """Rebuild the forward of call ``key`` (or, when it cannot be rebuilt on its own, inline
        it into its caller and rebuild that). ``found_wrong``: the check found the model as
        planned wrong there, so a call already rebuilt is inlined into its caller."""
        while True:
            key = self.writer(key, plan)
            if key in plan.rebuilt and not (found_wrong and key != ROOT):
                return
            if key in plan.rebuilt:
                # rebuilt and still wrong: its caller takes the code (of every call of the module)
                for other in self.siblings(key):
                    plan.inlined[other] = reason
                    plan.rebuilt.pop(other, None)
                key, reason = self.parent.get(key, ROOT), f"{self.calls[key].path} is inlined into it: {reason}"
                continue
            why_not = next(filter(None, map(self._not_rebuildable, self.siblings(key))), None)
            if why_not is None:
                # every call of the module runs the one forward put at its name: all are rebuilt
                for other in self.siblings(key):
                    plan.rebuilt.setdefault(other, reason)
                return
            for other in [k for k, c in self.calls.items() if k != ROOT and c.path == self.calls[key].path]:
                plan.inlined.setdefault(other, why_not)
            key, reason = self.parent.get(key, ROOT), f"{self.calls[key].path} is inlined into it ({why_not}): {reason}"

    def siblings(self, key: str) -> list[str]:
        """The calls of the module that call ``key`` calls (``key`` itself first)."""
        if key not in self.repeated:
            return [key]
        path = self.calls[key].path
        return [key, *(k for k in self.calls if k in self.repeated and k != key and self.calls[k].path == path)]

    def _not_rebuildable(self, key: str) -> str | None:
        if key == ROOT:
            return None
        call = self.calls.get(key)
        if call is None:
            return "its call was not recorded"
        if call.opaque:
            return "it takes or returns values the graph cannot name"
        try:
            _bind(call)
        except _Unbuildable as err:
            return str(err)
        return None

    # --- construction ---------------------------------------------------------------------------

    def build(self, plan: _Plan, *, copy_on_write: bool) -> tuple[nn.Module, int]:
        """The converted model under ``plan``: swaps first, then rebuilt modules, deepest first,
        each put in at its qualified name before its caller is built (a rebuilt caller holds its
        children as they are then). With ``copy_on_write`` the user's modules are not changed
        (the containers on the way are shallow copies): a candidate to check."""
        root = _CopyOnWrite(self.model) if copy_on_write else _InPlace(self.model)
        swaps = 0
        done: set[str] = set()  # a module called at several places is swapped once
        for node in self.snapshot.nodes:
            if node.op != "call_module" or self.writer(self.innermost(node), plan) in plan.rebuilt:
                continue
            path = str(node.target)
            if path in done:
                continue
            done.add(path)
            replacement = nn.Identity() if self.removed(path) else self.gm.get_submodule(path)
            if root.get(path) is not replacement:
                root.set(path, replacement)
                swaps += 1
        built: dict[str, nn.Module] = {}
        first_of: dict[str, str] = {}  # module path -> its call rebuilt first
        for key in sorted(plan.rebuilt, key=lambda k: -len(self.keys_of(k))):
            built[key] = self._rebuild(key, plan, built, root)
            path = self.calls[key].path
            if key != ROOT and first_of.setdefault(path, key) != key:
                # another call of a module rebuilt already: one forward must serve both
                if not _same_forward(built[first_of[path]], built[key]):
                    raise _Unbuildable(f"{path} is called at several places and its calls need different edits", key)
                built[key] = built[first_of[path]]
            if key != ROOT and self.writer(self.parent.get(key, ROOT), plan) not in plan.rebuilt:
                root.set(self.calls[key].path, built[key])
        if ROOT in built:
            return built[ROOT], swaps
        return root.module, swaps

    def keys_of(self, key: str) -> list[str]:
        chain = []
        while key != ROOT:
            chain.append(key)
            key = self.parent.get(key, ROOT)
        return chain

    def _rebuild(self, key: str, plan: _Plan, built: dict[str, nn.Module], root: _Root) -> nn.Module:
        call = self.calls[key]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        prefix = f"{call.path}." if call.path else ""
        attrs: dict[str, Any] = {}

        def lookup(node: fx.Node) -> fx.Node:
            for candidate in (node, self.resolve(node)):
                if candidate in env:
                    return env[candidate]
            raise _Unbuildable(f"{node.name} is read in {call.path or 'the root'} but not given to it", key)

        def relative(target: str) -> str:
            if not target.startswith(prefix):
                raise _Unbuildable(f"it uses {target}, which is not one of its submodules", key)
            return target[len(prefix):]

        if key == ROOT:
            for node in self.nodes:
                if node.op == "placeholder":
                    env[node] = graph.node_copy(node)
        else:
            for name, default, value in _bind(call):
                placeholder = graph.placeholder(name, default_value=default)
                _bind_value(graph, value, placeholder, env, self.resolve)
        emitted: set[str] = set()
        for node in self.nodes:
            if node.op in ("placeholder", "output"):
                continue
            keys = self.keys[node]
            if key != ROOT and key not in keys:
                continue
            inner = keys[keys.index(key) + 1:] if key != ROOT else keys
            unit = next((k for k in inner if k not in plan.inlined), None)
            if unit is not None:
                if unit not in emitted:
                    emitted.add(unit)
                    self._call_child(graph, unit, built, root, lookup, relative, env, attrs)
                continue
            new = graph.node_copy(node, lookup)
            if node.op == "get_attr" and str(node.target).startswith(FX_CONSTANT) and not str(node.target).startswith(prefix):
                new.target = str(node.target)  # a tensor the trace made (torch.tensor(...) in a forward)
                attrs[new.target] = _fetch(self.gm, str(node.target))
            elif node.op in ("call_module", "get_attr"):
                new.target = relative(str(node.target))
                attrs[new.target] = _fetch(self.gm, str(node.target))
            env[node] = new
        graph.output(pytree.tree_map(lambda v: lookup(v) if isinstance(v, fx.Node) else v, call.output))
        _drop_dead_getitems(graph)
        indexed = isinstance(call.module, (nn.Sequential, nn.ModuleList))
        module = (_IndexedGraphModule if indexed else fx.GraphModule)(attrs, graph, class_name=type(call.module).__name__)
        # pickle/torch.load rebuild a GraphModule's class under this name (else "GraphModule")
        module._graphmodule_cls_name = type(call.module).__name__
        self._identities_for_removed_children(call, module)
        _copy_plain_attributes(call.module, module)
        module.training = call.module.training
        return module

    def _identities_for_removed_children(self, call: ModuleCall, rebuilt: nn.Module) -> None:
        """A child of the original that the converted graph no longer calls (a BatchNorm, an
        activation fused into its layer) is ``nn.Identity`` in the rebuilt module too, at its name."""
        prefix = f"{call.path}." if call.path else ""
        for name, _child in call.module.named_children():
            path = prefix + name
            if not hasattr(rebuilt, name) and self.snapshot.calls[path] and self.removed(path):
                rebuilt.add_module(name, nn.Identity())

    def _call_child(self, graph: fx.Graph, key: str, built: dict[str, nn.Module], root: _Root,
                    lookup: Callable[[fx.Node], fx.Node], relative: Callable[[str], str],
                    env: dict[fx.Node, fx.Node], attrs: dict[str, Any]) -> None:
        """Call the child module of call ``key`` as a module, with its recorded arguments (as the
        converted graph now computes them), and map what it returns."""
        call = self.calls[key]
        if call.opaque:
            raise _Unbuildable(f"{call.path} takes or returns values the graph cannot name", key)
        target = relative(call.path)
        # a child that keeps its forward: the user's module there, with its swaps in
        attrs[target] = built[key] if key in built else root.get(call.path)
        args, kwargs = pytree.tree_map(lambda v: lookup(v) if isinstance(v, fx.Node) else v, (call.args, call.kwargs))
        result = graph.call_module(target, tuple(args), dict(kwargs))
        _bind_value(graph, call.output, result, env, self.resolve)

    # --- record ---------------------------------------------------------------------------------

    def record(self, plan: _Plan, swaps: int, flat: bool = False) -> ModuleTree:
        def once_per_module(items: Iterable[tuple[str, str]]) -> tuple[RebuiltModule, ...]:
            rows = {}  # a module called at several places is one row
            for k, r in items:
                if k in self.calls:
                    rows.setdefault(self.calls[k].path, RebuiltModule(
                        path=self.calls[k].path, type=type(self.calls[k].module).__name__, reason=r))
            return tuple(rows.values())

        rebuilt = once_per_module(sorted(plan.rebuilt.items(), key=lambda kv: self.nodes_order(kv[0])))
        inlined = once_per_module(plan.inlined.items())
        return ModuleTree(
            root_type=type(self.model).__name__,
            class_kept=ROOT not in plan.rebuilt and not flat,
            swapped=swaps,
            rebuilt=rebuilt,
            inlined=inlined,
            flat=flat,
        )

    def nodes_order(self, key: str) -> int:
        for i, node in enumerate(self.nodes):
            if key == ROOT or key in self.keys[node]:
                return i
        return len(self.nodes)


# --- the module tree: changed in place, or copy-on-write for a candidate ----------------------


class _Root:
    module: nn.Module

    def get(self, path: str) -> nn.Module:
        return self.module.get_submodule(path) if path else self.module

    def set(self, path: str, module: nn.Module) -> None:
        raise NotImplementedError


class _InPlace(_Root):
    def __init__(self, model: nn.Module) -> None:
        self.module = model

    def set(self, path: str, module: nn.Module) -> None:
        self.module.set_submodule(path, module)


class _CopyOnWrite(_Root):
    """The user's tree, where each container on the way to a changed module is a shallow copy
    (same parameters, buffers, hooks; its own dict of children)."""

    def __init__(self, model: nn.Module) -> None:
        self.module = _shallow(model)
        self.copied = {id(self.module)}

    def set(self, path: str, module: nn.Module) -> None:
        parent = self.module
        *parents, name = path.split(".")
        for part in parents:
            child = parent._modules[part]
            if id(child) not in self.copied:
                child = _shallow(child)
                self.copied.add(id(child))
                parent._modules[part] = child
            parent = child
        parent._modules[name] = module


def _shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = module._modules.copy()
    return clone


# --- helpers ------------------------------------------------------------------------------------


class _IndexedGraphModule(fx.GraphModule):
    """A rebuilt ``nn.Sequential`` / ``nn.ModuleList``: ``rebuilt[i]``, ``len(rebuilt)`` and
    iteration over its numbered children keep working (``block[0]``). A pickled copy comes back
    as a plain GraphModule of that class name, without them (torch.fx rebuilds the class)."""

    def _numbered(self) -> list[nn.Module]:
        children = self._modules  # type: ignore[attr-defined]
        return [children[k] for k in sorted((k for k in children if k.isdigit()), key=int)]

    def __getitem__(self, index: int | slice) -> Any:
        return self._numbered()[index]

    def __len__(self) -> int:
        return len(self._numbered())

    def __iter__(self) -> Any:
        return iter(self._numbered())

    def __bool__(self) -> bool:  # a module is true, even one without numbered children
        return True


def _bind(call: ModuleCall) -> list[tuple[str, Any, Any]]:
    """``(name, default, value)`` of each parameter of the called forward, with the value the
    trace passed (``inspect._empty`` for a parameter left at its default)."""
    try:
        signature = inspect.signature(call.module.forward)
        bound = signature.bind(*call.args, **call.kwargs)
    except (TypeError, ValueError) as err:
        raise _Unbuildable(f"its forward's signature does not take the recorded call ({err})", call.key) from err
    out = []
    for name, parameter in signature.parameters.items():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise _Unbuildable(f"its forward takes *{name}", call.key)
        default = parameter.default
        value = bound.arguments.get(name, default)
        out.append((name, default, value))
    return out


def _bind_value(graph: fx.Graph, value: Any, node: fx.Node, env: dict[fx.Node, fx.Node],
                resolve: Callable[[Any], Any]) -> None:
    """Map every graph node inside ``value`` (a node, or tuples/lists/dicts of them) to the
    matching part of ``node`` in ``graph``."""
    if isinstance(value, fx.Node):
        env[value] = node
        env.setdefault(resolve(value), node)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            if _has_node(item):
                _bind_value(graph, item, graph.call_function(operator.getitem, (node, i)), env, resolve)
    elif isinstance(value, dict):
        for k, item in value.items():
            if _has_node(item):
                _bind_value(graph, item, graph.call_function(operator.getitem, (node, k)), env, resolve)


def _has_node(value: Any) -> bool:
    return any(isinstance(leaf, fx.Node) for leaf in pytree.tree_leaves(value))


def _drop_dead_getitems(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            graph.erase_node(node)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


#: instance attributes a rebuilt module must not take over from the original
_OWN = frozenset({"training", "_modules", "_parameters", "_buffers", "_code", "_graph", "meta"})


def _copy_plain_attributes(original: nn.Module, rebuilt: nn.Module) -> None:
    """The original's plain instance attributes (``stride``, ``num_features``, a config...),
    where the rebuilt module has no attribute of that name."""
    for name, value in vars(original).items():
        if name in _OWN or name.startswith("_") or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        if not hasattr(rebuilt, name):
            setattr(rebuilt, name, value)


def _same_forward(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    """``a`` and ``b`` (rebuilt for two calls of one module) compute the same thing: node by
    node the same operations, on the same modules and tensors, in the same way."""
    a_nodes, b_nodes = list(a.graph.nodes), list(b.graph.nodes)
    if len(a_nodes) != len(b_nodes):
        return False
    image: dict[fx.Node, fx.Node] = {}
    for x, y in zip(a_nodes, b_nodes):
        if x.op != y.op or x.target != y.target:
            return False
        if x.op in ("call_module", "get_attr") and _fetch(a, str(x.target)) is not _fetch(b, str(y.target)):
            return False
        x_leaves, x_spec = pytree.tree_flatten(_open_slices((x.args, dict(x.kwargs))))
        y_leaves, y_spec = pytree.tree_flatten(_open_slices((y.args, dict(y.kwargs))))
        if x_spec != y_spec:
            return False
        for u, v in zip(x_leaves, y_leaves):
            if isinstance(u, fx.Node) or isinstance(v, fx.Node):
                if image.get(u) is not v:
                    return False
            elif not _same_constant(u, v):
                return False
        image[x] = y
    return True


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"a call of {node.target} ({type(gm.get_submodule(node.target)).__name__})"
    return f"{node.name} ({node.op} {_target_name(node.target)})"


# --- the check: the candidate traced again equals the converted graph ---------------------------


def _first_mismatch(candidate: nn.Module, gm: fx.GraphModule, tracer: NormPropTracer,
                    concrete_args: dict[str, Any] | None) -> tuple[str, str] | None:
    """None when ``candidate``, traced flat by ``tracer``, computes ``gm``'s graph (same
    operations on the same modules and tensors, up to nn.Identity); else the call key where they
    first differ (the innermost module call of the differing node of ``gm``) and why."""
    # Every module the converted graph calls is one call, as in the graph: also one a pass added
    # that the tracer would trace into (a timm activation class kept after its norm, GELUTanh).
    called = {id(_fetch(gm, str(n.target))) for n in gm.graph.nodes if n.op == "call_module"}
    own_rule = tracer.is_leaf_module
    tracer.is_leaf_module = lambda m, name: id(m) in called or own_rule(m, name)  # type: ignore[method-assign]
    try:
        graph = tracer.trace(candidate, concrete_args=concrete_args)
    except Exception as err:  # noqa: BLE001 - any failure blames the module being traced
        failed = tracer.failed_module or ROOT
        return failed, f"its forward fails on the swapped modules ({type(err).__name__}: {err})"

    def skip_identity(root: nn.Module, node: Any) -> Any:
        while isinstance(node, fx.Node) and node.op == "call_module" and isinstance(_fetch(root, node.target), nn.Identity):
            node = node.args[0]
        return node

    def blame(c: fx.Node, why: str) -> tuple[str, str]:
        keys = list(owner_stack(c))
        return (keys[-1] if keys else ROOT), f"re-traced, {c.name} ({c.op} {_target_name(c.target)}) {why}"

    r_out = next(n for n in graph.nodes if n.op == "output")
    c_out = next(n for n in gm.graph.nodes if n.op == "output")
    pairs: list[tuple[Any, Any]] = [(r_out, c_out)]
    seen: dict[fx.Node, fx.Node] = {}
    seen_c: dict[fx.Node, fx.Node] = {}
    while pairs:
        r, c = pairs.pop()
        r, c = skip_identity(candidate, r), skip_identity(gm, c)
        if not isinstance(r, fx.Node) or not isinstance(c, fx.Node):
            if isinstance(r, fx.Node) or isinstance(c, fx.Node) or not _same_constant(r, c):
                return blame(c if isinstance(c, fx.Node) else c_out, "reads a different value")
            continue
        if r in seen or c in seen_c:
            if seen.get(r) is not c or seen_c.get(c) is not r:
                return blame(c, "is computed differently")
            continue
        seen[r], seen_c[c] = c, r
        if r.op == "call_function" and r.target is c.meta.get(RESTORED_FUNCTION):
            pairs.append((r.args[0], c.args[0]))  # the user's own functional dropout, as the module stands for it
            continue
        if r.op != c.op:
            return blame(c, f"is a {r.op} there")
        if r.op in ("call_module", "get_attr"):
            if _fetch(candidate, str(r.target)) is not _fetch(gm, str(c.target)):
                return blame(c, f"calls {r.target} there")
        elif r.op == "placeholder":
            if r.target != c.target:
                return blame(c, f"is input {r.target} there")
        elif r.target != c.target:
            return blame(c, f"is {_target_name(r.target)} there")
        r_leaves, r_spec = pytree.tree_flatten(_open_slices((r.args, dict(r.kwargs))))
        c_leaves, c_spec = pytree.tree_flatten(_open_slices((c.args, dict(c.kwargs))))
        if r_spec != c_spec:
            return blame(c, "takes other arguments")
        pairs.extend(zip(r_leaves, c_leaves))
    return None


def _open_slices(value: Any) -> Any:
    """``value`` with every slice as a tuple ``("slice", start, stop, step)``: a slice may hold
    graph nodes (``x[:, n:]``), which pytree would not look into."""
    if isinstance(value, slice):
        return ("slice", *(_open_slices(v) for v in (value.start, value.stop, value.step)))
    if isinstance(value, (tuple, list)):
        return tuple(_open_slices(v) for v in value) if isinstance(value, tuple) else [_open_slices(v) for v in value]
    if isinstance(value, dict):
        return {k: _open_slices(v) for k, v in value.items()}
    return value


def _same_constant(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return a is b
