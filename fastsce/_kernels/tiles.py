"""Integer-target kernels for few classes: the SIMD lanes run across rows, not along one.

With K ~ 10 a row-wise loop never fills a 16-lane vector, and each row pays a scalar
libm exp and log. Here rows go in tiles of R = 64 (four zmm vectors of float32, eight of
float64): a tile is gathered transposed into a small scratch T (K, R), so that every step
(max, exp, sums, log, loss, gradient) is a lane-wise operation over the tile's rows,
repeated for each class j, with no horizontal reduction and no remainder loop; the
gradient goes back transposed. The last N % R rows run as a zero-padded tile.

``hard_loss`` and ``hard_loss_grad`` take the arguments of, and compute the same
things as, fastsce._kernels.hard_loss / hard_loss_grad (see that module for the
argument list): per-row float64 losses in ``row_loss`` (when asked for) and per chunk their
sum (a tile's in a fixed vector order, the tiles' in row order), reduced serially by the
caller; every row's result and every sum independent of the thread count.

Per row, as in the row-wise kernels: m = max_j z_j (NaN-propagating); the target's
shift z_y - m in float64 (exact for float32 logits); s_other = sum_{j != y} exp(z_j - m)
with each exp in the logits' dtype and the sum in float64 (the target is left out by
setting its T entry to -inf once the max is known); e_y = exp(z_y - m) and
log(s_other + e_y) in float64 (vectorised: fastsce._kernels.simd.log_normal); the target's
gradient -s_other / s without cancellation. Ignored rows (and rows of weight 0) get
loss 0 and a zero row; z-loss, row weights and lse are per-lane arithmetic too.
"""

from types import SimpleNamespace

import numpy as np
from numba import prange, types
from numba.extending import overload

from fastsce._kernels.half import as_float, as_stored, scratch_row
from fastsce._kernels.jit import borrow_outs, borrowed, copy_into, jit, keep_alive, parallel, vector
from fastsce._kernels.rows import _chain, _scale, _scale_and_cap, row_lse
from fastsce._kernels.simd import exp_nonpositive, exp_shifted, like, log_normal, lse_minus_target, maximum, prefer_512bit, times
from fastsce._kernels.vec import load_rows, narrow, store_rows, transpose, widen, width

# Tiles per prange iteration: the scratch is allocated once per chunk.
TILES_PER_CHUNK = 32
CHUNK_ROWS = TILES_PER_CHUNK * 64  # rows per prange step: whole tiles of 64 rows
CLASS_MAJOR_ROWS = 64  # rows per tile of class_major_loss


def tile_rows(z):
    """Rows per tile: four 512-bit vectors of z's dtype (64 float32, 32 float64)."""
    raise NotImplementedError  # only callable from jitted code


@overload(tile_rows)
def _tile_rows(z):
    if z.dtype == types.float32:
        return lambda z: 64
    return lambda z: 64


# --- lane-wise passes over a tile: T is (K, R), one row of T per class ---------------------------
#
# Inner loops run over the R lanes (rows of the tile) with a constant trip count, and
# index only with loop counters that start at 0 (row views T[j], no j * R + r): Numba's
# negative-index wraparound then folds away instead of turning the loads into gathers.
# R = 64, not one vector (16 / 8): LLVM fully unrolls short constant loops before the
# loop vectoriser runs, and the SLP vectoriser then gives up on the unrolled code (it
# cannot rule out that T and the lane arrays overlap); 64-lane loops stay loops, and the
# loop vectoriser emits zmm code behind a runtime overlap check (checked with
# inspect_asm: vgatherdps / vmaxps / vfmadd...ps / vscatterdps on zmm, both dtypes).


@jit
def _load_tile(zt, T):
    """T[j, r] = zt[r, j] (half bits converted): blocks of W rows x W classes, each W
    masked row loads, an in-register transpose and W stores (fastsce._kernels.vec).
    Assembly (float32, K = 10, inspect_asm): per block 16 masked vmovups loads (kmovd
    masks), 64 shuffles on zmm (vpermt2ps / vpermt2pd / vunpck*pd / vshuff64x2 /
    vinsertf64x4), 16 stores; no gather, no scatter. Measured on one tile in L1: load and
    store 0.18-0.23 ns per element each; the tile as a whole ~10% faster at K = 100 and
    unchanged within noise at K = 10, where the per-row float64 work dominates."""
    k = T.shape[0]
    R = tile_rows(T)
    W = width(T)
    for r0 in range(0, R, W):
        for c0 in range(0, k, W):
            n = min(W, k - c0)
            store_rows(T, c0 * R + r0, R, n, W, transpose(widen(load_rows(zt, r0 * k + c0, k, W, n))))


