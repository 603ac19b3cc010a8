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
that require grad; negative or non-finite weights are computed by PyTorch inside the
same operator.

This module imports torch; ``import fastsce`` does not.
"""

from __future__ import annotations

from typing import Any

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


def _on_numpy(fn, input, target, weight, ignore_index, reduction, label_smoothing, **kwargs):
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
        **kwargs,
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
        if not weight.is_floating_point():
            return False
    return True  # (weights' values are checked inside the operators: see _weights_ok)


def _weights_ok(weight) -> bool:
    """fastsce refuses negative or non-finite class weights; PyTorch takes them. Checked
    inside the operators, as data-dependent branching would break a compiled graph."""
    return weight is None or bool(torch.isfinite(weight).all() and (weight >= 0).all())


def _by_torch(input, target, weight, ignore_index, reduction, label_smoothing, with_grad):
    """(loss, gradient or None) by PyTorch's own cross_entropy: what the operators give
    for weights fastsce refuses. The gradient is that of the loss (of each row's, "none")."""
    z = input.detach().requires_grad_(with_grad)
    with torch.enable_grad():
        loss = F.cross_entropy(
            z, target, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
        grad = torch.autograd.grad(loss, z, torch.ones_like(loss))[0] if with_grad else None
    return loss.detach(), grad


def _rows_shape(input: torch.Tensor) -> tuple[int, ...]:
    """The shape of a per-row loss: the input's without the class dim (dim 1, or dim 0 unbatched)."""
    return tuple(input.shape[:1] + input.shape[2:]) if input.ndim > 1 else ()


# The kernels as PyTorch operators (torch.library.custom_op): torch.compile sees each as one
# opaque call with a known output shape (its fake implementation) and its autograd formula,
# instead of tracing into NumPy and breaking the graph.
@torch.library.custom_op("fastsce::cross_entropy", mutates_args=())
def _loss_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    if not _weights_ok(weight):
        return _by_torch(input, target, weight, ignore_index, reduction, label_smoothing, False)[0]
    return _tensor(_on_numpy(fastsce.cross_entropy, input, target, weight, ignore_index, reduction, label_smoothing))


@torch.library.custom_op("fastsce::cross_entropy_with_grad", mutates_args=())
def _loss_grad_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss, and the gradient its backward scales (computed in the same pass)."""
    if not _weights_ok(weight):
        return _by_torch(input, target, weight, ignore_index, reduction, label_smoothing, True)
    loss, grad = _on_numpy(
        fastsce.cross_entropy_with_grad, input, target, weight, ignore_index, reduction, label_smoothing
    )
    return _tensor(loss), _tensor(grad)


@torch.library.custom_op("fastsce::cross_entropy_grad_", mutates_args=("input",))
def _grad_in_place_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> None:
    """Overwrites the input (contiguous) with the gradient of the loss."""
    if not _weights_ok(weight):
        input.copy_(_by_torch(input, target, weight, ignore_index, reduction, label_smoothing, True)[1])
        return
    z = _numpy(input)
    _on_numpy(fastsce.cross_entropy_with_grad, input, target, weight, ignore_index, reduction, label_smoothing, out=z)


@_loss_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing):
    return input.new_empty(_rows_shape(input) if reduction == "none" else ())


@_loss_grad_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing):
    loss = input.new_empty(_rows_shape(input) if reduction == "none" else ())
    return loss, torch.empty(input.shape, dtype=input.dtype)


@_grad_in_place_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing):
    return None


_DOUBLE_BACKWARD = (
    "fastsce.torch.cross_entropy has no second derivative (backward with create_graph=True, "
    "e.g. for a gradient penalty): its gradient comes from fastsce's kernels, outside "
    "autograd. Use torch.nn.functional.cross_entropy where the gradient is differentiated."
)


def _scale(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """The saved gradient times the incoming one (one per row for "none")."""
    if reduction == "none" and grad.ndim > 1:
        grad_output = grad_output.unsqueeze(1)
    return grad * grad_output


def _is_one(grad_output: torch.Tensor) -> bool:
    """Whether an eager incoming gradient is the scalar 1 (never asked of the tensors a
    compiler traces with, whose values are unknown)."""
    eager = type(grad_output) is torch.Tensor and not torch.compiler.is_compiling()
    return eager and grad_output.ndim == 0 and bool(grad_output == 1)


def _setup_loss_grad(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.reduction = inputs[4]


def _backward_loss_grad(ctx, grad_output, _):
    if torch.is_grad_enabled():  # create_graph=True: a gradient of the gradient would miss a term
        raise RuntimeError(_DOUBLE_BACKWARD)
    (grad,) = ctx.saved_tensors
    if _is_one(grad_output):
        return grad, None, None, None, None, None  # a plain loss.backward(): no (N, K) product
    return _scale(grad, grad_output, ctx.reduction), None, None, None, None, None


_loss_grad_op.register_autograd(_backward_loss_grad, setup_context=_setup_loss_grad)


class _InPlaceBackward(torch.autograd.Function):
    """inplace_backward=True: only the loss in forward (the logits are left as they are);
    backward writes the gradient over the logits' storage and returns that storage."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing):
        ctx.save_for_backward(input, target, weight)
        ctx.args = ignore_index, reduction, label_smoothing
        return _loss_op(input, target, weight, ignore_index, reduction, label_smoothing)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        input, target, weight = ctx.saved_tensors
        ignore_index, reduction, label_smoothing = ctx.args
        grad = input.detach()
        if not grad.is_contiguous():  # then a contiguous copy takes the gradient
            grad = grad.contiguous()
        _grad_in_place_op(grad, target, weight, ignore_index, reduction, label_smoothing)
        if reduction == "none" and grad.ndim > 1:
            grad.mul_(grad_output.unsqueeze(1))
        elif not _is_one(grad_output):  # a plain loss.backward() skips this pass
            grad.mul_(grad_output)
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
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.cross_entropy`` (same arguments, same order).

    CPU input (N, K), (N, K, d1, ...) or (K,) with integer class targets (the input's
    shape without dim 1) or probability targets (the input's shape) runs on fastsce's
    kernels; anything else falls back to ``torch.nn.functional.cross_entropy`` (see the
    module docstring). Returns a tensor of the input's dtype (float32 under CPU autocast,
    as PyTorch's): 0-d for "mean"/"sum", the target's shape for "none".

    inplace_backward : bool, keyword only
        Backward writes the gradient over the input's storage (when it is contiguous) and
        returns it, so no (N, K) gradient buffer is allocated; forward computes only the
        loss. After backward the input holds the gradient, not the logits: use it only when
        nothing needs the logits after backward (autograd does not, for the usual
        ``cross_entropy(model(x), y, inplace_backward=True).backward()``). Ignored under
        ``torch.compile``, whose compiled graph plans its own buffers.
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
    if torch.is_autocast_enabled("cpu"):  # cross_entropy is on autocast's float32 list
        input, target, weight = (_autocast_float32(t) for t in (input, target, weight))
    args = (input, target, weight, ignore_index, reduction, label_smoothing)
    if not (torch.is_grad_enabled() and input.requires_grad):
        return _loss_op(*args)
    if inplace_backward and not torch.compiler.is_compiling():  # compiled graphs plan their own buffers
        return _InPlaceBackward.apply(*args)
    return _loss_grad_op(*args)[0]


def _autocast_float32(t):
    """A float16 / bfloat16 tensor as float32, as autocast casts the arguments of its
    float32 operators (differentiably: the gradient flows back in the tensor's dtype)."""
    if t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (same constructor, buffers and state
    dict) whose forward is :func:`fastsce.torch.cross_entropy`; ``inplace_backward``
    (keyword only) as there."""

    def __init__(self, *args, inplace_backward: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward,
        )


# --- linear_cross_entropy: the loss of a linear head from its input (fastsce.linear) ---------
# Kept apart from cross_entropy above: its own autograd Function and helpers.

_LINEAR_EXTRAS = (
    "z_loss", "logit_scale", "softcap", "sample_weight", "where", "all_ignored", "chunk_rows", "chunk_classes",
    "denominator",
)  # fmt: skip


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
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    **fastsce_options: Any,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.linear_cross_entropy`` (same arguments), on
    :func:`fastsce.linear_cross_entropy_with_grad`: the logits are never held whole.

    CPU float32 / float64 input (N, H) or (H,), linear_weight (V, H), linear_bias (V,)
    and class-index targets run on fastsce (``options``, PyTorch's chunking options,
    are not needed and ignored); anything else falls back to
    ``torch.nn.functional.linear_cross_entropy``. Gradients flow to input, linear_weight
    and linear_bias, those that require grad; under ``torch.no_grad()`` only the loss is
    computed. Also takes fastsce's options as keywords: z_loss, logit_scale, softcap,
    sample_weight, where, all_ignored, chunk_rows, chunk_classes, denominator.
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
