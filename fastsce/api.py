"""Public API: validate, normalise, dispatch to the fused kernels, reduce."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Literal, overload

import numpy as np

from fastsce import _threads
from fastsce._kernels import blocks as block_kernels, rows as row_kernels, tiles as tile_kernels
from fastsce._kernels.half import bits_view
from fastsce._layout import read_only, row_blocks
from fastsce._typing import Array, ArrayLike, DTypeLike, Loss
from fastsce._validate import (
    _F64_MAX,
    _INT64_MAX,
    _INT64_MIN,
    _WEIGHT_RANGE,
    Problem,
    check_denominator,
    check_labels,
    check_out,
    check_problem,
    check_returns,
    kernel_labels,
    native,
    row_weights,
    same_memory,
    unscaled,
)

__all__ = ["cross_entropy", "cross_entropy_with_grad"]

# A gradient row longer than this is computed in two reads of the logits instead of
# three passes (the third would miss the cache): see row_kernels.hard_loss_grad.
LONG_ROW_BYTES = 1 << 20

# Rows per prange chunk of the row-wise kernels: about this many logits, at least one row.
ROW_CHUNK_LOGITS = 1 << 16

# Logits that are not C-contiguous rows (another class axis, another layout) are copied
# this many at a time (4-8 MB; float16 / bfloat16 as they are, the kernels convert),
# so a call never holds a second (N, K) array.
COPY_BLOCK_LOGITS = 1 << 20

# Up to these K, integer-target rows are vectorised across rows (fastsce._kernels.tiles)
# rather than along them: the measured break-even (2 threads, N * K ~ 1.6M; e.g.
# float32 loss+grad at K=128: 2.84x memcpy across rows, 3.34x along; at K=160: 3.46x, 3.23x).
# Remeasured with the in-register transposes (1 thread, N * K = 1M, CPU time, a loaded
# machine): loss+grad still crosses between 128 and 160 (4.85x / 5.82x at 128, 5.26x /
# 4.68x at 160); loss only now at ~400 (2.78x / 3.08x at 300, 2.75x / 2.66x at 400).
# With borrowed views and 16-wide exps in the tiles (2 threads, N * K = 1M, interleaved,
# two runs): loss+grad across / along rows 2.82x / 3.09x and 2.67x / 2.82x at 128,
# 3.07x / 3.85x and 2.63x / 3.93x at 160, 3.25x / 3.19x and 3.49x / 2.91x at 200.
# On this project's current CI machine (AMD Zen 4, AVX-512; 2 threads, N * K = 1M,
# interleaved, × memcpy): float32 loss+grad across / along rows 4.17 / 5.77 at 300, 5.13 /
# 4.32 at 400 (and 5.10 / 6.93 at 200, where the old bound of 160 sent rows along);
# loss only 3.61 / 4.47 at 384, 4.94 / 3.82 at 500; float64 loss+grad 4.27 / 4.77 at 128,
# 5.08 / 4.26 at 160.
# With the row kernels' one-loop exp-sum and borrowed views (same machine and method, 25
# rounds): float32 loss+grad 4.77 / 5.28 at 160, 4.78 / 4.39 at 192, 5.40 / 4.23 at 200,
# 3.71 / 3.76 at 256, 3.30 / 2.68 at 320; loss only still 1.67 / 1.96 at 384; float64
# loss+grad 3.73 / 3.64 at 64, 4.04 / 2.86 at 100; loss only 1.70 / 2.11 at 128, 2.92 /
# 2.41 at 160.
SMALL_K = {  # compute dtype: (loss only, loss and gradient)
    np.dtype(np.float32): (384, 176),
    np.dtype(np.float64): (144, 64),
}
# The bounds for float32 / float64 rows (half rows keep SMALL_K), by what the call has:
# the smallest of its options' bounds applies ("plain" for a call with none, "other" for
# the options not named). Time in the blocks and tiles / in the row kernels, one process,
# 15-21 interleaved rounds, N * K = 1M, 1 and 2 threads. Plain calls (row_kernels.plain_loss,
# plain_loss_grad): float32 loss+grad 0.61-0.77 at 128, 1.14-1.15 at 136, 1.10-1.25 at
# 160-176 (blocks); loss only 0.75-0.88 at 176 (blocks), 1.00-1.20 at 192, 1.2-1.8 at
# 200-384 (tiles); float64 loss+grad 0.84-0.99 at 48-56, 0.93-1.08 at 64; loss only
# 0.80-0.91 at 96, 0.97-1.11 at 112-144. With an option (the general row kernel), float32:
# softcap loss+grad 0.97-1.04 at 112, 1.01-1.12 at 128, 1.02-1.57 at 144-176 (tiles);
# label smoothing 0.93-1.04 at 144, 1.01-1.20 at 160-176 (blocks); z-loss 0.85-1.10 at
# 144-176; loss only, softcap, label smoothing, z-loss or lse: 0.67-1.03 at 144-176
# (blocks, tiles for the softcap), 1.03-1.68 at 200-384 (tiles).
# On the Zen 5 CI machine, after the blocks' chunks of about ROW_CHUNK_LOGITS logits
# (api._chunk_rows) and their row-wise widths past 176 (2 threads, N * K = 1M, 9
# interleaved rounds): plain float32 loss+grad in the blocks / in the row kernel 0.66 at
# 136, 0.55 at 176, 0.72 at 200, 0.61 at 224, 0.65 at 240, 0.69 at 256, 0.72 at 288-300,
# 0.74-0.89 at 320, and at 352-384 (a width of 384) 0.76-0.82 in one run, 1.01-1.09 in
# another, where the loss alone took 1.16-1.20 (0.81 at 288, 0.95 at 320): plain calls
# take the blocks up to their widest, 320.
FLOAT_SMALL_K = {
    np.dtype(np.float32): {"plain": (320, 320), "softcap": (176, 128), "label_smoothing": (176, 144), "other": (176, 176)},
    np.dtype(np.float64): {"plain": (96, 56), "other": (144, 64)},
}


def _options_of(params: tuple, want_lse: bool) -> list[str]:
    """The options a call has, as FLOAT_SMALL_K names them: "softcap", "label_smoothing",
    and "other" for a z-loss, a logit scale or lse; empty for a plain call."""
    eps, z_loss, _, _, a, c = params
    return [name for name, on in (("softcap", c), ("label_smoothing", eps), ("other", z_loss or a != 1 or want_lse)) if on]


def _plain(params: tuple, want_lse: bool, half_rows: bool) -> bool:
    """Whether a call is plain: no option, on float32 / float64 rows, not half ones (the
    plain row kernels' calls)."""
    return not half_rows and not _options_of(params, want_lse)


def _small(k: int, compute: np.dtype, grad: bool, params: tuple, want_lse: bool, half_rows: bool) -> bool:
    """Whether rows of K classes go to the blocks and tiles (_small_k_kernels)."""
    options = _options_of(params, want_lse)
    if half_rows:  # plain ones: the blocks as far as they go (and the tiles' bounds beyond)
        bound = SMALL_K[compute][grad]
        return k <= (bound if options else max(bound, block_kernels.MAX_K))
    bounds = FLOAT_SMALL_K[compute]
    return k <= min(bounds.get(name, bounds["other"])[grad] for name in options or ["plain"])


# the blocks' logits: float32, and float16 / bfloat16 as the kernels take them (bits_view)
_BLOCK_DTYPES = (np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.int16))


