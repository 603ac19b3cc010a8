"""Private jitted kernels of softmax, log_softmax and logsumexp over rows.

Each kernel takes C-contiguous rows ``z`` (M, K) in the compute dtype and spreads fixed
chunks of ``chunk_rows`` rows over threads with ``prange``; rows are independent, so
the results do not depend on the thread count. The row loops are the SIMD pieces of
fastsce._kernels.rows (max, exp-sum, exp-store, scale) and fastsce._kernels.simd: each row is read
from memory once, later passes over it hit L1/L2.

``out`` may be ``z`` itself (``in_place``): every read of a row happens before, or at
the same index as, its writes. ``long_rows``: rows too long to stay in cache between
passes (longer than fastsce.api.LONG_ROW_BYTES) take their max and exp-sum in a single
streaming read with a running max (_kernels._row_stats, the "online softmax").

Special values follow PyTorch: a row with a NaN is all NaN; a row whose max is +inf,
or whose entries are all -inf, has an all-NaN softmax and log_softmax (inf - inf);
logsumexp is NaN, +inf and -inf respectively for those rows.
"""

import math

import numpy as np
from numba import prange

from fastsce._kernels.jit import borrowed, jit, keep_alive, parallel
from fastsce._kernels.rows import BLOCK, _rescale_blocks, _row_max, _row_stats, _scale, _store_exp, _sum_exp_block
from fastsce._kernels.simd import like, prefer_512bit

# --- loops over one row ----------------------------------------------------------------
# Plain @jit, not @vector: an element-wise map vectorises without "reassoc", and
# reassoc would be free to turn (z - m) - log_s into z - (m + log_s), which loses the
# digits of log p where |m| >> |log p| (float32 logits ~ 1e4).


@jit
def _shift(z, m, log_s, out):
    """out = (z - m) - log_s."""
    prefer_512bit()
    for j in range(z.size):
        out[j] = (z[j] - m) - log_s


@jit
def _shift_in_place(g, m, log_s):
    # Its own loop: with z and out the same array LLVM's overlap check would fall back
    # to scalar code.
    prefer_512bit()
    for j in range(g.size):
        g[j] = (g[j] - m) - log_s


@jit
def _sum_exp(z, m):
    """sum_j exp(z_j - m) in float64 (block sums in z's dtype)."""
    s = 0.0
    for lo in range(0, z.size, BLOCK):
        s += _sum_exp_block(z[lo : lo + BLOCK], m, None)
    return s


@jit
def _max_and_sum(zi, long_rows):
    """(max, sum_j exp(z_j - max)) of a row: two passes, the second in cache, or for a
    long row one streaming pass."""
    if long_rows:
        m, s, _ = _row_stats(zi, -1, None, None, None, None, False)
        return m, s
    m = _row_max(zi)
    return m, _sum_exp(zi, m)


@jit
def _row_logsumexp(zi, long_rows):
    m, s = _max_and_sum(zi, long_rows)
    if math.isinf(m):  # all -inf, or a +inf: inf - inf made s NaN (or 0 in a long row).
        return float(_row_max(zi))  # -inf or +inf, unless a NaN (a running max can overtake one)
    return float(m) + math.log(s)


# --- kernels ---------------------------------------------------------------------------


@parallel
def softmax(z, out, chunk_rows, in_place, long_rows):
    """out = exp(z - m) / s row by row: exps stored while summed, then scaled in cache."""
    n, k = z.shape
    n_chunks = -(-n // chunk_rows)
    for ch in prange(n_chunks):
        zb, ob = borrowed(z), borrowed(out)  # (as the loss kernels: no reference counting per view)
        scratch = np.empty((k + BLOCK - 1) // BLOCK if long_rows else 0, z.dtype)
        block_max = borrowed(scratch)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            gi = ob[i]
            if long_rows:  # one read of z: g = exp(z - M_b) per block, rescaled below
                m, s, _ = _row_stats(zb[i], -1, None, None, gi, block_max, in_place)
                _rescale_blocks(gi, block_max, m, 1.0 / s, None, None, None)
            else:
                m = _row_max(zb[i])
                s = _store_exp(zb[i], m, gi, in_place, -1)
                _scale(gi, like(1.0 / s, gi))
        keep_alive(scratch)


@parallel
def log_softmax(z, out, chunk_rows, in_place, long_rows):
    """out = (z - m) - log s row by row.

    A long row is read twice (max and exp-sum in one streaming pass, then the stores)
    rather than once with its shifted values stored and corrected in a second pass over
    out: that would move the same bytes (out read back instead of z) plus one more write.
    """
    n, k = z.shape
    n_chunks = -(-n // chunk_rows)
    for ch in prange(n_chunks):
        zb, ob = borrowed(z), borrowed(out)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            m, s = _max_and_sum(zb[i], long_rows)
            log_s = like(math.log(s), zb)
            if in_place:
                _shift_in_place(ob[i], m, log_s)
            else:
                _shift(zb[i], m, log_s, ob[i])


@parallel
def logsumexp(z, out, chunk_rows, long_rows):
    """out[i] = m + log sum_j exp(z_ij - m), m the row max: each row read once."""
    n, k = z.shape
    n_chunks = -(-n // chunk_rows)
    for ch in prange(n_chunks):
        zb = borrowed(z)
        for i in range(ch * chunk_rows, min(n, (ch + 1) * chunk_rows)):
            out[i] = _row_logsumexp(zb[i], long_rows)
