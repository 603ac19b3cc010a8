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

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy"]

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

    def forward(self, input, target):
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


# --- linear_cross_entropy: the loss of a linear head from its input (fastsce.linear) ---------
# Kept apart from cross_entropy above: its own autograd Function and helpers.

_LINEAR_EXTRAS = ("z_loss", "logit_scale", "softcap", "sample_weight", "where", "all_ignored", "chunk_rows", "denominator")


def _linear_supported(input, linear_weight, target, linear_bias, weight) -> bool:
    tensors = (input, linear_weight, target) + tuple(t for t in (linear_bias, weight) if t is not None)
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors):
        return False
    if input.dtype not in (torch.float32, torch.float64) or input.ndim not in (1, 2):
        return False
    if linear_weight.dtype != input.dtype or (linear_bias is not None and linear_bias.dtype != input.dtype):
        return False
    if target.requires_grad or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        return False
    if weight is not None and (weight.requires_grad or not weight.is_floating_point()):
        return False
    return True


def _linear_arrays(input, linear_weight, target, linear_bias, weight, extras):
    """The NumPy views and options fastsce.linear takes (weights converted like cross_entropy's)."""
    extras = {k: _numpy(v) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
    return (
        _numpy(input), _numpy(linear_weight), _numpy(target),
        dict(
            linear_bias=None if linear_bias is None else _numpy(linear_bias),
            weight=None if weight is None else _numpy(weight).astype(np.float64),
            **extras,
        ),
    )  # fmt: skip


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, for "mean"/"sum", the gradients that are needed
    (backward scales them by the incoming scalar). For "none" backward computes them,
    a second pass, with the incoming per-row gradient as row weights (its positive and
    negative parts apart: row weights are >= 0)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, options):
        from fastsce import linear

        h, w, y, kwargs = _linear_arrays(input, linear_weight, target, linear_bias, weight, options)
        want = tuple(ctx.needs_input_grad[:3])
        setup = linear._linear_setup(h, w, y, kwargs)
        ctx.reduction = kwargs.get("reduction", "mean")
        if ctx.reduction == "none":
            loss, _, _, _ = linear._solve(setup, (False, False, False))
            ctx.arrays, ctx.want = (h, w, y, kwargs), want
            return _tensor(loss)
        loss, grads, _, _ = linear._solve(setup, want)
        ctx.grads = [None if g is None else _tensor(g) for g in grads]
        return _tensor(np.asarray(loss))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        from fastsce import linear

        if ctx.reduction != "none":
            return (*(None if g is None else g * grad_output for g in ctx.grads), None, None, None)
        h, w, y, kwargs = ctx.arrays
        g_out = grad_output.detach().to(torch.float64).reshape(-1).numpy()
        base = linear._linear_setup(h, w, y, kwargs).problem.row_weight
        v = np.ones(g_out.shape) if base is None else base
        total = [None, None, None]
        for sign, part in ((1.0, np.maximum(g_out, 0)), (-1.0, np.maximum(-g_out, 0))):
            if not part.any():
                continue
            parts = dict(kwargs, reduction="sum", where=None, sample_weight=(v * part).reshape(y.shape))
            _, grads, _, _ = linear._solve(linear._linear_setup(h, w, y, parts), ctx.want)
            for i, g in enumerate(grads):
                if g is not None:
                    total[i] = sign * g if total[i] is None else total[i] + sign * g
        shapes = (h.shape, w.shape, None if kwargs["linear_bias"] is None else kwargs["linear_bias"].shape)
        out = []
        for i, wanted in enumerate(ctx.want):
            if not wanted:
                out.append(None)
            else:
                out.append(_tensor(np.zeros(shapes[i], h.dtype) if total[i] is None else total[i]))
        return (*out, None, None, None)


def linear_cross_entropy(
    input,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=None,
    label_smoothing=0.0,
    options=None,
    **fastsce_options,
):
    """Drop-in for ``torch.nn.functional.linear_cross_entropy`` (same arguments), on
    :func:`fastsce.linear_cross_entropy_with_grad`: the logits are never held whole.

    CPU float32 / float64 input (N, H) or (H,), linear_weight (V, H), linear_bias (V,)
    and class-index targets run on fastsce (``options``, PyTorch's chunking options,
    are not needed and ignored); anything else falls back to
    ``torch.nn.functional.linear_cross_entropy``. Gradients flow to input, linear_weight
    and linear_bias, those that require grad; under ``torch.no_grad()`` only the loss is
    computed. Also takes fastsce's options as keywords: z_loss, logit_scale, softcap,
    sample_weight, where, all_ignored, chunk_rows, denominator.
    """
    unknown = set(fastsce_options) - set(_LINEAR_EXTRAS)
    if unknown:
        raise TypeError(f"linear_cross_entropy got unexpected keyword arguments {sorted(unknown)}")
    ignore_index = -100 if ignore_index is None else ignore_index
    if not _linear_supported(input, linear_weight, target, linear_bias, weight):
        if fastsce_options:
            raise ValueError(
                f"fastsce options {sorted(fastsce_options)} need CPU float32 or float64 input (N, H) and "
                "linear_weight (V, H) of one dtype and integer class targets"
            )
        return F.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, options=options,
        )  # fmt: skip
    kwargs = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, **fastsce_options)
    tensors = (input, linear_weight) + (() if linear_bias is None else (linear_bias,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LinearCrossEntropy.apply(input, linear_weight, linear_bias, target, weight, kwargs)
    h, w, y, arrays = _linear_arrays(input, linear_weight, target, linear_bias, weight, kwargs)
    return _tensor(np.asarray(fastsce.linear_cross_entropy(h, w, y, **arrays)))
