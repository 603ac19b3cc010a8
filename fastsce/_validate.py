"""Argument checking shared by the fast API and the NumPy reference.

Both raise the same exception on the same bad input, so a reference-vs-fast check
never disagrees about what is legal. Everything here is O(N + K): the (N, K) logits
are only looked at through their shape, dtype and layout.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class Problem:
    """Validated, normalised arguments of one cross-entropy call."""

    logits: np.ndarray  # (N, K) float32/float64, as given (any layout)
    target: np.ndarray  # (N,) int32/int64 class indices, or (N, K) probabilities in logits' dtype
    soft: bool  # True for probability targets
    weight: np.ndarray | None  # (K,) in logits' dtype, or None
    ignore_index: int
    reduction: str
    label_smoothing: float
    given: dict  # the user's target and weight arrays before conversion, for overlap checks

    @property
    def shape(self) -> tuple[int, int]:
        return self.logits.shape


def check_problem(logits, target, weight, ignore_index, reduction, label_smoothing) -> Problem:
    logits = _check_logits(logits)
    given = {"target": np.asarray(target), "weight": None if weight is None else np.asarray(weight)}
    target, soft = _check_target(given["target"], logits)
    weight = _check_weight(given["weight"], logits)
    ignore_index = _check_ignore_index(ignore_index)
    if soft and ignore_index != -100:  # as PyTorch: probabilities have no class to ignore
        raise ValueError(
            f"ignore_index={ignore_index} only applies to class-index targets; target has "
            f"shape {target.shape} (probabilities). Leave ignore_index at its default -100"
        )
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    label_smoothing = _check_label_smoothing(label_smoothing)
    return Problem(logits, target, soft, weight, ignore_index, reduction, label_smoothing, given)


def check_labels(problem: Problem, first_bad_row: int | None = None) -> None:
    """IndexError naming the first class index outside [0, K) that is not ignore_index.

    first_bad_row: that row (-1 for none) when the caller has found it already; the fast
    path does, in the compiled pass that also sums the label weights."""
    if problem.soft:
        return
    target, k = problem.target, problem.shape[1]
    if first_bad_row is None:
        bad = (target != problem.ignore_index) & ((target < 0) | (target >= k))
        first_bad_row = int(np.argmax(bad)) if bad.any() else -1
    if first_bad_row >= 0:
        raise IndexError(
            f"target[{first_bad_row}] = {int(target[first_bad_row])} is not a class index for logits "
            f"with K={k} classes: labels must lie in [0, {k - 1}] or equal "
            f"ignore_index={problem.ignore_index}"
        )


def check_out(out, problem: Problem) -> np.ndarray:
    """The gradient buffer: (N, K), logits' dtype, C-contiguous, writeable.

    It may be the logits array itself (in-place gradient); otherwise it must not
    overlap any input, because the kernel writes it while still reading them.
    """
    logits = problem.logits
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy.ndarray; got {type(out).__name__}")
    if out.shape != logits.shape:
        raise ValueError(
            f"out has shape {out.shape} but logits have shape {logits.shape}; "
            "allocate out with np.empty_like(logits)"
        )
    if out.dtype != logits.dtype:
        raise ValueError(f"out has dtype {out.dtype} but logits have dtype {logits.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous; allocate it with np.empty_like(logits, order='C')")
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")
    in_place = same_memory(out, logits)
    if not in_place and np.shares_memory(out, logits):
        raise ValueError("out overlaps logits without being logits itself; pass out=logits or a separate array")
    for name, arr in problem.given.items():
        if arr is not None and np.shares_memory(out, arr):
            raise ValueError(f"out overlaps {name}; pass a separate array as out")
    return out


def same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def _check_logits(logits) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32 or float64; got dtype {logits.dtype}. "
            "Convert with logits.astype(np.float32)"
        )
    if logits.ndim != 2:
        raise ValueError(
            f"logits must be 2-D with shape (N, K); got shape {logits.shape}. "
            "Reshape with logits.reshape(-1, K)"
        )
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class; got shape {logits.shape}")
    return logits


def _check_target(target, logits: np.ndarray) -> tuple[np.ndarray, bool]:
    target = np.asarray(target)
    n, k = logits.shape
    if target.shape == logits.shape:  # class probabilities, as PyTorch decides: by shape
        if target.dtype.kind != "f":
            raise TypeError(
                f"target of shape {target.shape} (same as logits) holds class probabilities "
                f"and must be a float array; got dtype {target.dtype}. For class indices "
                "pass a 1-D integer array of shape (N,)"
            )
        # Probabilities of another float dtype are converted to the logits' dtype (a copy).
        return target.astype(logits.dtype, copy=False), True
    if target.shape != (n,):
        raise ValueError(
            f"target has shape {target.shape} but logits have shape {logits.shape}; "
            f"target must be class indices of shape ({n},) or probabilities of shape {logits.shape}"
        )
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"target of shape {target.shape} holds class indices and must be an integer array; "
            f"got dtype {target.dtype}. Convert with target.astype(np.int64)"
        )
    if target.dtype == np.uint64 and n and target.max() > np.iinfo(np.int64).max:
        row = int(np.argmax(target > np.iinfo(np.int64).max))
        raise IndexError(f"target[{row}] = {int(target[row])} is not a class index for K={k} classes")
    # The kernels take int32 and int64 labels as they are; others become int64.
    native = target.dtype if target.dtype in (np.dtype(np.int32), np.dtype(np.int64)) else np.int64
    return np.ascontiguousarray(target, dtype=native), False


def _check_weight(weight, logits: np.ndarray) -> np.ndarray | None:
    if weight is None:
        return None
    weight = np.asarray(weight)
    k = logits.shape[1]
    if weight.dtype.kind not in "iuf":
        raise TypeError(f"weight must be a real numeric array; got dtype {weight.dtype}")
    if weight.shape != (k,):
        raise ValueError(
            f"weight has shape {weight.shape} but logits have shape {logits.shape}; "
            f"weight must have one entry per class, shape ({k},)"
        )
    bad = ~np.isfinite(weight) | (weight < 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"weight[{j}] = {weight[j]!r}; class weights must be finite and >= 0")
    return np.ascontiguousarray(weight, dtype=logits.dtype)


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer; got {ignore_index!r}")
    info = np.iinfo(np.int64)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"ignore_index must fit in a 64-bit integer; got {ignore_index!r}")
    return int(ignore_index)


def _check_label_smoothing(label_smoothing) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1]; got {label_smoothing!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:  # also rejects NaN
        raise ValueError(f"label_smoothing must lie in [0, 1]; got {label_smoothing!r}")
    return label_smoothing
