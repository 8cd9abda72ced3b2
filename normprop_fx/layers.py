"""NormProp layers: weight-normalized Conv1d/2d/3d and Linear with learned gamma/beta and a
normalized activation (docs/method.md section 2).

    u_i = gamma_i * (W_i . x) / ||W_i||_2 + beta_i
    o_i = (f(u_i) - c_mean) / c_std

The per-output-channel scale gamma_i / ||W_i|| multiplies the weight (O(#weights)), and beta is
passed as the conv/linear bias, so the layer costs one plain conv plus one pointwise op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple, _reverse_repeat_tuple

from .activation_functions import ActivationSpec, activation
from .batchnorm_state import BatchNormState, check_finite_in, normprop_gamma_beta, output_affine
from .eager import has_hooks, is_compiling
from .errors import InvalidOptionError, NormPropError
from .moments import activation_constants
from .normalized_activation import NormalizedActivation
from .records import NORMPROP_INIT, TRAINED_INIT
from .standardize import Standardize, absorbable_correction, corrected_input
from .weight_norm import normalized_rows

GammaInit = str | float

# A leaf of torch.fx: a plain symbolic trace of a NormProp layer records the call, so its graph
# computes the layer's eager weight normalization, backward included (weight_norm.py). (``wrap``
# patches this module's global name, the one normalized_weight calls.)
torch.fx.wrap("normalized_rows")


#: Added to the squared filter norm: a zero filter gives a zero output and finite gradients
#: (the weight gradient of a zero row is scaled by 1/sqrt(eps) = 1e4, still finite in fp16),
#: while a filter of norm 1e-3 is normalized to within 0.5%.
DEFAULT_EPS = 1e-8


def resolve_gamma_init(gamma_init: GammaInit, spec: ActivationSpec) -> float:
    """``"paper"`` -> 1 / jacobian_gain of the activation (1/1.21 for ReLU); a number -> itself."""
    if isinstance(gamma_init, str):
        if gamma_init != "paper":
            raise InvalidOptionError(f"gamma_init must be 'paper' or a positive number, got {gamma_init!r}")
        return activation_constants(spec).gamma_init
    if isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
        raise InvalidOptionError(f"gamma_init must be 'paper' or a positive number, got {gamma_init!r}")
    if not (math.isfinite(gamma_init) and gamma_init > 0):
        raise InvalidOptionError(f"gamma_init must be a finite positive number, got {gamma_init!r}")
    return float(gamma_init)


def init_gamma_beta_activation(
    module: nn.Module, channels: int, spec: ActivationSpec, gamma_init: GammaInit, affine: bool,
    factory: dict[str, Any],
) -> None:
    """Give ``module`` its per-channel gamma (at gamma_init) and beta (0), as parameters when
    ``affine`` else fixed buffers, and its normalized activation: shared by every NormProp module.
    ``module.init`` says how gamma and beta were initialized (the paper's way here)."""
    module.affine = affine
    module.init = NORMPROP_INIT
    module.gamma_init = resolve_gamma_init(gamma_init, spec)
    gamma = torch.full((channels,), module.gamma_init, **factory)
    beta = torch.zeros(channels, **factory)
    if affine:
        module.gamma = nn.Parameter(gamma)
        module.beta = nn.Parameter(beta)
    else:
        module.register_buffer("gamma", gamma)
        module.register_buffer("beta", beta)
    module.activation = NormalizedActivation(spec)


def normalized_weight(
    weight: torch.Tensor, gamma: torch.Tensor, eps: float = DEFAULT_EPS, *, weight_dim: int | None = None
) -> torch.Tensor:
    """``gamma_i * W_i / ||W_i||`` for every output row i of ``weight`` (dim 0).

    The norm is taken in at least float32, so fp16/bf16 weights neither overflow nor underflow
    in the sum of squares, and float64 weights keep float64 precision.

    ``weight_dim``: the rank of ``weight`` when the caller knows it (a layer does, from its
    class), so that the shape arithmetic needs no ``weight.dim()``: under a plain torch.fx trace
    ``weight`` is a Proxy, whose ``dim()`` is no Python int.
    """
    ndim = weight.dim() if weight_dim is None else weight_dim
    reduce_dims = tuple(range(1, ndim))
    compute = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(compute)
    if not is_compiling():
        # eager: one autograd.Function with the fewest passes over the weights (weight_norm.py)
        return normalized_rows(w, gamma.to(compute), eps).to(weight.dtype)
    inv_norm = torch.rsqrt(w.pow(2).sum(reduce_dims, keepdim=True) + eps)
    scale = gamma.to(compute).reshape(-1, *([1] * (ndim - 1))) * inv_norm
    return (w * scale).to(weight.dtype)


class NormPropLayer(nn.Module):
    """What every NormProp layer shares: weight, gamma, beta, the normalized activation.

    ``affine=False`` (the BatchNorm it replaces had no learned affine) keeps gamma and beta as
    fixed buffers at their initial values instead of parameters. A moment correction of the
    layer's input can be its child ``input_correction``, applied first
    (:func:`~normprop_fx.standardize.attach_input_correction`).
    """

    weight: nn.Parameter
    gamma: torch.Tensor
    beta: torch.Tensor
    #: When set, inputs of any other rank are refused: the pattern this layer replaced only
    #: normalized its output features for that rank (Linear -> BatchNorm1d needs (N, C)).
    required_input_dim: int | None = None
    #: The rank of ``weight``, known from the class (see :func:`normalized_weight`).
    _weight_dim: int
    #: After keep_batchnorm_function: the replaced BatchNorm's affine ``(g, t)``, float64 on the
    #: CPU: its output had per-channel mean t and std |g| on the data its statistics describe,
    #: which normprop_fx.recalibrate restores on new data (docs/method.md section 8). None otherwise.
    batchnorm_affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def _check_input(self, x: torch.Tensor) -> None:
        if self.required_input_dim is None:
            return
        if isinstance(x, torch.fx.Proxy):
            # Traced by another tool (torch.fx, torchvision feature extraction): the rank is not
            # known yet, so the graph checks it when it runs.
            torch._assert(x.dim() == self.required_input_dim, self._wrong_rank_message("another rank"))
        elif x.dim() != self.required_input_dim:
            raise NormPropError(self._wrong_rank_message(f"shape {tuple(x.shape)}"))

    def _wrong_rank_message(self, got: str) -> str:
        return (
            f"{type(self).__name__}({self.extra_repr()}) replaced a pattern that normalizes its "
            f"output features only for {self.required_input_dim}-D input, but got {got}: on such "
            "input the original BatchNorm normalized another axis. "
            "Keep that part of the model out of the conversion (leaf_modules=...)."
        )

    def _init_normprop(
        self,
        out_channels: int,
        act: ActivationSpec | str,
        gamma_init: GammaInit,
        affine: bool,
        eps: float,
        factory: dict[str, Any],
    ) -> None:
        spec = activation(act) if isinstance(act, str) else act
        self.eps = float(eps)
        init_gamma_beta_activation(self, out_channels, spec, gamma_init, affine, factory)

    def normalized_weight(self) -> torch.Tensor:
        return normalized_weight(self.weight, self.gamma, self.eps, weight_dim=self._weight_dim)

    def _weight_absorbed_correction(self, x: torch.Tensor) -> Standardize | None:
        """The input correction the eager form computes in the normalized weight and the bias
        (:meth:`_eager_weight_bias`) instead of in a pass over ``x``, or None: where that is the
        same function, i.e. for a correction that subtracts a mean where the layer adds no zero
        padding around the corrected input (:meth:`_pads_with_zeros`; a pure scale commutes with
        zero padding), and for a per-channel correction only where each weight column reads one
        input channel (an ungrouped conv)."""
        correction = absorbable_correction(self, x)
        if correction is None or has_hooks(self.activation) or (correction.subtracts_mean and self._pads_with_zeros()):
            return None
        if correction.is_scalar or self._per_input_channel(correction) is not None:
            return correction
        return None

    def _pads_with_zeros(self) -> bool:
        return False

    def _per_input_channel(self, correction: Standardize) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(mean, scale)`` as vectors over the weight's input dim (dim 1), or None."""
        return None

    def _eager_forward(self, linear_op: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                       correction: Standardize | None = None) -> torch.Tensor:
        """The eager form (normprop_fx/eager.py) of a layer whose Conv/Linear op on its input is
        ``linear_op(weight, bias)``: with hooks on the activation, the activation called as a
        module on its own input (the hooks see what they see in the compiled form); else the
        activation's input affine computed by the layer, in its normalized weight and its bias.

        The weight is always the side normalized. (Until 2026-12-06 layers whose weight had
        over 3x the elements of their output normalized the output instead; with the weight
        normalization's fused backward (weight_norm.py) the weight side measured faster on every
        shape tried, down to 512x512x3x3 on 2x2 maps and Linear(2048, 128) at batch 2:
        docs/method.md section 10.)"""
        if has_hooks(self.activation):
            return self.activation(linear_op(self.normalized_weight(), self.beta))
        weight, bias = self._eager_weight_bias(correction)
        return self.activation.eager_from_input_affine(linear_op(weight, bias), inplace=True)

    def _eager_weight_bias(self, correction: Standardize | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias of the eager form (normprop_fx/eager.py): the activation's input
        affine ``u * a + c`` is computed by the layer itself, ``gamma * a`` normalizing the weight
        and ``beta * a + c`` the bias, O(channels) work instead of a pass over the output.

        With ``correction`` (:meth:`_weight_absorbed_correction`), the input correction
        ``(x - m) * s`` too: ``W (x - m) s = (W s) x - (W s) m``, a scalar ``s`` in gamma, a
        per-channel one multiplying the weight's input columns, and ``(W s) m`` summed into the
        bias: O(weights) work instead of a pass over the input, forward and backward."""
        # (weight read first: a torch.fx trace then lists the parameters in the layer's order)
        weight, gamma, beta = self.weight, self.gamma, self.beta
        scale, shift = self.activation.eager_input_affine()
        if (scale, shift) != (1.0, 0.0):
            gamma, beta = gamma * scale, beta * scale + shift
        if correction is None:
            return normalized_weight(weight, gamma, self.eps, weight_dim=self._weight_dim), beta
        per_channel = None if correction.is_scalar else self._per_input_channel(correction)
        if per_channel is None:
            gamma = gamma * correction.scale.to(gamma.dtype).reshape(())
        w = normalized_weight(weight, gamma, self.eps, weight_dim=self._weight_dim)
        columns = (1, -1) + (1,) * (self._weight_dim - 2)
        if per_channel is not None:
            w = w * per_channel[1].to(w.dtype).reshape(columns)
        if not correction.subtracts_mean:
            return w, beta
        if per_channel is None:
            shift_out = w.sum(tuple(range(1, self._weight_dim))) * correction.mean.to(w.dtype).reshape(())
        else:
            shift_out = w.reshape(w.shape[0], w.shape[1], -1).sum(2) @ per_channel[0].to(w.dtype)
        return w, beta - shift_out.to(beta.dtype)

    def keep_batchnorm_function(
        self, state: BatchNormState, conv_bias: torch.Tensor | None, *, where: str = ""
    ) -> None:
        """Make this layer compute exactly what its conv (with bias ``conv_bias``, dropped from
        the layer) followed by the BatchNorm ``state`` computed in eval mode (docs/method.md section 8):
        gamma and beta from the BatchNorm's statistics and affine, the weight kept as it is, and
        the activation's output no longer standardized, since the trained layers after it expect
        the raw values. Raises NormPropError when the exact gamma/beta do not fit the layer's
        dtype (fp16)."""
        gamma, beta = normprop_gamma_beta(state, self.weight, conv_bias, self.eps)
        check_finite_in({"gamma": gamma, "beta": beta}, self.gamma.dtype, where or type(self).__name__)
        with torch.no_grad():
            self.gamma.copy_(gamma.to(self.gamma.device))
            self.beta.copy_(beta.to(self.beta.device))
        self.activation = NormalizedActivation(self.activation.spec, standardize=False)
        self.init = TRAINED_INIT
        self.batchnorm_affine = tuple(v.detach().cpu().clone() for v in output_affine(state))

    def reset_parameters(self) -> None:
        """Kaiming-uniform weight (the direction is all that matters), gamma_init, beta 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._reset_gamma_beta()

    def _reset_gamma_beta(self) -> None:
        with torch.no_grad():
            self.gamma.fill_(self.gamma_init)
            self.beta.zero_()

    @classmethod
    def _from_weighted_module(
        cls, module: nn.Module, args: tuple[Any, ...], share_weight: bool, options: dict[str, Any]
    ) -> NormPropLayer:
        """``cls(*args, **options)`` holding ``module``'s weight: the Parameter itself when
        ``share_weight`` and it is one, else a copy. The layer is built on the meta device so
        no weight is initialized only to be replaced."""
        weight = module.weight
        layer = cls(*args, device="meta", dtype=weight.dtype, **options)
        layer.to_empty(device=weight.device)
        layer._reset_gamma_beta()
        if share_weight and isinstance(weight, nn.Parameter):
            layer.weight = weight
        else:
            with torch.no_grad():
                layer.weight.copy_(weight)
        return layer

    def _normprop_repr(self) -> str:
        init = f"gamma_init={self.gamma_init:.6g}" if self.init == NORMPROP_INIT else "init=trained"
        return f"activation={self.activation.spec}, {init}, affine={self.affine}, eps={self.eps:g}"


class NormPropLinear(NormPropLayer):
    """Linear layer with NormProp weight normalization and normalized activation."""

    _weight_dim = 2

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        activation: ActivationSpec | str = "relu",
        gamma_init: GammaInit = "paper",
        affine: bool = True,
        eps: float = DEFAULT_EPS,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self._init_normprop(out_features, activation, gamma_init, affine, eps, factory)
        self.reset_parameters()

    @classmethod
    def from_module(cls, linear: nn.Linear, *, share_weight: bool = False, **options: Any) -> NormPropLinear:
        """A NormPropLinear with a copy of ``linear``'s weight, or the weight Parameter itself
        with ``share_weight=True`` (its bias is dropped: beta takes its role)."""
        return cls._from_weighted_module(linear, (linear.in_features, linear.out_features), share_weight, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        correction = self._weight_absorbed_correction(x)
        if correction is None:
            x = corrected_input(self, x)
        if is_compiling():
            return self.activation(F.linear(x, self.normalized_weight(), self.beta))
        return self._eager_forward(lambda weight, bias: F.linear(x, weight, bias), correction)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._normprop_repr()}"


class _NormPropConvNd(NormPropLayer):
    _dims: ClassVar[int]
    _conv: ClassVar[Any]

    @property
    def _weight_dim(self) -> int:
        return self._dims + 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        activation: ActivationSpec | str = "relu",
        gamma_init: GammaInit = "paper",
        affine: bool = True,
        eps: float = DEFAULT_EPS,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        ntuple = _ntuple(self._dims)
        if in_channels % groups or out_channels % groups:
            raise InvalidOptionError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise InvalidOptionError(f"unknown padding_mode {padding_mode!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = ntuple(kernel_size)
        self.stride = ntuple(stride)
        self.padding = padding if isinstance(padding, str) else ntuple(padding)
        self.dilation = ntuple(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = self._explicit_padding()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self._init_normprop(out_channels, activation, gamma_init, affine, eps, factory)
        self.reset_parameters()

    def _explicit_padding(self) -> list[int]:
        """F.pad's argument for a non-zeros padding_mode, as torch.nn.Conv computes it."""
        if not isinstance(self.padding, str):
            return list(_reverse_repeat_tuple(self.padding, 2))
        padding = [0, 0] * self._dims
        if self.padding == "same":
            for d, k, i in zip(self.dilation, self.kernel_size, range(self._dims - 1, -1, -1)):
                total = d * (k - 1)
                padding[2 * i] = total // 2
                padding[2 * i + 1] = total - total // 2
        return padding

    @classmethod
    def from_module(
        cls, conv: nn.modules.conv._ConvNd, *, share_weight: bool = False, **options: Any
    ) -> _NormPropConvNd:
        """A NormProp conv with every hyper-parameter of ``conv`` and a copy of its weight, or
        the weight Parameter itself with ``share_weight=True`` (its bias is dropped: beta takes
        its role)."""
        args = (
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.padding_mode,
        )
        return cls._from_weighted_module(conv, args, share_weight, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        correction = self._weight_absorbed_correction(x)
        if correction is None:
            x = corrected_input(self, x)
        x = self._pad_input(x)  # (after the correction: the padding sees zeros, not corrected zeros)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding: Any = 0
        else:
            padding = self.padding
        conv = type(self)._conv
        if is_compiling():
            # Compiled, beta is added after the conv, so it joins the pointwise kernel there (and
            # its gradient is reduced by inductor): as the conv's bias, mkldnn's convolution
            # backward reduced that gradient in a pass of its own.
            y = conv(x, self.normalized_weight(), None, self.stride, padding, self.dilation, self.groups)
            return self.activation(y + self.beta.reshape(-1, *([1] * self._dims)))
        return self._eager_forward(
            lambda weight, bias: conv(x, weight, bias, self.stride, padding, self.dilation, self.groups), correction)

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Padding a subclass adds by hand, around the corrected input (NormPropConv2dSame's
        TF-'same' zeros); the conv op's own padding is added by the op."""
        return x

    def _pads_with_zeros(self) -> bool:
        """Whether the conv adds zeros around its input (padding_mode "zeros" with a padding):
        then a shifted input's border differs from the shifted zero-padded one. The other
        padding modes copy input values, which an affine commutes with."""
        return self.padding_mode == "zeros" and any(self._reversed_padding_repeated_twice)

    def _per_input_channel(self, correction: Standardize) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A correction of shape (C_in, 1, ..., 1) of an ungrouped conv, as two C_in vectors."""
        shape = (self.in_channels,) + (1,) * self._dims
        if self.groups != 1 or tuple(correction.mean.shape) != shape or tuple(correction.scale.shape) != shape:
            return None
        return correction.mean.reshape(-1), correction.scale.reshape(-1)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._dims:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return f"{s}, {self._normprop_repr()}"


class NormPropConv1d(_NormPropConvNd):
    """Conv1d with NormProp weight normalization and normalized activation."""

    _dims = 1
    _conv = staticmethod(F.conv1d)


class NormPropConv2d(_NormPropConvNd):
    """Conv2d with NormProp weight normalization and normalized activation."""

    _dims = 2
    _conv = staticmethod(F.conv2d)


class NormPropConv3d(_NormPropConvNd):
    """Conv3d with NormProp weight normalization and normalized activation."""

    _dims = 3
    _conv = staticmethod(F.conv3d)


NORMPROP_LAYERS: tuple[type[NormPropLayer], ...] = (NormPropLinear, NormPropConv1d, NormPropConv2d, NormPropConv3d)
