"""Argument checking shared by the fast API and the NumPy reference.

Both raise the same exception on the same bad input, so a reference-vs-fast check
never disagrees about what is legal. Everything here is O(N + K): the (N, K) logits
are only looked at through their shape, dtype and layout.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from fastsce._layout import read_only

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
HALF_DTYPE_NAMES = ("float16", "bfloat16")  # bfloat16: ml_dtypes' NumPy dtype, when given one
REDUCTIONS = ("mean", "sum", "none")
ALL_IGNORED = ("nan", "zero")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1  # (np.iinfo is ~5 us a call)
_F64_MAX = float(np.finfo(np.float64).max)

# Class weights whose largest lies outside these bounds (per compute dtype), and row
# weights (float64) whose largest lies outside the float64 ones, are scaled by a power of
# two (exactly) so it lands in [1, 2): the compute dtype then holds them (float32 cannot
# hold 1e300) and the float64 "mean" denominators (sums of v w) and 1 / D neither
# overflow nor underflow. Only then: scaling loses class weights below 2^-149 (float32)
# times the largest, which unscaled weights of an ordinary range keep.
_WEIGHT_RANGE = {np.dtype(np.float32): (2.0**-100, 2.0**100), np.dtype(np.float64): (2.0**-500, 2.0**500)}

# How to drop a masked array's mask into a plain one, per argument (see as_array).
_MASK_FIXES = {
    "logits": "logits.filled(-np.inf) to mask classes, or where= to skip rows",
    "logits_shard": "logits_shard.filled(-np.inf) to mask classes",
    "x": "x.filled(-np.inf) to mask entries",
    "target": "target.filled(0) with where=~target.mask to skip the masked rows",
    "weight": "weight.filled(0)",
    "sample_weight": "sample_weight.filled(0)",
    "where": "where.filled(False)",
    "out": "a plain numpy.ndarray",
}


def native(dtype: np.dtype) -> np.dtype:
    """dtype in this machine's byte order: arrays of the other order are computed (and
    their results returned) as their native equivalent."""
    return dtype.newbyteorder("=")


def as_array(name: str, a) -> np.ndarray:
    """np.asarray(a), refusing numpy.ma masked arrays: their mask would be dropped silently."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma masked array; fastsce does not apply masks (the mask would be "
            f"ignored). Pass {_MASK_FIXES.get(name, f'{name}.filled(...)')}"
        )
    return np.asarray(a)


def check_no_self_overlap(name: str, out: np.ndarray, prefix: str = "") -> None:
    """ValueError unless distinct indices of ``out`` are distinct memory: a kernel writing
    one element would otherwise change another it has still to read or write.

    Sufficient test: with the axes sorted by |stride|, each stride clears the extent of
    the smaller ones (true of every layout NumPy makes: C, F, transposes, slices)."""
    if out.size == 0:  # no elements, nothing to overlap (NumPy gives them zero strides)
        return
    flags = out.flags
    if flags.c_contiguous or flags.f_contiguous:  # every element its own memory (the usual case)
        return
    extent = out.itemsize
    for n, stride in sorted(((n, abs(st)) for n, st in zip(out.shape, out.strides) if n > 1), key=lambda t: t[1]):
        if stride < extent:
            raise ValueError(
                f"{prefix}{name} has overlapping elements (shape {out.shape}, strides {out.strides}): "
                f"writing one would change another. Pass an array that owns its memory, e.g. {name}.copy()"
            )
        extent += stride * (n - 1)


@dataclass(frozen=True)
class Problem:
    """Validated, normalised arguments of one cross-entropy call.

    The logits are seen as M rows of K classes: ``rows`` is the logits with the class
    axis moved last (a view), of shape lead + (K,), M = prod(lead).
    """

    logits: np.ndarray  # as given: any shape with the class axis at ``axis``, any layout
    axis: int  # the class axis, in [0, logits.ndim)
    rows: np.ndarray  # np.moveaxis(logits, axis, -1): lead + (K,)
    target: np.ndarray  # (M,) int32/int64 class indices, or probabilities shaped like ``rows``
    soft: bool  # True for probability targets
    weight: np.ndarray | None  # (K,) in the compute dtype, or None (see scale_weights)
    ignore_index: int
    reduction: str
    label_smoothing: float
    row_weight: np.ndarray | None  # (M,) float64: sample_weight * where, or None (see scale_weights)
    z_loss: float  # (see scale_weights)
    logit_scale: float | None
    softcap: float | None
    all_ignored: str
    compute: np.dtype  # float32 (also for float16/bfloat16 logits) or float64
    result: np.dtype  # dtype of the loss and gradient returned
    given: dict  # the user's target and weight arrays before conversion, for overlap checks
    fold: float = 1.0  # a factor of row_weight that "mean" denominators divide out (see scale_weights)
    units: tuple = (1.0, 1.0)  # "mean" denominators D, D_z of the user's weights / of the scaled ones

    @property
    def lead(self) -> tuple[int, ...]:
        return self.rows.shape[:-1]

    @property
    def shape(self) -> tuple[int, int]:
        """(M, K): rows and classes."""
        return math.prod(self.rows.shape[:-1]), self.rows.shape[-1]