def _small_k_kernels(z: np.ndarray, params: tuple, want_lse: bool, classes_last: bool = True):
    """The kernels for rows of a small K (<= SMALL_K): fastsce._kernels.blocks (16 rows at
    a time) for float32 and half rows of K <= blocks.MAX_K, with a softcap K <=
    blocks.TRANSPOSED_MAX (with label smoothing, z-loss, lse, a logit scale or a softcap,
    kernels of their own, when the classes are the last axis); else fastsce._kernels.tiles (tiles.PLAIN for a call with
    no option, whose kernels compile none of the options' code). (A call with the classes on another axis runs in the
    tiles whether they read it in place or its rows are copied: with those options the
    two kernels' sums, added in different orders, may differ in entries of the gradient
    that cancel, and the same call should not depend on the memory layout.) Against the
    tiles (float32, 2 threads, ~1M logits, one process, 40 interleaved rounds),
    loss+grad / loss only: 0.41 / 0.44 the time at K = 2, 0.47 / 0.50 at 3, 0.54 / 0.63
    at 5, 0.49 / 0.58 at 8, 0.50 / 0.55 at 10, 0.59 / 0.59 at 16, 0.75 / 0.83 at 20,
    0.66 / 0.69 at 24, 0.81 / 0.82 at 32 (transposed blocks); row-wise (15 rounds): 0.71
    / 0.78 at 33, 0.53 / 0.63 at 48, 0.55 / 0.63 at 64, 0.62 / 0.59 at 80, 0.74 / 0.73
    at 100, 0.64 / 0.73 at 112, 0.80 / 0.75 at 128, 0.89 / 0.90 at 160, 0.84 / 0.84 at
    176."""
    eps, z_loss, _, _, logit_scale, cap = params
    k = z.shape[1]
    options = block_kernels.options_of(eps, z_loss, logit_scale, want_lse, cap)
    if z.dtype not in _BLOCK_DTYPES or k > block_kernels.max_k(options):
        return tile_kernels if options else tile_kernels.PLAIN
    if not options or classes_last:
        return block_kernels.kernels(k, options)
    return tile_kernels


