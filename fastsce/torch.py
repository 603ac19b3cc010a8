"""PyTorch drop-in: ``cross_entropy`` and ``CrossEntropyLoss`` backed by fastsce's kernels.

    from fastsce.torch import cross_entropy, CrossEntropyLoss
    loss = cross_entropy(logits, labels)      # as torch.nn.functional.cross_entropy
    loss.backward()

The forward pass computes the loss and its gradient in one fused call of
:func:`fastsce.cross_entropy_with_grad` on zero-copy NumPy views of the tensors and keeps
the gradient; the backward pass only scales it by the incoming gradient. Without
autograd (``torch.no_grad()``, or an input that does not require grad) only the loss is
computed, with :func:`fastsce.cross_entropy`.

Falls back to ``torch.nn.functional.cross_entropy`` (silently, same result) for anything
but CPU float32/float64 input of shape (N, K): other devices or dtypes (float16,
bfloat16), class-axis layouts (N, K, d1, ...), 1-D input, the legacy
``size_average``/``reduce`` arguments, targets or weights that require grad, and
negative or non-finite weights.

This module imports torch; ``import fastsce`` does not.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import fastsce

__all__ = ["cross_entropy", "CrossEntropyLoss"]

_DTYPES = (torch.float32, torch.float64)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (a copy only when it is not contiguous)."""
    return t.detach().contiguous().numpy()


def _on_numpy(fn, input, target, weight, ignore_index, reduction, label_smoothing):
    """fn (fastsce.cross_entropy or cross_entropy_with_grad) on NumPy views of the tensors."""
    return fn(
        _numpy(input),
        _numpy(target),
        weight=None if weight is None else _numpy(weight),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def _supported(input, target, weight) -> bool:
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return False
    if input.device.type != "cpu" or input.dtype not in _DTYPES or input.ndim != 2:
        return False
    if target.device.type != "cpu" or target.requires_grad or target.is_complex():
        return False
    if target.shape == input.shape:
        if not target.is_floating_point():
            return False
    elif target.ndim != 1 or target.is_floating_point() or target.dtype == torch.bool:
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
        ctx.grad = torch.from_numpy(grad)
        ctx.reduction = reduction
        return torch.from_numpy(np.asarray(loss))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":  # one incoming gradient per row
            grad = ctx.grad * grad_output[:, None]
        else:
            grad = ctx.grad * grad_output
        return grad, None, None, None, None, None


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    """Drop-in for ``torch.nn.functional.cross_entropy`` (same arguments, same order).

    CPU float32/float64 input of shape (N, K) with (N,) integer class targets or (N, K)
    probability targets runs on fastsce's kernels; anything else falls back to
    ``torch.nn.functional.cross_entropy`` (see the module docstring). Returns a tensor
    of the input's dtype: 0-d for "mean"/"sum", (N,) for "none".
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
    return torch.from_numpy(np.asarray(loss))


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (same constructor, buffers and state
    dict) whose forward is :func:`fastsce.torch.cross_entropy`."""

    def forward(self, input, target):
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
