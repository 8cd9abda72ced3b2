"""Which form a NormProp module computes in: the compiled form or the eager one.

Both compute the same function, to rounding; they differ in how many passes over the
activations they take and in what the backward saves.

- **Compiled** (torch.compile and torch.export trace the module): the forms inductor fuses
  best, kept as they were measured (docs/bench.md): a piecewise-linear activation with its
  standardization through the output-gradient autograd.Function of ``piecewise_linear.py``, so a
  compiled training step saves no bool mask; beta added after the conv, so it joins the pointwise
  kernel.
- **Eager** (everything else: plain PyTorch, torch.jit.trace, the ONNX exporters' trace, a plain
  torch.fx trace, torch.func): native ops only, and the fewest passes over the activations. A
  positive scalar affine after an activation is moved in front of it where the activation allows
  (``f(u) * a + b = clamp(u * a + b, ...)`` for the clamp family, ``leaky_relu(u * a) + b``), and
  an affine in front of an activation goes into the weight and bias of the layer that computes
  ``u``: a NormProp conv then costs one conv and one clamp, as a plain conv and ReLU do. Each
  remaining affine is one ``torch.addcmul``. Being made of native ops, this form also gives
  torch.func (``jvp``, ``hessian``, ``vmap``), ``torch.jit`` and the legacy ONNX exporter what they
  need. Two autograd.Functions remain, each where plain autograd alone runs: the weight
  normalization (weight_norm.py; with a ``jvp`` and a vmap rule, and plain ops under a jit
  trace) and the in-place clamp of a training step (:func:`clamp_fresh`; native ops under every
  tracer and transform, :func:`plain_autograd`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: True while torch.compile or torch.export traces (torch.compiler.is_compiling from torch 2.3 on).
_torch_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_forced_compiled_form = False


def is_compiling() -> bool:
    """Whether NormProp modules compute their compiled form: while torch.compile or
    torch.export traces, or inside :func:`compiled_form`."""
    return _forced_compiled_form or _torch_is_compiling()


@contextlib.contextmanager
def compiled_form() -> Iterator[None]:
    """Run NormProp modules in their compiled form in eager mode too: the reference the eager
    form is tested against (tests/test_eager.py), and a way to rule the eager form out when
    debugging. Not thread-safe: it sets a module-level flag."""
    global _forced_compiled_form
    previous, _forced_compiled_form = _forced_compiled_form, True
    try:
        yield
    finally:
        _forced_compiled_form = previous


def scalar_affine(x: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """``x * scale + shift`` for Python floats, in one pass over ``x`` (``x * scale + shift``
    written out is two: a multiply, then an add that reads the product back): ``torch.add(shift,
    x, alpha=scale)``, a binary kernel with a Python scalar. (``torch.addcmul`` with two 0-dim
    tensors is a ternary kernel that takes 1.8x its time on CPU: 2.2 against 1.2 ms over 4M float32
    values, 1 thread, docs/method.md section 10.)"""
    if shift == 0.0:
        return x if scale == 1.0 else x * scale
    if scale == 1.0:
        return x + shift
    return torch.add(_scalar(shift, x), x, alpha=scale)


def scalar_affine_(x: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """``x * scale + shift`` written into ``x`` itself (a fresh tensor nothing else reads), which
    on CPU costs less than :func:`scalar_affine`'s pass into a new activation-sized tensor, whose
    pages are mapped and zeroed on first touch (what the in-place forms gained side by side:
    docs/bench.md, notes, ``tools/bench_ab.py --base c502f3e``). One pass, ``torch.add(shift, x,
    alpha=scale, out=x)``, on a plain tensor that autograd records nothing on (``out=`` has no
    autograd, and tracers, exporters and torch.func transforms take the native in-place ops
    better); else two, ``mul_`` then ``add_``."""
    if scale != 1.0 and shift != 0.0 and plain_tensor(x) and not records_gradient(x):
        return torch.add(_scalar(shift, x), x, alpha=scale, out=x)
    if scale != 1.0:
        x = x.mul_(scale)
    return x if shift == 0.0 else x.add_(shift)


def tensor_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` for tensors ``scale`` and ``shift`` (per channel, shaped to broadcast
    over ``x``), into a new tensor. Eager, on a plain tensor: ``(x * scale).add_(shift)``, a multiply
    into the new tensor, then an add in place there: on CPU 0.64x the time of one
    ``torch.addcmul(shift, x, scale)``, a ternary kernel with two broadcast operands (1.90 against
    2.96 ms over 16x256x32x32 float32 values, 1 thread: ``python tools/bench_ops.py``). Autograd
    records both (the multiply's backward reads ``x`` and ``scale``, not the product the add
    overwrites). Under tracers, transforms and compilers: the ``addcmul``."""
    if plain_tensor(x) and torch.broadcast_shapes(x.shape, scale.shape, shift.shape) == torch.broadcast_shapes(x.shape, scale.shape):
        return (x * scale).add_(shift)
    return torch.addcmul(shift, x, scale)


