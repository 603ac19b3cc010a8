"""softmax, log_softmax and logsumexp over any axis of any array, on the fused kernels.

Validate and normalise in Python, then dispatch to fastsce._kernels.softmax a block of
rows at a time (fastsce._layout): class-last C-contiguous float32/float64 input is the
fast path; another class axis, another layout or float16 / bfloat16 (computed in
float32) is copied a block of rows at a time.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from fastsce import _threads, api
from fastsce._kernels import softmax as softmax_kernels
from fastsce._layout import row_blocks
from fastsce._typing import Array, ArrayLike
from fastsce._validate import as_array, check_no_self_overlap, is_float, native, same_memory

__all__ = ["softmax", "log_softmax", "logsumexp"]


def softmax(x: ArrayLike, axis: int = -1, *, out: Array | None = None) -> Array:
    """exp(x - max) / sum(exp(x - max)) along ``axis``, as ``torch.softmax(x, axis)``.

    Parameters
    ----------
    x : float32, float64, float16 or bfloat16 array, any shape and layout
        float16 and bfloat16 (an ``ml_dtypes`` array) are computed in float32.
    axis : int
        The axis to normalise over.
    out : array of x's shape and dtype, optional
        Where to write the result (any layout); ``out=x`` computes it in place.

    Returns
    -------
    An array of x's shape and dtype (``out`` when given). A row holding a NaN or +inf,
    or only -inf, is all NaN (as in PyTorch); -inf entries elsewhere give 0.
    """
    return _rows(softmax_kernels.softmax, "softmax", x, axis, out)


def log_softmax(x: ArrayLike, axis: int = -1, *, out: Array | None = None) -> Array:
    """(x - max) - log(sum(exp(x - max))) along ``axis``, as ``torch.log_softmax(x, axis)``.

    Takes the arguments of :func:`softmax`. A row holding a NaN or +inf, or only -inf,
    is all NaN (as in PyTorch; SciPy gives -inf next to a +inf); -inf entries elsewhere
    stay -inf.
    """
    return _rows(softmax_kernels.log_softmax, "log_softmax", x, axis, out)


def logsumexp(
    x: ArrayLike, axis: int = -1, *, keepdims: bool = False, out: Array | None = None
) -> np.floating[Any] | Array:
    """log(sum(exp(x))) along ``axis``, without overflow, as ``torch.logsumexp(x, axis)``.

    Parameters
    ----------
    x : float32, float64, float16 or bfloat16 array, any shape and layout
    axis : int
    keepdims : bool
        Keep ``axis`` with length 1 in the result.
    out : array of the result's shape and x's dtype, optional

    Returns
    -------
    An array of x's dtype, x's shape without ``axis`` (``out`` when given); a NumPy
    scalar for 1-D x. A row holding a NaN gives NaN, else +inf if it holds +inf, -inf
    if it is all -inf (or empty).
    """
    if not isinstance(keepdims, (bool, np.bool_)):
        raise TypeError(f"logsumexp: keepdims must be True or False; got {keepdims!r}")
    x, axis, compute = _check_x(x, axis, "logsumexp")
    shape = x.shape[:axis] + ((1,) if keepdims else ()) + x.shape[axis + 1 :]
    if out is not None:
        _check_out(out, x, shape, "logsumexp", allow_x=False)
    rows = np.moveaxis(x, axis, -1)
    k = rows.shape[-1]
    lse = np.empty(int(np.prod(rows.shape[:-1], dtype=np.int64)), compute)
    if k == 0:  # the sum of no terms is 0
        lse[:] = -np.inf
    else:
        long_rows, chunk_rows = _row_options(k, compute)
        with _threads.launching(x.size) as pick:  # the pool, or the serial twin
            for r0, r1, z, _, _ in row_blocks(rows, compute, api.COPY_BLOCK_LOGITS):
                pick(softmax_kernels.logsumexp)(z, lse[r0:r1], chunk_rows, long_rows)
    result = lse.reshape(shape)
    if out is not None:
        out[...] = result  # rounded to float16 / bfloat16 here, once
        return out
    result = result.astype(native(x.dtype), copy=False)
    return result[()] if result.ndim == 0 else result


def _rows(kernel, name, x, axis, out):
    x, axis, compute = _check_x(x, axis, name)
    if out is None:
        out = np.empty(x.shape, native(x.dtype))
    else:
        _check_out(out, x, x.shape, name, allow_x=True)
    rows = np.moveaxis(x, axis, -1)
    k = rows.shape[-1]
    if x.size == 0:
        return out
    long_rows, chunk_rows = _row_options(k, compute)
    out_rows = np.moveaxis(out, axis, -1)
    with _threads.launching(x.size) as pick:  # the pool, or the serial twin
        for _, _, z, _, (o,) in row_blocks(rows, compute, api.COPY_BLOCK_LOGITS, outputs=(out_rows,)):
            pick(kernel)(z, o, chunk_rows, same_memory(o, z), long_rows)
    return out


def _row_options(k: int, compute: np.dtype) -> tuple[bool, int]:
    """(long_rows, chunk_rows): the thresholds of the loss kernels (fastsce.api)."""
    return k * compute.itemsize > api.LONG_ROW_BYTES, max(1, api.ROW_CHUNK_LOGITS // k)


# --- argument checks ---------------------------------------------------------------------


def _check_x(x, axis, name: str) -> tuple[np.ndarray, int, np.dtype]:
    """(x as an array, axis in [0, ndim), compute dtype)."""
    x = as_array("x", x)
    if not is_float(x.dtype):
        raise TypeError(
            f"{name}: x must be float16, bfloat16, float32 or float64; got dtype {x.dtype}. "
            "Convert with x.astype(np.float32)"
        )
    if x.ndim == 0:
        raise ValueError(f"{name}: x must have at least one axis; got a 0-d array. Pass x.reshape(1)")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name}: axis must be an integer; got {axis!r}. For several axes, reshape x so they are one")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name}: axis={axis} is out of range for x of shape {x.shape}; use -{x.ndim} <= axis < {x.ndim}")
    compute = np.dtype(np.float64) if native(x.dtype) == np.float64 else np.dtype(np.float32)
    return x, int(axis) % x.ndim, compute


def _check_out(out, x: np.ndarray, shape: tuple[int, ...], name: str, allow_x: bool) -> None:
    """out: an ndarray of the result's shape and x's dtype (any layout, either byte order),
    writeable, without overlapping elements, and either x itself (``allow_x``: in place)
    or not overlapping x."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: out must be a numpy.ndarray; got {type(out).__name__}")
    as_array("out", out)
    if out.shape != shape:
        raise ValueError(f"{name}: out has shape {out.shape} but the result has shape {shape}; allocate out with that shape")
    if native(out.dtype) != native(x.dtype):
        raise ValueError(f"{name}: out has dtype {out.dtype} but the result has x's dtype {x.dtype}; allocate out with that dtype")
    if not out.flags.writeable:
        raise ValueError(f"{name}: out is read-only; pass a writeable array")
    check_no_self_overlap("out", out, f"{name}: ")
    if allow_x and same_memory(out, x):
        return
    if np.shares_memory(out, x):
        if allow_x:
            raise ValueError(f"{name}: out overlaps x without being x itself; pass out=x to compute in place, or a separate array")
        raise ValueError(f"{name}: out overlaps x; pass a separate array")