@jit
def _store_tile(T, gt):
    """gt[r, j] = T[j, r] (rounded to half bits for a half gradient): _load_tile's
    blocks the other way round."""
    k = T.shape[0]
    R = tile_rows(T)
    W = width(T)
    for r0 in range(0, R, W):
        for c0 in range(0, k, W):
            n = min(W, k - c0)
            store_rows(gt, r0 * k + c0, k, W, n, narrow(transpose(load_rows(T, c0 * R + r0, R, n, W)), gt))


# The max and the float64 sums take four classes per pass over the lanes: m and total
# live in memory between passes (LLVM cannot keep 64 lanes in registers across the loop
# over classes), so each pass is a store-to-load chain; four classes a pass make it a
# quarter as long. Measured on one tile in L1 (this Zen 4 machine, 1 thread): the max
# 845 -> 277 ns at K = 100, 79 -> 41 at K = 10; the exp-sum 1400 -> 1130 ns at K = 100.
# Assembly (float32, K = 100, inspect_asm): zmm loops, llvm.maximum as vmaxps with
# vcmpunordps for NaN, the sums as vcvtps2pd and a tree of vaddpd; beside them the scalar
# loops LLVM keeps for arrays that overlap (its runtime check sends the tiles past them).


@jit
def _lane_max(T, m):
    prefer_512bit()
    k = T.shape[0]
    t0 = T[0]
    for r in range(tile_rows(T)):
        m[r] = t0[r]
    j = 1
    while j + 4 <= k:
        ta, tb, tc, td = T[j], T[j + 1], T[j + 2], T[j + 3]
        for r in range(tile_rows(T)):  # NaN-propagating: a NaN logit makes the row NaN
            m[r] = maximum(m[r], maximum(maximum(ta[r], tb[r]), maximum(tc[r], td[r])))
        j += 4
    for j in range(j, k):
        tj = T[j]
        for r in range(tile_rows(T)):
            m[r] = maximum(m[r], tj[r])


@jit
def _lane_weighted_shift(T, w, m, total):
    """total[r] = sum_j w_j (T[j, r] - m[r]), each term in T's dtype, summed in float64;
    a zero weight adds 0 even where T[j, r] = -inf."""
    prefer_512bit()
    for r in range(tile_rows(T)):
        total[r] = 0.0
    for j in range(T.shape[0]):
        wj = w[j]
        if wj != 0:
            tj = T[j]
            for r in range(tile_rows(T)):
                total[r] += float(wj * (tj[r] - m[r]))


@jit
def _lane_exp_sum(T, m, total):
    """T[j, r] = exp(T[j, r] - m[r]) in T's dtype, and total[r] = sum_j T[j, r] summed in
    float64 (a lane sums its row's terms four at a time, in a fixed order: float32 sums
    would lose ~sqrt(K) ulps)."""
    prefer_512bit()
    for r in range(tile_rows(T)):
        total[r] = 0.0
    # The exps and the sums in loops of their own: with the float64 sum in the same loop
    # LLVM took 8 lanes (ymm) for the exp too, to match the doubles; alone the exp runs
    # 16 lanes wide (zmm).
    k = T.shape[0]
    for j in range(k):
        tj = T[j]
        for r in range(tile_rows(T)):
            tj[r] = exp_shifted(tj[r], m[r])
    j = 0
    while j + 4 <= k:
        ta, tb, tc, td = T[j], T[j + 1], T[j + 2], T[j + 3]
        for r in range(tile_rows(T)):
            total[r] += (float(ta[r]) + float(tb[r])) + (float(tc[r]) + float(td[r]))
        j += 4
    for j in range(j, k):
        tj = T[j]
        for r in range(tile_rows(T)):
            total[r] += float(tj[r])


@jit
def _lane_grad(T, a, b, w, eps, general):
    """T[j, r] = a[r] T[j, r] - b[r] w_j (the w term only with smoothing)."""
    prefer_512bit()
    for j in range(T.shape[0]):
        tj = T[j]
        if general is not None and eps > 0:
            wj = w[j]
            for r in range(tile_rows(T)):
                tj[r] = a[r] * tj[r] - b[r] * wj
        else:
            for r in range(tile_rows(T)):
                tj[r] = a[r] * tj[r]


