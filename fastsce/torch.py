"""PyTorch drop-in: ``cross_entropy`` and ``CrossEntropyLoss`` backed by fastsce's kernels.

    from fastsce.torch import cross_entropy, CrossEntropyLoss
    loss = cross_entropy(logits, labels)      # as torch.nn.functional.cross_entropy
    loss.backward()

The forward pass computes the loss and its gradient in one fused call of
:func:`fastsce.cross_entropy_with_grad` on zero-copy NumPy views of the tensors and keeps
the gradient; the backward pass only scales it by the incoming gradient. Without
autograd (``torch.no_grad()``, or an input that does not require grad) only the loss is
computed, with :func:`fastsce.cross_entropy`.

Takes what PyTorch takes on the CPU: input (N, K), (N, K, d1, ..., dk) (classes on
dim 1) or (K,), in float32, float64, float16 or bfloat16 (the last two computed in
float32 inside the kernels; bfloat16 needs ``ml_dtypes``). Falls back to
``torch.nn.functional.cross_entropy`` (silently, same result) for anything else: other
devices or dtypes, the legacy ``size_average``/``reduce`` arguments, targets or weights
that require grad, and negative or non-finite weights.

This module imports torch; ``import fastsce`` does not.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import fastsce

__all__ = ["cross_entropy", "CrossEntropyLoss"]

try:  # NumPy has no bfloat16; ml_dtypes' is what fastsce reads
    import ml_dtypes

    _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BFLOAT16 = None

_DTYPES = (torch.float32, torch.float64, torch.float16) + ((torch.bfloat16,) if _BFLOAT16 is not None else ())


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (a copy only when it is not contiguous)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BFLOAT16)
    return t.numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing a NumPy array's memory (bfloat16 through its bits)."""
    a = np.asarray(a)
    if a.dtype == _BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _on_numpy(fn, input, target, weight, ignore_index, reduction, label_smoothing):
    """fn (fastsce.cross_entropy or cross_entropy_with_grad) on NumPy views of the
    tensors, with PyTorch's class axis: dim 1, or dim 0 of unbatched (K,) input."""
    return fn(
        _numpy(input),
        _numpy(target),
        weight=None if weight is None else _numpy(weight).astype(np.float64),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        axis=1 if input.ndim > 1 else 0,
    )


def _supported(input, target, weight) -> bool:
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return False
    if input.device.type != "cpu" or input.dtype not in _DTYPES or input.ndim == 0:
        return False
    if target.device.type != "cpu" or target.requires_grad or target.is_complex() or target.dtype == torch.bfloat16:
        return False
    if target.shape == input.shape:
        if not target.is_floating_point():
            return False
    elif target.shape != input.shape[:1] + input.shape[2:] if input.ndim > 1 else target.ndim != 0:
        return False
    elif target.is_floating_point() or target.dtype == torch.bool:
        return False
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or weight.requires_grad:
            return False
        if not weight.is_floating_point() or not bool(torch.isfinite(weight).all() and (weight >= 0).all()):
            return False
    return True


class _CrossEntropy(torch.autograd.Function):
    """Loss in forward; the gradient is computed there too and stored for backward."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing):
        loss, grad = _on_numpy(
            fastsce.cross_entropy_with_grad, input, target, weight, ignore_index, reduction, label_smoothing
        )
        ctx.grad = _tensor(grad)
        ctx.reduction = reduction
        return _tensor(loss)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none" and ctx.grad.ndim > 1:  # one incoming gradient per row
            grad = ctx.grad * grad_output.unsqueeze(1)
        else:
            grad = ctx.grad * grad_output
        return grad, None, None, None, None, None


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.cross_entropy`` (same arguments, same order).

    CPU input (N, K), (N, K, d1, ...) or (K,) with integer class targets (the input's
    shape without dim 1) or probability targets (the input's shape) runs on fastsce's
    kernels; anything else falls back to ``torch.nn.functional.cross_entropy`` (see the
    module docstring). Returns a tensor of the input's dtype: 0-d for "mean"/"sum", the
    target's shape for "none".
    """
    if size_average is not None or reduce is not None or not _supported(input, target, weight):
        return F.cross_entropy(
            input,
            target,
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    if torch.is_grad_enabled() and input.requires_grad:
        return _CrossEntropy.apply(input, target, weight, ignore_index, reduction, label_smoothing)
    loss = _on_numpy(fastsce.cross_entropy, input, target, weight, ignore_index, reduction, label_smoothing)
    return _tensor(loss)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (same constructor, buffers and state
    dict) whose forward is :func:`fastsce.torch.cross_entropy`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