def check_problem(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    *,
    axis=-1,
    sample_weight=None,
    where=None,
    z_loss=0.0,
    logit_scale=None,
    softcap=None,
    all_ignored="nan",
    dtype=None,
) -> Problem:
    logits = _check_logits(logits)
    axis = _check_axis(axis, logits)
    rows = logits if axis == logits.ndim - 1 else np.moveaxis(logits, axis, -1)
    compute = np.dtype(np.float64) if native(logits.dtype) == np.float64 else np.dtype(np.float32)
    result = _check_dtype(dtype, logits, compute)
    given = {"target": as_array("target", target), "weight": None if weight is None else as_array("weight", weight)}
    target, soft = _check_target(given["target"], logits, axis, rows, compute)
    weight = _check_weight(given["weight"], logits, axis, None)
    ignore_index = _check_ignore_index(ignore_index)
    if soft and ignore_index != -100:  # as PyTorch: probabilities have no class to ignore
        raise ValueError(
            f"ignore_index={ignore_index} only applies to class-index targets; target has "
            f"shape {given['target'].shape} (probabilities). Leave ignore_index at its default -100"
        )
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("all_ignored", all_ignored, ALL_IGNORED)
    label_smoothing = _check_real("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _check_real("z_loss", z_loss, 0.0, np.inf)
    logit_scale, softcap = check_transform(logit_scale, softcap)
    row_weight, row_top = row_weights(sample_weight, where, rows.shape[:-1])
    m = math.prod(rows.shape[:-1])
    weight, row_weight, z_loss, fold, units = scale_weights(
        weight, row_weight, z_loss, reduction, soft, m, compute, row_top=row_top
    )
    return Problem(
        logits, axis, rows, target, soft, weight, ignore_index, reduction, label_smoothing, row_weight,
        z_loss, logit_scale, softcap, all_ignored, compute, result, given, fold, units,
    )


def unscaled(top: float, bounds: tuple[float, float]) -> bool:
    """Whether weights whose largest is ``top`` are left as they are by scale_weights
    (all 0, or the largest within bounds); False for NaN."""
    return top == 0 or bounds[0] <= top <= bounds[1]


def _power_of_two_scale(a: np.ndarray | None, bounds: tuple[float, float], top: float | None = None) -> float:
    """1, or the power of two that brings max(a) into [1, 2) when it lies outside bounds
    (2^1023 at most: [0.5, 1) would need 2^1024 for weights near the float64 maximum).
    top: max(a) when the caller has it already (a pass over a saved)."""
    if a is None or a.size == 0:
        return 1.0
    top = float(a.max()) if top is None else top
    if unscaled(top, bounds):
        return 1.0
    return math.ldexp(1.0, math.frexp(top)[1] - 1)


def scale_weights(weight, row_weight, z_loss, reduction, soft, m, compute, *, row_top=None):
    """(class weights in the compute dtype, row weights, z_loss, fold, units) as the
    kernels and the reference take them, scaled by powers of two (exactly) so that extreme weights
    that pass validation neither overflow nor underflow there.

    With W and V the scales of the class and row weights (1 for ordinary weights): the
    class-index "mean" is unchanged by them (w / W and v / V in its numerator and
    denominator alike). Elsewhere the loss is linear in w: W is folded into the row
    weights (float64: v W) and taken off the z-loss (z_loss / W), which class weights do
    not touch, and ``fold`` = W tells the probability-target "mean" to divide its
    denominators (sums of row weights) by it. ``units``: the "mean" denominators (D, D_z)
    of the given weights over those of the scaled ones. A class weight below 2^-149 (float32) or
    2^-1074 (float64) times the largest becomes 0. row_top: max(row_weight), when known."""
    w_scale = _power_of_two_scale(weight, _WEIGHT_RANGE[compute])
    if weight is not None:
        if w_scale != 1:
            weight = np.asarray(weight, np.float64) / w_scale
        weight = np.ascontiguousarray(weight, dtype=compute)
    v_scale = 1.0
    if reduction == "mean":
        v_scale = _power_of_two_scale(row_weight, _WEIGHT_RANGE[np.dtype(np.float64)], row_top)
        if v_scale != 1:
            row_weight = row_weight / v_scale
        if not soft:
            return weight, row_weight, z_loss, 1.0, (w_scale * v_scale, v_scale)
    if w_scale == 1:
        return weight, row_weight, z_loss, 1.0, (v_scale, v_scale)
    row_weight = np.full(m, w_scale) if row_weight is None else row_weight * w_scale
    return weight, row_weight, z_loss / w_scale, w_scale, (v_scale, v_scale)


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
        where = _index_name(first_bad_row, problem.lead)
        raise IndexError(
            f"target{where} = {int(target[first_bad_row])} is not a class index for logits "
            f"with K={k} classes: labels must lie in [0, {k - 1}] or equal "
            f"ignore_index={problem.ignore_index}"
        )


def check_transform(logit_scale, softcap) -> tuple[float | None, float | None]:
    """The logit transform z = softcap * tanh(logit_scale * x / softcap): None turns a part off."""
    if logit_scale is not None:
        logit_scale = _check_real("logit_scale", logit_scale, -np.inf, np.inf)
    if softcap is not None:
        softcap = _check_real("softcap", softcap, 0.0, np.inf)
        if softcap == 0:
            raise ValueError(
                f"softcap must be > 0 (z = softcap * tanh(x / softcap)); got {softcap!r}. Pass None to turn it off"
            )
    return logit_scale, softcap


def check_returns(return_z_loss, return_lse) -> tuple[bool, bool]:
    for name, flag in (("return_z_loss", return_z_loss), ("return_lse", return_lse)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False; got {flag!r}")
    return bool(return_z_loss), bool(return_lse)


def check_denominator(denominator, reduction) -> tuple[float, float] | None:
    """None, or the (D, D_z) a "mean" divides by instead of the call's own: one number
    >= 0 for both, or a pair (cross-entropy, z-loss)."""
    if denominator is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"denominator={denominator!r} only applies to reduction='mean'; got reduction={reduction!r}. "
            "Leave denominator=None or use reduction='mean'"
        )
    pair = denominator if isinstance(denominator, (tuple, list)) else (denominator, denominator)
    if len(pair) != 2:
        raise ValueError(f"denominator must be a number or a pair (D, D_z); got {denominator!r}")
    return tuple(_check_real("denominator", d, 0.0, np.inf) for d in pair)


def _index_name(row: int, lead: tuple[int, ...]) -> str:
    """How the user would index row ``row`` of their target: [5] or [2, 7]."""
    index = np.unravel_index(row, lead) if lead else ()
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def check_out(out, problem: Problem) -> np.ndarray:
    """The gradient buffer: the logits' shape, the result dtype, writeable, any layout
    (C-contiguous in the class-last layout is the fast path).

    It may be the logits array itself (in-place gradient); otherwise it must not
    overlap any input, because the kernel writes it while still reading them.
    """
    logits = problem.logits
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy.ndarray; got {type(out).__name__}")
    as_array("out", out)
    if out.shape != logits.shape:
        raise ValueError(
            f"out has shape {out.shape} but logits have shape {logits.shape}; "
            "allocate out with np.empty_like(logits)"
        )
    if native(out.dtype) != problem.result:  # either byte order
        raise ValueError(f"out has dtype {out.dtype} but the gradient has dtype {problem.result}")
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")
    check_no_self_overlap("out", out)
    in_place = same_memory(out, logits)
    if not in_place and np.shares_memory(out, logits):
        raise ValueError("out overlaps logits without being logits itself; pass out=logits or a separate array")
    for name, arr in problem.given.items():
        if arr is not None and np.shares_memory(out, arr):
            raise ValueError(f"out overlaps {name}; pass a separate array as out")
    return out


def same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """a and b are the same elements of the same memory (a view like b of b's data)."""
    if a is b:
        return True
    if a.shape != b.shape or a.strides != b.strides or a.dtype != b.dtype:
        return False
    # Separate buffers, the usual case, are told apart by their bounds, without the
    # ~3 us __array_interface__ dict (arrays with no elements have no bounds to compare).
    if a.size and not np.may_share_memory(a, b):
        return False
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def is_float(dtype: np.dtype) -> bool:
    """float16, bfloat16, float32 or float64, in either byte order."""
    return native(dtype) in FLOAT_DTYPES or dtype.name in HALF_DTYPE_NAMES


def _check_logits(logits) -> np.ndarray:
    logits = as_array("logits", logits)
    if not is_float(logits.dtype):
        raise TypeError(
            f"logits must be float16, bfloat16, float32 or float64; got dtype {logits.dtype}. "
            "Convert with logits.astype(np.float32)"
        )
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis; got a 0-d array. Pass shape (K,) or (N, K)")
    return logits


def _check_axis(axis, logits: np.ndarray) -> int:
    if type(axis) is not int and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"axis must be an integer; got {axis!r}")
    if not -logits.ndim <= axis < logits.ndim:
        raise ValueError(f"axis={axis} is out of range for logits of shape {logits.shape}")
    axis = int(axis) % logits.ndim
    if logits.shape[axis] == 0:
        raise ValueError(f"logits must have at least one class; got shape {logits.shape} with axis={axis}")
    return axis