# --- per-row (lane) float64 arithmetic ----------------------------------------------------------


@jit
def _lane_loss(k, lanes, m, w_sum, params, grad, a, b, like_z, need_lse, x_scale, general):
    """For each lane: its weighted loss, z-term and lse into the lanes (0 for a row not
    counted) and, with ``grad``, the gradient's factors a = v scale ((1 - eps) w_y + eps W
    / K) / s + zg / s and b = v scale eps / K (in z's dtype), and the target's entry
    gy = v scale [-(1 - eps) w_y s_other / s + (eps / K) (W e_y / s - w_y)] + zg e_y / s,
    zg = 2 z_loss v scale_z lse, all times x_scale (dz/dx of a logit_scale applied to the
    tile in place, else 1). lse only ``need_lse`` (else 0): a log per row saved. general
    None: a plain call (no option: eps = zl = 0, x_scale = 1, no lse), whose kernel
    compiles none of those terms."""
    prefer_512bit()
    eps, zl, scale, scale_z = params[0], params[1], params[2], params[3]
    if general is None:
        _plain_lane_loss(lanes, scale, grad, a, like_z)
        return
    need_log = need_lse or eps > 0
    live, vr, w_y, zy, s_other, w_shift, gy, lt, zt, lse_l = lanes
    for r in range(tile_rows(like_z)):
        e_y = exp_nonpositive(zy[r])
        s = s_other[r] + e_y
        inv_s = 1.0 / s
        log_s = log_normal(s) if need_log else 0.0
        lse = row_lse(m[r], log_s) if need_lse else 0.0
        # (1 - eps) w_y (lse - z_y) + (eps / K) sum_j w_j (lse - z_j), lse - z = log s - (z - m)
        loss = times(w_y[r], lse_minus_target(s_other[r], e_y, zy[r]))
        if eps > 0:
            loss = (1 - eps) * loss + eps / k * (w_sum * log_s - w_shift[r])
        counted = live[r] != 0
        lt[r] = vr[r] * loss if counted else 0.0
        zt[r] = vr[r] * zl * lse * lse if counted and zl > 0 else 0.0
        lse_l[r] = lse
        if grad:
            sv = scale * vr[r] * x_scale
            hard = (1 - eps) * w_y[r] * sv
            zg = 2 * zl * scale_z * vr[r] * x_scale * lse if zl > 0 else 0.0
            a[r] = like((hard + eps * w_sum / k * sv + zg) * inv_s, like_z)
            b[r] = like(eps / k * sv, like_z)
            gy[r] = -hard * (s_other[r] * inv_s) + eps / k * sv * (w_sum * (e_y * inv_s) - w_y[r]) + zg * (e_y * inv_s)


@jit
def _plain_lane_loss(lanes, scale, grad, a, like_z):
    """_lane_loss without options: the loss w_y (lse - z_y), a = v scale w_y / s and gy =
    -v scale w_y s_other / s."""
    prefer_512bit()
    live, vr, w_y, zy, s_other, _, gy, lt, zt, lse_l = lanes
    for r in range(tile_rows(like_z)):
        e_y = exp_nonpositive(zy[r])
        inv_s = 1.0 / (s_other[r] + e_y)
        loss = times(w_y[r], lse_minus_target(s_other[r], e_y, zy[r]))
        lt[r] = vr[r] * loss if live[r] != 0 else 0.0
        zt[r] = 0.0
        lse_l[r] = 0.0
        if grad:
            hard = w_y[r] * (scale * vr[r])
            a[r] = like(hard * inv_s, like_z)
            gy[r] = -hard * (s_other[r] * inv_s)


# --- one tile ------------------------------------------------------------------------------------


