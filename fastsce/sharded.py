"""Cross-entropy with the classes of each row split across shards (vocabulary-parallel).

When the K classes are split into shards (column chunks of a huge vocabulary, or the
slices held by different machines), each shard reduces its own logits to a few numbers
per row, those combine exactly into the loss, and each shard then computes its own slice
of the gradient from the combined numbers; no shard ever needs another shard's logits.

    stats = [partial_stats(z_s, target, offset_s) for z_s, offset_s in shards]
    total = combine(*stats)                       # any order, any tree: associative
    loss = finish(total)
    grad_s = finish_grad(z_s, target, total, offset_s)   # (N, K_s), this shard's columns

The loss and the concatenated gradients are those of :func:`fastsce.cross_entropy_with_grad`
on the full logits. With z the (transformed) logits of row n, w the class weights, t the
target distribution (one-hot of the label for class indices), eps the label smoothing,
lse = logsumexp_j z_j and W = sum_j w_j:

    loss_n = (1 - eps) (A lse - B) + (eps / K) (W lse - C)
    A = sum_j w_j t_j,   B = sum_j w_j t_j z_j,   C = sum_j w_j z_j

A shard's :class:`ShardStats` holds, per row, its max m, s = sum exp(z - m), A, and
B, C relative to m (b = B - A m, c = C - W m, which keeps their digits for large
logits); :func:`combine` takes the larger max and rescales the rest to it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np

from fastsce import _threads
from fastsce._kernels import shards as shard_kernels
from fastsce._typing import Array, ArrayLike, Loss
from fastsce._kernels.rows import float64_sum
from fastsce._layout import read_only
from fastsce._validate import (
    ALL_IGNORED,
    FLOAT_DTYPES,
    REDUCTIONS,
    _WEIGHT_RANGE,
    _check_choice,
    _check_ignore_index,
    _check_real,
    _check_target,
    _check_weight,
    _power_of_two_scale,
    as_array,
    check_returns,
    check_transform,
    row_weights,
    same_memory,
)

__all__ = ["ShardStats", "combine", "finish", "finish_grad", "partial_stats"]

# Rows per prange chunk: about this many logits, at least one row (as fastsce.api).
_CHUNK_LOGITS = 1 << 16



@dataclass(frozen=True, repr=False, eq=False)
class ShardStats:
    """Partial statistics of the classes of one or more shards, for every row.

    Per row (float64 arrays of shape (N,), read-only), over the classes seen so far:
    ``m`` the max logit, ``s`` = sum exp(z - m), ``a`` = sum w t, ``b`` = sum w t (z - m),
    ``c`` = sum w (z - m) (0 without label smoothing); for class-index targets ``held``,
    how many shards held the row's label (int64), and ``labels``, the labels themselves.
    Scalars: ``classes`` (the number of classes seen), ``weight_sum`` (their summed class
    weight), ``shards`` (the (class_offset, K_s) of every shard, sorted), and the options
    the statistics were computed with, which every shard must share.
    """

    m: np.ndarray
    s: np.ndarray
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    held: np.ndarray | None
    labels: np.ndarray | None
    classes: int
    weight_sum: float
    shards: tuple
    dtype: np.dtype
    soft: bool
    ignore_index: int
    label_smoothing: float
    logit_scale: float | None
    softcap: float | None

    @property
    def n(self) -> int:
        return self.m.shape[0]

    def __repr__(self):
        target = "probabilities" if self.soft else f"class indices, ignore_index={self.ignore_index}"
        return (
            f"ShardStats(N={self.n}, classes={self.classes}, shards={list(self.shards)}, dtype={self.dtype}, "
            f"{target}, label_smoothing={self.label_smoothing}, logit_scale={self.logit_scale}, "
            f"softcap={self.softcap})"
        )


# --- public functions ---------------------------------------------------------------------------


def partial_stats(
    logits_shard: ArrayLike,
    target: ArrayLike,
    class_offset: int,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> ShardStats:
    """Partial statistics of one shard: classes [class_offset, class_offset + K_s).

    Parameters
    ----------
    logits_shard : (N, K_s) float32 or float64 array
        Columns class_offset .. class_offset + K_s - 1 of the full (N, K) logits.
    target : (N,) integer array, or (N, K_s) float array
        Class indices in the full range [0, K) (a row whose label lies in another shard
        adds no target term here), or this shard's columns of the target probabilities.
    class_offset : int >= 0
        The full-range index of the shard's first class.
    weight : (K_s,) array, optional
        This shard's slice of the class weights.
    ignore_index, label_smoothing : as in :func:`fastsce.cross_entropy`.
    logit_scale : float, optional
        The logits used are logit_scale * logits_shard.
    softcap : float > 0, optional
        The logits used are softcap * tanh(logits / softcap), after logit_scale.

    One read of the shard's logits; the result is O(N).
    """
    shard = _Shard(logits_shard, target, class_offset, weight, ignore_index, label_smoothing, logit_scale, softcap)
    n, k = shard.x.shape
    m, s, a, b, c = (np.empty(n, np.float64) for _ in range(5))
    scale, cap, transformed = shard.transform_args
    chunk_rows = max(1, _CHUNK_LOGITS // k)
    held = labels = None
    with _threads.launching(shard.x.size) as pick:  # the pool, or the serial twins
        if shard.soft:
            pick(shard_kernels.soft_stats)(
                shard.x, shard.target, shard.w, shard.eps, scale, cap, transformed, chunk_rows, m, s, a, b, c
            )
        else:
            held = np.empty(n, np.int64)
            pick(shard_kernels.hard_stats)(
                shard.x, shard.target, shard.offset, shard.ignore_index, shard.w, shard.eps,
                scale, cap, transformed, chunk_rows, m, s, a, b, c, held,
            )  # fmt: skip
            labels = shard.target.astype(np.int64)  # a copy: the stats never alias the input
    arrays = dict(m=m, s=s, a=a, b=b, c=c, held=held, labels=labels)
    for arr in arrays.values():
        if arr is not None:
            arr.setflags(write=False)
    return ShardStats(
        **arrays,
        classes=k,
        weight_sum=shard.w_sum,
        shards=((shard.offset, k),),
        dtype=shard.x.dtype,
        soft=shard.soft,
        ignore_index=shard.ignore_index,
        label_smoothing=shard.eps,
        logit_scale=shard.logit_scale,
        softcap=shard.softcap,
    )


def combine(a: ShardStats, b: ShardStats, *more: ShardStats) -> ShardStats:
    """Merge the statistics of disjoint sets of classes: associative and commutative, so
    any order or reduction tree gives the same result (to rounding; swapping two
    arguments gives the same bits). Raises ValueError for statistics of different
    rows, targets, dtypes or options."""
    result = _combine_two(a, b)
    for other in more:
        result = _combine_two(result, other)
    return result


@overload
def finish(
    stats: ShardStats,
    *,
    reduction: str = "mean",
    z_loss: float = 0.0,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: Literal[False] = False,
    return_lse: Literal[False] = False,
) -> Loss: ...


@overload
def finish(
    stats: ShardStats,
    *,
    reduction: str = "mean",
    z_loss: float = 0.0,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
) -> Loss | tuple[Any, ...]: ...


def finish(
    stats: ShardStats,
    *,
    reduction: str = "mean",
    z_loss: float = 0.0,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
) -> Loss | tuple[Any, ...]:
    """The loss from the combined statistics of every shard.

    Options as in :func:`fastsce.cross_entropy`: ``reduction``; ``z_loss`` (adds
    z_loss * lse^2 per counted row); ``sample_weight`` and ``where`` ((N,) row weights
    and mask, v = sample_weight * where; a row with v = 0 is left out like an ignored
    row); ``all_ignored`` ("nan" or "zero": the "mean" when its denominator is 0).

    Returns the loss (a scalar of the logits' dtype, an (N,) array for "none"), or a
    tuple (loss, [z-term], [lse]) with the requested extras: the z-term alone, reduced
    like the loss (which includes it), and every row's logsumexp.

    Raises IndexError naming the first row whose label no shard held, or more than one
    (overlapping shards), and ValueError when the shards leave a gap or overlap.
    """
    check_returns(return_z_loss, return_lse)
    rows = _Rows(stats, reduction, z_loss, sample_weight, where, all_ignored)
    dtype = stats.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):  # a float32 loss beyond 3.4e38 is inf, quietly
        if reduction == "none":
            loss = (rows.ce + rows.zl).astype(dtype)
            z_term = rows.zl.astype(dtype)
        elif reduction == "sum":
            total_z = rows.zl.sum()
            loss = dtype(rows.ce.sum() + total_z)
            z_term = dtype(total_z)
        else:
            ce = rows.ce.sum() / rows.d if rows.d else rows.fill
            total_z = (rows.zl.sum() / rows.d_z if rows.d_z else rows.fill) if rows.z_loss else 0.0
            loss = dtype(ce + total_z)
            z_term = dtype(total_z)
    extras = []
    if return_z_loss:
        extras.append(z_term)
    if return_lse:
        extras.append(rows.lse.astype(dtype))
    return (loss, *extras) if extras else loss


def finish_grad(
    logits_shard: ArrayLike,
    target: ArrayLike,
    stats: ShardStats,
    class_offset: int,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    reduction: str = "mean",
    z_loss: float = 0.0,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    out: Array | None = None,
) -> Array:
    """This shard's (N, K_s) slice of the gradient of :func:`finish`'s loss with respect
    to the full logits, from the combined statistics of every shard.

    logits_shard, target, class_offset and weight are the shard's, as given to
    :func:`partial_stats` (with the same ignore_index, label_smoothing, logit_scale and
    softcap); the remaining options are those given to :func:`finish`. ``out``: an
    (N, K_s) C-contiguous writeable array of the logits' dtype that receives the
    gradient (it may be logits_shard itself). Rows left out of the loss get a zero
    gradient without their logits being read.
    """
    shard = _Shard(logits_shard, target, class_offset, weight, ignore_index, label_smoothing, logit_scale, softcap)
    _check_same_shard(shard, stats)
    rows = _Rows(stats, reduction, z_loss, sample_weight, where, all_ignored)
    g = _check_out(out, shard)
    k = shard.x.shape[1]
    eps, big_k = stats.label_smoothing, stats.classes

    with np.errstate(invalid="ignore", divide="ignore"):
        if reduction == "mean":
            sc = 1.0 / rows.d if rows.d else rows.fill
            sc_z = 1.0 / rows.d_z if rows.d_z else rows.fill
        else:
            sc = sc_z = 1.0
    v = np.where(rows.counted, rows.v, 0.0)
    p, q, r = grad_coefficients(stats.a, stats.s, rows.lse, stats.weight_sum, big_k, eps, v, sc, sc_z, rows.z_loss)
    scale, cap, transformed = shard.transform_args
    chunk_rows = max(1, _CHUNK_LOGITS // k)
    m, p, q, r, counted = (read_only(np.asarray(a)) for a in (stats.m, p, q, r, rows.counted))  # (as fastsce.linear)
    with _threads.launching(shard.x.size) as pick:  # the pool, or the serial twins
        if shard.soft:
            pick(shard_kernels.soft_grad)(
                shard.x, shard.target, shard.w, m, p, q, r, counted, scale, cap, transformed, chunk_rows, g,
            )  # fmt: skip
        else:
            pick(shard_kernels.hard_grad)(
                shard.x, shard.target, shard.offset, shard.w, m, p, q, r, counted,
                scale, cap, transformed, chunk_rows, g, same_memory(g, shard.x),
            )  # fmt: skip
    return g


# --- validation ---------------------------------------------------------------------------------


class _Shard:
    """The validated, normalised arguments describing one shard."""

    def __init__(self, logits, target, class_offset, weight, ignore_index, label_smoothing, logit_scale, softcap):
        logits = _check_shard_logits(logits)
        self.offset = _check_offset(class_offset)
        self.given = {"target": as_array("target", target), "weight": None if weight is None else as_array("weight", weight)}
        self.target, self.soft = _check_target(self.given["target"], logits, 1, logits, logits.dtype)
        w = _check_weight(self.given["weight"], logits, 1, None)
        if w is not None:
            w = _check_shard_weight_range(w, logits.dtype)
        self.ignore_index = _check_ignore_index(ignore_index)
        if self.soft and self.ignore_index != -100:  # as PyTorch: probabilities have no class to ignore
            raise ValueError(
                f"ignore_index={self.ignore_index} only applies to class-index targets; target has "
                f"shape {self.target.shape} (probabilities). Leave ignore_index at its default -100"
            )
        self.eps = _check_real("label_smoothing", label_smoothing, 0.0, 1.0)
        self.logit_scale, self.softcap = check_transform(logit_scale, softcap)
        self.logits = logits
        self.x = read_only(np.ascontiguousarray(logits))  # no copy on the fast path
        k = logits.shape[1]
        self.w = read_only(np.ones(k, logits.dtype) if w is None else w)
        self.w_sum = float(k) if w is None else float64_sum(w)
        if self.soft:  # probabilities of another float dtype: converted (a copy)
            self.target = read_only(np.ascontiguousarray(self.target, dtype=logits.dtype))

    @property
    def transform_args(self):
        """(logit_scale, softcap, transformed) as the kernels take them."""
        scale = 1.0 if self.logit_scale is None else self.logit_scale
        cap = 0.0 if self.softcap is None else self.softcap
        return scale, cap, self.logit_scale is not None or self.softcap is not None


def _check_shard_weight_range(w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The class weights in the logits' dtype, refusing those it cannot hold: a shard sees
    only its own slice, so it cannot rescale them as fastsce.cross_entropy does."""
    info = np.finfo(dtype)
    w64 = np.asarray(w, np.float64)
    bad = (w64 > info.max) | ((w64 > 0) & (w64 < info.tiny))
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(
            f"weight[{j}] = {float(w64[j])!r} is outside the normal range of {dtype} "
            f"[{info.tiny:g}, {info.max:g}]; scale every shard's weights by one common factor "
            "(the class-index mean does not change)"
        )
    return np.ascontiguousarray(w, dtype=dtype)


def _check_shard_logits(logits) -> np.ndarray:
    logits = as_array("logits_shard", logits)
    if not logits.dtype.isnative and logits.dtype.newbyteorder("=") in FLOAT_DTYPES:
        logits = logits.astype(logits.dtype.newbyteorder("="))  # the other byte order: its values
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits_shard must be float32 or float64; got dtype {logits.dtype}. "
            "Convert with logits_shard.astype(np.float32)"
        )
    if logits.ndim != 2:
        raise ValueError(
            f"logits_shard must be 2-D with shape (N, K_s); got shape {logits.shape}. "
            "Reshape with logits_shard.reshape(-1, K_s)"
        )
    if logits.shape[1] == 0:
        raise ValueError(f"logits_shard must hold at least one class; got shape {logits.shape}")
    return logits


