"""Private jitted kernels: one pass per row, fused max / exp-sum / loss / gradient.

Every kernel takes C-contiguous logits ``z`` (N, K) and spreads fixed chunks of
``chunk_rows`` rows over threads with ``prange``; each chunk adds its rows' float64
losses in order into ``chunk_loss`` (and stores each in ``row_loss`` unless that is
empty), and the caller sums the chunks: the same bits whatever the thread count.
Each row is read from memory once: the max pass brings it into cache, later passes over
the same row hit L1/L2. The gradient buffer ``g`` may be ``z`` itself (``in_place``):
all reads of a row's logits happen before, or at the same index as, its writes.

The loops over a row are SIMD loops (fastsce._kernels.simd): a vectorised exp, a lane-wise
max, and sums kept in the logits' dtype over blocks of at most BLOCK terms, each block
total then added in float64 (float64-grade sums at float32 vector width).

Arguments shared by the kernels:
  w       (K,) class weights in z's dtype (ones when the user gave none)
  w_sum   sum of w, float64
  v       (N,) float64 row weights (sample_weight * where), or empty for all ones;
          a row with v = 0 is skipped like an ignored one
  params  (eps, z_loss, scale, scale_z, a, c) as float64: label smoothing; the z-loss
          coefficient; 1 / D and 1 / D_z for "mean" (NaN or 0 when nothing counts), 1
          otherwise; logit scale a and softcap c (0 for none): the loss sees
          z = c tanh(a x / c), transformed row by row into a scratch row. (hard_loss and
          hard_loss_grad read scale and scale_z there, and take the options as
          arguments of their own, None where the call has none.)
  outs    (row_loss, row_z, lse, chunk_loss, chunk_z): per-row loss, z-term and
          logsumexp (each empty when not wanted), and per-chunk float64 sums of the
          cross-entropy and z-terms (kept apart: "mean" divides them by D and D_z)
"""

import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from fastsce._kernels.half import (
    as_stored, float_rows, grad_row, is_half, load_row, load_row_max, scratch_row, store_grad_row, store_row,
    store_scaled, store_scaled_minus,
)
from fastsce._kernels.jit import borrow_outs, borrowed, jit, keep_alive, parallel, read_only_view, vector
from fastsce._kernels.simd import (
    exp_nonpositive, exp_shifted, like, lse_minus_target, maximum, prefer_512bit, scaled, times,
)

# Terms summed in the logits' dtype before the total moves to float64: float32 lanes
# over 1024 terms keep ~1e-7 relative error; a float64 accumulator throughout would
# halve the vector width of the exp loop (measured 0.54 vs 0.25 ns per element).
BLOCK = 1024


# --- SIMD loops over one row (or one block of it) ---------------------------------------------
#
# The loops reading logits take an optional logit scale a (simd.scaled): each logit is then
# read as the rounded a z_j, the value a scaled copy of the row held, with no copy.
# Assembly with a float32 a (inspect_asm): the same zmm loops, unrolled 4 times, with one
# vmulps more per 16 logits (no FMA fusing it into the subtraction: simd.product).
# Unscaled rows pass a = None (no product): a = 1 instead cost 3-9% per row (1 thread,
# rows in L2, _hard_row_grad with a = 1 against None) and 6-9% on float32 loss+grad
# kernels (1 thread, CPU time, 3 alternating runs), where the exp pass bounds them. The
# kernels take the scale as None or a number (see hard_loss), so each call compiles one.


@vector
def _row_max(z, a=None):
    # llvm.maximum: vmaxps, and a compare and a blend on each accumulator (3.4 cycles a
    # zmm, 52 ns for 1000 float32 in L1). Explicit zmm code with vmaxps alone (17 ns;
    # NaNs passed by, an infinite max taken again) made the plain row kernels 0.82-0.87x
    # the time of a row in cache, but 1.19-1.25x at K = 1000 and 1.06-1.63x at K = 2000
    # on rows from memory, and whole calls 1.16-1.46x for the loss alone (one and two
    # threads). Likely: while this slower loop reads a row, the hardware prefetchers get
    # ahead and stream the next rows in during the exp pass; racing through it, the max
    # left the memory idle there. (llvm.maxnum under "nnan", also one vmaxps, makes the
    # result poison for a NaN operand: it miscompiled a softcapped row's max.)
    prefer_512bit()
    m = scaled(z[0], a)
    for j in range(1, z.size):
        m = maximum(m, scaled(z[j], a))  # NaN-propagating: a NaN logit makes the row NaN
    return m


# The exp-sums leave one element, ``skip`` (the target class), out of the sum: a compare
# and a masked add per register, in the one loop over the block. Two loops around it
# (block[:t], block[t + 1:]) cost 36% more per float32 row of 1000 (one thread, rows in
# L1, interleaved: 286 against 187 ns): a second loop's start and remainder, and loads
# and stores across cache lines, the second slice starting anywhere. Assembly
# (float32): the same zmm exp loop, unrolled 4 times, with two vpcmpeqq of the 64-bit
# lane indices against skip, a kunpckbw and a masked move per 16 elements; with skip
# None (a block without the target: _kept) none of them.


def _kept(j, skip):
    """j != skip; True, and no compare, where skip is None."""
    raise NotImplementedError  # only callable from jitted code


@overload(_kept)
def _kept_impl(j, skip):
    if isinstance(skip, (types.NoneType, types.Omitted)):
        return lambda j, skip: True
    return lambda j, skip: j != skip


@vector
def _sum_exp_block(z, m, skip, a=None):
    # Loss only: the plain exp of the rounded z - m is enough here (its error grows with
    # |z - m|, where the terms no longer matter to the sum) and 10% faster.
    prefer_512bit()
    s = like(0, z)
    zero = like(0, z)
    for j in range(z.size):
        e = exp_nonpositive(scaled(z[j], a) - m)
        s += e if _kept(j, skip) else zero
    return s


@vector
def _store_exp_block(z, m, g, skip, a=None):
    prefer_512bit()
    s = like(0, z)
    zero = like(0, z)
    for j in range(z.size):
        e = exp_shifted(scaled(z[j], a), m)
        g[j] = e
        s += e if _kept(j, skip) else zero
    return s


@vector
def _exp_in_place_block(g, m, skip, a=None):
    # Its own loop: with z and g the same array LLVM's overlap check would fall back
    # to scalar code.
    prefer_512bit()
    s = like(0, g)
    zero = like(0, g)
    for j in range(g.size):
        e = exp_shifted(scaled(g[j], a), m)
        g[j] = e
        s += e if _kept(j, skip) else zero
    return s


@vector
def _store_exp_shift_block(z, m, g, skip, w, a=None):
    """_store_exp_block and, in the same loop, _weighted_shift_block's sum: (the exps'
    sum but for j = skip, sum_j w_j (z_j - m)), for rows of one block. Label smoothing's
    pass of its own cost loss+grad 18-28% at K = 300 and 9-32% at K = 1000 over the
    plain call; fused, -2-10% and 5-16% (2 threads, old and new kernels alternating in
    one process, four runs). At K = 32000 the fused loop measured 8-10% slower than the
    two passes (each from L2 there), so longer rows keep them. Assembly: zmm, the
    weighted shift's FMA and masked add beside the exp's."""
    prefer_512bit()
    s = like(0, z)
    ws = like(0, z)
    zero = like(0, z)
    for j in range(z.size):
        x = scaled(z[j], a)
        e = exp_shifted(x, m)
        g[j] = e
        s += e if _kept(j, skip) else zero
        ws += w[j] * (x - m) if w[j] != 0 else zero
    return s, ws


