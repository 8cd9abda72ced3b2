"""NormProp replacement of timm's ``Conv2dSame``: TensorFlow-style 'SAME' padding computed from
the input size at run time (asymmetric when the total padding is odd), then the NormProp conv."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import NormPropConv2d


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding TensorFlow's 'SAME' adds along one spatial axis of length ``size``."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


@torch.fx.wrap
def pad_same(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """``x`` zero-padded as TensorFlow's 'SAME' does on its last two axes.

    A leaf function of torch.fx (``torch.fx.wrap``): the padding depends on the input size,
    which a symbolic trace does not know, so a traced graph calls this function as it is
    (as timm's ``pad_same`` is kept). Eager, compiled or exported, it is an ordinary function."""
    ih, iw = x.shape[-2:]
    pad_h = same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class NormPropConv2dSame(NormPropConv2d):
    """NormPropConv2d with TensorFlow 'SAME' padding, as ``timm.layers.Conv2dSame``."""

    @classmethod
    def from_module(cls, conv: nn.Conv2d, *, share_weight: bool = False, **options: Any) -> NormPropConv2dSame:
        args = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation, conv.groups)
        return cls._from_weighted_module(conv, args, share_weight, options)  # type: ignore[return-value]

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """The 'same' zeros go around the corrected input, as in the flat graph, where the
        correction is a node in front of this layer (padding first, the correction would shift
        the zeros too, and a mean absorbed into the bias would miss the border)."""
        return pad_same(x, self.kernel_size, self.stride, self.dilation)

    def _pads_with_zeros(self) -> bool:
        return True  # (whether it pads depends on the input size: always counted as padding)
