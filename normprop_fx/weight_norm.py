"""Weight normalization ``gamma_i * W_i / sqrt(||W_i||^2 + eps)`` as one autograd.Function.

The eager training step of a NormProp network normalizes every weight of the network at every
step, and at the batch sizes NormProp is for (small ones) the weights are about as many numbers
as the activations: resnet18 at batch 16 and 128 px has 11.2M conv weight elements and 13.0M
BatchNorm input elements. Written with plain autograd ops, the normalization and its backward take
about ten passes over the weights (the norm, the scaled copy, the product of the gradient with
the weight and its sum, the norm's own backward, the sum of two weight gradients). Here the
backward is written out, one pass for the per-row dot product ``<G_i, W_i>`` and one for

    dL/dW_i = s_i * G_i - s_i * inv_i^2 * <G_i, W_i> * W_i,   s_i = gamma_i * inv_i,
    dL/dgamma_i = inv_i * <G_i, W_i>,                         inv_i = (||W_i||^2 + eps)^-1/2

(tools/bench.py, docs/bench.md: the eager train step). On the CPU the backward is ATen's fused
weight-norm kernel given these norms with eps (:func:`_fused_backward`), which does both passes
row by row while the row is in cache. It is used in eager mode only
(outside torch.jit tracing); torch.compile differentiates the plain ops itself, and the tracers that
turn a model into a file (torch.jit.trace, the legacy ONNX exporter)
get the same forward in plain ops, which they can record; a plain torch.fx trace records a
call of :func:`normalized_rows`. torch.func works through it: it has a ``jvp`` (forward
mode, so ``jvp`` and ``hessian``) and a generated vmap rule (per-sample gradients); its backward is
made of differentiable ops, so double backward works too.
"""

from __future__ import annotations