@vector
def _weighted_shift_block(z, w, m, a=None):
    """(sum_j w_j (z_j - m), sum_j w_j), a zero weight adding 0 even where z_j = -inf."""
    prefer_512bit()
    s = like(0, z)
    w_sum = like(0, z)
    zero = like(0, z)
    for j in range(z.size):
        s += w[j] * (scaled(z[j], a) - m) if w[j] != 0 else zero
        w_sum += w[j]
    return s, w_sum


@vector
def _scale(g, a):
    prefer_512bit()
    for j in range(g.size):
        g[j] = a * g[j]


@vector
def _scale_minus_weight(g, a, b, w):
    """g = a g - b w."""
    prefer_512bit()
    for j in range(g.size):
        g[j] = a * g[j] - b * w[j]


def _scale_into(g, a, out):
    """out = a g: g itself scaled for a float gradient (out is g), or the float32 row
    scaled and rounded into the half row out in the same pass (half.store_scaled)."""
    raise NotImplementedError  # only callable from jitted code


def _scale_minus_weight_into(g, a, b, w, out):
    """out = a g - b w, as _scale_into."""
    raise NotImplementedError  # only callable from jitted code


@overload(_scale_into)
def _scale_into_impl(g, a, out):
    if isinstance(out.dtype, types.Integer):  # half bits
        return lambda g, a, out: store_scaled(g, a, out)
    return lambda g, a, out: _scale(g, a)


@overload(_scale_minus_weight_into)
def _scale_minus_weight_into_impl(g, a, b, w, out):
    if isinstance(out.dtype, types.Integer):
        return lambda g, a, b, w, out: store_scaled_minus(g, a, b, w, out)
    return lambda g, a, b, w, out: _scale_minus_weight(g, a, b, w)


# A row's max that the caller may already have: NOT_KNOWN where it has not. (+inf: the max
# is then taken again, and a row holding +inf has that max anyway. A float in every call,
# not None in some: one compiled variant of the row helpers for the rows read through a
# scratch row and the rows read in place.)
NOT_KNOWN = math.inf


def _known_or_max(m, z, a):
    """m, the max of the row a z that its caller took while converting or softcapping
    it into z; or, where m is None or NOT_KNOWN, that max now (_row_max)."""
    raise NotImplementedError  # only callable from jitted code


@overload(_known_or_max)
def _known_or_max_impl(m, z, a):
    if isinstance(m, (types.NoneType, types.Omitted)):
        return lambda m, z, a: _row_max(z, a)
    return lambda m, z, a: like(m, z) if m < NOT_KNOWN else _row_max(z, a)  # (a NaN max: taken again)


@vector
def _soft_block(z, t, w, m, c1, c0, g, store):
    """Over a block: sum exp(z - m), A = sum w t', B = sum w t' (z - m), t' = c1 t + c0;
    with ``store`` also g[j] = exp(z_j - m). A zero w t' adds 0 to B even where z_j = -inf."""
    prefer_512bit()
    s = like(0, z)
    a = like(0, z)
    b = like(0, z)
    zero = like(0, z)
    for j in range(z.size):
        d = z[j] - m
        e = exp_shifted(z[j], m)
        if store:
            g[j] = e
        s += e
        wt = w[j] * (c1 * t[j] + c0)
        a += wt
        b += wt * d if wt != 0 else zero
    return s, a, b


# --- float64 totals of the block sums -------------------------------------------------------


def _store_exp(z, m, g, in_place, skip, a=None):
    """g[j] = exp(z[j] - m); returns their float64 sum but for j = skip (out of range: none).
    z is g when in_place: a runtime bool (both loops compiled), or None / True (_exps)."""
    raise NotImplementedError  # only callable from jitted code


@overload(_store_exp)
def _store_exp_impl(z, m, g, in_place, skip, a=None):
    if isinstance(in_place, types.Boolean):
        return lambda z, m, g, in_place, skip, a=None: _exps(z, m, g, skip, True, a) if in_place else _exps(z, m, g, skip, None, a)
    return lambda z, m, g, in_place, skip, a=None: _exps(z, m, g, skip, in_place, a)


def _or(x, default):
    """x, or default where x is None (at typing: the options the kernels take as None)."""
    raise NotImplementedError  # only callable from jitted code


@overload(_or)
def _or_impl(x, default):
    if isinstance(x, (types.NoneType, types.Omitted)):
        return lambda x, default: default
    return lambda x, default: x


def _read_scale(a, c, z):
    """The logit scale the row helpers apply as they read a row (scaled): a in z's
    dtype, or None where there is none or a softcap takes it (z = c tanh(a x / c))."""
    raise NotImplementedError  # only callable from jitted code


@overload(_read_scale)
def _read_scale_impl(a, c, z):
    if isinstance(a, types.NoneType) or not isinstance(c, types.NoneType):
        return lambda a, c, z: None
    return lambda a, c, z: like(a, z)


def _exps(z, m, g, skip, in_place, a=None):
    """_store_exp with in_place None (g is not z) or True (g is z), chosen as Numba types
    the call: a caller that knows which compiles one loop (the plain kernels: both cost
    a plain call 1.2 s more of compiling, 30%)."""
    raise NotImplementedError  # only callable from jitted code


@overload(_exps)
def _exps_impl(z, m, g, skip, in_place, a=None):
    if isinstance(in_place, (types.NoneType, types.Omitted)):
        block, into = _store_exp_block, True
    else:  # its own loop: with z and g the same array LLVM's overlap check would fall back to scalar code
        block, into = _exp_in_place_block, False

    def exps(z, m, g, skip, in_place, a=None):
        s = 0.0
        for lo in range(0, z.size, BLOCK):
            t = skip - lo
            gb = g[lo : lo + BLOCK]
            args = (z[lo : lo + BLOCK], m, gb) if into else (gb, m)
            s += block(*args, t, a) if 0 <= t < BLOCK else block(*args, None, a)
        return s

    return exps


@jit
def _weighted_shift_sum(z, w, m, a=None):
    s = 0.0
    for lo in range(0, z.size, BLOCK):
        s += _weighted_shift_block(z[lo : lo + BLOCK], w[lo : lo + BLOCK], m, a)[0]
    return s


