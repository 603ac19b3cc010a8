"""Evaluation kernels: every per-row number an evaluation needs, from one read of each row.

Per row, with m = max_j z_j, s = sum_j exp(z_j - m) and lse = m + log s:
  loss          lse - z_y (as the loss kernels: log1p form while p_y is not tiny)
  entropy       lse - sum_j p_j z_j = log s - sum_j e_j (z_j - m) / s, e_j = exp(z_j - m)
  confidence    max_j p_j = 1 / s
  p_y           exp(z_y - m) / s
  argmax        the first j with z_j = m (the first NaN for a row holding NaN, as np.argmax)
  rank          #{j : z_j > z_y} (ties in the target's favour)
The pass that finds m also counts the rank (one row at a time) or finds the argmax (the
tile); the exp pass over the row, still in cache, sums s and the entropy's terms (and
counts the tile's rank); a row's argmax is then searched for block by block. Few classes
go 64 rows at a time with the vector lanes across rows (fastsce._kernels.tiles'
transposed tile), more one row at a time.

Rows are reduced into per-chunk sums (each a float64 row of ``acc``, its layout below),
in row order within a chunk and over fixed chunks, so the sums do not depend on the
thread count; the caller adds the chunks. A row counts when its target is not
ignore_index and its row weight v (sample_weight * where) is not 0; counted rows add
v times each quantity. A row holding NaN makes its accuracy terms NaN (as its loss),
and a row whose confidence is NaN is left out of the bins and counted in NAN_CONFIDENCE.

Arguments: z (N, K) C-contiguous float32 / float64; target (N,) int64, checked (each in
[0, K) or ignore_index); w (K,) class weights in z's dtype; v (N,) float64 or empty for
all ones; topk (T,) int64; bins >= 1; acc (chunks, SUMS + T + 3 bins) float64; per_row
(target_logprob, entropy, confidence) in z's dtype and (argmax, target_rank) int64, each
(N,) or empty when not wanted (an ignored row's target_logprob is NaN, its rank -1).
"""

import math

import numpy as np
from numba import prange

from fastsce._kernels.jit import borrowed, copy_into, jit, keep_alive, parallel, vector
from fastsce._kernels.rows import BLOCK
from fastsce._kernels.simd import exp_nonpositive, like, log_normal, lse_minus_target, maximum, prefer_512bit, times
from fastsce._kernels.tiles import _load_tile, tile_rows

# The per-chunk sums, one float64 each (then T top-k sums, then the bins: B weights, B
# confidence sums, B correct sums).
LOSS = 0  # sum v w_y loss
LOSS_WEIGHT = 1  # sum v w_y
PLAIN_LOSS = 2  # sum v loss (perplexity)
WEIGHT = 3  # sum v
ROWS = 4  # counted rows
ENTROPY = 5  # sum v entropy
TARGET_PROBABILITY = 6  # sum v p_y
CONFIDENCE = 7  # sum v confidence
CORRECT = 8  # sum v [argmax = y]
NAN_CONFIDENCE = 9  # sum v over counted rows whose confidence is NaN
SUMS = 10


def sums_size(topk: int, bins: int) -> int:
    """Length of a row of ``acc`` for ``topk`` values of k and ``bins`` bins."""
    return SUMS + topk + 3 * bins


# --- one row (any K) ----------------------------------------------------------------------


@vector
def _exp_entropy_block(z, m):
    """Over a part of a row: (sum exp(z - m), sum exp(z - m) (z - m)) in z's dtype; a term
    with exp(z - m) = 0 adds 0 (z - m may be -inf)."""
    prefer_512bit()
    s = like(0, z)
    sd = like(0, z)
    zero = like(0, z)
    for j in range(z.size):
        d = z[j] - m
        e = exp_nonpositive(d)
        s += e
        sd += e * d if e != zero else zero
    return s, sd