import torch


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _column(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(-1, *([1] * (ndim - 1)))


def _squared_norm(w: torch.Tensor, eps: float) -> torch.Tensor:
    """``||w_i||^2 + eps`` per row, in at least float32: vector_norm reads the weight once."""
    compute = torch.promote_types(w.dtype, torch.float32)
    return torch.linalg.vector_norm(_rows(w), dim=1, dtype=compute).square() + eps


def _inverse_norm(w: torch.Tensor, eps: float) -> torch.Tensor:
    """``(||w_i||^2 + eps)^-1/2`` per row."""
    return torch.rsqrt(_squared_norm(w, eps))


class NormalizedWeight(torch.autograd.Function):
    """``(w, gamma, eps) -> (gamma_i * w_i / sqrt(||w_i||^2 + eps), inv)`` for rows i of ``w``
    (dim 0); ``inv`` (the inverse norms, not differentiable) is returned so that the backward
    can reuse it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w: torch.Tensor, gamma: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv = _inverse_norm(w, eps)
        return w * _column(gamma * inv, w.dim()), inv

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        w, gamma, eps = inputs
        _, inv = output
        ctx.eps = eps
        ctx.mark_non_differentiable(inv)
        ctx.save_for_backward(w, gamma, inv)
        ctx.save_for_forward(w, gamma)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_inv: torch.Tensor | None):  # noqa: ANN001, ANN205
        w, gamma, inv = ctx.saved_tensors
        if _fused_backward_applies(grad, w, gamma):
            return _fused_backward(grad, w, gamma, inv)
        if torch.is_grad_enabled():
            # a differentiable backward (create_graph, torch.func): inv computed here depends on
            # w in the graph, so a double backward sees how; the forward's copy would be a constant
            inv = _inverse_norm(w, ctx.eps)
        dot = torch.linalg.vecdot(_rows(grad), _rows(w), dim=1)  # <G_i, W_i> (bmm is 3x slower on CPU)
        s = gamma * inv
        grad_w = torch.addcmul(grad * _column(s, w.dim()), w, _column(-s * inv * inv * dot, w.dim()))
        return grad_w, inv * dot, None

    @staticmethod
    def jvp(ctx, dw: torch.Tensor | None, dgamma: torch.Tensor | None, _deps: None):  # noqa: ANN001, ANN205
        w, gamma = ctx.saved_tensors
        inv, ndim = _inverse_norm(w, ctx.eps), w.dim()
        # d(inv) = -inv^3 <W_i, dW_i>; d(gamma * inv) = dgamma * inv + gamma * d(inv)
        ds = torch.zeros_like(gamma) if dgamma is None else dgamma * inv
        out = torch.zeros_like(w)
        if dw is not None:
            ds = ds - gamma * inv.pow(3) * torch.linalg.vecdot(_rows(w), _rows(dw), dim=1)
            out = dw * _column(gamma * inv, ndim)
        return out + w * _column(ds, ndim), None


def _fused_backward_applies(grad: torch.Tensor, w: torch.Tensor, gamma: torch.Tensor) -> bool:
    """Whether :func:`_fused_backward` computes this backward: a plain first-order backward on
    the CPU of contiguous tensors of one dtype. A differentiable backward (``create_graph``), the
    tensors of a torch.func transform (``vmap``, ``grad``: ATen's kernel has no batching rule), a
    channels_last weight and other devices take the backward of plain ops."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return (
        not torch.is_grad_enabled()
        and w.device.type == "cpu"
        and grad.dtype == w.dtype == gamma.dtype
        and not (wrapped(grad) or wrapped(w) or wrapped(gamma))
        and grad.is_contiguous() and w.is_contiguous()
    )


def _fused_backward(grad: torch.Tensor, w: torch.Tensor, gamma: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    """The backward by ATen's weight-norm kernel (the backward of ``torch._weight_norm``), which
    does per row, while the row is in cache, what the plain ops do in three passes over the
    weights: ``<G_i, W_i>``, then ``dL/dW_i = (gamma_i / n_i) (G_i - W_i <G_i, W_i> / n_i^2)``
    and ``dL/dgamma_i = <G_i, W_i> / n_i``. It takes the norms ``n_i`` it divides by as an
    argument, so given ``n_i = (||W_i||^2 + eps)^1/2`` it computes this module's gradient, eps
    included, to rounding (tests/test_eager.py). Its forward takes no eps, which is why the
    forward stays in plain ops: the backward is where the passes were. About 2.3x less time for
    the whole weight normalization, forward and backward, of a 512x512x3x3 weight (1 thread)."""
    ndim = w.dim()
    grad_w, grad_gamma = torch.ops.aten._weight_norm_interface_backward(
        grad, w, _column(gamma, ndim).contiguous(), _column(inv.reciprocal(), ndim).contiguous(), 0)
    return grad_w, grad_gamma.reshape(gamma.shape), None


def norm_with_eps(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(||W_i||^2 + eps)^1/2`` per row of ``weight``, in at least float32, with plain autograd
    (vector_norm's backward is one pass over the weight): the traced form's divisor. A division,
    not a multiplication by rsqrt: see normalized_rows."""
    return torch.sqrt(_squared_norm(weight, eps))


def normalized_rows(w: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """``gamma_i * w_i / sqrt(||w_i||^2 + eps)``, the eager form: :class:`NormalizedWeight`, or
    under torch.jit tracing the same forward in plain ops, which the tracer records.

    A leaf of torch.fx (layers.py wraps it where it is called): a plain symbolic trace of a
    NormProp layer (torchvision's feature extraction, ``torch.fx.symbolic_trace``) records a call
    of this function, so the traced graph computes what the layer computes, forward and backward."""
    if not torch.jit.is_tracing():  # (a trace cannot save a Python autograd.Function into a file)
        return NormalizedWeight.apply(w, gamma, eps)[0]
    # gamma / sqrt(.), not gamma * rsqrt(.): the legacy ONNX exporter writes rsqrt as Div(1, Sqrt),
    # and onnxruntime's DivMulFusion (Div(1, x) * y -> Div(y, x)) leaves a dangling input when the
    # node that computes y is removed too: the Identity the exporter reads a parameter through
    # when parameters have equal values (gammas at their initial value), or a no-op Cast without
    # constant folding. "Node input ... is not a graph input" (tests/test_deploy.py)
    return w * _column(gamma / norm_with_eps(w, eps), w.dim())