# Logits with the classes on another axis, e.g. PyTorch's (N, K, d), go to a tile kernel
# that reads rows 64 at a time in place (fastsce._kernels.tiles.class_major_loss) up to this K
# (its per-thread tile is K x 64) and from this d = the product of the axes after the
# classes (fewer would leave most of a tile's lanes empty); otherwise rows are copied a
# block at a time. Measured, float32 loss+grad over the same rows with the classes last:
# (N, K, 64) 1.4x at K = 10, 1.1x at 100, 1.9x at 1000, 2.3x at 8000, 4.7x at 32000
# (block copies: 9x at 8000, 22x at 32000); (8, 21, 256, 256) 1.0x.
def _row_kernel(z: np.ndarray, g: np.ndarray | None, params: tuple, want_lse: bool, in_place: bool, long_rows: bool):
    """The row kernel (integer targets, K above the blocks and tiles) for rows z (half
    rows as their bits), and the arguments it takes after those all kernels take: the
    plain kernels for a call with no option on float rows, which compile in a fraction of
    the general ones' time (see row_kernels.plain_loss), else the general ones."""
    plain = _plain(params, want_lse, z.dtype.kind != "f")
    if g is None:
        return (row_kernels.plain_loss, ()) if plain else (row_kernels.hard_loss, _options(z, params))
    if plain and g.dtype == z.dtype and not long_rows:
        return row_kernels.plain_loss_grad, (g, True if in_place else None)
    return row_kernels.hard_loss_grad, (g, True if in_place else None, True if long_rows else None, *_options(z, params))


def _options(z: np.ndarray, params: tuple) -> tuple:
    """The general row kernels' options (label smoothing, z-loss, logit scale, softcap)
    and whether rows go through a scratch row (half rows, softcapped ones), each None
    where the call has none: Numba then compiles a kernel for what a call has, without
    the others' loops."""
    eps, z_loss, _, _, a, c = params
    copy = True if c or z.dtype.kind != "f" else None
    return (eps or None, z_loss or None, None if a == 1 else a, c or None, copy)


CLASS_MAJOR_K = 1 << 16
CLASS_MAJOR_MIN_D = 32

_NO_ROW_WEIGHTS = np.empty(0, np.float64)

# The common call, on which a small problem spends most of its time in Python: C-contiguous
# (N, K) float32 / float64 / float16 / bfloat16 (native byte order) logits, (N,) int64 / int32 labels, out= absent or a C-contiguous
# array of the logits' shape and dtype, any options but dtype= and denominator=, given as
# Python numbers / bools and NumPy arrays (weights in the range scale_weights leaves alone).
# _fast checks exactly that and runs the kernels (measured at 1 x 10 to 16 x 4000 on a
# loaded machine, CPU time outside them: plain 12-16 us, with weight= / sample_weight= /
# where= / z_loss= + return_lse= 13-26 us; the general path 57-71 us; bench/small_calls.py);
# anything else, and every error but the row weights' (see _fast), goes to the general
# path, which gives the same results (tests/test_fast_path.py). (torch.Tensor.numpy()
# views qualify.)
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)  # NumPy's own dtype objects, compared by identity
_F16 = np.dtype(np.float16)
_I32, _I64 = np.dtype(np.int32), np.dtype(np.int64)
_F32_MAX = float(np.finfo(np.float32).max)
# Per-row outputs not asked for: never written (size 0), so every call may share them.
_NO_ROWS = {_F32: np.empty(0, _F32), _F64: np.empty(0, _F64)}


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: Literal[False] = False,
    return_lse: Literal[False] = False,
    dtype: DTypeLike | None = None,
    denominator: float | tuple[float, float] | None = None,
) -> Loss: ...


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
    dtype: DTypeLike | None = None,
    denominator: float | tuple[float, float] | None = None,
) -> Loss | tuple[Any, ...]: ...