@vector
def _max_rank_block(z, zy):
    """(max z (NaN-propagating), #{z > zy}) in one pass over at most BLOCK terms. The count
    in float32 (exact to 2^24): an integer count is int64 in Numba, which held the loop
    to 8 lanes (ymm) where the float32 max takes 16 (zmm)."""
    prefer_512bit()
    m = z[0]
    rank = like(0, z)
    one = like(1, z)
    zero = like(0, z)
    for j in range(z.size):
        m = maximum(m, z[j])
        rank += one if z[j] > zy else zero
    return m, rank


@jit
def _max_rank(z, zy):
    m = z[0]
    rank = 0
    for lo in range(0, z.size, BLOCK):
        bm, br = _max_rank_block(z[lo : lo + BLOCK], zy)
        m = maximum(m, bm)
        rank += int(br)
    return m, rank


@vector
def _first_block(z, m):
    """The first j with z_j = m in a block of at most BLOCK, or BLOCK (int32 lanes)."""
    prefer_512bit()
    none = np.int32(BLOCK)
    first = none
    for j in range(z.size):
        first = min(first, np.int32(j) if z[j] == m else none)
    return first


@jit
def _first_max(z, m):
    """The first j with z_j = m (np.argmax's: the first NaN when m is NaN), block by block."""
    if m != m:
        return _first_nan(z)
    for lo in range(0, z.size, BLOCK):
        first = _first_block(z[lo : lo + BLOCK], m)
        if first < BLOCK:
            return lo + first
    return 0


@jit
def _exp_entropy_sums(z, m):
    """_exp_entropy_block over blocks of BLOCK terms, each block's sums (in z's dtype)
    added in float64 while the block is in L1."""
    s = 0.0
    sd = 0.0
    for lo in range(0, z.size, BLOCK):
        bs, bsd = _exp_entropy_block(z[lo : lo + BLOCK], m)
        s += bs
        sd += bsd
    return s, sd


@jit
def _first_nan(z):
    for j in range(z.size):
        if z[j] != z[j]:
            return j
    return 0


@jit
def _eval_row(zi, y, live):
    """(loss, entropy, confidence, p_y, argmax, rank) of one row; y: its target, used when
    ``live`` (else loss, p_y and rank are not meaningful). Passes over the row: max and
    rank, then the exps (the target's apart), then the argmax's search, stopping at the
    block that holds it (with rank and argmax in the exp loop that loop took 1.5x as
    long, measured at K = 1000)."""
    zy = zi[y] if live else like(math.inf, zi)
    m, rank = _max_rank(zi, zy)
    if live:
        s1, sd1 = _exp_entropy_sums(zi[:y], m)
        s2, sd2 = _exp_entropy_sums(zi[y + 1 :], m)
        s_other, sd = s1 + s2, sd1 + sd2
    else:
        s_other, sd = _exp_entropy_sums(zi, m)
    first = _first_max(zi, m)
    zy_shift = float(zy) - float(m) if live else -math.inf
    e_y = math.exp(zy_shift)
    s = s_other + e_y
    loss = lse_minus_target(s_other, e_y, zy_shift) if live else 0.0
    if e_y != 0:
        sd += e_y * zy_shift
    entropy = math.log(s) - sd / s
    return loss, entropy, 1.0 / s, e_y / s, first, rank, m != m


@jit
def _bin(conf, bins):
    """The bin (i/B, (i+1)/B] holding a confidence in (0, 1] (NaN gives a bin too: test first)."""
    b = math.ceil((conf if conf == conf else 0.0) * bins)  # (a NaN to int is undefined)
    return min(max(int(b) - 1, 0), bins - 1)


@jit
def _add_row(acc, vi, w_y, loss, entropy, conf, p_y, correct, rank, topk, bins):
    acc[LOSS] += times(vi * w_y, loss)
    acc[LOSS_WEIGHT] += vi * w_y
    acc[PLAIN_LOSS] += vi * loss
    acc[WEIGHT] += vi
    acc[ROWS] += 1.0
    acc[ENTROPY] += vi * entropy
    acc[TARGET_PROBABILITY] += vi * p_y
    acc[CONFIDENCE] += vi * conf
    acc[CORRECT] += vi * correct
    nan_row = correct != correct
    for t in range(topk.size):
        acc[SUMS + t] += math.nan if nan_row else (vi if rank < topk[t] else 0.0)
    if conf == conf:
        base = SUMS + topk.size
        b = _bin(conf, bins)
        acc[base + b] += vi
        acc[base + bins + b] += vi * conf
        acc[base + 2 * bins + b] += vi * correct
    else:
        acc[NAN_CONFIDENCE] += vi


