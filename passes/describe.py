"""Human-readable names for FX nodes, used in report lines and error messages."""

from __future__ import annotations

from typing import Any

from torch import fx


def describe_target(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module in ("torch", "torch._C._VariableFunctions") or module.startswith("torch._C"):
        return f"torch.{name}"
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{module}.{name}" if module else name


def describe_node(node: Any, gm: fx.GraphModule | None = None) -> str:
    """'layer1.0.conv1 (Conv2d)', 'F.relu', '.relu_()', "the input 'x'", ..."""
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    if node.op == "call_module":
        if gm is not None:
            try:
                return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
            except AttributeError:
                pass
        return str(node.target)
    if node.op == "call_function":
        return describe_target(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return f"the input '{node.target}'"
    if node.op == "get_attr":
        return f"the attribute '{node.target}'"
    return node.op


def owner_module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""