def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
    dtype: DTypeLike | None = None,
    denominator: float | tuple[float, float] | None = None,
) -> Loss | tuple[Any, ...]:
    """Softmax cross-entropy loss of a batch of logits, with PyTorch's semantics.

    Parameters
    ----------
    logits : float32, float64, float16 or bfloat16 array, classes along ``axis``
        Unnormalised scores, e.g. (N, K). C-contiguous with the classes last is the fast
        path; other layouts are copied a block of rows at a time. float16 and bfloat16
        (an ``ml_dtypes`` array) are computed in float32. ``-inf`` marks a masked class.
    target : integer array of class indices, shaped like the logits without the class
        axis, or a float array of probabilities shaped like the logits
        Told apart by shape, as in ``torch.nn.functional.cross_entropy``.
    weight : (K,) array, optional
        Non-negative, finite per-class weights.
    ignore_index : int
        Rows whose class index equals this contribute nothing. As in PyTorch, only the
        default -100 is accepted with probability targets.
    reduction : {"mean", "sum", "none"}
        "mean" divides by the summed weight of the counted rows: sum of
        sample_weight * where * weight[target] (the number of rows for probabilities).
        "none" returns one loss per row, shaped like the class-index target.
    label_smoothing : float in [0, 1]
        Mixes the target with the uniform distribution over the K classes.
    axis : int
        The class axis: -1 (NumPy / JAX layout (..., K)) or e.g. 1 for PyTorch's
        (N, K, d1, ..., dk) with target (N, d1, ..., dk).
    z_loss : float >= 0
        Adds z_loss * logsumexp(z_n)^2 for each counted row (PaLM's auxiliary loss).
        Weighted by the row's sample weight but not its class weight; "mean" divides
        it by the summed sample weight of the counted rows (their number without
        sample weights), as Liger-Kernel does.
    logit_scale : float, optional
        The loss sees ``logit_scale * logits``.
    softcap : float > 0, optional
        The loss sees ``softcap * tanh(logits / softcap)`` (after ``logit_scale``).
    sample_weight : float array shaped like the rows, optional
        Non-negative per-row weights; a row of weight 0 is skipped like an ignored one.
    where : bool array shaped like the rows, optional
        Rows to include (as optax's ``where``); the others are skipped.
    all_ignored : {"nan", "zero"}
        The "mean" loss when no row counts: NaN (0 / 0, as PyTorch) or 0 (as Liger-Kernel).
    return_z_loss : bool
        Also return the z-loss term alone (already included in the loss), reduced alike.
    return_lse : bool
        Also return logsumexp of every row (ignored rows too) in the compute dtype.
    dtype : optional
        dtype of the loss (and gradient): the logits' (default), or float32 for
        float16 / bfloat16 logits.
    denominator : float >= 0, or a pair (D, D_z), optional
        With ``reduction="mean"`` only: divide by this instead of this call's own
        denominators (D for the cross-entropy, D_z for the z-loss; one number sets
        both), e.g. the number of counted tokens of the whole global batch, so the
        losses and gradients of its micro-batches add up to the full batch's. 0 gives
        what ``all_ignored`` says.

    Returns
    -------
    loss : scalar, or an array shaped like the rows for ``reduction="none"``;
    ``(loss, z_loss, lse)`` with the requested extras when ``return_z_loss`` or
    ``return_lse`` is set.

    Only the loss is computed: no gradient is formed or written.
    """
    if dtype is None and denominator is None:
        fast = _fast(
            logits, target, weight, ignore_index, reduction, label_smoothing, axis, z_loss, logit_scale, softcap,
            sample_weight, where, all_ignored, return_z_loss, return_lse, False, None,
        )  # fmt: skip
        if fast is not None:
            return fast
    problem = check_problem(
        logits, target, weight, ignore_index, reduction, label_smoothing, axis=axis,
        sample_weight=sample_weight, where=where, z_loss=z_loss, logit_scale=logit_scale,
        softcap=softcap, all_ignored=all_ignored, dtype=dtype,
    )  # fmt: skip
    returns = check_returns(return_z_loss, return_lse)
    denominator = check_denominator(denominator, reduction)
    loss, z_term, lse = _run(problem, None, returns, denominator)
    return _pack(loss, None, z_term, lse, returns)


@overload
def cross_entropy_with_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: Literal[False] = False,
    return_lse: Literal[False] = False,
    dtype: DTypeLike | None = None,
    denominator: float | tuple[float, float] | None = None,
    out: Array | None = None,
) -> tuple[Loss, Array]: ...


@overload
def cross_entropy_with_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
    dtype: DTypeLike | None = None,
    denominator: float | tuple[float, float] | None = None,
    out: Array | None = None,
) -> tuple[Any, ...]: ...


def cross_entropy_with_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
    dtype: DTypeLike | None = None,
    denominator: float | tuple[float, float] | None = None,
    out: Array | None = None,
) -> tuple[Any, ...]:
    """Loss and its gradient with respect to the logits, in one fused pass per row.

    Takes the arguments of :func:`cross_entropy`, plus:

    out : array of the logits' shape and the result dtype, optional
        Where to write the gradient (any layout; C-contiguous with the classes last is
        the fast path). ``out=logits`` computes it in place, overwriting the logits and
        allocating no second (N, K) buffer.

    Returns
    -------
    (loss, grad), then z_loss and lse when requested: ``grad`` has the logits' shape
    and the result dtype (it is ``out`` when given). For ``reduction="none"`` row n of
    ``grad`` is the gradient of row n's loss. With ``logit_scale`` / ``softcap`` it is
    the gradient with respect to the logits as given (the chain rule applied).
    """
    if dtype is None and denominator is None:
        fast = _fast(
            logits, target, weight, ignore_index, reduction, label_smoothing, axis, z_loss, logit_scale, softcap,
            sample_weight, where, all_ignored, return_z_loss, return_lse, True, out,
        )  # fmt: skip
        if fast is not None:
            return fast
    problem = check_problem(
        logits, target, weight, ignore_index, reduction, label_smoothing, axis=axis,
        sample_weight=sample_weight, where=where, z_loss=z_loss, logit_scale=logit_scale,
        softcap=softcap, all_ignored=all_ignored, dtype=dtype,
    )  # fmt: skip
    returns = check_returns(return_z_loss, return_lse)
    denominator = check_denominator(denominator, reduction)
    if out is None:
        out = np.empty(problem.logits.shape, problem.result)
    else:
        check_out(out, problem)
    loss, z_term, lse = _run(problem, out, returns, denominator)
    return _pack(loss, out, z_term, lse, returns)