@jit
def _borrow_rows(per_row):
    """The per-row outputs borrowed (fastsce._kernels.jit.borrowed): a call that unpacks
    the tuple then counts no references (the caller holds the arrays)."""
    a, b, c, d, e = per_row
    return borrowed(a), borrowed(b), borrowed(c), borrowed(d), borrowed(e)


@jit
def _store_row(per_row, i, live, loss, entropy, conf, first, rank):
    target_logprob, ent, confidence, argmax, target_rank = per_row
    if target_logprob.size:
        target_logprob[i] = -loss if live else math.nan
    if ent.size:
        ent[i] = entropy
    if confidence.size:
        confidence[i] = conf
    if argmax.size:
        argmax[i] = first
    if target_rank.size:
        target_rank[i] = rank if live else -1


@parallel
def evaluate_rows(z, target, ignore_index, w, v, topk, bins, chunk_rows, acc, per_row):
    """One row at a time, rows lo .. hi of chunk c into acc[c]."""
    n = z.shape[0]
    for c in prange(acc.shape[0]):
        row = np.zeros(acc.shape[1])
        outs = _borrow_rows(per_row)
        for i in range(c * chunk_rows, min(n, (c + 1) * chunk_rows)):
            y = target[i]
            has_target = y != ignore_index
            loss, entropy, conf, p_y, first, rank, nan_row = _eval_row(z[i], y, has_target)
            vi = (v[i] if v.size else 1.0) if has_target else 0.0
            if vi != 0:
                correct = math.nan if nan_row else (1.0 if first == y else 0.0)
                _add_row(row, vi, float(w[y]), loss, entropy, conf, p_y, correct, rank, topk, bins)
            if outs[0].size:
                _store_row(outs, i, has_target, loss, entropy, conf, first, rank)
        copy_into(acc[c, :], row)


# --- 64 rows at a time (few classes) -----------------------------------------------------------


@jit
def _lane_max_first(T, m, first):
    """m[r] = max_j T[j, r] (NaN-propagating), first[r] = the first j holding it (for a
    NaN row: not meaningful, the caller looks it up)."""
    prefer_512bit()
    t0 = T[0]
    for r in range(tile_rows(T)):
        m[r] = t0[r]
        first[r] = 0
    for j in range(1, T.shape[0]):
        tj = T[j]
        jj = np.int32(j)
        for r in range(tile_rows(T)):
            x = tj[r]
            first[r] = jj if x > m[r] else first[r]
            m[r] = maximum(m[r], x)


@jit
def _lane_exp_entropy(T, m, zt, s, sd, rank, e):
    """s[r] = sum_j exp(T[j, r] - m[r]), sd[r] = sum_j exp(..) (T[j, r] - m[r]) (float64)
    and rank[r] = #{j : T[j, r] > zt[r]} (e: a lane scratch). The exps in a loop of their
    own: with the float64 sums in the same loop LLVM took 8 lanes (ymm) for them too."""
    prefer_512bit()
    for r in range(tile_rows(T)):
        s[r] = 0.0
        sd[r] = 0.0
        rank[r] = 0
    zero = like(0, T)
    for j in range(T.shape[0]):
        tj = T[j]
        for r in range(tile_rows(T)):
            x = tj[r]
            e[r] = exp_nonpositive(x - m[r])
            rank[r] += np.int32(1) if x > zt[r] else np.int32(0)
        for r in range(tile_rows(T)):
            s[r] += float(e[r])
            sd[r] += float(e[r] * (tj[r] - m[r])) if e[r] != zero else 0.0


