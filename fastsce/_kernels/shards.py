"""Private jitted kernels of fastsce.sharded: a shard's partial row statistics, and its
slice of the gradient once the statistics of every shard are combined.

A shard holds classes [offset, offset + K_s) of every row. Its statistics, per row, read
the row once block by block (BLOCK classes at a time, while the block is in L1), with a
running max as in _kernels._row_stats:

    m = max_j z_j          s = sum_j exp(z_j - m)
    a = sum_j w_j t_j      b = sum_j w_j t_j (z_j - m)      c = sum_j w_j (z_j - m)

b and c are kept relative to m (not sum w t z): they then keep their digits when the
logits are large, exactly as the unsharded kernels' w_shift. When a block raises the
running max from m to m', s is rescaled by exp(m - m') and b, c are shifted by
a (m - m'), W (m - m') (0 * -inf = 0: a zero weight on a -inf logit adds nothing).

z is the logits, or c tanh(a x / c) / a x with softcap / logit_scale: then each block is
first transformed into a per-chunk scratch of BLOCK elements (no (N, K) temporary), and
the gradient is multiplied by dz/dx.
"""

import math

import numpy as np
from numba import prange

from fastsce._kernels.jit import jit, parallel, vector
from fastsce._kernels.rows import BLOCK, _row_max, _soft_block, _weighted_shift_block
from fastsce._kernels.simd import exp_nonpositive, exp_shifted, like, prefer_512bit, times

# --- the logit transform ----------------------------------------------------------------------


@jit
def transform(x, a, c):
    """(z, dz/dx) in float64: z = c tanh(a x / c) when c > 0, else z = a x.

    tanh through exp (vectorisable; no tanh in this Numba build's vector library):
    tanh|v| = (1 - e) / (1 + e), e = exp(-2 |v|) <= 1, whose error is an absolute 1e-16,
    and dz/dx = a (1 - tanh^2 v) = a 4 e / (1 + e)^2, which does not cancel near |v| >> 1.
    x = -inf gives z = -c (softcap) and dz/dx = 0; NaN stays NaN.
    """
    u = a * x
    if c == 0:
        return u, a
    v = u / c
    e = exp_nonpositive(-2.0 * abs(v))
    th = (1.0 - e) / (1.0 + e)
    z = c * th if v >= 0 else -(c * th)
    return z, a * 4.0 * e / ((1.0 + e) * (1.0 + e))


@jit
def _transform_block(x, a, c, z, d, store_d):
    """z = transform(x) rounded to z's dtype; d = dz/dx too when store_d."""
    prefer_512bit()
    for j in range(x.size):
        zj, dj = transform(float(x[j]), a, c)
        z[j] = zj
        if store_d:
            d[j] = dj


# --- partial statistics -----------------------------------------------------------------------


@vector
def _sum_exp_block(z, m):
    # exp_shifted (z - m as if exact), not exp_nonpositive: s feeds the gradient.
    prefer_512bit()
    s = like(0, z)
    for j in range(z.size):
        s += exp_shifted(z[j], m)
    return s


@jit
def _fold_hard_block(z, w, eps, m, s, cs, w_seen):
    """Add one block of a row to its running (m, s, c, sum of w seen)."""
    new_max = _row_max(z)
    if not new_max <= m:  # a larger max, or NaN (which then spreads to the row)
        shift = float(m) - float(new_max)
        s *= math.exp(shift)
        cs += times(w_seen, shift)
        m = new_max
    if eps > 0:
        ds, dw = _weighted_shift_block(z, w, m)
        if m != -math.inf:  # else every z here is -inf: counted through w_seen
            cs += ds
        w_seen += dw
    if m != -math.inf:  # else every exp here is 0
        s += _sum_exp_block(z, m)
    return m, s, cs, w_seen