@jit
def _tile_core(T, yt, vt, ignore_index, w, w_sum, params, grad, m, a, b, lanes, Tz, need_lse, general):
    """A loaded tile T (K, R), targets yt (R,), row weights vt (R,, or empty): losses,
    z-terms and lse into the lanes; with ``grad`` T becomes the gradient (with respect
    to the logits as given), except the target entries (lanes[6], see _target_entry)
    and the rows not counted (lanes[0] == 0), left to the caller. general: True, or
    None for a plain call (no option), whose kernels compile none of the options'
    branches (pruned before typing)."""
    k = T.shape[0]
    eps, scale_x, cap = params[0], params[4], params[5]
    live, vr, w_y, zy, s_other, w_shift = lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5]
    x_scale = 1.0  # dz/dx where it is one number for the tile
    if general is not None and Tz.size:  # z = cap tanh(scale_x x / cap), kept in Tz for the chain rule
        flat, flat_z = T.reshape(T.size), Tz.reshape(Tz.size)  # one loop, not one per class
        _scale_and_cap(flat, flat_z, scale_x, cap)
        copy_into(flat, flat_z)
    elif general is not None and scale_x != 1.0:
        # z = scale_x x, in place (rounded as the row kernels round it); the chain rule's
        # factor joins the gradient's coefficients instead of a pass of its own
        _scale(T.reshape(T.size), like(scale_x, T))
        x_scale = scale_x
    _lane_max(T, m)
    if general is not None and eps > 0:
        _lane_weighted_shift(T, w, m, w_shift)
    for r in range(tile_rows(T)):
        y = yt[r]
        vr[r] = vt[r] if vt.size else 1.0
        if y == ignore_index or vr[r] == 0:
            live[r] = 0.0
            w_y[r] = 0.0
            zy[r] = -np.inf  # e_y = 0: the lane's lse is still the row's
        else:
            live[r] = 1.0
            w_y[r] = w[y]
            zy[r] = float(T[y, r]) - float(m[r])  # exact for float32 logits
            T[y, r] = -np.inf  # leaves the target out of s_other
    _lane_exp_sum(T, m, s_other)
    _lane_loss(k, lanes, m, w_sum, params, grad, a, b, T, need_lse, x_scale, general)
    if grad:
        _lane_grad(T, a, b, w, eps, general)
        if general is not None and Tz.size:
            _chain(T.reshape(T.size), Tz.reshape(Tz.size), scale_x, cap)


@jit
def _target_entry(gy, r, y, Tz, params, general):
    """The gradient's target entry gy (lanes[6][r]) of lane r, times dz/dx with a logit
    transform. Takes gy, not the lanes: the tuple of ten arrays passed to a call per row
    cost ~200 ns of a ~1.6 us K = 10 tile (measured on one tile, in one process)."""
    if general is not None and Tz.size:
        scale_x, cap = params[4], params[5]
        # exactly 0 where saturated, z = +-c (c rounded as z was; see rows._softcap_chain)
        q = float(Tz[y, r]) / cap if cap > 0 else 0.0
        gy = 0.0 * gy if cap > 0 and abs(Tz[y, r]) == like(cap, Tz) else gy * scale_x * (1 - q * q)
    return gy


@jit
def _tile(zt, yt, vt, ignore_index, w, w_sum, params, gt, grad, T, m, a, b, lanes, Tz, need_lse, general):
    """Rows zt (R, K): gradient into gt (R, K) (which may be zt itself: zt is read whole
    before gt is written)."""
    _load_tile(zt, T)
    _tile_core(T, yt, vt, ignore_index, w, w_sum, params, grad, m, a, b, lanes, Tz, need_lse, general)
    if grad:
        _store_tile(T, gt)
        live, gy = lanes[0], lanes[6]
        for r in range(tile_rows(T)):
            if live[r] == 0:
                gt[r] = 0
            else:
                gt[r, yt[r]] = as_stored(_target_entry(gy[r], r, yt[r], Tz, params, general), gt)


@jit
def _scratch(k, like_z, transform):
    """Per-thread scratch of a tile: T (K, R), lane values m, a, b in z's dtype, ten
    float64 lanes (see _lane_loss), and with a softcap Tz (K, R), the tile as
    the loss sees it."""
    R = tile_rows(like_z)
    T = np.empty((k, R), like_z.dtype)
    Tz = np.empty((k if transform else 0, R), like_z.dtype)
    m = np.empty(R, like_z.dtype)
    a = np.empty(R, like_z.dtype)
    b = np.empty(R, like_z.dtype)
    lr = np.empty((10, R), np.float64)
    return T, m, a, b, lr, Tz


@jit
def _borrow_scratch(owned):
    """_scratch's arrays borrowed (see jit.borrowed), the float64 lanes as a tuple of ten
    rows: the tile helpers then make their views without reference counting. The caller
    keeps ``owned`` alive while it uses them."""
    T, m, a, b, lr, Tz = owned
    lr = borrowed(lr)
    lanes = (lr[0], lr[1], lr[2], lr[3], lr[4], lr[5], lr[6], lr[7], lr[8], lr[9])
    return borrowed(T), borrowed(m), borrowed(a), borrowed(b), lanes, borrowed(Tz)


