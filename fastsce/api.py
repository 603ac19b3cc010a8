"""Public API: validate, normalise, dispatch to the fused kernels, reduce."""

from __future__ import annotations

import functools
import threading

import numpy as np

from fastsce import _kernels, _small_k
from fastsce._validate import Problem, check_labels, check_out, check_problem, same_memory

__all__ = ["cross_entropy", "cross_entropy_with_grad"]

# Numba's default "workqueue" thread pool aborts on concurrent launches from several
# Python threads. Each call already uses every core, so serialising launches costs nothing.
_launch_lock = threading.Lock()

# A gradient row longer than this is computed in two reads of the logits instead of
# three passes (the third would miss the cache): see _kernels.hard_loss_grad.
LONG_ROW_BYTES = 1 << 20

# Rows per prange chunk of the row-wise kernels: about this many logits, at least one row.
ROW_CHUNK_LOGITS = 1 << 16

# Up to these K, integer-target rows are vectorised across rows (fastsce._small_k)
# rather than along them: the measured break-even (2 threads, N * K ~ 1.6M; e.g.
# float32 loss+grad at K=128: 2.84x memcpy across rows, 3.34x along; at K=160: 3.46x, 3.23x).
SMALL_K = {  # logits dtype: (loss only, loss and gradient)
    np.dtype(np.float32): (200, 128),
    np.dtype(np.float64): (200, 100),
}


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Softmax cross-entropy loss of a batch of logits, with PyTorch's semantics.

    Parameters
    ----------
    logits : (N, K) float32 or float64 array
        Unnormalised scores. C-contiguous is the fast path; other layouts are copied once.
        ``-inf`` marks a masked class.
    target : (N,) integer array of class indices, or (N, K) float array of probabilities
        Told apart by shape, as in ``torch.nn.functional.cross_entropy``. Probabilities
        of another float dtype are converted to the logits' dtype.
    weight : (K,) array, optional
        Non-negative, finite per-class weights (converted to the logits' dtype).
    ignore_index : int
        Rows whose class index equals this contribute nothing. As in PyTorch, only the
        default -100 is accepted with probability targets.
    reduction : {"mean", "sum", "none"}
        "mean" divides by the summed weight of the counted rows (N for probabilities).
    label_smoothing : float in [0, 1]
        Mixes the target with the uniform distribution over the K classes.

    Returns
    -------
    loss : scalar of the logits' dtype, or (N,) array for ``reduction="none"``.

    Only the loss is computed: no gradient is formed or written.
    """
    problem = check_problem(logits, target, weight, ignore_index, reduction, label_smoothing)
    return _run(problem, *_weights(problem), grad=None)


def cross_entropy_with_grad(
    logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, out=None
):
    """Loss and its gradient with respect to the logits, in one fused pass per row.

    Takes the arguments of :func:`cross_entropy`, plus:

    out : (N, K) C-contiguous writeable array of the logits' dtype, optional
        Where to write the gradient. ``out=logits`` computes it in place, overwriting
        the logits and allocating no second (N, K) buffer.

    Returns
    -------
    (loss, grad) : ``grad`` has the logits' shape and dtype (it is ``out`` when given).
        For ``reduction="none"`` row n of ``grad`` is the gradient of row n's loss.
    """
    problem = check_problem(logits, target, weight, ignore_index, reduction, label_smoothing)
    weights = _weights(problem)
    if out is None:
        out = np.empty(problem.shape, problem.logits.dtype)
    else:
        check_out(out, problem)
    return _run(problem, *weights, grad=out), out


@functools.lru_cache(maxsize=8)
def _ones(k: int, dtype: np.dtype) -> np.ndarray:
    """The weights of an unweighted call, kept: no K-sized allocation per call. (Left
    writeable, as user weights are, so the kernels compile once for both; never exposed.)"""
    return np.ones(k, dtype)


def _weights(problem: Problem):
    """(class weights, their float64 sum, the "mean" denominator), checking the labels
    in the same compiled pass over them."""
    n, k = problem.shape
    dtype = problem.logits.dtype
    if problem.weight is None:
        w, w_sum = _ones(k, dtype), float(k)
    else:
        w, w_sum = problem.weight, _kernels.float64_sum(problem.weight)
    if problem.soft:
        return w, w_sum, float(n)
    bad_row, denominator = _kernels.label_stats(problem.target, k, problem.ignore_index, w)
    check_labels(problem, bad_row)
    return w, w_sum, denominator


def _run(problem: Problem, w: np.ndarray, w_sum: float, denominator: float, grad: np.ndarray | None):
    n, k = problem.shape
    z = np.ascontiguousarray(problem.logits)  # no copy on the fast path (and for out=logits)
    dtype = z.dtype
    eps = problem.label_smoothing
    small = not problem.soft and k <= SMALL_K[dtype][grad is not None]
    # Fixed chunks of rows, whose float64 loss sums are added up here: a function of K
    # only, so the total is the same for any thread count, with O(N / chunk) memory.
    chunk_rows = _small_k.CHUNK_ROWS if small else max(1, ROW_CHUNK_LOGITS // k)
    chunk_loss = np.empty(-(-n // chunk_rows), np.float64)
    row_loss = np.empty(n if problem.reduction == "none" else 0, dtype)
    losses = (chunk_rows, row_loss, chunk_loss)

    if problem.reduction == "mean":
        scale = 1.0 / denominator if denominator else np.nan  # 0 / 0, as PyTorch
    else:
        scale = 1.0

    with _launch_lock:
        if problem.soft:
            t = np.ascontiguousarray(problem.target)
            if grad is None:
                _kernels.soft_loss(z, t, w, eps, *losses)
            else:
                _kernels.soft_loss_grad(z, t, w, eps, scale, *losses, grad)
        else:
            args = (z, problem.target, problem.ignore_index, w, w_sum, eps)
            kernels = _small_k if small else _kernels
            if grad is None:
                kernels.hard_loss(*args, *losses)
            elif small:
                _small_k.hard_loss_grad(*args, scale, *losses, grad, same_memory(grad, z))
            else:
                long_rows = k * dtype.itemsize > LONG_ROW_BYTES
                _kernels.hard_loss_grad(*args, scale, *losses, grad, same_memory(grad, z), long_rows)

    if problem.reduction == "none":
        return row_loss
    total = chunk_loss.sum()  # float64, in a fixed order
    with np.errstate(over="ignore"):  # a float32 loss beyond 3.4e38 is inf, quietly
        if problem.reduction == "sum":
            return dtype.type(total)
        return dtype.type(total / denominator if denominator else np.nan)