@vector
def _lane_finish(k, bins, m, zt, yl, vr, wy, first, s_other, sd, loss, entropy, conf, py, correct, bl, tsum):
    """Per lane: loss, entropy, confidence, p_y, correctness (see the module notes) and
    the confidence's bin (-1 when NaN); tsum += the tile's first SUMS sums, over the lanes
    with vr != 0. A lane with yl = k has no target (ignored)."""
    prefer_512bit()
    t_loss = 0.0
    t_lw = 0.0
    t_plain = 0.0
    t_w = 0.0
    t_rows = 0.0
    t_ent = 0.0
    t_py = 0.0
    t_conf = 0.0
    t_corr = 0.0
    t_nan = 0.0
    for r in range(tile_rows(m)):
        live = yl[r] != k
        counted = vr[r] != 0
        zy = float(zt[r]) - float(m[r]) if live else -math.inf
        e_y = exp_nonpositive(zy)
        s = s_other[r] + e_y
        inv_s = 1.0 / s
        log_s = log_normal(s) if s >= 1.0 else math.nan  # s >= 1 or NaN
        # loss = log s - zy, one log per lane (lse_minus_target takes a second). With zy < 0
        # both terms are >= 0: no cancellation. With e_y = 1 (the target is the max) it is
        # log(1 + s_other), and the rounding of s = 1 + s_other is corrected as log1p does.
        correction = ((s - 1.0) - s_other[r]) * inv_s if e_y == 1.0 else 0.0
        lo = (log_s - zy) - correction if live else 0.0
        ent = log_s - (sd[r] + (e_y * zy if e_y != 0 else 0.0)) * inv_s
        cor = math.nan if m[r] != m[r] else (1.0 if first[r] == yl[r] else 0.0)
        loss[r] = lo
        entropy[r] = ent
        conf[r] = inv_s
        py[r] = e_y * inv_s
        correct[r] = cor
        bl[r] = np.int32(_bin(inv_s, bins) if inv_s == inv_s else -1)
        v = vr[r]
        zero = 0.0
        t_loss += times(v * wy[r], lo) if counted else zero
        t_lw += v * wy[r]
        t_plain += v * lo if counted else zero
        t_w += v
        t_rows += 1.0 if counted else zero
        t_ent += v * ent if counted else zero
        t_py += v * py[r] if counted else zero
        t_conf += v * inv_s if counted else zero
        t_corr += v * cor if counted else zero
        t_nan += v if counted and bl[r] < 0 else zero
    tsum[LOSS] += t_loss
    tsum[LOSS_WEIGHT] += t_lw
    tsum[PLAIN_LOSS] += t_plain
    tsum[WEIGHT] += t_w
    tsum[ROWS] += t_rows
    tsum[ENTROPY] += t_ent
    tsum[TARGET_PROBABILITY] += t_py
    tsum[CONFIDENCE] += t_conf
    tsum[CORRECT] += t_corr
    tsum[NAN_CONFIDENCE] += t_nan


@vector
def _lane_topk(vr, rank, correct, k):
    """sum of vr over the lanes with rank < k (NaN for a row holding NaN: correct is NaN)."""
    prefer_512bit()
    total = 0.0
    for r in range(rank.size):
        total += vr[r] * (correct[r] * 0.0 + (1.0 if rank[r] < k else 0.0)) if vr[r] != 0 else 0.0
    return total