@vector
def _lane_sum(x, rows):
    """x[0] + ... + x[rows - 1] in float64, in the vector loop's fixed order (lanes, then
    across them): the same bits for the same rows whatever the thread count. A sum in
    row order is a chain of 64 dependent adds of 4 cycles each (the gain was within the
    noise of whole calls)."""
    prefer_512bit()
    total = 0.0
    for r in range(rows):
        total += x[r]
    return total


@jit
def _record_lanes(lanes, rows, first, outs):
    """The tile's first ``rows`` lanes as rows first.. of the outputs; their sums."""
    row_loss, row_z, lse_out = outs[0], outs[1], outs[2]
    lt, zt_l, lse_l = lanes[7], lanes[8], lanes[9]
    for r in range(rows if row_loss.size else 0):
        row_loss[first + r] = lt[r] + zt_l[r]
    for r in range(rows if row_z.size else 0):
        row_z[first + r] = zt_l[r]
    for r in range(rows if lse_out.size else 0):
        lse_out[first + r] = lse_l[r]
    return _lane_sum(lt, rows), _lane_sum(zt_l, rows)


# --- classes on another axis: x (A, K, D), row (a, d) is x[a, :, d] ------------------------------
#
# A tile is R consecutive d of one a: T[j] = x[a, j, d0:d0 + R] is a contiguous run, so
# the tile is loaded (and its gradient stored) without a transpose.


@jit
def _load_runs(xa, d0, rows, T):
    """T[j, :rows] = xa[j, d0:d0 + rows] (converted from half bits), 0 beyond: K runs of
    contiguous values, in one function (a call per class costs as much as its copy)."""
    prefer_512bit()
    for j in range(T.shape[0]):
        tj = T[j]
        xj = xa[j]
        for r in range(rows):
            tj[r] = as_float(xj[d0 + r])
        for r in range(rows, tile_rows(T)):
            tj[r] = 0


@jit
def _store_runs(T, rows, ya, d0):
    """ya[j, d0:d0 + rows] = T[j, :rows] (rounded to half bits for a half gradient)."""
    prefer_512bit()
    for j in range(T.shape[0]):
        tj = T[j]
        yj = ya[j]
        for r in range(rows):
            yj[d0 + r] = as_stored(tj[r], ya)


