"""Cross-entropy straight from hidden states, never holding the (N, V) logits.

    loss = fastsce.linear_cross_entropy(hidden, W, labels)
    loss, g_hidden, g_W, g_b = fastsce.linear_cross_entropy_with_grad(hidden, W, labels)

The loss of logits = input @ linear_weightᵀ + linear_bias (PyTorch's ``F.linear``)
through :func:`fastsce.cross_entropy`, computed a tile of rows at a time: a BLAS
product makes the tile's logits, the fused row kernels of :mod:`fastsce.api` turn them
into loss and gradient in place, and two more products take the tile's gradient G back
to ``grad_input`` (G W) and add it into ``grad_linear_weight`` (Gᵀ h). The extra memory
is the tile (by default 48 MiB, or an eighth of the weight when that is more: whatever
N) plus O(N + V) vectors. When too few
whole rows fit the tile, it holds many rows and a block of classes (``chunk_classes``):
the rows' statistics are folded block by block with fastsce.sharded's kernels, then
each block's logits are made again for its gradient (_split_tile).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from fastsce import _threads, api, sharded
from fastsce._kernels import shards as shard_kernels
from fastsce._layout import read_only
from fastsce._typing import ArrayLike, Loss
from fastsce._validate import (
    FLOAT_DTYPES,
    HALF_DTYPE_NAMES,
    Problem,
    check_denominator,
    check_problem,
    check_returns,
)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad"]

# The default tile of logits (see _tile), the only (rows, classes) buffer: TILE_BYTES,
# or an eighth of the weight (V x H) when that is more, so the extra memory does not
# depend on N and adds at most an eighth to the weight the caller holds (and, with
# gradients, to the weight's gradient returned). An eighth of V x H holds H / 8 whole
# rows: 256 at H = 2048, enough to keep BLAS at its pace where the weight is too large
# for 48 MiB to hold many rows (N = 2048, H = 2048, V = 128256, idle, 2 threads, each
# in its own process, the three products 23.1-26.4 s: whole rows of 64 1.40x, 96
# 1.26x, 120 1.22x, 256 0.88x, 512 0.86x; 1024 rows x 11 classes blocks of 48 MiB
# 1.14-1.27x, its bound 3.9 / 3 products).
TILE_BYTES = 48 << 20
WEIGHT_SHARE = 8

# Fewer whole rows than this fit (and than N) and the classes are split too: tiles of
# MIN_TILE_ROWS rows by a block of classes (see _split_tile), at the cost of making each
# block's logits twice when gradients are wanted: (B - 1) / B of a fourth product with
# B blocks. Below a few hundred rows a tile reads the weight and its gradient for too
# little arithmetic (idle, 2 threads: 64 rows 1.40x the products, above); at N = 4096,
# H = 1024, V = 32000 whole rows of 393 and the split tile both took 0.98-1.01x.
MIN_WHOLE_ROWS = 256
MIN_TILE_ROWS = 1024

# grad_linear_weight is accumulated in its own dtype (float32 for float32): every tile's
# Gᵀ h is added in place by BLAS (gemm with beta = 1), so no (V, H) temporary is made.
# A float64 accumulator would cost V * H * 8 bytes (262 MB at V = 32000, H = 1024) and
# buys nothing measurable: at N = 4096, H = 512, V = 8000 the float32 weight gradient's
# largest error against float64 is 4.6e-7 / 6.5e-7 / 1.1e-6 of its largest entry with
# 64 / 512 / 1572 (the default) rows a tile, the unfused float32 Gᵀ h's 9.3e-7 (tests/test_linear.py::
# test_float32_weight_gradient_error_like_unfused keeps it so).
# The bias gradient (V values) is summed in float64.


@dataclasses.dataclass(frozen=True)
class _Setup:
    h: np.ndarray  # (N, H) C-contiguous
    w: np.ndarray  # (V, H)
    b: np.ndarray | None  # (V,)
    problem: Problem  # the cross-entropy of the (N, V) logits, seen only through their shape
    returns: tuple[bool, bool]
    denominator: tuple[float, float] | None
    tile: tuple[int, int]  # (rows, classes) of a tile of logits
    input_shape: tuple[int, ...]


def linear_cross_entropy(
    input: ArrayLike,
    linear_weight: ArrayLike,
    target: ArrayLike,
    *,
    linear_bias: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
    denominator: float | tuple[float, float] | None = None,
    chunk_rows: int | None = None,
    chunk_classes: int | None = None,
) -> Loss | tuple[Any, ...]:
    """Cross-entropy of logits = input @ linear_weightᵀ + linear_bias, without them.

    Parameters
    ----------
    input : float32 or float64 array (..., H)
        Hidden states, one row per token.
    linear_weight : (V, H) array of the input's dtype
        The classifier head (``torch.nn.Linear(H, V).weight``).
    target : integer array of class indices, shaped like ``input`` without its last axis
        (Probabilities are not taken: an (N, V) target is the array this avoids.)
    linear_bias : (V,) array of the input's dtype, optional
    chunk_rows : int >= 1, optional
        Rows per tile: the extra memory is chunk_rows x chunk_classes logits. Default:
        as many whole rows as fit in the tile budget, max(48 MiB, 1/8 of the
        weight's bytes), when that is at least min(N, 256), else 1024; with
        chunk_classes given, as many as fit in the budget.
    chunk_classes : int >= 1, optional
        Classes per tile (a block of each row): the rows' statistics are gathered over
        the blocks, then each block's logits are made again for the gradient. Default:
        all V when chunk_rows is given or whole rows fit as above, else equal blocks
        within the budget.

    The other arguments are those of :func:`fastsce.cross_entropy` (class indices, the
    classes on the last axis) with the same meaning, and ``denominator`` that of
    :func:`fastsce.cross_entropy_with_grad`.

    Returns
    -------
    loss, or ``(loss, z_loss, lse)`` with the requested extras, as :func:`fastsce.cross_entropy`.
    """
    setup = _check(
        input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss,
        logit_scale, softcap, sample_weight, where, all_ignored, return_z_loss, return_lse, denominator, chunk_rows,
        chunk_classes,
    )  # fmt: skip
    loss, grads, z_term, lse = _solve(setup, (False, False, False))
    extra = [x for x, wanted in zip((z_term, lse), setup.returns) if wanted]
    return (loss, *extra) if extra else loss


def linear_cross_entropy_with_grad(
    input: ArrayLike,
    linear_weight: ArrayLike,
    target: ArrayLike,
    *,
    linear_bias: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
    denominator: float | tuple[float, float] | None = None,
    chunk_rows: int | None = None,
    chunk_classes: int | None = None,
) -> tuple[Any, ...]:
    """Loss and its gradients with respect to input, linear_weight and linear_bias.

    Takes the arguments of :func:`linear_cross_entropy`.

    Returns
    -------
    (loss, grad_input, grad_linear_weight, grad_linear_bias), then z_loss and lse when
    requested. ``grad_linear_bias`` is None without a bias. The gradients have the
    shapes and dtype of their arrays. For ``reduction="none"`` they are those of the sum
    of the per-row losses.
    """
    setup = _check(
        input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss,
        logit_scale, softcap, sample_weight, where, all_ignored, return_z_loss, return_lse, denominator, chunk_rows,
        chunk_classes,
    )  # fmt: skip
    loss, grads, z_term, lse = _solve(setup, (True, True, setup.b is not None))
    extra = [x for x, wanted in zip((z_term, lse), setup.returns) if wanted]
    return (loss, *grads, *extra)


def _check(
    input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss,
    logit_scale, softcap, sample_weight, where, all_ignored, return_z_loss, return_lse, denominator, chunk_rows,
    chunk_classes,
) -> _Setup:  # fmt: skip
    """Everything checked before any product: shapes and dtypes here (in the linear
    layer's terms), the cross-entropy's options by fastsce._validate on a stand-in for
    the (N, V) logits that has their shape and dtype and no memory."""
    h = _check_float("input", input)
    if h.ndim == 0 or h.shape[-1] == 0:
        raise ValueError(f"input must have shape (..., H) with H >= 1 features; got shape {h.shape}")
    lead, hidden = h.shape[:-1], h.shape[-1]
    w = _check_float("linear_weight", linear_weight)
    if w.ndim != 2:
        raise ValueError(f"linear_weight must be 2-D, (V, H) = (classes, features); got shape {w.shape}")
    if w.shape[1] != hidden:
        raise ValueError(
            f"linear_weight has shape {w.shape} but input has H={hidden} features (shape {h.shape}); "
            f"linear_weight must be (V, {hidden}), as torch.nn.Linear({hidden}, V).weight"
        )
    if not (w.flags.c_contiguous or w.flags.f_contiguous):
        w = np.ascontiguousarray(w)  # once, rather than by BLAS at every tile
    classes = w.shape[0]
    if classes == 0:
        raise ValueError(f"linear_weight must have at least one row (class); got shape {w.shape}")
    _same_dtype("linear_weight", w, h)
    b = None
    if linear_bias is not None:
        b = _check_float("linear_bias", linear_bias)
        if b.shape != (classes,):
            raise ValueError(
                f"linear_bias has shape {b.shape} but linear_weight has V={classes} rows; "
                f"linear_bias must have shape ({classes},)"
            )
        _same_dtype("linear_bias", b, h)
    y = np.asarray(target)
    if y.shape != lead:
        raise ValueError(
            f"target has shape {y.shape} but input has shape {h.shape}; target must hold one class "
            f"index per row of input, shape {lead} (probability targets are not supported here)"
        )
    if y.dtype.kind not in "iu":
        raise TypeError(
            f"target must be an integer array of class indices; got dtype {y.dtype}. "
            "Convert with target.astype(np.int64)"
        )
    if weight is not None and np.shape(weight) != (classes,):
        raise ValueError(
            f"weight has shape {np.shape(weight)} but linear_weight has V={classes} rows (classes); "
            f"weight must have one entry per class, shape ({classes},)"
        )
    logits = np.broadcast_to(np.zeros((), h.dtype), lead + (classes,))  # shape and dtype only
    problem = check_problem(
        logits, y, weight, ignore_index, reduction, label_smoothing, sample_weight=sample_weight, where=where,
        z_loss=z_loss, logit_scale=logit_scale, softcap=softcap, all_ignored=all_ignored,
    )  # fmt: skip
    returns = check_returns(return_z_loss, return_lse)
    denominator = check_denominator(denominator, reduction)
    for name, value, unit in (("chunk_rows", chunk_rows, "rows"), ("chunk_classes", chunk_classes, "classes")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 ({unit} per tile) or None; got {value!r}")
    rows = math.prod(lead)
    tile = _tile(rows, classes, hidden, h.dtype.itemsize, chunk_rows, chunk_classes)
    h2 = np.ascontiguousarray(h.reshape(rows, hidden))  # a copy only if input is not C-contiguous
    return _Setup(h2, w, b, problem, returns, denominator, tile, h.shape)


def _tile(n: int, classes: int, hidden: int, itemsize: int, chunk_rows, chunk_classes) -> tuple[int, int]:
    """(rows, classes) of a tile: as given, else within the budget (TILE_BYTES, or
    1/WEIGHT_SHARE of the weight), whole rows when at least min(N, MIN_WHOLE_ROWS) of
    them fit, else MIN_TILE_ROWS rows (or N) and blocks of classes of equal size
    (rounded up to 16 where that still fits)."""
    if chunk_rows is not None:
        return int(chunk_rows), min(classes, int(chunk_classes or classes))
    budget = max(TILE_BYTES, classes * hidden * itemsize // WEIGHT_SHARE)
    if chunk_classes is not None:
        cols = min(classes, int(chunk_classes))
        return max(1, budget // (cols * itemsize)), cols
    whole = budget // (classes * itemsize)
    if whole >= max(1, min(n, MIN_WHOLE_ROWS)):
        return whole, classes
    rows = max(1, min(n, MIN_TILE_ROWS))
    most = max(1, budget // (rows * itemsize))
    blocks = -(-classes // most)
    cols = -(-classes // blocks)
    return rows, min(most, -(-cols // 16) * 16) if cols > 16 else cols


def _linear_setup(input, linear_weight, target, kwargs: dict) -> _Setup:
    """_check from keyword arguments (for fastsce.torch and the reference)."""
    get = kwargs.get
    return _check(
        input, linear_weight, target, get("linear_bias"), get("weight"), get("ignore_index", -100),
        get("reduction", "mean"), get("label_smoothing", 0.0), get("z_loss", 0.0), get("logit_scale"),
        get("softcap"), get("sample_weight"), get("where"), get("all_ignored", "nan"), get("return_z_loss", False),
        get("return_lse", False), get("denominator"), get("chunk_rows"), get("chunk_classes"),
    )  # fmt: skip


def _check_float(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in FLOAT_DTYPES:
        half = " (half precision is not supported here)" if x.dtype.name in HALF_DTYPE_NAMES else ""
        raise TypeError(
            f"{name} must be float32 or float64; got dtype {x.dtype}{half}. Convert with {name}.astype(np.float32)"
        )
    return x


def _same_dtype(name: str, x: np.ndarray, h: np.ndarray) -> None:
    if x.dtype != h.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but input has dtype {h.dtype}; pass them in one dtype, "
            f"e.g. {name}.astype(np.{h.dtype})"
        )


def _solve(setup: _Setup, want: tuple[bool, bool, bool]):
    """(loss, (grad_input, grad_linear_weight, grad_linear_bias), z-term, lse), the
    gradients computed as far as ``want`` says (None otherwise), a tile at a time."""
    p, h, w, b = setup.problem, setup.h, setup.w, setup.b
    n, classes = p.shape
    dtype = p.compute  # = the input's
    want_z, want_lse = setup.returns
    want_grad = any(want)
    # The whole batch's class weights and "mean" denominators, its labels checked (the
    # first bad one named by its row in the batch), before any product.
    cw, cw_sum, d, d_z = api._scaled_weights(p, setup.denominator)
    scale, scale_z = api._scales(p, d, d_z)
    none = p.reduction == "none"
    row_loss = np.empty(n if none else 0, dtype)
    row_z = np.empty(n if none and want_z else 0, dtype)
    lse = np.empty(n if want_lse else 0, dtype)
    g_in = np.empty(h.shape, dtype) if want[0] else None
    g_w = np.zeros(w.shape, dtype) if want[1] else None
    g_b = np.zeros(classes, np.float64) if want[2] else None
    ce = z_sum = 0.0
    size = max(1, min(setup.tile[0], n))
    cols = setup.tile[1]
    tile = np.empty(size * cols, dtype) if n else None  # the only (rows, classes) buffer
    split = cols < classes
    for r0 in range(0, n, size):
        r1 = min(n, r0 + size)
        ht = h[r0:r1]
        if split:
            sums = _split_tile(
                setup, (r0, r1), tile, cw, cw_sum, scale, scale_z, want, g_in, g_w, g_b,
            )  # fmt: skip
            c, zs, rl, rz, ls = sums
        else:
            t = tile[: (r1 - r0) * classes].reshape(r1 - r0, classes)
            _logits(ht, w, b, t)
            rows = dataclasses.replace(
                p, logits=t, axis=1, rows=t, target=p.target[r0:r1],
                row_weight=None if p.row_weight is None else p.row_weight[r0:r1],
            )  # fmt: skip
            # The tile's gradient (of the whole batch's loss) replaces its logits in place.
            c, zs, rl, rz, ls = api._fused(rows, t if want_grad else None, setup.returns, cw, cw_sum, scale, scale_z)
            _backward(t, ht, w, want, g_in, g_w, g_b, r0, r1, 0, classes, True)
        ce, z_sum = ce + c, z_sum + zs  # float64, tile after tile: the same for any thread count
        if none:
            row_loss[r0:r1] = rl
            if want_z:
                row_z[r0:r1] = rz
        if want_lse:
            lse[r0:r1] = ls
    loss, z_term, lse = api._reduce(p, ce, z_sum, row_loss, row_z, lse, d, d_z, setup.returns)
    grads = (
        None if g_in is None else g_in.reshape(setup.input_shape),
        g_w,
        None if g_b is None else g_b.astype(dtype),
    )
    return loss, grads, z_term, lse


def _logits(ht: np.ndarray, w: np.ndarray, b: np.ndarray | None, t: np.ndarray) -> None:
    """t = ht wᵀ + b: one tile (or block of classes) of logits, by BLAS."""
    np.matmul(ht, w.T, out=t)
    if b is not None:
        t += b


def _backward(g, ht, w, want, g_in, g_w, g_b, r0, r1, c0, c1, first) -> None:
    """Take the gradient g of rows r0:r1, classes c0:c1 (with w = their rows of the
    weight) into the gradients wanted: G W into grad_input's rows (added to them unless
    first), Gᵀ h into grad_linear_weight's rows c0:c1, the column sums into the bias's."""
    if want[0]:
        _add_gw(g_in[r0:r1], g, w[c0:c1], first)
    if want[1]:
        _add_product(g_w[c0:c1], g, ht)
    if want[2]:
        g_b[c0:c1] += g.sum(axis=0, dtype=np.float64)


def _split_tile(setup: _Setup, span, buf, cw, cw_sum, scale, scale_z, want, g_in, g_w, g_b):
    """A tile of rows r0:r1 whose logits do not fit the tile whole, a block of classes
    at a time (fastsce.sharded's kernels): a first pass makes each block's logits and
    folds them into per-row statistics (max, sum of exps, target and smoothing terms,
    merged as fastsce.combine does), from which the rows' losses follow; with gradients,
    a second pass (blocks in reverse order, the last one's logits still in the buffer)
    makes each block's logits again, turns them into the gradient in place, and takes
    it into the gradients as a whole-row tile does. Returns _fused's sums for the tile."""
    p, h, w, b = setup.problem, setup.h, setup.w, setup.b
    r0, r1 = span
    classes = p.shape[1]
    rows, cols = r1 - r0, setup.tile[1]
    ht, y = h[r0:r1], p.target[r0:r1]
    eps, zl = p.label_smoothing, p.z_loss
    a = 1.0 if p.logit_scale is None else p.logit_scale
    cap = 0.0 if p.softcap is None else p.softcap
    transformed = a != 1.0 or cap > 0
    blocks = [(c0, min(classes, c0 + cols)) for c0 in range(0, classes, cols)]
    chunk = max(1, sharded._CHUNK_LOGITS // cols)  # rows per prange chunk of the shard kernels
    held = np.empty(rows, np.int64)  # (every label was checked: held once by its block)
    total = None
    w_seen = 0.0
    for c0, c1 in blocks:
        z = buf[: rows * (c1 - c0)].reshape(rows, c1 - c0)
        _logits(ht, w[c0:c1], None if b is None else b[c0:c1], z)
        part = tuple(np.empty(rows) for _ in range(5))
        with _threads.launching(z.size) as pick:
            pick(shard_kernels.hard_stats)(  # (inputs read-only, as fastsce.sharded gives them)
                read_only(z), y, c0, p.ignore_index, read_only(cw[c0:c1]), eps, a, cap, transformed, chunk, *part, held,
            )  # fmt: skip
        w_block = float(cw[c0:c1].sum(dtype=np.float64))
        total = part if total is None else sharded.merge_rows(total, w_seen, part, w_block)
        w_seen += w_block
    v = np.ones(rows) if p.row_weight is None else p.row_weight[r0:r1]
    live = (y != p.ignore_index) & (v != 0)
    lse, ce, zt = sharded.row_terms(total, cw_sum, classes, eps, v, live, zl)  # as fastsce.finish
    if any(want):
        # the row kernels' gradient (scale, z-loss, row weight) in fastsce.sharded's terms
        pp, q, r = sharded.grad_coefficients(total[2], total[1], lse, cw_sum, classes, eps, v, scale, scale_z, zl)
        frozen = [read_only(np.asarray(x)) for x in (total[0], pp, q, r, live)]  # (as fastsce.sharded gives them)
        for i, (c0, c1) in enumerate(reversed(blocks)):
            z = buf[: rows * (c1 - c0)].reshape(rows, c1 - c0)
            if i:  # the last block's logits are still there from the first pass
                _logits(ht, w[c0:c1], None if b is None else b[c0:c1], z)
            with _threads.launching(z.size) as pick:
                pick(shard_kernels.hard_grad)(
                    read_only(z), y, c0, read_only(cw[c0:c1]), *frozen, a, cap, transformed, chunk, z, True,
                )  # fmt: skip
            _backward(z, ht, w, want, g_in, g_w, g_b, r0, r1, c0, c1, i == 0)
    dtype = p.compute
    none = p.reduction == "none"
    row_loss = (ce + zt).astype(dtype) if none else None
    return float(ce.sum()), float(zt.sum()), row_loss, zt.astype(dtype), lse.astype(dtype)


def _add_gw(out: np.ndarray, g: np.ndarray, w: np.ndarray, first: bool) -> None:
    """out = g w (first), else out += g w: out (rows, H) C-contiguous, g (rows, K) C-contiguous.

    BLAS gemm with beta = 1 on outᵀ (no (rows, H) temporary) where SciPy takes w as it
    is (C-contiguous), else NumPy's matmul into a temporary, then an add."""
    if first:
        np.matmul(g, w, out=out)
        return
    gemm = _gemm(out.dtype)
    if gemm is not None and w.flags.c_contiguous:
        done = gemm(1.0, w.T, g.T, beta=1.0, c=out.T, overwrite_c=1)
        if np.shares_memory(done, out):
            return
        out[...] = done.T  # pragma: no cover - gemm copied out (it does not for these layouts)
        return
    out += g @ w


def _gemm(dtype):
    """SciPy's BLAS gemm of the dtype, or None (no SciPy, or _GEMM off)."""
    if not _GEMM:
        return None
    try:
        from scipy.linalg import blas
    except ImportError:  # pragma: no cover - exercised by monkeypatching _GEMM in the tests
        return None
    return blas.sgemm if dtype == np.float32 else blas.dgemm


def _add_product(c: np.ndarray, g: np.ndarray, h: np.ndarray) -> None:
    """c += gᵀ h in place: c (V, H) C-contiguous, g (rows, V) and h (rows, H) C-contiguous.

    BLAS gemm with beta = 1 on cᵀ (Fortran order): no (V, H) temporary. Without SciPy,
    NumPy's matmul into a block of classes at a time, then an add."""
    gemm = _gemm(c.dtype)
    if gemm is not None:
        done = gemm(1.0, h.T, g.T, beta=1.0, c=c.T, trans_b=1, overwrite_c=1)
        if np.shares_memory(done, c):
            return
        c[...] = done.T  # pragma: no cover - gemm copied c (it does not for these layouts)
        return
    step = max(1, (4 << 20) // max(1, h.shape[1] * c.itemsize))  # 4 MB blocks of classes
    block = np.empty((min(step, c.shape[0]), c.shape[1]), c.dtype)
    for j0 in range(0, c.shape[0], step):
        j1 = min(c.shape[0], j0 + step)
        np.matmul(g[:, j0:j1].T, h, out=block[: j1 - j0])
        c[j0:j1] += block[: j1 - j0]


_GEMM = True  # False: the NumPy path of _add_product (tests)