def plain_tensor(x: torch.Tensor) -> bool:
    """``x`` is a tensor of plain eager PyTorch: not a torch.fx Proxy, not under torch.jit tracing,
    not a torch.func wrapped tensor, not compiling."""
    return (not isinstance(x, torch.fx.Proxy) and not torch.jit.is_tracing()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x) and not is_compiling())


def records_gradient(x: torch.Tensor) -> bool:
    """Whether autograd records an op on ``x`` (then an in-place op must not overwrite a tensor
    some backward reads)."""
    return x.requires_grad and torch.is_grad_enabled()


def plain_autograd(x: torch.Tensor) -> bool:
    """Whether ``x`` is a tensor that plain PyTorch autograd records, with no tracer or transform
    that a Python autograd.Function would get in the way of: not a torch.fx Proxy, not under
    torch.jit tracing (a trace cannot save the Function into a file), not a torch.func wrapped
    tensor (``jvp``, ``vmap``: native ops have their rules), not compiling."""
    return plain_tensor(x) and records_gradient(x)


class _ClampInPlace(torch.autograd.Function):
    """``hardtanh_(v, lo, hi)`` under autograd without the clone autograd makes for the native
    in-place op (whose backward formula reads the input): the backward reads the output instead,
    which selects the same elements, exactly: ``lo < y < hi`` holds for ``y = clamp(v, lo, hi)``
    exactly where it holds for ``v`` (on the flat pieces ``y`` is the bound itself)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:  # noqa: ANN001
        ctx.mark_dirty(v)
        y = torch.nn.functional.hardtanh(v, lo, hi, inplace=True)
        ctx.save_for_backward(y)
        ctx.lo, ctx.hi = lo, hi
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, y, ctx.lo, ctx.hi), None, None


def clamp_fresh(v: torch.Tensor, lo: float, hi: float, *, fresh: bool) -> torch.Tensor:
    """``clamp(v, lo, hi)`` (``F.hardtanh``). ``fresh``: ``v`` is a new tensor nothing else
    reads (a layer's output), so the clamp overwrites it: natively when no gradient is recorded,
    through :class:`_ClampInPlace` under plain autograd (the training step writes no new
    activation-sized tensor, as ``ReLU(inplace=True)`` after a BatchNorm does), out of place
    under tracers and transforms."""
    if not fresh or isinstance(v, torch.fx.Proxy):
        return torch.nn.functional.hardtanh(v, lo, hi)
    if not records_gradient(v):
        return torch.nn.functional.hardtanh(v, lo, hi, inplace=True)
    if plain_autograd(v):
        return _ClampInPlace.apply(v, lo, hi)
    return torch.nn.functional.hardtanh(v, lo, hi)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs hooks: its own forward/backward hooks or global module
    hooks. A layer whose activation has hooks calls that activation as a module, with the
    activation's own input, instead of computing it inside the layer (the hook sees what it
    would see in the compiled form; normprop_fx.recalibrate's hooks measure it)."""
    m = torch.nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None) or m._global_forward_hooks
                or m._global_forward_pre_hooks or m._global_backward_hooks
                or getattr(m, "_global_backward_pre_hooks", None))