@parallel
def class_major_loss(x3, target, ignore_index, w, w_sum, v, params, outs, y3, grad):
    """Rows r = a D + d of a C-contiguous (A, K, D) x3 with targets target[r]; the
    gradient (with ``grad``) into y3 of x3's shape. outs as in _kernels, chunk_loss /
    chunk_z with one entry per TILES_PER_CHUNK tiles (a, d0), in (a, d0) order."""
    n_a, k, d_size = x3.shape
    R = tile_rows(x3)
    tiles = -(-d_size // R)
    chunk_loss, chunk_z = outs[3], outs[4]
    need_lse = params[1] > 0 or outs[2].size > 0
    # Inputs only: an array written inside the prange loop must not be borrowed outside
    # it (the parallel lowering then lost the writes to chunk_loss).
    x3, target, w, v = borrowed(x3), borrowed(target), borrowed(w), borrowed(v)
    for c in prange(chunk_loss.size):
        owned = _scratch(k, scratch_row(x3, 0), params[5] > 0)
        T, m, a, b, lanes, Tz = _borrow_scratch(owned)
        yt = np.empty(R, target.dtype)
        vt = np.empty(R if v.size else 0, np.float64)
        total = 0.0
        z_total = 0.0
        for t in range(c * TILES_PER_CHUNK, min(n_a * tiles, (c + 1) * TILES_PER_CHUNK)):
            a_i = t // tiles
            d0 = (t % tiles) * R
            rows = min(R, d_size - d0)
            first = a_i * d_size + d0
            yt[:] = ignore_index  # lanes past D: ignored
            copy_into(yt[:rows], target[first : first + rows])
            if v.size:
                vt[:] = 1.0
                copy_into(vt[:rows], v[first : first + rows])
            _load_runs(x3[a_i], d0, rows, T)
            _tile_core(T, yt, vt, ignore_index, w, w_sum, params, grad, m, a, b, lanes, Tz, need_lse, True)
            if grad:
                live, gy = lanes[0], lanes[6]
                for r in range(rows):
                    if live[r] == 0:
                        T[:, r] = 0
                    else:
                        T[yt[r], r] = _target_entry(gy[r], r, yt[r], Tz, params, True)
                _store_runs(T, rows, y3[a_i], d0)
            dt, dz = _record_lanes(lanes, rows, first, outs)
            total += dt
            z_total += dz
        keep_alive(owned)
        chunk_loss[c], chunk_z[c] = total, z_total


@jit
def _chunk(z, target, ignore_index, w, w_sum, v, params, outs, g, lo, hi, grad, general):
    """Rows lo .. hi: full tiles, then the rest (< R rows) as one zero-padded tile.
    Returns the sums of their losses and z-terms, tile by tile (each also in outs' per-row
    arrays that are not empty)."""
    R = tile_rows(z)
    k = z.shape[1]
    owned = _scratch(k, scratch_row(z, 0), general is not None and params[5] > 0)
    T, m, a, b, lanes, Tz = _borrow_scratch(owned)
    need_lse = general is not None and (params[1] > 0 or outs[2].size > 0)
    no_weights = v[:0]
    total = 0.0
    z_total = 0.0
    for i in range(lo, hi, R):
        rows = min(R, hi - i)
        if rows == R:
            zt, yt, gt = z[i : i + R], target[i : i + R], g[i : i + R]
            vt = v[i : i + R] if v.size else no_weights
        else:  # the last rows, zero-padded to a whole tile whose extra rows are ignored
            zt = np.zeros((R, k), z.dtype)
            copy_into(zt[:rows], z[i:hi])
            yt = np.full(R, ignore_index, target.dtype)
            copy_into(yt[:rows], target[i:hi])
            vt = np.ones(R if v.size else 0, np.float64)
            if v.size:
                copy_into(vt[:rows], v[i:hi])
            gt = np.empty((R if grad else 0, k), g.dtype)
        _tile(zt, yt, vt, ignore_index, w, w_sum, params, gt, grad, T, m, a, b, lanes, Tz, need_lse, general)
        if grad and rows < R:
            copy_into(g[i:hi], gt[:rows])
        dt, dz = _record_lanes(lanes, rows, i, outs)
        total += dt
        z_total += dz
    keep_alive(owned)
    return total, z_total


# The drivers take the arguments of fastsce._kernels.hard_loss / hard_loss_grad: those of
# any call (general True), and PLAIN's for calls with no option (label smoothing, z-loss,
# lse, logit scale, softcap), which compile none of the options' code: a first float64
# call at K = 10, 1M logits, empty cache, took 19.1 s (loss+grad) and 9.2 s (loss) with
# the options' branches compiled.


def _drivers(general):
    @parallel
    def hard_loss(z, target, ignore_index, w, w_sum, v, params, chunk_rows, outs):
        """chunk_rows must be a multiple of the tile (CHUNK_ROWS)."""
        n = z.shape[0]
        chunk_loss, chunk_z = outs[3], outs[4]
        # A writeable stand-in for the gradient, never written: z itself would not compile
        # when the logits are read-only (_tile stores into it on the gradient path).
        no_grad = np.empty((0, z.shape[1]), z.dtype)
        for c in prange(chunk_loss.size):
            lo = c * chunk_rows
            hi = min(lo + chunk_rows, n)
            chunk_loss[c], chunk_z[c] = _chunk(borrowed(z), borrowed(target), ignore_index, borrowed(w), w_sum, borrowed(v), params, borrow_outs(outs), no_grad, lo, hi, False, general)

    @parallel
    def hard_loss_grad(z, target, ignore_index, w, w_sum, v, params, chunk_rows, outs, g, in_place):
        """in_place needs nothing special: a tile is read whole before its gradient is written."""
        n = z.shape[0]
        chunk_loss, chunk_z = outs[3], outs[4]
        for c in prange(chunk_loss.size):
            lo = c * chunk_rows
            hi = min(lo + chunk_rows, n)
            chunk_loss[c], chunk_z[c] = _chunk(borrowed(z), borrowed(target), ignore_index, borrowed(w), w_sum, borrowed(v), params, borrow_outs(outs), borrowed(g), lo, hi, True, general)

    return SimpleNamespace(hard_loss=hard_loss, hard_loss_grad=hard_loss_grad)


_GENERAL = _drivers(True)
hard_loss, hard_loss_grad = _GENERAL.hard_loss, _GENERAL.hard_loss_grad
PLAIN = _drivers(None)