def _fast(
    logits, target, weight, ignore_index, reduction, label_smoothing, axis, z_loss, logit_scale, softcap,
    sample_weight, where, all_ignored, return_z_loss, return_lse, grad, out,
):  # fmt: skip
    """The common call (see above _F32): what the general path returns (loss, or (loss,
    gradient) when ``grad``, then the extras asked for); None when the arguments are
    anything else or wrong, then the general path checks them and raises. Does what
    check_problem, check_out and _run do for these arguments, without the Problem, the
    block generator and the thread-launch context manager. The only error raised here is
    the row weights' (row_weights'), once every argument the general path checks before
    them has passed, so that both raise the same error first."""
    if type(logits) is not np.ndarray or type(target) is not np.ndarray:  # (no subclass: masked arrays)
        return None
    dt = logits.dtype
    if dt is _F32 or dt is _F64:
        compute = dt
    elif dt is _F16 or (dt.kind == "V" and dt.name == "bfloat16" and dt.isnative):  # (ml_dtypes')
        compute = _F32  # and the kernels take the bits (bits_view)
    else:
        return None
    if logits.ndim != 2 or not logits.flags.c_contiguous:
        return None
    m, k = logits.shape
    t_dt = target.dtype
    if (
        not (t_dt is _I64 or t_dt is _I32) or target.shape != (m,) or not target.flags.c_contiguous or m * k == 0
        or type(axis) is not int or not (axis == -1 or axis == 1)
        or type(ignore_index) is not int or not _INT64_MIN <= ignore_index <= _INT64_MAX
        or type(reduction) is not str or reduction not in ("mean", "sum", "none")
        or type(all_ignored) is not str or all_ignored not in ("nan", "zero")
        or type(label_smoothing) not in (float, int) or not 0.0 <= label_smoothing <= 1.0
        or type(z_loss) not in (float, int) or not 0.0 <= z_loss <= _F64_MAX
        or type(return_z_loss) is not bool or type(return_lse) is not bool
    ):  # fmt: skip
        return None
    a = c = None
    if logit_scale is not None:
        if type(logit_scale) not in (float, int) or not -_F64_MAX <= logit_scale <= _F64_MAX:
            return None
        a = float(logit_scale)
    if softcap is not None:
        if type(softcap) not in (float, int) or not 0.0 < softcap <= _F64_MAX:
            return None
        c = float(softcap)
    in_place = False
    if out is not None:
        if type(out) is not np.ndarray or out.dtype is not dt or out.shape != logits.shape:
            return None
        flags = out.flags
        if not (flags.c_contiguous and flags.writeable) or np.may_share_memory(out, target):
            return None
        in_place = out is logits
        if not in_place and np.may_share_memory(out, logits):
            return None
    if weight is None:
        w, w_sum = _ones(k, compute), float(k)
    else:
        # Valid, and in the range that scale_weights leaves alone, or the general path's:
        # min >= 0 and max finite is isfinite & >= 0 everywhere (NaN fails both).
        if type(weight) is not np.ndarray or weight.shape != (k,) or weight.dtype.kind not in "iuf":
            return None
        if out is not None and np.may_share_memory(out, weight):
            return None
        if not (weight.min() >= 0 and unscaled(float(weight.max()), _WEIGHT_RANGE[compute])):
            return None
        w = np.ascontiguousarray(weight, dtype=compute)
        w_sum = row_kernels.float64_sum(w)
    v = _NO_ROW_WEIGHTS
    if sample_weight is not None or where is not None:
        if (sample_weight is not None and type(sample_weight) is not np.ndarray) or (
            where is not None and type(where) is not np.ndarray
        ):
            return None
        borrow = out is None or sample_weight is None or not np.may_share_memory(out, sample_weight)
        v, top = row_weights(sample_weight, where, (m,), borrow=borrow)  # raises as the general path would
        if reduction == "mean" and not unscaled(top, _WEIGHT_RANGE[_F64]):
            return None  # scaled there
    # as the general path gives them to the kernels (so that both use the same compiled kernels)
    logits, target = read_only(bits_view(logits)), kernel_labels(target)
    mean = reduction == "mean"
    if mean:
        mask = where.reshape(-1) if where is not None and sample_weight is None else None
        bad_row, d, d_z = _label_stats(target, k, ignore_index, w, v, weight is None, mask)
    else:  # no denominators: the labels' check alone, the vectorised count instead of the float64 sums
        bad_row, d, d_z = row_kernels.label_counts(target, k, ignore_index)
    if bad_row >= 0:  # the general path names it
        return None
    if mean:
        scale, scale_z = _mean(1.0, d, all_ignored), _mean(1.0, d_z, all_ignored)
    else:
        scale = scale_z = 1.0
    z_loss = float(z_loss)
    params = (float(label_smoothing), z_loss, scale, scale_z, 1.0 if a is None else a, 0.0 if c is None else c)
    none = reduction == "none"
    small = _small(k, compute, grad, params, return_lse, logits.dtype.kind != "f")
    chunk_rows = _chunk_rows(k, small)
    n_chunks = -(-m // chunk_rows)
    no_rows = _NO_ROWS[compute]
    row_loss = np.empty(m, compute) if none else no_rows
    row_z = np.empty(m, compute) if none and return_z_loss else no_rows
    lse = np.empty(m, compute) if return_lse else no_rows
    chunk_loss, chunk_z = np.empty(n_chunks), np.empty(n_chunks)
    args = (logits, target, ignore_index, w, w_sum, v, params, chunk_rows, (row_loss, row_z, lse, chunk_loss, chunk_z))
    g = None
    if grad:
        g = np.empty((m, k), dt) if out is None else out
        gk = bits_view(g)
        if small:
            kernel, args = _small_k_kernels(logits, params, return_lse).hard_loss_grad, (*args, gk, in_place)
        else:
            kernel, extra = _row_kernel(logits, gk, params, return_lse, in_place, k * compute.itemsize > LONG_ROW_BYTES)
            args = (*args, *extra)
    elif small:
        kernel = _small_k_kernels(logits, params, return_lse).hard_loss
    else:
        kernel, extra = _row_kernel(logits, None, params, return_lse, False, False)
        args = (*args, *extra)
    if _threads.runs_serial(m * k):
        _threads._serial(kernel)(*args)
    else:
        with _threads.launching(m * k) as pick:
            pick(kernel)(*args)
    # as _total and _reduce
    if none:
        loss, z_term = row_loss.astype(dt, copy=False), row_z.astype(dt, copy=False)
    else:
        ce = float(chunk_loss[0] if n_chunks == 1 else chunk_loss.sum())
        z_term = float(chunk_z[0] if n_chunks == 1 else chunk_z.sum()) if z_loss else 0.0
        if mean:
            ce = _mean(ce, d, all_ignored)
            z_term = _mean(z_term, d_z, all_ignored) if z_loss else 0.0
        loss = _scalar(ce + z_term, dt)
        if return_z_loss:
            z_term = _scalar(z_term, dt)
    if return_z_loss or return_lse:
        return _pack(loss, g, z_term, lse, (return_z_loss, return_lse))
    return (loss, g) if grad else loss


def _chunk_rows(k: int, small: bool) -> int:
    """Rows per prange chunk: fixed chunks whose float64 loss sums are added up in order,
    a function of K only, so the total is the same for any thread count (with O(N /
    chunk) memory). About ROW_CHUNK_LOGITS logits; for the blocks and tiles whole tiles
    of 64 rows, at most tiles.CHUNK_ROWS. (The blocks took 2048 rows a chunk at every K:
    at K = 176, 5957 rows were 3 chunks for 2 threads, one thread doing two.)"""
    if not small:
        return max(1, ROW_CHUNK_LOGITS // k)
    return min(tile_kernels.CHUNK_ROWS, max(64, ROW_CHUNK_LOGITS // k // 64 * 64))


def _pack(loss, grad, z_term, lse, returns):
    """loss, or (loss, [grad], [z_term], [lse]) with the requested extras, in that order."""
    extra = [x for x, wanted in zip((z_term, lse), returns) if wanted]
    if grad is None and not extra:
        return loss
    return (loss, *extra) if grad is None else (loss, grad, *extra)


@functools.lru_cache(maxsize=8)
def _ones(k: int, dtype: np.dtype) -> np.ndarray:
    """The weights of an unweighted call, kept: no K-sized allocation per call. (Left
    writeable, as user weights are, so the kernels compile once for both; never exposed.)"""
    return np.ones(k, dtype)


def _label_stats(target, k, ignore_index, w, v, unweighted: bool, where=None):
    """row_kernels.label_stats(target, k, ignore_index, w, v), bitwise; without weights
    (``unweighted``, v empty) label_counts, which does not compile the weighted sums; and
    when v is a ``where`` mask (the (M,) bool mask when v is that mask as 0.0 / 1.0, no
    sample weights) and the class weights are ones, the count of the counted rows it
    keeps, exact (14 + 3-20 us for 65536 rows, against 41)."""
    if unweighted and (v.size == 0 or where is not None):
        bad_row, counted, _ = row_kernels.label_counts(target, k, ignore_index)
        if v.size and bad_row < 0:  # the rows the mask keeps of those counted
            counted = float(np.count_nonzero(where if counted == target.size else where & (target != ignore_index)))
        return bad_row, counted, counted  # (a bad label: label_stats' own (row, 0, 0))
    return row_kernels.label_stats(target, k, ignore_index, w, v)


def _weights(problem: Problem):
    """As _scaled_weights, with D and D_z those of the weights as given (for a caller that
    reduces with them itself, e.g. the command line)."""
    w, w_sum, d, d_z = _scaled_weights(problem)
    return w, w_sum, d * problem.units[0], d_z * problem.units[1]


def _scaled_weights(problem: Problem, denominator: tuple[float, float] | None = None):
    """(class weights, their float64 sum, the "mean" denominators D and D_z), as the
    kernels take them (see fastsce._validate.scale_weights), checking the labels in the
    same compiled pass over them. denominator: a caller-given (D, D_z) in the units of
    the weights as given, used instead of this call's own."""
    m, k = problem.shape
    if denominator is not None:
        w, w_sum, _, _ = _scaled_weights(problem)
        return w, w_sum, denominator[0] / problem.units[0], denominator[1] / problem.units[1]
    if problem.weight is None:
        w, w_sum = _ones(k, problem.compute), float(k)
    else:
        w, w_sum = problem.weight, row_kernels.float64_sum(problem.weight)
    v = _NO_ROW_WEIGHTS if problem.row_weight is None else problem.row_weight
    if problem.soft:
        d = float(m) if problem.row_weight is None else row_kernels.float64_sum(v) / problem.fold
        return w, w_sum, d, d
    bad_row, d, d_z = _label_stats(problem.target, k, problem.ignore_index, w, v, problem.weight is None)
    check_labels(problem, bad_row)
    return w, w_sum, d, d_z


def _blocks(problem: Problem, grad: np.ndarray | None):
    """(r0, r1, logits, target, gradient, in_place) per block of rows r0:r1, the arrays
    as the kernels take them: C-contiguous (rows, K) in the compute dtype, or in the
    logits' half dtype, which the kernels convert row by row (one block of views on the
    fast path, else copies a block at a time: see fastsce._layout)."""
    last = problem.axis == problem.logits.ndim - 1
    g_rows = grad if grad is None or last else np.moveaxis(grad, problem.axis, -1)
    rows = problem.rows
    if (
        not problem.soft and rows.dtype == problem.compute and rows.flags.c_contiguous
        and (g_rows is None or (g_rows.dtype == problem.result and g_rows.flags.c_contiguous))
    ):  # fmt: skip
        # row_blocks' one block of views, without its generator and this one (~3 us a call)
        m, k = problem.shape
        z = rows.reshape(m, k)
        g = None if g_rows is None else g_rows.reshape(m, k)
        return ((0, m, read_only(z), problem.target, g, g is not None and same_memory(g, z)),)
    return _copied_blocks(problem, g_rows)


def _copied_blocks(problem: Problem, g_rows: np.ndarray | None):
    """_blocks through row_blocks: one block of views, or copies a block at a time."""
    # half rows go to the kernels as they are, in native byte order (else copied to it)
    z_dtype = native(problem.rows.dtype) if problem.rows.dtype.itemsize == 2 else problem.compute
    inputs = (problem.target,) if problem.soft else ()
    blocks = row_blocks(
        problem.rows, z_dtype, COPY_BLOCK_LOGITS, inputs, (g_rows,), in_dtype=problem.compute, out_dtype=problem.result
    )
    for r0, r1, z, ins, (g,) in blocks:
        t = ins[0] if problem.soft else problem.target[r0:r1]
        yield r0, r1, z, t, g, g is not None and same_memory(g, z)
        z = ins = t = g = None  # a copied block is freed before the next is made


def _class_major(problem: Problem, grad: np.ndarray | None):
    """(x3, y3, chunks of tiles) when the logits (and gradient) are C-contiguous with the classes
    on an axis other than the last: the memory as (A, K, D), for the tile kernel that
    reads rows x[a, :, d] 64 at a time without a transposed copy. Else None."""
    logits, axis = problem.logits, problem.axis
    if axis == logits.ndim - 1 or not logits.flags.c_contiguous or not logits.dtype.isnative:
        return None
    if grad is not None and not (grad.flags.c_contiguous and grad.dtype.isnative):
        return None
    a, k, d = math.prod(logits.shape[:axis]), logits.shape[axis], math.prod(logits.shape[axis + 1 :])
    if d < CLASS_MAJOR_MIN_D:
        return None
    x3 = read_only(bits_view(logits.reshape(a, k, d)))
    y3 = np.empty((0, 0, 0), problem.compute) if grad is None else bits_view(grad.reshape(a, k, d))
    tiles = a * -(-d // tile_kernels.CLASS_MAJOR_ROWS)
    return x3, y3, -(-tiles // tile_kernels.TILES_PER_CHUNK)


def _total(chunks: list[np.ndarray]) -> float:
    """The float64 sum of the chunks' sums, in a fixed order (one block: no concatenation,
    a few us of a small call)."""
    if not chunks:  # a copied layout with no rows has no blocks at all
        return 0.0
    if len(chunks) == 1 and chunks[0].size == 1:
        # its sum (~1.5 us): the kernels' chunk sums start from +0.0, so never -0.0
        return float(chunks[0][0])
    return float((chunks[0] if len(chunks) == 1 else np.concatenate(chunks)).sum())


def _mean(total: float, d: float, all_ignored: str) -> float:
    if d:
        return total / d
    return np.nan if all_ignored == "nan" else 0.0  # 0 / 0: NaN, as PyTorch; or 0, as Liger


def _run(problem: Problem, grad: np.ndarray | None, returns: tuple[bool, bool], denominator=None):
    """(loss, z-term, lse) in the shapes and dtypes returned; the gradient into ``grad``.
    denominator: None, or the (D, D_z) that "mean" divides by instead of this call's own."""
    w, w_sum, d, d_z = _scaled_weights(problem, denominator)
    sums = _fused(problem, grad, returns, w, w_sum, *_scales(problem, d, d_z))
    return _reduce(problem, *sums, d, d_z, returns)


def _scales(problem: Problem, d: float, d_z: float) -> tuple[float, float]:
    """What the gradients of the cross-entropy and of the z-loss are multiplied by."""
    if problem.reduction == "mean":
        return _mean(1.0, d, problem.all_ignored), _mean(1.0, d_z, problem.all_ignored)
    return 1.0, 1.0


def _fused(problem: Problem, grad, returns, w, w_sum, scale: float, scale_z: float):
    """The kernels over all rows: (float64 sum of the row losses, of the z-terms, per-row
    losses, per-row z-terms (both only for "none"), lse (only when wanted)), flat, in the
    compute dtype; the gradient (scaled by scale / scale_z) into ``grad``. Labels must
    have been checked (by _weights); fastsce.linear calls this once per tile of rows."""
    m, k = problem.shape
    compute = problem.compute
    want_z, want_lse = returns
    none = problem.reduction == "none"
    a = 1.0 if problem.logit_scale is None else problem.logit_scale
    c = 0.0 if problem.softcap is None else problem.softcap
    params = (problem.label_smoothing, problem.z_loss, scale, scale_z, a, c)
    v = _NO_ROW_WEIGHTS if problem.row_weight is None else problem.row_weight
    across = not problem.soft  # rows vectorised across (fastsce._kernels.tiles): class indices
    small = across and _small(k, compute, grad is not None, params, want_lse, problem.rows.dtype.itemsize == 2)
    long_rows = k * compute.itemsize > LONG_ROW_BYTES
    chunk_rows = _chunk_rows(k, small)

    no_rows = _NO_ROWS[compute]  # (shared: never written)
    row_loss = np.empty(m, compute) if none else no_rows
    row_z = np.empty(m, compute) if none and want_z else no_rows
    lse = np.empty(m, compute) if want_lse else no_rows
    chunk_loss, chunk_z = [], []
    class_major = _class_major(problem, grad) if across and k <= CLASS_MAJOR_K else None
    classes_last = problem.axis == problem.logits.ndim - 1
    # the pool, or the serial twins (fastsce._threads); small calls skip launching()'s generator
    serial = _threads.runs_serial(m * k)
    with contextlib.nullcontext(_threads._serial) if serial else _threads.launching(m * k) as pick:
        if class_major is not None:  # no block copies: tiles of 64 rows read in place
            x3, y3, n_chunks = class_major
            chunk_loss.append(np.empty(n_chunks, np.float64))
            chunk_z.append(np.empty(n_chunks, np.float64))
            outs = (row_loss, row_z, lse, chunk_loss[-1], chunk_z[-1])
            args = (problem.ignore_index, w, w_sum, v, params, outs, y3, grad is not None)
            pick(tile_kernels.class_major_loss)(x3, problem.target, *args)
        for r0, r1, zb, tb, gb, in_place in () if class_major is not None else _blocks(problem, grad):
            zb, gb = bits_view(zb), None if gb is None else bits_view(gb)
            n_chunks = -(-(r1 - r0) // chunk_rows)
            chunk_loss.append(np.empty(n_chunks, np.float64))
            chunk_z.append(np.empty(n_chunks, np.float64))
            outs = (row_loss[r0:r1], row_z[r0:r1], lse[r0:r1], chunk_loss[-1], chunk_z[-1])
            args = (zb, tb, problem.ignore_index, w, w_sum, v[r0:r1], params, chunk_rows, outs)
            if problem.soft:
                if grad is None:
                    pick(row_kernels.soft_loss)(zb, tb, w, v[r0:r1], params, chunk_rows, outs)
                else:
                    pick(row_kernels.soft_loss_grad)(zb, tb, w, v[r0:r1], params, chunk_rows, outs, gb)
            elif small and grad is None:
                pick(_small_k_kernels(zb, params, want_lse, classes_last).hard_loss)(*args)
            elif small:
                pick(_small_k_kernels(zb, params, want_lse, classes_last).hard_loss_grad)(*args, gb, in_place)
            else:
                kernel, extra = _row_kernel(zb, gb, params, want_lse, in_place, long_rows)
                pick(kernel)(*args, *extra)
            zb = tb = gb = args = outs = None  # (as in _blocks)

    ce = _total(chunk_loss)  # float64, in a fixed order
    z_term = _total(chunk_z) if problem.z_loss else 0.0
    return ce, z_term, row_loss, row_z, lse


def _reduce(problem: Problem, ce, z_term, row_loss, row_z, lse, d, d_z, returns):
    """(loss, z-term, lse) as returned, from _fused's sums and rows and the denominators."""
    want_z, want_lse = returns
    result = problem.result
    lse = lse.reshape(problem.lead) if want_lse else None
    if problem.reduction == "none":

        def per_row(x):
            return x.astype(result, copy=False).reshape(problem.lead)

        return per_row(row_loss), per_row(row_z) if want_z else None, lse
    if problem.reduction == "mean":
        ce = _mean(ce, d, problem.all_ignored)
        z_term = _mean(z_term, d_z, problem.all_ignored) if problem.z_loss else 0.0
    return _scalar(ce + z_term, result), _scalar(z_term, result), lse


def _scalar(x: float, dtype: np.dtype):
    """x as a NumPy scalar of dtype; beyond the dtype's range it is inf, quietly (np.errstate
    only when float32 or a half dtype may overflow: it costs ~2 us)."""
    if dtype == _F64 or (dtype == _F32 and abs(x) <= _F32_MAX):
        return dtype.type(x)
    with np.errstate(over="ignore"):
        return dtype.type(x)