def _check_dtype(dtype, logits: np.ndarray, compute: np.dtype) -> np.dtype:
    if dtype is None:
        return native(logits.dtype)
    try:
        dtype = native(np.dtype(dtype))
    except TypeError:
        raise TypeError(f"dtype must be a NumPy float dtype or None; got {dtype!r}") from None
    if dtype not in (native(logits.dtype), compute):
        raise ValueError(
            f"dtype={dtype} is not available for {logits.dtype} logits: results come in the "
            f"logits' dtype ({logits.dtype}) or the dtype they are computed in ({compute})"
        )
    return dtype


def _check_target(target, logits: np.ndarray, axis: int, rows: np.ndarray, compute: np.dtype) -> tuple[np.ndarray, bool]:
    lead = rows.shape[:-1]
    if target.shape == logits.shape:  # class probabilities, as PyTorch decides: by shape
        if target.dtype.kind != "f" and target.dtype.name != "bfloat16":
            raise TypeError(
                f"target of shape {target.shape} (same as logits) holds class probabilities "
                f"and must be a float array; got dtype {target.dtype}. For class indices "
                f"pass an integer array of shape {lead}"
            )
        moved = target if axis == target.ndim - 1 else np.moveaxis(target, axis, -1)
        return moved, True  # converted to the compute dtype where used
    if target.shape != lead:
        hint = ""
        if logits.ndim > 2 and axis != 1 and target.shape == logits.shape[:1] + logits.shape[2:]:
            hint = " (for PyTorch's (N, K, d1, ...) layout pass axis=1)"
        raise ValueError(
            f"target has shape {target.shape} but logits have shape {logits.shape} with the classes on "
            f"axis {axis}; target must be class indices of shape {lead} or probabilities of shape "
            f"{logits.shape}{hint}"
        )
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"target of shape {target.shape} holds class indices and must be an integer array; "
            f"got dtype {target.dtype}. Convert with target.astype(np.int64)"
        )
    flat = target.reshape(-1)
    if target.dtype == np.uint64 and flat.size and flat.max() > np.iinfo(np.int64).max:
        row = int(np.argmax(flat > np.iinfo(np.int64).max))
        raise IndexError(
            f"target{_index_name(row, lead)} = {int(flat[row])} is not a class index for "
            f"K={rows.shape[-1]} classes"
        )
    return kernel_labels(flat), False


