"""Plain NumPy softmax cross-entropy, written straight from the formulas.

This is the oracle the fast kernels are tested against and the baseline they are
benchmarked against. It takes the same arguments, raises the same errors and returns
the same things as :func:`fastsce.cross_entropy` / :func:`fastsce.cross_entropy_with_grad`.
It works in the logits' dtype (as PyTorch does) with (N, K) temporaries, and sums
the batch in float64.

Notation: z = logits, log p = log_softmax(z), w = class weights (ones if None),
eps = label_smoothing, K = number of classes, D = the "mean" denominator.
"""

from __future__ import annotations

import numpy as np

from fastsce._validate import Problem, check_labels, check_out, check_problem

__all__ = ["cross_entropy", "cross_entropy_with_grad", "TOLERANCE"]

# How closely fastsce matches this reference, per logits dtype, for np.allclose /
# np.testing.assert_allclose. The reference rounds in the logits' dtype at every step
# (as PyTorch does), so float32 differences are a few float32 ulps of O(1) quantities.
TOLERANCE = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-14),
}


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Loss only; see :func:`fastsce.cross_entropy`."""
    problem = check_problem(logits, target, weight, ignore_index, reduction, label_smoothing)
    check_labels(problem)
    return _solve(problem, want_grad=False)[0]


def cross_entropy_with_grad(
    logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, out=None
):
    """Loss and gradient; see :func:`fastsce.cross_entropy_with_grad`."""
    problem = check_problem(logits, target, weight, ignore_index, reduction, label_smoothing)
    check_labels(problem)
    if out is not None:
        check_out(out, problem)
    loss, grad = _solve(problem, want_grad=True)
    if out is not None:
        out[...] = grad
        grad = out
    return loss, grad


def _times(a, b):
    """a * b with 0 * inf = 0: a zero weight or probability removes a -inf log-probability
    (as in scipy.special.xlogy). NaN stays NaN."""
    with np.errstate(invalid="ignore"):
        return np.where((a == 0) & np.isinf(b), 0, a * b)


def _solve(problem: Problem, want_grad: bool):
    z = problem.logits
    n, k = z.shape
    dtype = z.dtype
    eps = problem.label_smoothing
    w = np.ones(k, dtype) if problem.weight is None else problem.weight

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        shifted = z - z.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        p = np.exp(log_p)

        if problem.soft:
            # l_n = -sum_j w_j t_nj log p_nj, with t smoothed to (1 - eps) t + eps / K
            t = problem.target
            if eps > 0:
                t = (1 - eps) * t + dtype.type(eps / k)
            counted = np.ones(n, dtype=bool)  # ignore_index does not apply to probabilities
            row_loss = -_times(w * t, log_p).sum(axis=1)
            denominator = float(n)
            # d l_n / d z_nj = p_nj sum_k w_k t_nk - w_j t_nj
            grad = p * (w * t).sum(axis=1, keepdims=True) - w * t if want_grad else None
        else:
            # l_n = (1 - eps) w_y (-log p_ny) + (eps / K) sum_j w_j (-log p_nj), 0 for ignored rows
            counted = problem.target != problem.ignore_index
            y = np.where(counted, problem.target, 0)
            w_y = np.where(counted, w[y], 0).astype(dtype)
            rows = np.arange(n)
            row_loss = _times(w_y, -log_p[rows, y])
            if eps > 0:
                row_loss = (1 - eps) * row_loss + eps / k * -_times(w, log_p).sum(axis=1)
            denominator = float(w_y.sum(dtype=np.float64))
            if want_grad:
                one_hot = np.zeros_like(z)
                one_hot[rows, y] = 1
                # d l_n / d z_nj = (1 - eps) w_y (p_nj - [j = y]) + (eps / K) (p_nj sum_k w_k - w_j)
                grad = w_y[:, None] * (p - one_hot)
                if eps > 0:
                    grad = (1 - eps) * grad + eps / k * (p * w.sum() - w)
            else:
                grad = None

        row_loss = np.where(counted, row_loss, 0).astype(dtype)
        if problem.reduction == "none":
            loss, scale = row_loss, 1.0
        elif problem.reduction == "sum":
            loss, scale = dtype.type(row_loss.sum(dtype=np.float64)), 1.0
        else:  # "mean": 0 / 0 = NaN when nothing is counted, as in PyTorch
            total = row_loss.sum(dtype=np.float64)
            loss = dtype.type(total / denominator if denominator else np.nan)
            scale = 1.0 / denominator if denominator else np.nan
        if grad is not None:
            grad = np.where(counted[:, None], grad * scale, 0).astype(dtype)
    return loss, grad