@parallel
def hard_stats(
    x, target, offset, ignore_index, w, eps, a, c, transformed, chunk_rows, m_out, s_out, a_out, b_out, c_out, held
):
    """Per row: m, s, c; and where the row's label y lies in this shard (and is not
    ignore_index) a = w_y, b = w_y (z_y - m), held = 1 (else 0, 0, 0)."""
    n, k = x.shape
    for ch in prange((n + chunk_rows - 1) // chunk_rows):
        tmp = np.empty(min(k, BLOCK), x.dtype)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            label = target[i]
            y = label - offset
            holds = label != ignore_index and 0 <= y < k
            m = like(-math.inf, x)
            s = 0.0
            cs = 0.0
            w_seen = 0.0
            zy = 0.0
            for lo in range(0, k, BLOCK):
                hi = min(lo + BLOCK, k)
                if transformed:
                    blk = tmp[: hi - lo]
                    _transform_block(x[i, lo:hi], a, c, blk, blk, False)
                    m, s, cs, w_seen = _fold_hard_block(blk, w[lo:hi], eps, m, s, cs, w_seen)
                    if holds and lo <= y < hi:
                        zy = float(blk[y - lo])
                else:
                    m, s, cs, w_seen = _fold_hard_block(x[i, lo:hi], w[lo:hi], eps, m, s, cs, w_seen)
                    if holds and lo <= y < hi:
                        zy = float(x[i, y])
            m_out[i] = m
            s_out[i] = s
            c_out[i] = cs
            if holds:
                w_y = float(w[y])
                a_out[i] = w_y
                b_out[i] = times(w_y, zy - float(m))
                held[i] = 1
            else:
                a_out[i] = 0.0
                b_out[i] = 0.0
                held[i] = 0


@jit
def _fold_soft_block(z, t, w, eps, m, s, sa, sb, cs, w_seen, no_store):
    new_max = _row_max(z)
    if not new_max <= m:
        shift = float(m) - float(new_max)
        s *= math.exp(shift)
        sb += times(sa, shift)
        cs += times(w_seen, shift)
        m = new_max
    ds, da, db = _soft_block(z, t, w, m, like(1, z), like(0, z), no_store, False)
    sa += da
    if m != -math.inf:  # else every z here is -inf: ds and db are NaN, counted through sa
        s += ds
        sb += db
    if eps > 0:
        dc, dw = _weighted_shift_block(z, w, m)
        if m != -math.inf:
            cs += dc
        w_seen += dw
    return m, s, sa, sb, cs, w_seen


@parallel
def soft_stats(x, t, w, eps, a, c, transformed, chunk_rows, m_out, s_out, a_out, b_out, c_out):
    """Per row: m, s, a = sum w t, b = sum w t (z - m), c (probability targets t)."""
    n, k = x.shape
    for ch in prange((n + chunk_rows - 1) // chunk_rows):
        tmp = np.empty(min(k, BLOCK), x.dtype)
        no_store = np.empty(0, x.dtype)  # _soft_block's store target, never written here
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            m = like(-math.inf, x)
            s = 0.0
            sa = 0.0
            sb = 0.0
            cs = 0.0
            w_seen = 0.0
            for lo in range(0, k, BLOCK):
                hi = min(lo + BLOCK, k)
                if transformed:
                    blk = tmp[: hi - lo]
                    _transform_block(x[i, lo:hi], a, c, blk, blk, False)
                    m, s, sa, sb, cs, w_seen = _fold_soft_block(
                        blk, t[i, lo:hi], w[lo:hi], eps, m, s, sa, sb, cs, w_seen, no_store
                    )
                else:
                    m, s, sa, sb, cs, w_seen = _fold_soft_block(
                        x[i, lo:hi], t[i, lo:hi], w[lo:hi], eps, m, s, sa, sb, cs, w_seen, no_store
                    )
            m_out[i] = m
            s_out[i] = s
            a_out[i] = sa
            b_out[i] = sb
            c_out[i] = cs


# --- this shard's gradient --------------------------------------------------------------------
#
# With the combined statistics the gradient of a row is, per class j of the shard,
#     g_j = (p e_j - q w_j t_j - r w_j) dz_j/dx_j,     e_j = exp(z_j - m)
# where the caller folds the row's 1/s, reduction scale, sample weight, smoothing and
# z-loss into the float64 per-row coefficients p, q, r (see fastsce.sharded._coefficients).


@jit
def _grad_block(z, w, m, p, r, g):
    """g = p exp(z - m) - r w. g may be z itself: each element is read before it is written."""
    prefer_512bit()
    for j in range(z.size):
        g[j] = p * exp_shifted(z[j], m) - r * w[j]


@jit
def _grad_in_place_block(g, w, m, p, r):
    """_grad_block with g the logits themselves: its own loop, as with two arguments that
    are one array LLVM's overlap check falls back to scalar code (4x slower)."""
    prefer_512bit()
    for j in range(g.size):
        g[j] = p * exp_shifted(g[j], m) - r * w[j]


@jit
def _soft_grad_block(z, t, w, m, p, q, r, g):
    """g = p exp(z - m) - q w t - r w."""
    prefer_512bit()
    for j in range(z.size):
        g[j] = p * exp_shifted(z[j], m) - (q * t[j] + r) * w[j]


@jit
def _times_block(g, d):
    prefer_512bit()
    for j in range(g.size):
        g[j] = g[j] * d[j]


@parallel
def hard_grad(x, target, offset, w, m, p, q, r, active, a, c, transformed, chunk_rows, g, in_place):
    """Rows with active[i] False get a zero gradient, their logits never read. In the
    label's column the gradient is formed in float64: p e_y - q w_y keeps the digits of
    p_y - 1 when p_y is close to 1. in_place: g is x."""
    n, k = x.shape
    for ch in prange((n + chunk_rows - 1) // chunk_rows):
        tz = np.empty(min(k, BLOCK), x.dtype)
        td = np.empty(min(k, BLOCK), x.dtype)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            if not active[i]:
                g[i, :] = 0
                continue
            y = target[i] - offset
            holds = 0 <= y < k
            xy = float(x[i, y]) if holds else 0.0  # before g (maybe x itself) is written
            mi = like(m[i], x)
            pi = like(p[i], x)
            ri = like(r[i], x)
            for lo in range(0, k, BLOCK):
                hi = min(lo + BLOCK, k)
                if transformed:
                    _transform_block(x[i, lo:hi], a, c, tz[: hi - lo], td[: hi - lo], True)
                    _grad_block(tz[: hi - lo], w[lo:hi], mi, pi, ri, g[i, lo:hi])
                    _times_block(g[i, lo:hi], td[: hi - lo])
                elif in_place:
                    _grad_in_place_block(g[i, lo:hi], w[lo:hi], mi, pi, ri)
                else:
                    _grad_block(x[i, lo:hi], w[lo:hi], mi, pi, ri, g[i, lo:hi])
            if holds:
                zy, dzy = transform(xy, a, c) if transformed else (xy, 1.0)
                e_y = math.exp(zy - m[i])
                g[i, y] = (p[i] * e_y - (q[i] + r[i]) * float(w[y])) * dzy


@parallel
def soft_grad(x, t, w, m, p, q, r, active, a, c, transformed, chunk_rows, g):
    n, k = x.shape
    for ch in prange((n + chunk_rows - 1) // chunk_rows):
        tz = np.empty(min(k, BLOCK), x.dtype)
        td = np.empty(min(k, BLOCK), x.dtype)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            if not active[i]:
                g[i, :] = 0
                continue
            mi = like(m[i], x)
            pi = like(p[i], x)
            qi = like(q[i], x)
            ri = like(r[i], x)
            for lo in range(0, k, BLOCK):
                hi = min(lo + BLOCK, k)
                if transformed:
                    _transform_block(x[i, lo:hi], a, c, tz[: hi - lo], td[: hi - lo], True)
                    _soft_grad_block(tz[: hi - lo], t[i, lo:hi], w[lo:hi], mi, pi, qi, ri, g[i, lo:hi])
                    _times_block(g[i, lo:hi], td[: hi - lo])
                else:
                    _soft_grad_block(x[i, lo:hi], t[i, lo:hi], w[lo:hi], mi, pi, qi, ri, g[i, lo:hi])
