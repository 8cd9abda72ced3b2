"""Pass 2: functional dropout whose ``training=`` flag the trace froze becomes a module again.

``F.dropout(x, p, training=self.training)`` (or ``torch.dropout(x, p, self.training)``, the flag
positional) in a traced forward records ``training`` as the
constant it had at trace time, so the converted model would keep dropping out in ``eval()``
(and a model traced in eval mode would never drop out in ``train()``). Each such call becomes the
matching ``nn.Dropout*`` module, in the trace-time mode, registered under the module that made the
call, so ``train()`` and ``eval()`` switch it like any other dropout. Any other frozen flag stays
and is a warning in the report (``trace.frozen_training_flags``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .describe import owner_module_path
from .graph_utils import RESTORED_FUNCTION, adopt_owner, free_module_name, hand_over
from .patterns import training_flag

class FeatureDropout(nn.modules.dropout._DropoutNd):
    """``torch.feature_dropout`` as a module: zeroes whole channels (dim 1) of an input of any rank,
    as ``nn.Dropout2d`` does on 4-D input, and follows ``train()``/``eval()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.feature_dropout(x, self.p, self.training)


#: functional dropout -> (module class, positional index of ``p``); where each takes its
#: train/eval flag is patterns.TRAINING_FLAGS.
_DROPOUTS: dict[object, tuple[type[nn.Module], int]] = {
    F.dropout: (nn.Dropout, 1),
    F.dropout1d: (nn.Dropout1d, 1),
    F.dropout2d: (nn.Dropout2d, 1),
    F.dropout3d: (nn.Dropout3d, 1),
    F.alpha_dropout: (nn.AlphaDropout, 1),
    F.feature_alpha_dropout: (nn.FeatureAlphaDropout, 1),
    torch.dropout: (nn.Dropout, 1),
    torch.feature_dropout: (FeatureDropout, 1),
    torch.alpha_dropout: (nn.AlphaDropout, 1),
    torch.feature_alpha_dropout: (nn.FeatureAlphaDropout, 1),
}


def restore_dropout_modes(gm: fx.GraphModule) -> list[str]:
    """Replace every functional dropout with a constant ``training`` flag in ``gm`` (modified)
    by a dropout module; return the qualified names of the modules added."""
    added: list[str] = []
    for node in list(gm.graph.nodes):
        row = _DROPOUTS.get(node.target) if node.op == "call_function" else None
        if row is None:
            continue
        cls, p_index = row
        p = node.kwargs.get("p", node.args[p_index] if len(node.args) > p_index else 0.5)
        training = training_flag(node)
        if training is None:
            training = True  # F.dropout's default; torch.dropout has none
        if not isinstance(training, bool) or not isinstance(p, (int, float)):
            continue  # a traced flag (a Proxy) already follows the mode
        owner = owner_module_path(node)
        target = free_module_name(gm, ".".join(part for part in (owner, f"{node.name}_module") if part))
        module = cls(float(p))
        module.train(training)
        gm.add_submodule(target, module)
        with gm.graph.inserting_before(node):
            replacement = adopt_owner(gm.graph.call_module(target, (node.args[0],)), node)
        replacement.meta[RESTORED_FUNCTION] = node.target
        hand_over(node, replacement)
        gm.graph.erase_node(node)
        added.append(target)
    if added:
        gm.graph.lint()
        gm.recompile()
    return added