def kernel_labels(labels: np.ndarray) -> np.ndarray:
    """Class indices as the kernels take them: read-only, C-contiguous int64 (a view when
    they are that already). int64 only: one compiled copy of each kernel instead of one
    per label dtype (measured: converting int32 labels takes 0.2-0.6 ns a row, 11 us at
    65536 rows against ~1 ms for the kernel at 65536 x 10)."""
    return read_only(np.ascontiguousarray(labels, dtype=np.int64))


def _check_weight(weight, logits: np.ndarray, axis: int, compute: np.dtype | None) -> np.ndarray | None:
    """The class weights, checked, as a (K,) array of ``compute`` (None: as given)."""
    if weight is None:
        return None
    k = logits.shape[axis]
    if weight.dtype.kind not in "iuf":
        raise TypeError(f"weight must be a real numeric array; got dtype {weight.dtype}")
    if weight.shape != (k,):
        raise ValueError(
            f"weight has shape {weight.shape} but logits have shape {logits.shape} (K={k} classes on axis {axis}); "
            f"weight must have one entry per class, shape ({k},)"
        )
    bad = ~np.isfinite(weight) | (weight < 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"weight[{j}] = {float(weight[j])!r}; class weights must be finite and >= 0")
    return weight if compute is None else np.ascontiguousarray(weight, dtype=compute)