@jit
def _row_stats(z, y, w, eps, g, block_max, in_place, a=None, m_known=None):
    """Reading the row once: its max m, sum_{j != y} exp(z_j - m) and, with smoothing,
    sum_j w_j (z_j - m) (0 otherwise).

    Block by block, each block read while in L1: when a block raises the running max,
    the sums so far are rescaled to it (the "online softmax"), so a row longer than the
    cache comes from memory only once. The target class is left out of the sum (pass
    y = -1 to keep every class). With a ``block_max`` array (not None) it also writes
    g = exp(z - M_b), M_b the running max when block b was read, kept in block_max[b];
    _rescale_blocks turns that into the gradient. eps None: no smoothing sum. (None
    prunes those branches before Numba types them: the loss-only rows compile no stores.) With a logit scale ``a`` every z_j
    above is a z_j, rounded (see _hard_row_grad). m_known: the row's max if the caller
    has it (_known_or_max), used for a row of one block: there it is that block's max,
    and the sums are the same bits as without it (a half row's, as its float32 copy's).
    """
    m = like(-math.inf, z)
    s_other = 0.0
    w_shift = 0.0
    w_seen = 0.0
    for lo in range(0, z.size, BLOCK):
        block = z[lo : lo + BLOCK]
        new_max = _known_or_max(m_known, block, a) if z.size <= BLOCK else _row_max(block, a)
        if not new_max <= m:  # a larger max, or NaN (which then spreads to the row)
            s_other *= exp_nonpositive(float(m) - float(new_max))
            w_shift += times(w_seen, float(m) - float(new_max))
            m = new_max
        if eps is not None and eps > 0:  # before the stores below overwrite an in-place block
            ds, dw = _weighted_shift_block(block, w[lo : lo + BLOCK], m, a)
            if m != -math.inf:  # else every z here is -inf: counted through w_seen
                w_shift += ds
            w_seen += dw
        if block_max is not None:
            block_max[lo // BLOCK] = m
        if m == -math.inf:  # nothing finite yet: every exp here is 0
            if block_max is not None:
                g[lo : lo + BLOCK] = 0
            continue
        t = y - lo  # the target's place in the block (none when out of its range)
        if block_max is not None:
            s_other += _store_exp(block, m, g[lo : lo + BLOCK], in_place, t, a)
        elif 0 <= t < block.size:  # one loop, the target's lane masked out of the sum
            # (_kept): cut at t into two loops, each left a remainder that LLVM runs
            # element by element, it took 1.2x the time of a row at K = 300-512 and 1.7x
            # at 200; 1.03-1.05x at 1000-1024 (one thread, 21 rounds, in cache)
            s_other += _sum_exp_block(block, m, t, a)
        else:
            s_other += _sum_exp_block(block, m, None, a)
    return m, s_other, w_shift


@jit
def _rescale_blocks(g, block_max, m, a, b, w, eps):
    """g = a exp(M_b - m) g - b w block by block: the gradient from _row_stats' stores
    (eps None: g = a exp(M_b - m) g, and no other variant compiled)."""
    for lo in range(0, g.size, BLOCK):
        hi = lo + BLOCK
        factor = like(a * exp_nonpositive(float(block_max[lo // BLOCK]) - float(m)), g)
        if eps is not None and eps > 0:
            _scale_minus_weight(g[lo:hi], factor, like(b, g), w[lo:hi])
        else:
            _scale(g[lo:hi], factor)


@jit
def _soft_sums(z, t, w, m, c1, c0, g, store):
    s = 0.0
    a = 0.0
    b = 0.0
    for lo in range(0, z.size, BLOCK):
        hi = lo + BLOCK
        ds, da, db = _soft_block(z[lo:hi], t[lo:hi], w[lo:hi], m, c1, c0, g[lo:hi], store)
        s += ds
        a += da
        b += db
    return s, a, b


@jit
def row_lse(m, log_s):
    """lse = m + log s of a row whose max is m, or m itself when that is +-inf: a row of
    -inf only gives -inf and one holding +inf gives +inf (as fastsce.logsumexp), where
    the shift by m gave inf - inf = NaN."""
    m = float(m)
    return m if math.isinf(m) else m + log_s


# --- integer targets --------------------------------------------------------------------------


@jit
def _hard_row_loss(k, w_y, zy, s_other, w_sum, w_shift_sum, eps):
    """(1 - eps) w_y (lse - z_y) + (eps / K) sum_j w_j (lse - z_j), lse - z = log s - (z - m)."""
    e_y = exp_nonpositive(zy)
    loss = times(w_y, lse_minus_target(s_other, e_y, zy))
    if eps is not None and eps > 0:  # (None: not compiled)
        loss = (1 - eps) * loss + eps / k * (w_sum * math.log(s_other + e_y) - w_shift_sum)
    return loss


@jit
def _hard_row(zi, y, k, w, w_sum, eps, need_lse, za, m_known=None):
    m, s_other, w_shift_sum = _row_stats(zi, y, w, eps, None, None, False, za, m_known)
    zy = float(scaled(zi[y], za)) - float(m)  # exact for float32: the loss keeps its digits
    loss = _hard_row_loss(k, w[y], zy, s_other, w_sum, w_shift_sum, eps)
    return loss, row_lse(m, math.log(s_other + exp_nonpositive(zy))) if need_lse else 0.0


@jit
def _row_lse(zi, za=None):
    """logsumexp of a row (of za zi), in one read (for rows that are otherwise skipped)."""
    m, s, _ = _row_stats(zi, -1, None, None, None, None, False, za)
    return row_lse(m, math.log(s))


@jit
def _hard_row_grad(zi, y, gi, go, k, w, w_sum, eps, scale, zg, in_place, long_rows, need_lse, za, cap_a, cap_c, m_known, zc):
    """(loss, lse) of the row za zi, its gradient with respect to za zi into gi, and into
    go: gi itself for a float gradient; for a half one the row of half bits that gi's
    float32 row is rounded into, in the last pass that writes gi (_scale_into). zg: the
    z-loss's gradient is zg lse p_j (zg = 2 z_loss scale_z v). long_rows: a row too long
    to stay in cache between passes (True; None for rows that stay). Its max and exp-sum
    then come from one read (_row_stats), and one more pass rescales the stored exps.
    in_place: True when gi is zi, else None. Each option (eps, zg, za, cap_c) is None when
    the call has none: its branches are pruned before Numba types them, so a call
    compiles the loops of its own options only.

    za: the logit scale (None for none), applied as each logit is read: every pass sees
    the za zi_j a scaled copy of the row would hold (simd.product: rounded, never fused
    into an FMA), so the results are those of that copy, bit for bit, without writing
    it and reading it again (a 4th pass over the row).

    m_known: the row's max, taken by the caller as it converted or softcapped the row
    into zi, or None (_known_or_max). cap_c not None: zi is a softcapped row, z = c tanh(cap_a
    x / c), and gi becomes the gradient with respect to x: the chain rule's factor joins the
    pass that scales the stored exps (a pass of its own only for long rows). zc is zi
    then, and an unused scratch row otherwise: passed apart from zi, which may be
    read-only, so that the softcap's loops compile once, for a writeable row."""
    # Sum the non-target classes apart: p_y - 1 = -s_other / s keeps its digits
    # when p_y is close to 1, where 1 - p_y would cancel.
    zy_raw = scaled(zi[y], za)  # read before g (maybe z itself) is overwritten
    if long_rows is not None:
        block_max = np.empty((k + BLOCK - 1) // BLOCK, zi.dtype)
        m, s_other, w_shift_sum = _row_stats(zi, y, w, eps, gi, block_max, in_place, za)
    else:  # leaves exp(z - m) in g, to be scaled below while the row is in cache
        m = _known_or_max(m_known, zi, za)
        if eps is not None and in_place is None and k <= BLOCK:  # one block (longer rows: see _store_exp_shift_block)
            s_block, shift_block = _store_exp_shift_block(zi, m, gi, y, w, za)
            s_other, w_shift_sum = float(s_block), float(shift_block)
        else:
            w_shift_sum = _weighted_shift_sum(zi, w, m, za) if eps is not None else 0.0
            s_other = _exps(zi, m, gi, y, in_place, za)
    zy = float(zy_raw) - float(m)  # exact for float32: e_y and the loss keep their digits
    e_y = exp_nonpositive(zy)
    s = s_other + e_y
    lse = row_lse(m, math.log(s)) if need_lse else 0.0
    w_y = float(w[y])

    # g_j = scale [((1 - eps) w_y + eps W / K) p_j - (1 - eps) w_y [j = y] - eps w_j / K] + zg lse p_j
    e0, zg0 = _or(eps, 0.0), _or(zg, 0.0)
    hard = (1 - e0) * w_y * scale
    a = (hard + e0 * w_sum / k * scale + zg0 * lse) / s
    b = e0 / k * scale
    if cap_c is not None:
        ca, cc = like(_or(cap_a, 1.0), gi), like(cap_c, gi)
    if long_rows is not None:
        _rescale_blocks(gi, block_max, m, a, b, w, eps)
    elif cap_c is not None and eps is not None:
        _scale_minus_weight_capped(gi, like(a, gi), like(b, gi), w, zc, ca, cc)
    elif cap_c is not None:
        _scale_capped(gi, like(a, gi), zc, ca, cc)
    elif eps is not None:
        _scale_minus_weight_into(gi, like(a, gi), like(b, gi), w, go)
    else:
        _scale_into(gi, like(a, gi), go)
    g_y = -hard * (s_other / s) + b * (w_sum * (e_y / s) - w_y) + zg0 * lse * (e_y / s)
    if cap_c is not None and long_rows is None:
        g_y *= float(_softcap_slope(zc[y], ca, cc))
    gi[y] = g_y
    if cap_c is not None and long_rows is not None:  # the chain rule in a pass of its own (the same loop, f = 1)
        _scale_capped(gi, like(1, gi), zc, ca, cc)
    if is_half(go):
        if long_rows is not None or cap_c is not None:  # gi's last pass was not _scale_into
            store_row(gi, go)
        else:
            go[y] = as_stored(g_y, go)
    return _hard_row_loss(k, w_y, zy, s_other, w_sum, w_shift_sum, eps), lse


# --- the logits the loss sees: z = c tanh(a x / c) -------------------------------------------


# tanh(u) in float32, two ways, each polynomial u P(u^2) fitted for the least maximum
# relative error (the float32 evaluation then stays within 1.3 ulp):
# - a block of logits whose |u| are all below 1 (the common case: c = 30 caps logits
#   of a few tens) takes P of degree 7 alone (0.08 ulp on [0, 1]): 8 FMAs per element.
# - any other block: below |u| = 0.55 P of degree 5 (0.02 ulp; the Taylor series to
#   u^17 it replaces took 3 more FMAs for the same 1.5 ulp), beyond (1 - e) / (1 + e)
#   with e = exp(-2|u|) <= 1/3, which does not cancel; both computed for every element
#   and one selected (~28 vector instructions and a vdivps per 16 elements).
# Assembly (float32, zmm, unrolled 4 times): the polynomial alone 2 vmulps, 7 FMAs, 2
# vmulps and the max (vmaxps, vcmpunordps, masked move) per 16 elements; the general form
# ~28 instructions and a vdivps. Measured (1 thread, rows in L2, ns per element): the
# Taylor/exp loop 0.485, the degree-5/exp one 0.45; a row of 32000 by the polynomial
# alone, with its |x| max pass, 0.33 (x = 3 N(0, 1), c = 30).
_TANH_F32 = tuple(
    np.float32(c)
    for c in (
        1.0, -0.3333331755942848, 0.13332586131324203, -0.05385230922070699, 0.021071676375147362,
        -0.006274235883405963,
    )
)  # fmt: skip
_T0, _T1, _T2, _T3, _T4, _T5 = _TANH_F32
_TANH_F32_BELOW_1 = tuple(
    np.float32(c)
    for c in (
        1.0, -0.33333295431465865, 0.13332344564993442, -0.053879802207033464, 0.02148665608470898,
        -0.007946104195188161, 0.0023013629317870004, -0.0003584515165025355,
    )
)  # fmt: skip
_S0, _S1, _S2, _S3, _S4, _S5, _S6, _S7 = _TANH_F32_BELOW_1


def _softcap_row(x, out, a, c):
    """out = c tanh(a x / c); returns max(out) (NaN-propagating). No vector tanh in this Numba build: float32 rows use a
    float32 polynomial / exp form (within 2.5 ulp of tanh, checked in the tests), float64
    rows sign(u) (1 - e) / (1 + e), e = exp(-2|u|), in float64."""
    raise NotImplementedError  # only callable from jitted code


@overload(_softcap_row)
def _softcap_row_impl(x, out, a, c):
    if x.dtype == types.float32:
        return lambda x, out, a, c: _softcap_row_f32(x, out, a, c)
    return lambda x, out, a, c: _softcap_row_f64(x, out, a, c)


@jit
def _softcap_row_f32(x, out, a, c):
    """Block by block (read once from memory by the |x| max, then from L1): the
    polynomial alone where every |u| of the block is below 1, else _softcap_block_f32.
    |u_j| = |x_j| |r| rounded is at most max_j |x_j| |r| rounded (rounding is monotone);
    a NaN or infinite x makes the max NaN or inf and takes the general form."""
    r, c32 = np.float32(a / c), np.float32(c)
    m = np.float32(-np.inf)
    for lo in range(0, x.size, BLOCK):
        xb, ob = x[lo : lo + BLOCK], out[lo : lo + BLOCK]
        if _abs_max(xb) * abs(r) < np.float32(1.0):
            m = maximum(m, _softcap_small_block_f32(xb, ob, r, c32))
        else:
            m = maximum(m, _softcap_block_f32(xb, ob, r, c32))
    return m


@vector
def _abs_max(x):
    prefer_512bit()
    m = abs(x[0])
    for j in range(1, x.size):
        m = maximum(m, abs(x[j]))  # NaN-propagating
    return m


@vector
def _softcap_small_block_f32(x, out, r, c):
    """out = c tanh(x r) where every |x r| < 1; returns max(out)."""
    prefer_512bit()
    m = c * np.float32(-1.0)
    for j in range(x.size):
        u = x[j] * r
        q = u * u
        p = _S6 + q * _S7
        p = _S5 + q * p
        p = _S4 + q * p
        p = _S3 + q * p
        p = _S2 + q * p
        p = _S1 + q * p
        p = _S0 + q * p
        z = c * (u * p)
        out[j] = z
        m = maximum(m, z)  # here, not a pass over out: 0.08 ns per element less
    return m


@vector
def _softcap_block_f32(x, out, r, c):
    prefer_512bit()
    one, small = np.float32(1.0), np.float32(0.55)
    m = c * np.float32(-1.0)
    for j in range(x.size):
        u = x[j] * r
        q = u * u
        p = _T4 + q * _T5
        p = _T3 + q * p
        p = _T2 + q * p
        p = _T1 + q * p
        p = _T0 + q * p
        e = exp_nonpositive(np.float32(-2.0) * abs(u))
        t = u * p if abs(u) < small else math.copysign((one - e) / (one + e), u)
        z = c * t
        out[j] = z
        m = maximum(m, z)
    return m


@vector
def _softcap_row_f64(x, out, a, c):
    prefer_512bit()
    r = a / c
    m = like(-c, out)
    for j in range(x.size):
        u = float(x[j]) * r
        e = exp_nonpositive(-2.0 * abs(u))
        z = like(c * math.copysign((1.0 - e) / (1.0 + e), u), out)
        out[j] = z
        m = maximum(m, z)
    return m


@vector
def _scale_row(x, out, a):
    prefer_512bit()
    for j in range(x.size):
        out[j] = a * x[j]


@vector
def _softcap_chain(g, z, a, c):
    """g = a (1 - (z / c)^2) g: dz/dx of the softcap; exactly 0 where z = +-c (saturated),
    as the exact derivative: z / c is z (1 / c) under fastmath, a few ulps off 1, which
    left e.g. 1.4e-6 of a large z-loss gradient."""
    prefer_512bit()
    zero = like(0, g)
    for j in range(g.size):
        q = z[j] / c
        g[j] = zero * g[j] if abs(z[j]) == c else a * (1 - q * q) * g[j]  # (NaN stays NaN)


@jit
def _softcap_slope(z, a, c):
    """dz/dx = a (1 - (z / c)^2) at z = c tanh(a x / c), in z's dtype: exactly 0 at
    saturation (z = +-c, see _softcap_chain), 1 - q^2 as (1 - q)(1 + q) (1 - q exact
    near saturation, where 1 - q^2 would round q^2 first). q = z (1 / c) under "arcp"."""
    q = z / c
    one = like(1, z)
    return like(0, z) if abs(z) == c else a * ((one - q) * (one + q))


@vector
def _scale_capped(g, f, z, a, c):
    """g = f g dz/dx: the gradient's scaling (_scale) and the softcap's chain rule
    (_softcap_slope) in one pass over the row, in place of a pass of its own
    (_softcap_chain). Assembly (float32): zmm throughout, vmulps by 1 / c, no division
    and no float64 (_softcap_chain's 1 - q^2 is float64)."""
    prefer_512bit()
    for j in range(g.size):
        g[j] = f * g[j] * _softcap_slope(z[j], a, c)  # (NaN stays NaN)


@vector
def _scale_minus_weight_capped(g, f, b, w, z, a, c):
    """g = (f g - b w) dz/dx: _scale_minus_weight and the chain rule in one pass."""
    prefer_512bit()
    for j in range(g.size):
        g[j] = (f * g[j] - b * w[j]) * _softcap_slope(z[j], a, c)


@jit
def _scale_and_cap(x, out, a, c):
    if c > 0:
        _softcap_row(x, out, a, c)
    elif a != 1.0:
        _scale_row(x, out, like(a, out))


@jit
def _transform(x, out, a, c):
    """out = the row as the loss sees it, in the compute dtype (float32 for half rows)."""
    if is_half(x):
        load_row(x, out)
        _scale_and_cap(out, out, a, c)
    else:
        _scale_and_cap(x, out, a, c)


@jit
def _chain(g, z, a, c):
    if c > 0:
        _softcap_chain(g, z, like(a, g), like(c, g))
    elif a != 1.0:
        _scale(g, like(a, g))


# The drivers spread fixed chunks of rows over the threads. A chunk sums its rows' losses
# in row order into chunk_loss / chunk_z (and stores each into row_loss etc. when those
# are not empty), so the batch total does not depend on the thread count and needs no
# (N,) buffer.
#
# Inside the prange body they borrow every array (jit.borrowed): the views of a row,
# and the helpers' views of those, then count no references (two locked instructions
# each, per view, per call of a helper Numba does not inline; the scratch rows are kept
# alive by keep_alive). With the one-loop exp-sums above, measured against the kernels
# before (both in one process, interleaved, float32, out=, two runs): loss+grad 0.79-0.84x
# the time at 8192 x 1000, 0.83-0.89x at 4096 x 500, 0.85-0.86x at 16384 x 400,
# 1.02-1.03x at 1024 x 32000 (2 threads); loss only 0.83-0.90x, 0.87-0.94x, 0.94-1.01x
# and 0.95-0.98x.


@jit
def _counted(target, v, i, ignore_index):
    """(y, v_i, live) of row i: its label, its row weight (1 without row weights), and
    whether it counts (not ignored, not weighted 0)."""
    y = target[i]
    vi = v[i] if v.size else 1.0
    return y, vi, y != ignore_index and vi != 0


@jit
def _record(i, live, vi, zl, ce, lse, outs, totals):
    """Row i's weighted loss and z-term into the outputs; returns the updated chunk totals."""
    row_loss, row_z, lse_out, _, _ = outs
    ce = vi * ce if live else 0.0
    zt = vi * zl * lse * lse if live and zl > 0 else 0.0
    if row_loss.size:
        row_loss[i] = ce + zt
    if row_z.size:
        row_z[i] = zt
    if lse_out.size:
        lse_out[i] = lse
    return totals[0] + ce, totals[1] + zt


def _load_or_cap(x, out, a, c, za):
    """out = the row as the loss sees it, in the compute dtype (float32 for half rows):
    the rows the hard kernels read through a scratch row, half rows (scaled by za as
    they are converted: the products the loops would form as they read it) and
    softcapped ones (za = 1: the scale is inside the cap). Returns max(out), taken in
    the same pass, not one of its own."""
    raise NotImplementedError  # only callable from jitted code


@overload(_load_or_cap)
def _load_or_cap_impl(x, out, a, c, za):
    # Chosen by dtype here rather than by a branch on is_half(x) in one function, which
    # Numba types on both sides: the softcap loops would compile for a read-only and
    # a writeable row each.
    # c (the softcap) None: no cap (float rows are read through a scratch row only to be capped).
    if isinstance(x.dtype, types.Integer):  # half bits
        if isinstance(c, types.NoneType):
            return lambda x, out, a, c, za: load_row_max(x, out, za)

        def load_and_cap(x, out, a, c, za):
            load_row(x, out)
            return _softcap_row(out, out, _or(a, 1.0), c)

        return load_and_cap
    return lambda x, out, a, c, za: _softcap_row(x, out, _or(a, 1.0), c)


# The general kernels take each option as an argument of its own, None when the call has
# none (fastsce.api._row_kernel): eps (label smoothing), zl (the z-loss coefficient), a
# (the logit scale), c (the softcap); and copy, True when rows are read through a scratch
# row (half rows, converted; softcapped ones). Numba prunes the branches on ``is None``
# before it types them, so a call compiles its own options' loops, not every option's (a first call
# with label smoothing at K = 1000, empty cache, serial: 7.1 s, against 18.8 s when the
# kernels compiled them all). Assembly (inspect_asm, serial hard_loss_grad, float32):
# 5016 instructions (616 on zmm) with label smoothing, 4158 (492) with a z-loss, 5691
# (861) with a softcap, against 17640 for the kernel of every option; plain_loss_grad 3145.


@parallel
def hard_loss(z, target, ignore_index, w, w_sum, v, params, chunk_rows, outs, eps, zl, a, c, copy):
    chunk_loss, chunk_z = outs[3], outs[4]
    want_lse = outs[2].size > 0
    need_lse = want_lse or zl is not None  # else the rows' lse is not computed (a log per row)
    n, k = z.shape
    zf = float_rows(z)
    zl0 = _or(zl, 0.0)
    for ch in prange(chunk_loss.size):
        zb, zfb, tb, wb, vb, ob = borrowed(z), borrowed(zf), borrowed(target), borrowed(w), borrowed(v), borrow_outs(outs)
        scratch = scratch_row(z, k if copy is not None else 0)
        zt = borrowed(scratch)  # the row as the loss sees it
        ztr = read_only_view(zt)  # read as the logits are: the same compiled row helpers
        za = _read_scale(a, c, zt)  # the logit scale outside the cap: applied as rows are read or converted
        totals = (0.0, 0.0)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            y, vi, live = _counted(tb, vb, i, ignore_index)
            m_row = like(NOT_KNOWN, zt)
            if copy is not None and (live or want_lse):
                m_row = _load_or_cap(zb[i], zt, a, c, za)
            ce = lse = 0.0
            if copy is not None and live:
                ce, lse = _hard_row(ztr, y, k, wb, w_sum, eps, need_lse, None, m_row)
            elif live:
                ce, lse = _hard_row(zfb[i], y, k, wb, w_sum, eps, need_lse, za, m_row)
            elif copy is not None and want_lse:
                lse = _row_lse(ztr)
            elif want_lse:
                lse = _row_lse(zfb[i], za)
            totals = _record(i, live, vi, zl0, ce, lse, ob, totals)
        chunk_loss[ch], chunk_z[ch] = totals
        keep_alive(scratch)


@parallel
def hard_loss_grad(z, target, ignore_index, w, w_sum, v, params, chunk_rows, outs, g, in_place, long_rows, eps, zl, a, c, copy):
    """in_place, long_rows: True or None (each a kernel of its own); the rest as hard_loss's."""
    scale, scale_z = params[2], params[3]
    chunk_loss, chunk_z = outs[3], outs[4]
    want_lse = outs[2].size > 0
    need_lse = want_lse or zl is not None  # else the rows' lse is not computed (a log per row)
    n, k = z.shape
    # dz/dx of a logit_scale alone is one number: it joins the gradient's scale instead
    # of a pass of its own (_chain, for the softcap). 1 for none: exact.
    dz = 1.0 if c is not None else _or(a, 1.0)
    zf = float_rows(z)
    zl0 = _or(zl, 0.0)
    for ch in prange(chunk_loss.size):
        zb, zfb, tb, wb, vb, ob = borrowed(z), borrowed(zf), borrowed(target), borrowed(w), borrowed(v), borrow_outs(outs)
        gb = borrowed(g)
        scratch = (scratch_row(z, k if copy is not None else 0), scratch_row(z, k if is_half(g) else 0))
        zt, gt = borrowed(scratch[0]), borrowed(scratch[1])  # gt: a half gradient row, in float32
        ztr = read_only_view(zt)  # read as the logits are: the same compiled row helpers
        za = _read_scale(a, c, zt)
        totals = (0.0, 0.0)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            y, vi, live = _counted(tb, vb, i, ignore_index)
            m_row = like(NOT_KNOWN, zt)
            if copy is not None and (live or want_lse):
                m_row = _load_or_cap(zb[i], zt, a, c, za)  # before g (maybe z itself) is written
            ce = lse = 0.0
            gi = grad_row(gb, i, gt)
            sv = scale * vi * dz
            zg = None if zl is None else 2 * zl * scale_z * vi * dz
            if copy is not None and live:  # (the exps go from zt into gi: not in place)
                ce, lse = _hard_row_grad(ztr, y, gi, gb[i], k, wb, w_sum, eps, sv, zg, None, long_rows, need_lse, None, a, c, m_row, zt)
            elif live:
                ce, lse = _hard_row_grad(zfb[i], y, gi, gi, k, wb, w_sum, eps, sv, zg, in_place, long_rows, need_lse, za, a, c, m_row, zt)
            else:
                if copy is not None and want_lse:
                    lse = _row_lse(ztr)
                elif want_lse:
                    lse = _row_lse(zfb[i], za)
                gb[i, :] = 0
            totals = _record(i, live, vi, zl0, ce, lse, ob, totals)
        chunk_loss[ch], chunk_z[ch] = totals
        keep_alive(scratch)


# --- the plain call -----------------------------------------------------------------------------
#
# No option (label smoothing, z-loss, lse, logit scale, softcap), float32 or float64 rows
# short enough to stay in cache between passes, in place or not: most calls. When
# hard_loss and hard_loss_grad compiled every option's loops whatever the call (Numba
# types both sides of a branch on a runtime value), a first call at K = 1000 took 18.2 s
# (loss+grad) and 11.8 s (loss) with an empty kernel cache. These two compile the plain
# rows' helpers only, without the general kernels' machinery for half, softcapped,
# long rows and lse (those with every option None still compile in 5.6 s against 4.0 s,
# serial, K = 1000), with the same helpers and formulas: the general kernels' results within a
# few ulp (LLVM compiles each kernel apart, FMAs and the exp-sums' lanes included: the
# same bits in most processes, 1-3 ulp apart in some; tests/test_plain_rows.py).
# Measured (float32, 1 process per call, empty cache): a first call at K = 1000 3.3 s
# (loss+grad) and 3.2 s (loss), at K = 32000 3.0 s; the threaded kernels directly 4.4 s
# and 3.7 s. Assembly (inspect_asm, serial twins): 3140 instructions against the general
# kernel's 17640, the same zmm exp loop. They also ran faster, with less per row (2
# threads, 21 interleaved rounds, out=): loss+grad 0.87-0.89x the general kernel's time
# at 4096 x 500, 16384 x 300 and 8192 x 1000, 0.99x at 1024 x 32000; loss only 0.90-0.95x.
# Since the groups of rows below (a slower hour of this machine, the version before
# them alongside): serial 3.7 s (loss+grad) and 4.0-4.5 s (loss; 3.8 before), threaded
# 5.3 s (6.3) and 5.0 s (4.8); 3608 and 3473 instructions, the float64 arithmetic of a
# group's rows in zmm (vdivpd, vfmadd...pd).


# Rows go through the kernels GROUP_ROWS at a time: their passes over the logits row by
# row, but the float64 arithmetic of each row's loss and gradient factors (an exp, a log,
# three divisions: a chain of ~200 cycles) as one loop over the group (_row_losses,
# _row_factors: zmm of 8 rows), between the exp pass and the scaling pass. Row by row,
# that chain held the next row's passes back (a row's loop is more instructions than the
# core looks ahead): it cost ~100 ns a row whatever K, half the time of a row at K = 200.
# (No software prefetch of the next row either: on this machine, Zen 4, the hardware
# prefetchers stream the rows, and prefetching each next row line by line cost time:
# without it 0.81-0.96x the time with the gradient at K = 1000-128256, 0.68-0.91x for
# the loss alone, 2 threads, alternating processes.)
GROUP_ROWS = 16
# With the gradient, a group's exps wait in its rows of the gradient for the scaling
# pass: fewer rows a group where 16 of them would not stay in L2 (1 row at K = 32000)
GROUP_BYTES = 1 << 16


@jit
def _row_losses(s_other, zy, w_y, loss, n):
    """loss[r] = _hard_row_loss of rows r < n of a group, from their exp-sums, z_y - m and w_y."""
    prefer_512bit()
    for r in range(n):  # (_hard_row_loss's formula without its options: a call to it left the loop scalar)
        loss[r] = times(w_y[r], lse_minus_target(s_other[r], exp_nonpositive(zy[r]), zy[r]))


@jit
def _row_factors(s_other, zy, w_y, scale, a, g_y, loss, n):
    """_row_losses, and each row's gradient factors: a = w_y scale / s (the exps' factor)
    and g_y = -w_y scale s_other / s (the target's entry), s = s_other + exp(z_y - m)."""
    prefer_512bit()
    for r in range(n):
        e_y = exp_nonpositive(zy[r])
        s = s_other[r] + e_y
        hard = w_y[r] * scale[r]
        a[r] = hard / s
        g_y[r] = -hard * (s_other[r] / s)
        loss[r] = times(w_y[r], lse_minus_target(s_other[r], e_y, zy[r]))


@jit
def _plain_chunk(z, target, ignore_index, w, v, outs, lo, hi):
    """plain_loss's rows lo .. hi: their loss and z-term sums (the z-term 0). (A function
    of its own, so that the threaded kernel's prange body is one call: with these loops
    inline, parallel=True took 1.7 s more to compile, K = 1000.)"""
    n, k = z.shape
    group = np.empty((4, GROUP_ROWS))
    s_other, zy, w_y, loss = group[0], group[1], group[2], group[3]
    totals = (0.0, 0.0)
    for g0 in range(lo, hi, GROUP_ROWS):
        g1 = min(g0 + GROUP_ROWS, hi)
        for i in range(g0, g1):
            r = i - g0
            y, vi, live = _counted(target, v, i, ignore_index)
            s_other[r], zy[r], w_y[r] = 1.0, 0.0, 0.0  # (a row not counted: its loss is dropped)
            if live:
                zi = z[i]
                if k <= BLOCK:  # the max and the exp-sum, each a pass over the row in L1
                    m = _row_max(zi)
                    s_other[r] = float(_sum_exp_block(zi, m, y))
                else:
                    m, s_row, _ = _row_stats(zi, y, w, None, None, None, False, None)
                    s_other[r] = s_row
                zy[r] = float(zi[y]) - float(m)
                w_y[r] = w[y]
        _row_losses(s_other, zy, w_y, loss, g1 - g0)
        for i in range(g0, g1):
            y, vi, live = _counted(target, v, i, ignore_index)
            totals = _record(i, live, vi, 0.0, loss[i - g0], 0.0, outs, totals)
    return totals


@jit
def _plain_chunk_grad(z, target, ignore_index, w, v, outs, g, in_place, scale, lo, hi):
    """plain_loss_grad's rows lo .. hi (see _plain_chunk)."""
    k = z.shape[1]
    rows_a_group = min(GROUP_ROWS, max(1, GROUP_BYTES // (k * z.itemsize)))
    group = np.empty((7, GROUP_ROWS))
    s_other, zy, w_y, sv, a, g_y, loss = group[0], group[1], group[2], group[3], group[4], group[5], group[6]
    totals = (0.0, 0.0)
    for g0 in range(lo, hi, rows_a_group):
        g1 = min(g0 + rows_a_group, hi)
        for i in range(g0, g1):  # the max and the exps (into the gradient's row), row by row
            r = i - g0
            y, vi, live = _counted(target, v, i, ignore_index)
            s_other[r], zy[r], w_y[r], sv[r] = 1.0, 0.0, 0.0, 0.0
            if live:
                zi = z[i]
                m = _row_max(zi)
                zy[r] = float(zi[y]) - float(m)  # read before the exps overwrite an in-place row
                s_other[r] = _exps(zi, m, g[i], y, in_place)
                w_y[r] = float(w[y])
                sv[r] = scale * vi
            else:
                g[i, :] = 0
        _row_factors(s_other, zy, w_y, sv, a, g_y, loss, g1 - g0)
        for i in range(g0, g1):  # the exps scaled into the gradient
            r = i - g0
            y, vi, live = _counted(target, v, i, ignore_index)
            if live:
                gi = g[i]
                _scale(gi, like(a[r], gi))
                gi[y] = g_y[r]
            totals = _record(i, live, vi, 0.0, loss[r], 0.0, outs, totals)
    return totals


@parallel
def plain_loss(z, target, ignore_index, w, w_sum, v, params, chunk_rows, outs):
    """hard_loss of plain rows (any length: _row_stats reads a long row once)."""
    chunk_loss, chunk_z = outs[3], outs[4]
    n = z.shape[0]
    for ch in prange(chunk_loss.size):
        lo, hi = ch * chunk_rows, min(n, (ch + 1) * chunk_rows)
        chunk_loss[ch], chunk_z[ch] = _plain_chunk(borrowed(z), borrowed(target), ignore_index, borrowed(w), borrowed(v), borrow_outs(outs), lo, hi)


@parallel
def plain_loss_grad(z, target, ignore_index, w, w_sum, v, params, chunk_rows, outs, g, in_place):
    """hard_loss_grad of plain rows, K * itemsize <= LONG_ROW_BYTES; in_place None, or
    True when g is z (a kernel of its own: _exps)."""
    scale = params[2]
    chunk_loss, chunk_z = outs[3], outs[4]
    n = z.shape[0]
    for ch in prange(chunk_loss.size):
        lo, hi = ch * chunk_rows, min(n, (ch + 1) * chunk_rows)
        chunk_loss[ch], chunk_z[ch] = _plain_chunk_grad(
            borrowed(z), borrowed(target), ignore_index, borrowed(w), borrowed(v), borrow_outs(outs), borrowed(g), in_place, scale, lo, hi
        )


# --- probability targets ----------------------------------------------------------------------


@jit
def _soft_terms(zi, ti, w, m, c1, c0, log_s):
    """sum_j w_j t'_j (log s - (z_j - m)) term by term, a zero weight adding 0: the loss
    of a row whose a log s - b is not finite (an infinite target or logit), where the
    difference of the two sums would be inf - inf = NaN but the sum of the terms is +-inf."""
    loss = 0.0
    for j in range(zi.size):
        loss += times(float(w[j]) * (c1 * float(ti[j]) + c0), log_s - (float(zi[j]) - float(m)))
    return loss


@jit
def _soft_loss(zi, ti, w, m, c1, c0, s, a, b):
    log_s = math.log(s)
    loss = a * log_s - b
    return loss if math.isfinite(loss) else _soft_terms(zi, ti, w, m, c1, c0, log_s)


@jit
def _soft_row(zi, ti, w, c1, c0, no_store):
    m = _row_max(zi)
    s, a, b = _soft_sums(zi, ti, w, m, c1, c0, no_store, False)
    return _soft_loss(zi, ti, w, m, c1, c0, s, a, b), row_lse(m, math.log(s))


@jit
def _soft_row_grad(zi, ti, gi, w, c1, c0, scale, zg):
    m = _row_max(zi)
    s, a, b = _soft_sums(zi, ti, w, m, c1, c0, gi, True)
    log_s = math.log(s)
    lse = row_lse(m, log_s)
    loss = a * log_s - b
    if not math.isfinite(loss):  # as _soft_terms, from the stored exp(z_j - m) (zi may be gi)
        loss = 0.0
        for j in range(gi.size):
            loss += times(float(w[j]) * (c1 * float(ti[j]) + c0), log_s - math.log(float(gi[j])))
    # g_j = scale (p_j sum_k w_k t'_k - w_j t'_j) + zg lse p_j
    _soft_grad(gi, ti, w, like((scale * a + zg * lse) / s, gi), like(scale, gi), c1, c0)
    return loss, lse


@vector
def _soft_grad(g, t, w, pa, scale, c1, c0):
    prefer_512bit()
    for j in range(g.size):
        g[j] = pa * g[j] - scale * (w[j] * (c1 * t[j] + c0))


@parallel
def soft_loss(z, t, w, v, params, chunk_rows, outs):
    eps, zl, _, _, a, c = params
    chunk_loss, chunk_z = outs[3], outs[4]
    want_lse = outs[2].size > 0
    n, k = z.shape
    c1, c0 = like(1 - eps, t), like(eps / k, t)
    transform = a != 1.0 or c > 0 or is_half(z)
    zf = float_rows(z)
    for ch in prange(chunk_loss.size):
        zb, zfb, tb, wb, vb, ob = borrowed(z), borrowed(zf), borrowed(t), borrowed(w), borrowed(v), borrow_outs(outs)
        # no_store: _soft_sums slices it per block but, here, never writes
        scratch = (scratch_row(z, k), scratch_row(z, k if transform else 0))
        no_store, zt = borrowed(scratch[0]), borrowed(scratch[1])
        totals = (0.0, 0.0)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            vi = vb[i] if vb.size else 1.0
            live = vi != 0
            if transform and (live or want_lse):
                _transform(zb[i], zt, a, c)
            ce = lse = 0.0
            if live and transform:
                ce, lse = _soft_row(zt, tb[i], wb, c1, c0, no_store)
            elif live:
                ce, lse = _soft_row(zfb[i], tb[i], wb, c1, c0, no_store)
            elif want_lse:
                lse = _row_lse(zt) if transform else _row_lse(zfb[i])
            totals = _record(i, live, vi, zl, ce, lse, ob, totals)
        chunk_loss[ch], chunk_z[ch] = totals
        keep_alive(scratch)


@parallel
def soft_loss_grad(z, t, w, v, params, chunk_rows, outs, g):
    eps, zl, scale, scale_z, a, c = params
    chunk_loss, chunk_z = outs[3], outs[4]
    want_lse = outs[2].size > 0
    n, k = z.shape
    c1, c0 = like(1 - eps, t), like(eps / k, t)
    transform = a != 1.0 or c > 0 or is_half(z)
    zf = float_rows(z)
    for ch in prange(chunk_loss.size):
        zb, zfb, tb, wb, vb, ob = borrowed(z), borrowed(zf), borrowed(t), borrowed(w), borrowed(v), borrow_outs(outs)
        gb = borrowed(g)
        scratch = (scratch_row(z, k if transform else 0), scratch_row(z, k if is_half(g) else 0))
        zt, gt = borrowed(scratch[0]), borrowed(scratch[1])
        totals = (0.0, 0.0)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            vi = vb[i] if vb.size else 1.0
            live = vi != 0
            if transform and (live or want_lse):
                _transform(zb[i], zt, a, c)
            ce = lse = 0.0
            gi = grad_row(gb, i, gt)
            if live and transform:
                ce, lse = _soft_row_grad(zt, tb[i], gi, wb, c1, c0, scale * vi, 2 * zl * scale_z * vi)
                _chain(gi, zt, a, c)
                store_grad_row(gb, i, gt)
            elif live:
                ce, lse = _soft_row_grad(zfb[i], tb[i], gi, wb, c1, c0, scale * vi, 2 * zl * scale_z * vi)
            else:
                if want_lse:
                    lse = _row_lse(zt) if transform else _row_lse(zfb[i])
                gb[i, :] = 0
            totals = _record(i, live, vi, zl, ce, lse, ob, totals)
        chunk_loss[ch], chunk_z[ch] = totals
        keep_alive(scratch)


# --- before the kernels: labels and weights ---------------------------------------------------


@jit
def _all_ones(w):
    for j in range(w.size):
        if w[j] != 1:
            return False
    return True


@jit
def _label_counts(target, k, ignore_index):
    """(rows ignored, rows whose label is outside [0, K) and not ignore_index): a count
    that vectorises (16 us for 65536 labels, call included)."""
    k_u = np.uint64(k)
    ignored = 0
    out_of_range = 0
    for i in range(target.size):
        y = target[i]
        skip = y == ignore_index
        ignored += skip
        out_of_range += (not skip) & (np.uint64(y) >= k_u)
    return ignored, out_of_range


@vector
def _weighted_counts(target, ignore_index, w, v):
    """(sum of v_n w[y_n], sum of v_n) over the rows not ignored (labels checked: in
    [0, K)), v empty for ones; float64, added in vector lanes (a fixed order: the same
    bits whatever the thread count). As one float64 chain in row order, with a branch a
    row, this took 148 us for 65536 rows: every call with class or row weights paid it
    on one thread before its kernel (1.12-1.21x the plain call's time at 65536 x 10).
    Assembly (int64 labels, float32 w): zmm, vgatherqps of w[y], vfmadd231pd / vaddpd
    into 4 accumulators of 8 lanes each."""
    d = 0.0
    d_z = 0.0
    for i in range(target.size):
        y = target[i]
        keep = y != ignore_index
        t = (float(v[i]) if v.size else 1.0) if keep else 0.0
        d += t * float(w[y if keep else 0])
        d_z += t
    return d, d_z


@vector
def _row_weight_counts(target, k, ignore_index, v):
    """(rows whose label is outside [0, K) and not ignore_index, the sum of v_n over the
    rows not ignored: D = D_z when the class weights are all 1), in one pass: 7-10 us for
    65536 rows against 30 for _label_counts' pass and _weighted_counts' lookup of w[y_n]
    (one thread), the same bits. (With class weights too, one such pass took longer
    than the two.)"""
    k_u = np.uint64(k)
    out_of_range = 0
    d = 0.0
    for i in range(target.size):
        y = target[i]
        skip = y == ignore_index
        out_of_range += (not skip) & (np.uint64(y) >= k_u)
        d += 0.0 if skip else float(v[i])
    return out_of_range, d


@jit
def _first_bad_label(target, k, ignore_index):
    for i in range(target.size):
        y = target[i]
        if y != ignore_index and (y < 0 or y >= k):
            return i
    return -1


@jit
def label_counts(target, k, ignore_index):
    """label_stats without class or row weights: (first row whose label is outside [0, K)
    and not ignore_index, or -1; D = D_z = the count of counted rows). A function of its
    own, so that a call without weights does not compile _weighted_counts (0.3-0.7 s of
    every cold process's first call)."""
    ignored, out_of_range = _label_counts(target, k, ignore_index)
    if out_of_range:
        return _first_bad_label(target, k, ignore_index), 0.0, 0.0
    counted = float(target.size - ignored)
    return -1, counted, counted


@jit
def label_stats(target, k, ignore_index, w, v):
    """(first row whose label is outside [0, K) and not ignore_index, or -1; the "mean"
    denominators D = sum of v_n w[y_n] and D_z = sum of v_n over the counted rows, in
    float64, D and D_z 0 when a label is bad). v: row weights, or empty for ones."""
    ones = _all_ones(w)
    if v.size and ones:
        out_of_range, d = _row_weight_counts(target, k, ignore_index, v)
        if out_of_range:
            return _first_bad_label(target, k, ignore_index), 0.0, 0.0
        return -1, d, d
    bad_row, counted, _ = label_counts(target, k, ignore_index)
    if bad_row >= 0 or ones:  # the count is D and D_z
        return bad_row, counted, counted
    d, d_z = _weighted_counts(target, ignore_index, w, v)
    return -1, d, d_z


@jit
def float64_sum(w):
    """sum(w) in float64, in order, without NumPy's cast buffer."""
    total = 0.0
    for j in range(w.size):
        total += w[j]
    return total