def _check_offset(class_offset) -> int:
    if isinstance(class_offset, bool) or not isinstance(class_offset, numbers.Integral):
        raise TypeError(f"class_offset must be an integer (the shard's first class); got {class_offset!r}")
    if not 0 <= class_offset <= np.iinfo(np.int64).max // 2:
        raise ValueError(f"class_offset must be >= 0 (the shard's first class); got {class_offset!r}")
    return int(class_offset)


def _check_stats(stats, name="stats") -> None:
    if not isinstance(stats, ShardStats):
        raise TypeError(
            f"{name} must be a ShardStats from fastsce.partial_stats or fastsce.combine; got {type(stats).__name__}"
        )


_OPTIONS = ("dtype", "soft", "ignore_index", "label_smoothing", "logit_scale", "softcap")


def _combine_two(x: ShardStats, y: ShardStats) -> ShardStats:
    _check_stats(x, "a")
    _check_stats(y, "b")
    if x.n != y.n:
        raise ValueError(f"cannot combine statistics of N={x.n} rows with statistics of N={y.n} rows")
    for name in _OPTIONS:
        if getattr(x, name) != getattr(y, name):
            raise ValueError(
                f"cannot combine statistics computed with {name}={getattr(x, name)!r} with statistics "
                f"computed with {name}={getattr(y, name)!r}: give every shard the same options"
            )
    if not x.soft and not np.array_equal(x.labels, y.labels):
        row = int(np.argmax(x.labels != y.labels))
        raise ValueError(
            f"cannot combine statistics of different targets: target[{row}] is {int(x.labels[row])} "
            f"in one and {int(y.labels[row])} in the other; give every shard the same class indices"
        )
    merged = merge_rows((x.m, x.s, x.a, x.b, x.c), x.weight_sum, (y.m, y.s, y.a, y.b, y.c), y.weight_sum)
    arrays = dict(zip("msabc", merged), held=None if x.soft else x.held + y.held, labels=x.labels)
    for arr in arrays.values():
        if arr is not None:
            arr.setflags(write=False)
    return ShardStats(
        **arrays,
        classes=x.classes + y.classes,
        weight_sum=x.weight_sum + y.weight_sum,
        shards=tuple(sorted(x.shards + y.shards)),
        **{name: getattr(x, name) for name in _OPTIONS},
    )


