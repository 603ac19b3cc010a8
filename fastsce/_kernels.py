"""Private jitted kernels: one pass per row, fused max / exp-sum / loss / gradient.

Every kernel takes C-contiguous logits ``z`` (N, K), a row loop spread with
``prange``, and writes one float64 loss per row into ``row_loss``; the caller
reduces that (N,) array serially, so the batch sum is the same whatever the
thread count. Each row is read from memory once: the max pass brings it into
cache, later passes over the same row hit L1/L2. The gradient buffer ``g`` may be
``z`` itself (in-place): every pass reads z[j] before it writes g[j].

Arguments shared by the kernels:
  w      (K,) class weights in z's dtype (ones when the user gave none)
  w_sum  sum of w, float64
  eps    label smoothing
  scale  1 / D for "mean" (NaN when D = 0, as in PyTorch), 1 otherwise
"""

import math

from numba import prange

from fastsce._jit import jit, parallel


# --- row helpers ---------------------------------------------------------------------


@jit
def _times(w, x):
    """w * x with 0 * inf = 0: a zero weight removes a -inf log-probability; NaN stays NaN."""
    if w == 0 and math.isinf(x):
        return 0.0
    return w * x


@jit
def _row_max(z):
    # NaN never wins a comparison, but a NaN logit still makes exp(z - m) NaN below.
    m = z[0]
    for j in range(1, z.size):
        if z[j] > m:
            m = z[j]
    return m


@jit
def _sum_exp(z, m, lo, hi):
    s = 0.0  # float64 accumulator: a float32 sum over K ~ 1e5 terms would lose digits
    for j in range(lo, hi):
        s += math.exp(z[j] - m)
    return s


@jit
def _store_exp(z, m, g, lo, hi):
    """g[j] = exp(z[j] - m) for j in [lo, hi); returns their float64 sum."""
    s = 0.0
    for j in range(lo, hi):
        e = math.exp(z[j] - m)
        g[j] = e
        s += e
    return s


@jit
def _weighted_shift_sum(z, w, m):
    """sum_j w_j (z_j - m), a term with w_j = 0 adding 0 even where z_j = -inf."""
    s = 0.0
    for j in range(z.size):
        s += _times(w[j], z[j] - m)
    return s


@jit
def _hard_row_loss(k, w_y, zy_shift, log_s, w_sum, w_shift_sum, eps):
    """(1 - eps) w_y (lse - z_y) + (eps / K) sum_j w_j (lse - z_j), with lse - z = log_s - (z - m)."""
    loss = _times(w_y, log_s - zy_shift)
    if eps > 0:
        loss = (1 - eps) * loss + eps / k * (w_sum * log_s - w_shift_sum)
    return loss


# --- integer targets --------------------------------------------------------------------


@parallel
def hard_loss(z, target, ignore_index, w, w_sum, eps, row_loss):
    n, k = z.shape
    for i in prange(n):
        y = target[i]
        if y == ignore_index:
            row_loss[i] = 0.0
            continue
        zi = z[i]
        m = _row_max(zi)
        w_shift_sum = _weighted_shift_sum(zi, w, m) if eps > 0 else 0.0
        log_s = math.log(_sum_exp(zi, m, 0, k))
        row_loss[i] = _hard_row_loss(k, w[y], zi[y] - m, log_s, w_sum, w_shift_sum, eps)


@parallel
def hard_loss_grad(z, target, ignore_index, w, w_sum, eps, scale, row_loss, g):
    n, k = z.shape
    for i in prange(n):
        y = target[i]
        gi = g[i]
        if y == ignore_index:
            row_loss[i] = 0.0
            gi[:] = 0
            continue
        zi = z[i]
        m = _row_max(zi)
        w_shift_sum = _weighted_shift_sum(zi, w, m) if eps > 0 else 0.0
        zy_shift = zi[y] - m  # read before g (maybe z itself) is overwritten
        # Sum the non-target classes apart: p_y - 1 = -s_other / s keeps its digits
        # when p_y is close to 1, where 1 - p_y would cancel.
        s_other = _store_exp(zi, m, gi, 0, y) + _store_exp(zi, m, gi, y + 1, k)
        e_y = math.exp(zy_shift)
        s = s_other + e_y
        log_s = math.log(s)
        w_y = w[y]
        row_loss[i] = _hard_row_loss(k, w_y, zy_shift, log_s, w_sum, w_shift_sum, eps)

        # g_j = scale [((1 - eps) w_y + eps W / K) p_j - (1 - eps) w_y [j = y] - eps w_j / K]
        hard = (1 - eps) * w_y * scale
        a = (hard + eps * w_sum / k * scale) / s
        if eps > 0:
            b = eps / k * scale
            for j in range(k):
                gi[j] = a * gi[j] - b * w[j]
            gi[y] = -hard * (s_other / s) + b * (w_sum * (e_y / s) - w_y)
        else:
            for j in range(k):
                gi[j] = a * gi[j]
            gi[y] = -hard * (s_other / s)


# --- probability targets ----------------------------------------------------------------


@jit
def _soft_row(zi, ti, w, m, c1, c0, gi, store):
    """One pass over a row: sum exp(z - m), A = sum w t', B = sum w t' (z - m), t' = c1 t + c0.

    With store, also writes gi[j] = exp(z_j - m). Returns (s, A, B)."""
    s = 0.0
    a = 0.0
    b = 0.0
    for j in range(zi.size):
        d = zi[j] - m
        e = math.exp(d)
        if store:
            gi[j] = e
        s += e
        wt = w[j] * (c1 * ti[j] + c0)
        a += wt
        b += _times(wt, d)  # a zero target probability adds nothing, even where z_j = -inf
    return s, a, b


@parallel
def soft_loss(z, t, w, eps, row_loss):
    n, k = z.shape
    c1, c0 = 1 - eps, eps / k
    for i in prange(n):
        zi = z[i]
        m = _row_max(zi)
        s, a, b = _soft_row(zi, t[i], w, m, c1, c0, zi, False)
        row_loss[i] = a * math.log(s) - b


@parallel
def soft_loss_grad(z, t, w, eps, scale, row_loss, g):
    n, k = z.shape
    c1, c0 = 1 - eps, eps / k
    for i in prange(n):
        zi = z[i]
        ti = t[i]
        gi = g[i]
        m = _row_max(zi)
        s, a, b = _soft_row(zi, ti, w, m, c1, c0, gi, True)
        row_loss[i] = a * math.log(s) - b
        # g_j = scale (p_j sum_k w_k t'_k - w_j t'_j)
        pa = scale * a / s
        for j in range(k):
            gi[j] = pa * gi[j] - scale * (w[j] * (c1 * ti[j] + c0))


# --- the "mean" denominator -------------------------------------------------------------


@jit
def counted_weight(target, ignore_index, w):
    """sum of w[y_n] over rows with y_n != ignore_index, in float64, in row order."""
    total = 0.0
    for i in range(target.size):
        y = target[i]
        if y != ignore_index:
            total += w[y]
    return total