def row_weights(sample_weight, where, lead: tuple[int, ...], *, borrow=False) -> tuple[np.ndarray | None, float]:
    """(sample_weight * where as one float64 (M,) array, or None when neither is given; its
    largest value, or any value in [1, 2) when it holds only 0s and 1s: the caller scales
    by it, see scale_weights).

    borrow: the caller never writes the array and nothing writes sample_weight's memory
    while it is used (e.g. not the gradient's): a C-contiguous, writeable float64
    sample_weight, with no ``where``, is then returned as it is instead of copied
    (~30 us at 65536 rows; writeable, as a copy is, so the kernels compile once for both)."""
    v = None
    top = 1.0
    if sample_weight is not None:
        sample_weight = as_array("sample_weight", sample_weight)
        if sample_weight.dtype.kind not in "iuf":
            raise TypeError(f"sample_weight must be a real numeric array; got dtype {sample_weight.dtype}")
        if sample_weight.shape != lead:
            raise ValueError(
                f"sample_weight has shape {sample_weight.shape}; it needs one weight per row, shape {lead}"
            )
        flags = sample_weight.flags
        if sample_weight.dtype == np.float64 and (
            where is not None or (borrow and flags.c_contiguous and flags.writeable)
        ):  # (with where, the masked array below is a new one)
            v = sample_weight.reshape(-1)
        else:
            v = np.array(sample_weight, dtype=np.float64).reshape(-1)
        # Two reductions instead of isfinite, <, | and any (and the max is the scale's):
        # NaN propagates through both, -inf and negatives show in the min, +inf in the max.
        top = float(v.max()) if v.size else 0.0
        if v.size and not (v.min() >= 0 and top <= _F64_MAX):
            bad = ~np.isfinite(v) | (v < 0)
            row = int(np.argmax(bad))
            raise ValueError(
                f"sample_weight{_index_name(row, lead)} = {float(v[row])!r}; sample weights must be finite and >= 0"
            )
    if where is not None:
        where = as_array("where", where)
        if where.dtype != np.bool_:
            raise TypeError(f"where must be a boolean array; got dtype {where.dtype}. Use e.g. mask != 0")
        if where.shape != lead:
            raise ValueError(f"where has shape {where.shape}; it needs one flag per row, shape {lead}")
        mask = where.reshape(-1)
        if v is None:
            v = mask.astype(np.float64)  # 0s and 1s: top stays 1, in every scale's range
        else:
            v = _masked(v, mask)
            top = float(v.max()) if v.size else 0.0
    return v, top


def _masked(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """np.where(mask, v, 0.0) for float64 v, bit for bit (-0.0 kept where mask is True),
    as a new array: v's bits ANDed with the mask as all-one / all-zero 64-bit words
    (57 us instead of 115 at 65536 rows: np.where's masked loop is slow)."""
    words = mask.astype(np.int64)
    np.negative(words, out=words)  # 1 -> -1: every bit set
    np.bitwise_and(words, v.view(np.int64), out=words)
    return words.view(np.float64)


def _check_ignore_index(ignore_index) -> int:
    if type(ignore_index) is not int and (isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an integer; got {ignore_index!r}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in a 64-bit integer; got {ignore_index!r}")
    return int(ignore_index)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def _check_real(name: str, value, low: float, high: float) -> float:
    """A finite real number in [low, high]; bools, NaN and inf are rejected."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a float; got {value!r}")
    value = float(value)
    if not (low <= value <= high and math.isfinite(value)):
        limits = " and ".join(f"{op} {b:g}" for op, b in ((">=", low), ("<=", high)) if math.isfinite(b))
        raise ValueError(f"{name} must be a finite number{' ' + limits if limits else ''}; got {value!r}")
    return value