def merge_rows(x, w_x, y, w_y):
    """The per-row (m, s, a, b, c) of two disjoint sets of classes, from each one's
    (float64 arrays) and its summed class weight: shared with fastsce.linear, which
    folds a tile's blocks of classes one after another."""
    xm, xs, xa, xb, xc = x
    ym, ys, ya, yb, yc = y
    m = np.maximum(xm, ym)  # NaN-propagating
    with np.errstate(invalid="ignore", over="ignore"):
        # Shift each side from its max to the common one; an equal max (also both -inf) moves by 0.
        dx = np.where(xm == m, 0.0, xm - m)
        dy = np.where(ym == m, 0.0, ym - m)
        return (
            m,
            xs * np.exp(dx) + ys * np.exp(dy),
            xa + ya,
            (xb + _times(xa, dx)) + (yb + _times(ya, dy)),
            (xc + _times(w_x, dx)) + (yc + _times(w_y, dy)),
        )


def row_terms(stats, w_sum, k, eps, v, counted, z_loss):
    """Per-row float64 (lse, ce, zl) from the combined (m, s, a, b, c) of all K classes
    (w_sum: their summed weight): the logsumexp, and v times the row's cross-entropy and
    z-term, 0 where not counted. Shared with fastsce.linear's class-split tiles."""
    m, s, a, b, c = stats
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        log_s = np.log(s)
        # a row of -inf only has lse -inf, one holding +inf +inf (m + log s is NaN there)
        lse = np.where(np.isinf(m), m, m + log_s)
        ce = a * log_s - b
        if eps > 0:
            ce = (1 - eps) * ce + eps / k * (w_sum * log_s - c)
        ce = np.where(counted, v * ce, 0.0)
        zl = np.where(counted, v * (z_loss * lse * lse), 0.0) if z_loss > 0 else np.zeros(len(m))
    return lse, ce, zl