@jit
def _tile_eval(zt, yt, vt, rows, ignore_index, w, topk, bins, T, m, zl, el, il, fl, acc, first_row, per_row):
    """The tile zt (R, K) (rows beyond ``rows`` ignored) into acc and per_row."""
    k = T.shape[0]
    _load_tile(zt, T)
    yl, first, rank, bl = il[0], il[1], il[2], il[3]
    _lane_max_first(T, m, first)
    vr, wy, s_other, sd, loss, entropy, conf, py, correct = fl[0], fl[1], fl[2], fl[3], fl[4], fl[5], fl[6], fl[7], fl[8]
    for r in range(tile_rows(T)):
        if m[r] != m[r]:  # the first NaN, as np.argmax
            first[r] = _first_nan(T[:, r])
        y = yt[r] if r < rows else ignore_index
        if y == ignore_index:
            yl[r] = k
            zl[r] = m[r]
            vr[r] = 0.0
            wy[r] = 0.0
        else:
            yl[r] = y
            zl[r] = T[y, r]
            T[y, r] = -np.inf  # leaves the target out of s_other (rank: z_y > z_y is false)
            vr[r] = vt[r] if vt.size else 1.0
            wy[r] = w[y] if vr[r] != 0 else 0.0
    _lane_exp_entropy(T, m, zl, s_other, sd, rank, el)
    _lane_finish(k, bins, m, zl, yl, vr, wy, first, s_other, sd, loss, entropy, conf, py, correct, bl, acc)
    for t in range(topk.size):
        acc[SUMS + t] += _lane_topk(vr, rank, correct, topk[t])
    base = SUMS + topk.size
    for r in range(tile_rows(T)):  # the bins: a scatter, scalar (~170 ns a K = 10 tile;
        v = vr[r]  # four copies of the bins, to split the chains of adds, measured no faster)
        b = bl[r]
        if v != 0 and b >= 0:
            acc[base + b] += v
            acc[base + bins + b] += v * conf[r]
            acc[base + 2 * bins + b] += v * correct[r]
    if per_row[0].size:
        _store_lanes(per_row, first_row, rows, k, yl, loss, entropy, conf, first, rank)


@jit
def _store_lanes(per_row, i, rows, k, yl, loss, entropy, conf, first, rank):
    """Lanes 0 .. rows - 1 as rows i .. i + rows - 1 of the per-row arrays (all present).
    Through views indexed from 0: with i + r, Numba's negative-index wraparound kept the
    stores from vectorising (220 ns a tile, measured; see tiles' notes)."""
    prefer_512bit()
    target_logprob, ent, confidence, argmax, target_rank = per_row
    lp, en, co = target_logprob[i : i + rows], ent[i : i + rows], confidence[i : i + rows]
    am, tr = argmax[i : i + rows], target_rank[i : i + rows]
    for r in range(rows):
        lp[r] = -loss[r] if yl[r] != k else math.nan
    for r in range(rows):
        en[r] = entropy[r]
    for r in range(rows):
        co[r] = conf[r]
    for r in range(rows):
        am[r] = first[r]
    for r in range(rows):
        tr[r] = rank[r] if yl[r] != k else -1


@parallel
def evaluate_tiles(z, target, ignore_index, w, v, topk, bins, chunk_rows, acc, per_row):
    """64 rows at a time, chunk c (rows c chunk_rows ..., a multiple of 64) into acc[c]."""
    n, k = z.shape
    R = tile_rows(z)
    for c in prange(acc.shape[0]):
        row = np.zeros(acc.shape[1])
        T = np.empty((k, R), z.dtype)
        m = np.empty(R, z.dtype)
        zl = np.empty(R, z.dtype)
        el = np.empty(R, z.dtype)
        il = np.empty((4, R), np.int32)  # (int32: twice the lanes of int64 in the compares)
        fl = np.empty((9, R), np.float64)
        zpad = np.zeros((R, k), z.dtype)
        ypad = np.empty(R, np.int64)
        vpad = np.ones(R if v.size else 0, np.float64)
        outs = _borrow_rows(per_row)
        for i in range(c * chunk_rows, min(n, (c + 1) * chunk_rows), R):
            rows = min(R, n - i)
            if rows == R:
                zt, yt, vt = z[i : i + R], target[i : i + R], v[i : i + R] if v.size else v
            else:
                copy_into(zpad[:rows], z[i:n])
                zt = zpad
                copy_into(ypad[:rows], target[i:n])
                yt = ypad
                if v.size:
                    copy_into(vpad[:rows], v[i:n])
                vt = vpad
            _tile_eval(
                zt, yt, vt, rows, ignore_index, borrowed(w), topk, bins, borrowed(T), borrowed(m), borrowed(zl), borrowed(el),
                borrowed(il), borrowed(fl), row, i, outs,
            )  # fmt: skip
        keep_alive((T, m, zl, el, il, fl))
        copy_into(acc[c, :], row)
