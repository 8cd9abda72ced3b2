"""How often a GraphModule's graph uses each of its submodules."""

from __future__ import annotations

from collections import Counter

from torch import fx


def module_uses(gm: fx.GraphModule) -> Counter[str]:
    """Uses of each module path: a ``call_module`` of it, or a ``get_attr`` of it or of anything
    under it (``a.b`` counts for ``a`` too). A module used once can be rewritten for that one
    use without changing any other."""
    uses: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = str(node.target).split(".")
            for i in range(1, len(parts) + 1):
                uses[".".join(parts[:i])] += 1
    return uses