def grad_coefficients(a, s, lse, w_sum, k, eps, v, sc, sc_z, z_loss):
    """(p, q, r) per row, float64, of the gradient the shard kernels form,
    g_j = (p e_j - q w_j [j = y] - r w_j) dz_j/dx_j with e_j = exp(z_j - m), that is
    v sc [((1 - eps) a + eps W / K) p_j - (1 - eps) w_j t_j - eps w_j / K]
    + v sc_z 2 z_loss lse p_j, p_j = e_j / s (sc, sc_z: the loss's and the z-term's
    scale). Shared with fastsce.linear's class-split tiles."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        coef = sc * ((1 - eps) * a + eps * w_sum / k)
        if z_loss > 0:
            coef = coef + sc_z * 2 * z_loss * lse
        return v * coef / s, v * (sc * (1 - eps)), v * (sc * eps / k)


def _times(w, d):
    """w * d with 0 * inf = 0 (a zero weight on a -inf logit adds nothing); NaN stays NaN."""
    w = np.asarray(w, np.float64)
    return np.where((w == 0) & np.isinf(d), 0.0, w * d)


def _check_coverage(stats: ShardStats) -> None:
    """The shards must tile [0, K) exactly: no class counted twice, none missing."""
    end = 0
    for offset, k in stats.shards:
        if offset < end:
            raise ValueError(
                f"shards overlap: the shard at class_offset={offset} (K_s={k}) starts before the end "
                f"({end}) of the one before it; shards {list(stats.shards)} must cover each class once"
            )
        if offset > end:
            raise ValueError(
                f"no shard holds classes [{end}, {offset}): shards {list(stats.shards)} must cover "
                f"[0, K) with no gap; combine the statistics of every shard before finishing"
            )
        end = offset + k


class _Rows:
    """What finish and finish_grad share: validated options and per-row float64 terms.

    v: row weights; counted: rows in the loss; lse; ce, zl: v times the row's cross-entropy
    and z-term (0 where not counted); d, d_z: the "mean" denominators; fill: the "mean"
    when its denominator is 0."""

    def __init__(self, stats, reduction, z_loss, sample_weight, where, all_ignored):
        _check_stats(stats)
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("all_ignored", all_ignored, ALL_IGNORED)
        self.z_loss = _check_real("z_loss", z_loss, 0.0, np.inf)
        n = stats.n
        v = row_weights(sample_weight, where, (n,))[0]
        v = np.ones(n) if v is None else v
        if reduction == "mean":  # v / V in numerator and denominator alike: extreme sample
            v = v / _power_of_two_scale(v, _WEIGHT_RANGE[np.dtype(np.float64)])  # weights stay normal
        if not stats.soft:
            _check_held(stats)
        _check_coverage(stats)
        counted = v != 0
        if not stats.soft:
            counted &= stats.labels != stats.ignore_index
        self.lse, self.ce, self.zl = row_terms(
            (stats.m, stats.s, stats.a, stats.b, stats.c), stats.weight_sum, stats.classes,
            stats.label_smoothing, v, counted, self.z_loss,
        )  # fmt: skip
        with np.errstate(invalid="ignore", over="ignore"):
            self.d = float(np.where(counted, v * (1.0 if stats.soft else stats.a), 0.0).sum())
        self.d_z = float(np.where(counted, v, 0.0).sum())
        self.v = v
        self.counted = counted
        self.fill = np.nan if all_ignored == "nan" else 0.0


def _check_held(stats: ShardStats) -> None:
    """IndexError naming the first row (not ignored) whose label no shard held, or several."""
    bad = (stats.labels != stats.ignore_index) & (stats.held != 1)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    y, held = int(stats.labels[i]), int(stats.held[i])
    covered = ", ".join(f"[{o}, {o + k})" for o, k in stats.shards)
    if held == 0:
        raise IndexError(
            f"target[{i}] = {y} is a class of no shard: the shards hold classes {covered}. Labels must "
            f"lie in [0, K) and every shard's statistics be combined, or the label equal "
            f"ignore_index={stats.ignore_index}"
        )
    raise IndexError(
        f"target[{i}] = {y} is a class of {held} shards: shards {covered} overlap. Give each class to exactly one shard"
    )


def _check_same_shard(shard: _Shard, stats: ShardStats) -> None:
    _check_stats(stats)
    n, k = shard.x.shape
    if n != stats.n:
        raise ValueError(f"logits_shard has N={n} rows but stats were computed for N={stats.n} rows")
    given = dict(
        dtype=shard.x.dtype,
        soft=shard.soft,
        ignore_index=shard.ignore_index,
        label_smoothing=shard.eps,
        logit_scale=shard.logit_scale,
        softcap=shard.softcap,
    )
    for name, value in given.items():
        if value != getattr(stats, name):
            what = {"dtype": "logits_shard has dtype", "soft": "target is probabilities:"}.get(name, f"{name}=")
            raise ValueError(
                f"{what}{value!r} here but the stats were computed with {name}={getattr(stats, name)!r}; "
                "pass finish_grad the shard's arguments as given to partial_stats"
            )
    if (shard.offset, k) not in stats.shards:
        raise ValueError(
            f"no shard with class_offset={shard.offset} and K_s={k} classes went into stats "
            f"(its shards: {list(stats.shards)}); pass the shard's own logits and class_offset"
        )
    if not shard.soft and not np.array_equal(shard.target, stats.labels):
        row = int(np.argmax(shard.target != stats.labels))
        raise ValueError(
            f"target[{row}] = {int(shard.target[row])} but the stats were computed with "
            f"{int(stats.labels[row])} there; pass the same target as to partial_stats"
        )


def _check_out(out, shard: _Shard) -> np.ndarray:
    x = shard.logits
    if out is None:
        return np.empty(x.shape, x.dtype)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy.ndarray; got {type(out).__name__}")
    as_array("out", out)
    if out.shape != x.shape:
        raise ValueError(
            f"out has shape {out.shape} but logits_shard has shape {x.shape}; allocate it with "
            "np.empty_like(logits_shard)"
        )
    if out.dtype != x.dtype:
        raise ValueError(
            f"out has dtype {out.dtype} but the gradient has dtype {x.dtype}; allocate it with "
            f"np.empty(logits_shard.shape, np.{x.dtype})"
        )
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous; allocate it with np.empty_like(logits_shard, order='C')")
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array")
    if not same_memory(out, x) and np.shares_memory(out, x):
        raise ValueError("out overlaps logits_shard without being it; pass out=logits_shard or a separate array")
    for name, arr in shard.given.items():
        if arr is not None and np.shares_memory(out, arr):
            raise ValueError(f"out overlaps {name}; pass a separate array as out")
    return out
