"""Integer-target kernels for float32, float16 and bfloat16 rows of K <= 320 classes
(176 with label smoothing, z-loss, lse or a logit scale; 32 with a softcap): 16 rows at
a time.

Up to K = 32 (TRANSPOSED_MAX) a block is held in registers. Sixteen float32 logits of a
row fit one zmm. A block of 16 rows is read 16 classes at a time with 16 masked loads
and transposed in registers (fastsce._kernels.vec); from there on each step is one
vector instruction over the 16 rows, class by class, with nothing stored in between:
the max, the exps, the float64 exp-sums, the loss, the gradient; then the transposes
back and masked stores. The classes past K are lanes of -inf (their exps 0), and a block
does the work of 4, 8, 12, 16, 24 or 32 classes (``cols``, the first WIDTHS entry >= K;
a kernel per width). At K = 40-48 these blocks were no faster than the tiles (0.93-0.96x
the time), at 64 slower (1.13x): the exps wait for the gradient in registers that then
spill.

From K = 33 a block is row-wise (_row_steps): each row in cols / 16 zmm along its
classes (a width per 16 classes up to 128, then 176, 192, 224, 256, 288 and 320),
the max across its lanes, the exps and their float64 sum, two rows a loop step (one
beyond 176 classes); the 16 rows' m, z_y and sums go to
small stack arrays, and their float64 arithmetic (the loss, the gradient's factors) is
done as 16 lanes, as in the transposed blocks. With the gradient the exps are stored
(into the gradient's rows, or a float32 scratch of the 16 rows) and a second loop scales
them into the gradient.

float16 and bfloat16 rows (their bits, as fastsce._kernels.half passes them) are widened
to float32 as they are loaded and their gradient rounded once as it is stored (_Stored):
the arithmetic between is a float32 row's, bit for bit.

Label smoothing, z-loss, lse, a logit scale and (up to K = 32) a softcap take kernels of
their own (``options``, widths OPTION_WIDTHS), with the tiles' formulas (_option_factors;
the softcap's tanh and dz/dx are the row kernels', _capped and _cap_slope): a kernel per
set of options a call has (SMOOTH, LSE, SCALE, CAP), computing those options' terms only.
The tile kernels (fastsce._kernels.tiles) keep the rest of the small-K work: a softcap
past K = 32, float64 logits, and calls with options whose classes are not the last axis
(fastsce.api decides).

The arithmetic is the tiles' (and the row kernels'), lane by lane: m = max_j z_j
(vmaxps: a NaN may not reach m, but it reaches the sum or z_y, so the row's results are
NaN all the same), each
exp(z_j - m) in float32 as if z_j - m were exact (simd's exp_shifted), s_other = sum_{j != y} exp(z_j - m) in float64 (in a fixed tree order),
e_y = exp(z_y - m) in the transposed blocks the target's float32 exp, widened (a float64
exp of z_y - m of their own was one more chain of latencies a block), in the row-wise
ones in float64, the loss log1p(s_other / e_y) in float64 as
simd.lse_minus_target takes it, times the class and row weights; the gradient
a e_j with a = v scale w_y / s, and at the target -v scale w_y s_other / s. Rows not
counted (ignored, or of weight 0) get loss 0 and a zero gradient row.

The IR below is built from the constants of fastsce._kernels.simd, op for op as its
Numba versions compile (fast-math flags nsz, arcp, contract, as jit.FASTMATH):
tests/test_blocks.py compares the two.
"""

from types import SimpleNamespace

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fastsce._kernels import rows as rows_kernels, simd
from fastsce._kernels.jit import borrow_outs, borrowed, jit, parallel
from fastsce._kernels.vec import (
    _const_vector, _masked, _splat, float32_to_half_bits, half_bits_to_float32, prefetch, transposed,
)

W = 16  # rows per block, and classes per zmm of a row
# _chunk prefetches the rows this many bytes (of z; as many rows of g) ahead of a block
# call, with software prefetch (prefetcht0, a cache line at a time): with logits and
# gradient out of cache the hardware prefetchers alone left the transposed blocks
# waiting on memory. Measured against no prefetch, 262144 and 1M rows, 2 threads, 5-7
# interleaved rounds (this machine: AMD EPYC family 26, Zen 5): transposed, loss+grad
# 0.64-0.74x the time at K = 10, 0.56-0.59x at 16, 0.52-0.66x at 28, the loss alone
# 0.62-0.84x; rows in cache (65536 x 10, x 16) 1.00x. 2, 4 or 8 KB ahead measured the
# same within noise. The gradient's rows prefetched for reading, not prefetchw (0.65x
# against 0.70x at K = 10), and without them 0.91x at K = 10. Row-wise blocks: the loss
# alone 0.69-0.89x at K = 50-176; with the gradient prefetching cost time (1.13-1.5x at
# K = 50-64 with g's rows too, 1.12-1.15x with z's alone, 1.0-1.1x at K = 100-176), so
# those calls prefetch nothing. Nor do calls on less than PREFETCH_ABOVE bytes of logits,
# likely in cache (with the gradient's as many, in this machine's 32 MB L3), where the
# prefetches were only instructions more: 1M logits (4 MB) 0.96-1.05x the time at K =
# 2-100 with the gradient, 0.98-1.10x for the loss alone; 16384 x 100 (6.5 MB) the loss
# alone 1.03-1.05x; from 10 MB (262144 x 10) on they gained.
PREFETCH_BYTES = 4096
PREFETCH_ABOVE = 1 << 23
ROWS_PER_STEP = 2  # rows a loop step of _row_steps interleaves (_rows_per_step)
TRANSPOSED_MAX = 32  # up to this K the blocks are transposed (_block_steps), beyond row-wise (_row_steps)
# the classes a block computes: K or more. The widest row-wise blocks hold a row in 20 zmm
# (K = 320); against the row kernels (2 threads, N * K = 1M) a width of 384 took 1.01-1.09x
# the time with the gradient at K = 352-384 and 1.16-1.20x for the loss alone in one run
# (0.76-0.86x with the gradient in others), 512 1.0-1.1x at 448-512
WIDTHS = (4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 176, 192, 224, 256, 288, 320)
MAX_K = WIDTHS[-1]
# With label smoothing, z-loss, lse or a logit scale fewer widths: each is four kernels
# more to compile (loss, loss+grad, serial and threaded)
OPTION_WIDTHS = (8, 12, 16, 32, 64, 128, 176)
# The options a kernel computes (``options``, their sum; 0: none), each set a kernel of its
# own, compiled on first use: label smoothing; the rows' lse (returned, or a z-loss's); a
# logit scale; a softcap (CAP, the logit scale inside it: transposed widths only, K <=
# TRANSPOSED_MAX). (One kernel for all computed every option's terms, whichever the call
# had: 1.35-1.42x the plain call's time at 65536 x 10 with any one of them.)
SMOOTH, LSE, SCALE, CAP = 1, 2, 4, 8


def options_of(label_smoothing, z_loss, logit_scale, want_lse, softcap=0.0) -> int:
    """The ``options`` of a call's kernel (0 for a plain call)."""
    transform = CAP if softcap != 0 else SCALE * (logit_scale != 1)
    return SMOOTH * (label_smoothing != 0) + LSE * (z_loss != 0 or want_lse) + transform


def blocks_per_call(grad):
    """Blocks of 16 rows that one block_loss call interleaves: two for the loss alone
    (0.81-0.91x the time of one at K = 2-16, one thread, in cache), one with the gradient
    (two: 0.98-1.03x; the exps kept for the gradient of two blocks exceed the 32 zmm)."""
    return 1 if grad else 2


@overload(blocks_per_call)
def _blocks_per_call(grad):
    """The same in jitted code, for a literal ``grad`` (_chunk's step over the rows)."""
    if not isinstance(grad, types.BooleanLiteral):
        return None
    n = blocks_per_call(grad.literal_value)
    return lambda grad: n

_F32, _F64 = ir.FloatType(), ir.DoubleType()
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_FLAGS = ("nsz", "arcp", "contract")
# the logits' types the blocks take: float32, float16 and bfloat16 bits (fastsce._kernels.half)
_HELD = (types.float32, types.uint16, types.int16)


class _Vectors:
    """Vector arithmetic on one builder: every operand a vector of ``n`` lanes, or a
    Python number or scalar IR value, splatted to match."""

    def __init__(self, builder):
        self.b = builder

    def const(self, value, element, n):
        return ir.Constant(ir.VectorType(element, n), [value] * n)

    def like(self, x, v):
        """x (a number or a scalar IR value) as a vector of v's type."""
        vt = v.type
        if isinstance(x, ir.Value) and isinstance(x.type, ir.VectorType):
            return x
        if isinstance(x, ir.Value):
            return _splat(self.b, x, vt.count)
        return self.const(x, vt.element, vt.count)

    def _pair(self, x, y):
        if not (isinstance(x, ir.Value) and isinstance(x.type, ir.VectorType)):
            x = self.like(x, y)
        return x, self.like(y, x)

    def add(self, x, y):
        x, y = self._pair(x, y)
        return self.b.fadd(x, y, flags=_FLAGS)

    def sub(self, x, y):
        x, y = self._pair(x, y)
        return self.b.fsub(x, y, flags=_FLAGS)

    def mul(self, x, y):
        x, y = self._pair(x, y)
        return self.b.fmul(x, y, flags=_FLAGS)

    def div(self, x, y):
        x, y = self._pair(x, y)
        return self.b.fdiv(x, y, flags=_FLAGS)

    def cmp(self, op, x, y, unordered=False):
        x, y = self._pair(x, y)
        return (self.b.fcmp_unordered if unordered else self.b.fcmp_ordered)(op, x, y)

    def select(self, mask, x, y):
        x, y = self._pair(x, y)
        return self.b.select(mask, x, y)

    def max_or_nan_somewhere(self, x, y):
        """x > y ? x : y, one vmaxps: a NaN operand gives y, so a NaN among the values
        may not reach their max. The kernels' results stay NaN for such a row all the
        same: its NaN logit gives a NaN exp, in the sum (or, at the target, in z_y)."""
        return self.b.select(self.cmp(">", x, y), x, y)

    def any_nan(self, xs):
        """The lanes where any of the vectors xs is NaN."""
        return self.tree(self.b.or_, [self.cmp("!=", x, x, unordered=True) for x in xs])

    def fabs(self, x):
        vt = x.type
        name = f"llvm.fabs.v{vt.count}f{32 if vt.element == _F32 else 64}"
        return self.b.call(self.b.module.declare_intrinsic(name, fnty=ir.FunctionType(vt, [vt])), [x])

    def bits(self, x, element):
        return self.b.bitcast(x, ir.VectorType(element, x.type.count))

    def half(self, x, which):
        """Lanes 0..n/2-1 (which = 0) or n/2..n-1 (1) of x."""
        n = x.type.count // 2
        return self.b.shuffle_vector(x, x, _const_vector(_I32, range(which * n, which * n + n)))

    def join(self, lo, hi):
        n = lo.type.count
        return self.b.shuffle_vector(lo, hi, _const_vector(_I32, range(2 * n)))

    def wide(self, x):
        """A float32 vector as two float64 halves."""
        return [self.b.fpext(self.half(x, h), ir.VectorType(_F64, x.type.count // 2)) for h in (0, 1)]

    def narrow(self, lo, hi):
        """Two float64 halves as one float32 vector (rounded to nearest)."""
        f32 = ir.VectorType(_F32, lo.type.count)
        return self.join(self.b.fptrunc(lo, f32), self.b.fptrunc(hi, f32))

    # --- simd's exp and log, as vectors --------------------------------------------------

    def exp_f32(self, x, err):
        """simd._exp_f32: exp(x + err) for x <= 0."""
        t = self.add(self.mul(x, float(simd._L2E_F)), float(simd._MAGIC_F))
        n = self.sub(t, float(simd._MAGIC_F))
        r = self.sub(x, self.mul(n, float(simd._LN2_HI_F)))
        r = self.add(self.sub(r, self.mul(n, float(simd._LN2_LO_F))), err)
        q = self.like(float(simd._Q5_F), x)
        for c in (simd._Q4_F, simd._Q3_F, simd._Q2_F, simd._Q1_F, simd._Q0_F):
            q = self.add(self.mul(q, r), float(c))
        scale = self.bits(self.b.shl(self.bits(t, _I32), self.const(23, _I32, x.type.count)), _F32)
        v = self.mul(self.add(self.mul(q, r), 1.0), scale)
        return self.select(self.cmp("<", x, float(simd._MIN_F)), 0.0, v)

    def exp_shifted_f32(self, z, m):
        """simd._exp_diff_f32: exp(z - m), z - m's rounding error recovered (TwoSum)."""
        d = self.sub(z, m)
        bb = self.sub(d, z)
        err = self.sub(self.sub(z, self.sub(d, bb)), self.add(m, bb))
        return self.exp_f32(d, err)

    def exp_f64(self, x):
        """simd._exp_f64: exp(x) for x <= 0."""
        t = self.add(self.mul(x, simd._L2E_D), simd._MAGIC_D)
        n = self.sub(t, simd._MAGIC_D)
        r = self.sub(x, self.mul(n, simd._LN2_HI_D))
        r = self.sub(r, self.mul(n, simd._LN2_LO_D))
        q = self.add(self.mul(self.like(simd._Q10_D, x), r), simd._Q9_D)
        for c in simd._Q_D[2:]:
            q = self.add(self.mul(q, r), c)
        scale = self.bits(self.b.shl(self.bits(t, _I64), self.const(52, _I64, x.type.count)), _F64)
        v = self.mul(self.add(self.mul(q, r), 1.0), scale)
        return self.select(self.cmp("<", x, simd._MIN_D), 0.0, v)

    def log_normal(self, x):
        """simd.log_normal: log(x) for float64 x >= the smallest normal number."""
        b, n = self.b, x.type.count

        def c(v):
            return self.const(int(v), _I64, n)

        bits = self.bits(x, _I64)
        mant = b.and_(bits, c(simd._MANT_MASK))
        i = b.and_(b.add(mant, c(simd._SQRT2_ROUND)), c(simd._BIT52))
        k = b.add(b.sub(b.ashr(bits, c(52)), c(1023)), b.ashr(i, c(52)))
        f = self.sub(self.bits(b.or_(mant, b.xor(i, c(simd._ONE_EXP))), _F64), 1.0)
        s = self.div(f, self.add(f, 2.0))
        z = self.mul(s, s)
        w = self.mul(z, z)
        t1 = self.mul(w, self.add(simd._LG2, self.mul(w, self.add(simd._LG4, self.mul(w, simd._LG6)))))
        inner = self.add(simd._LG3, self.mul(w, self.add(simd._LG5, self.mul(w, simd._LG7))))
        t2 = self.mul(z, self.add(simd._LG1, self.mul(w, inner)))
        r = self.add(t2, t1)
        hfsq = self.mul(self.mul(f, 0.5), f)
        dk = b.sitofp(k, x.type)
        low = self.add(self.mul(s, self.add(hfsq, r)), self.mul(dk, simd._LN2_LO_LOG))
        v = self.sub(self.mul(dk, simd._LN2_HI_LOG), self.sub(self.sub(hfsq, low), f))
        return self.select(self.cmp("<", x, np.inf), v, x)

    def lse_minus_target(self, s_other, e_y, zy, inv_s):
        """simd.lse_minus_target, with 1 / (s_other + e_y) given."""
        x = self.div(s_other, e_y)
        as_ratio = self.cmp(">", e_y, 1e-30)
        u = self.select(as_ratio, self.add(x, 1.0), self.add(s_other, e_y))
        correction = self.select(as_ratio, self.mul(self.sub(self.sub(u, 1.0), x), self.mul(e_y, inv_s)), zy)
        return self.sub(self.log_normal(u), correction)

    def times(self, w, x):
        """simd.times: w x with 0 inf = 0."""
        zero_w = self.cmp("==", w, 0.0)
        inf_x = self.cmp("==", self.fabs(x), np.inf)
        return self.select(self.b.and_(zero_w, inf_x), 0.0, self.mul(w, x))

    def tree(self, op, xs):
        """op(op(x0, x1), op(x2, x3)) ..., a balanced tree in a fixed order: log2(n)
        dependent steps, not n - 1 (a block's steps are one chain of latencies)."""
        xs = list(xs)
        while len(xs) > 1:
            xs = [op(xs[i], xs[i + 1]) if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
        return xs[0]

    def lane_sum(self, x):
        """The lanes of x summed: halves added pairwise down to one (a fixed order)."""
        while x.type.count > 1:
            x = self.add(self.half(x, 0), self.half(x, 1))
        return self.b.extract_element(x, ir.Constant(_I32, 0))


class _Stored:
    """How an array's elements are held, and their conversions to and from float32 lanes:
    float32 as it is; float16 and bfloat16 as their bits (uint16 / int16, as
    fastsce._kernels.half passes them), widened exactly on the way in and rounded to
    nearest even on the way out (vec's conversions: vcvtph2ps / vcvtps2ph, a shift and
    integer rounding), so a half row's arithmetic is its float32 copy's, bit for bit."""

    def __init__(self, builder, dtype):
        self.b = builder
        self.kind = 0 if isinstance(dtype, types.Float) else (-16 if dtype.signed else 16)
        self.element = _F32 if self.kind == 0 else ir.IntType(16)
        self.vector = ir.VectorType(self.element, W)
        self.align = ir.Constant(_I32, 4 if self.kind == 0 else 2)

    def const(self, value):
        """A float32 number as a vector of stored elements."""
        if self.kind == 0:
            return ir.Constant(self.vector, [float(value)] * W)
        if self.kind == 16:
            bits = int(np.array(value, np.float16).view(np.int16))
        else:  # exact for the values used here (0, -inf): bfloat16 is float32's high half
            bits = int(np.array(value, np.float32).view(np.int32)) >> 16
        return ir.Constant(self.vector, [bits] * W)

    def widen(self, x):
        """Stored elements (a vector of W, or a scalar) as float32."""
        return x if self.kind == 0 else half_bits_to_float32(self.b, x, bfloat=self.kind < 0)

    def narrow(self, x):
        """A float32 vector of W lanes as stored elements (rounded to nearest even)."""
        return x if self.kind == 0 else float32_to_half_bits(self.b, x, bfloat=self.kind < 0)

    def load(self, p, mask, fill):
        """The W elements from p (an element's pointer) as float32; lanes off the mask (None:
        all on) are not read and hold ``fill``."""
        if mask is None:
            x = self.b.load(self.b.bitcast(p, self.vector.as_pointer()), align=self.align.constant)
        else:  # (the intrinsic takes the element's pointer, as vec's)
            x = self.b.call(_masked(self.b, "load", self.vector, p), [p, self.align, mask, self.const(fill)])
        return self.widen(x)

    def store(self, x, p, mask):
        """float32 lanes x to the W elements at p, those on the mask (None: all)."""
        x = self.narrow(x)
        if mask is None:
            self.b.store(x, self.b.bitcast(p, self.vector.as_pointer()), align=self.align.constant)
        else:
            self.b.call(_masked(self.b, "store", self.vector, p), [x, p, self.align, mask])


def _rows(context, builder, ty, value, r0, k, nrows, group):
    """(pointer, mask) of rows r0 .. r0 + 15 of a C-contiguous (N, K) array, classes
    16 group .. 16 group + 15 of them (the mask: those < K). A block of nrows < 16 rows
    repeats its last row in the lanes past nrows: every row's loads and stores then take
    the same mask, and a repeated row stores the values of its original again (the block
    loads all rows before it stores any, so in place too). (Against a mask per row, each
    the class mask and the row's liveness: 0.88-0.93x the time with the gradient at K =
    4-32, one thread, rows in cache; the K = 10 block's mask moves 79 -> 34.)"""
    first = ir.Constant(_I64, W * group)
    class_mask = builder.icmp_signed("<", _const_vector(_I64, range(W)), _splat(builder, builder.sub(k, first), W))
    data = _data(context, builder, ty, value)
    last = builder.sub(nrows, ir.Constant(_I64, 1))
    out = []
    for i in range(W):
        row = ir.Constant(_I64, i) if i == 0 else builder.select(builder.icmp_signed(">", nrows, ir.Constant(_I64, i)), ir.Constant(_I64, i), last)
        out.append((builder.gep(data, [builder.add(builder.mul(builder.add(r0, row), k), first)]), class_mask))
    return out


def _data(context, builder, ty, value):
    return context.make_array(ty)(context, builder, value).data


def _size(context, builder, ty, value):
    return context.make_array(ty)(context, builder, value).nitems


# Assembly (inspect_asm of _chunk, which holds a call's blocks; this machine):
# zmm code with no calls inside (the only calls, NRT's, allocate ``losses`` once a chunk);
# the masked row loads are vblendmps from memory under a k-mask (masked-off lanes are not
# read), the stores vmovups {k}; vdivpd 3 per 8 rows. Width 4 / 12 / 16 with the
# gradient: 1402 / 1923 / 2159 instructions, 79 / 149 / 173 shuffles, 168 / 234 / 280 zmm
# moves to or from the stack (the exps wait for the gradient's factors, more than 32
# registers); the loss alone, two blocks: 1881 / 2722 / 3153, 250 / 393 / 458. One thread,
# 2048 rows in cache: 134-250 ns a block of 16 rows before the tree max and the pairs,
# which took 0.88-0.97x (max) and 0.82-0.91x (pairs, loss alone) of that.
# Then the max as vmaxps (not llvm.maximum's vmaxps, vcmpunordps and blend) and w_y in
# one vpermps: the block's loop body at width 12 with the gradient 1290 -> 1182
# instructions (this AMD EPYC: family 25 model 17, Zen 4, whose FPU runs a zmm op as
# two 256-bit halves); llvm-mca -mcpu=znver4, 699 -> 663 cycles a block, bound by the
# two FMA pipes: the 12 zmm exps 46% of their load, the float64 loss and factors of the
# 16 rows 29%, the selects, max and transposes the rest. One thread, 8192 x K in cache,
# min of 30 calls, 11 interleaved rounds: 0.94x the time at K = 10 (loss+grad and loss
# alone), 0.97x at 24, 1.00x at 4.
#
# Row-wise (_row_steps, width 112, this machine): the row loop is zmm code with no calls;
# per step of two rows of 7 zmm, 646 instructions with the gradient (84 fma of the exp
# polynomial, 84 zmm moves to or from the stack: two rows' exps and logits with the exp's
# constants exceed 32 registers) and 603 for the loss alone (33 such moves); the max is
# vmaxps (a compare-select, not llvm.maximum's six instructions with its NaN and signed-
# zero fix-ups: 0.84x the time of a row at K = 100 with them); the scaling loop, per
# zmm, a load, a vmulps and a store. One thread, 2048 rows in cache: 39-43 ns a row at
# K = 48-64 (the tiles 46-57), 75-98 at K = 100 (the tiles 79-119), with the gradient.
# One, two or four rows a step measured the same within this machine's noise. Loops
# over a row's zmm instead (one kernel for every K, the row reloaded from L1 for the
# exps): 1.3-1.5x the time at K = 48-64, 0.87-1.13x at K = 100-256.
# With the exps' place chosen at run time (exps_row) the loop step with the gradient is
# 679 instructions (114 with an operand on the stack, the 16-lane arrays' stores
# included). float16 rows: 668, the conversions vcvtph2ps (16 a step: 14 zmm and two
# z_y) and vcvtps2ph (in the scaling loop) and nothing else added; the scratch is not
# zeroed (a 7 KB memset a chunk with cgutils.alloca_once).
#
# With options (inspect_asm of _chunk, loss+grad): width 12, 2798 instructions (1923
# plain), 706 with an operand on the stack (the lse, the smoothing sum and the third
# factor b keep more values alive than the 32 zmm); width 128 (row-wise), 2537 in all,
# its longest block (the row step) 467 with 60 such operands; no calls but NRT's.
# A kernel per set of options (inspect_asm of the serial hard_loss_grad, whole, width 12
# / 128): plain 3606 / 3636 instructions; the kernel of every option was 4142 / 4018;
# label smoothing alone 3955 / 3950, lse (or z-loss) 3801 / 3760, logit scale 3771 /
# 3551. Time against the plain call, 65536 x 10, 2 threads, 11-15 interleaved rounds:
# logit scale 1.35x -> 0.97-1.00x, z-loss 1.36x -> 1.09-1.18x, lse 1.42x -> 1.19-1.24x,
# label smoothing 1.35x -> 1.21-1.22x.
# With a softcap (CAP; this machine, Zen 5, serial kernels, width 12): loss+grad 5135
# instructions (the plain kernel 4093, label smoothing 4470), 12 vdivps (the exp form's,
# in the branch most blocks skip), 452 zmm operands on the stack (smoothing 332); the
# loss alone, two blocks a call, 6290. The prefetches (_chunk): loops of prefetcht0
# unrolled 8 times, 36 in the plain loss+grad kernel, outside the block's code.


@intrinsic
def block_loss(typingctx, z, target, ignore_index, w, v, row0, rows, params, w_sum, lanes, g, cols, grad, options):
    """Rows row0 .. row0 + rows (rows <= 16 blocks_per_call(grad)) of z (N, K <= cols):
    each row's loss (weighted; 0 where not counted) into lanes[0, ..], with LSE in
    ``options`` its z-term into lanes[1] and its lse into lanes[2] (0 past rows); returns the sums
    of the losses and of the z-terms (a fixed order). With ``grad`` (a literal bool), the
    rows' gradient into g (N, K). params: the tiles' (label smoothing, z-loss, scale,
    scale of the z-term, logit scale, softcap), of which only the scale and those of
    ``options`` (a literal: a sum of SMOOTH, LSE, SCALE or CAP) are read (the softcap
    must be 0 without CAP). ``cols``
    (a literal, one of WIDTHS; with options one of OPTION_WIDTHS, with CAP at most
    TRANSPOSED_MAX): the classes a block computes, K or more. w: the K
    class weights (float32), w_sum their float64 sum; v: per-row weights (float64), or
    empty for none."""
    if not (isinstance(grad, types.BooleanLiteral) and isinstance(options, types.IntegerLiteral) and 0 <= options.literal_value < 2 * CAP):
        return None
    if not (isinstance(cols, types.IntegerLiteral) and cols.literal_value in (OPTION_WIDTHS if options.literal_value else WIDTHS)):
        return None
    if options.literal_value & CAP and (options.literal_value & SCALE or cols.literal_value > TRANSPOSED_MAX):
        return None
    if not all(isinstance(a, types.Array) and a.ndim == n for a, n in ((z, 2), (target, 1), (w, 1), (v, 1), (lanes, 2), (g, 2))):
        return None
    if not (z.dtype in _HELD and g.dtype in (types.float32, z.dtype) and w.dtype == types.float32):
        return None
    if not v.dtype == lanes.dtype == types.float64:
        return None
    sig = types.UniTuple(types.float64, 2)(z, target, ignore_index, w, v, row0, rows, params, w_sum, lanes, g, cols, grad, options)
    n_cols, with_grad, flags = cols.literal_value, grad.literal_value, options.literal_value

    def codegen(context, builder, sig, args):
        zv, tv, ignore, wv, vv, r0, nrows, pv, w_sum, lv, gv = args[:11]
        r0 = context.cast(builder, r0, sig.args[5], types.int64)
        nrows = context.cast(builder, nrows, sig.args[6], types.int64)
        ignore = context.cast(builder, ignore, sig.args[2], types.int64)
        ps = [context.cast(builder, builder.extract_value(pv, i), t, types.float64) for i, t in enumerate(sig.args[7])]
        sc = ps[2]
        opts = None
        if flags:
            w_sum = context.cast(builder, w_sum, sig.args[8], types.float64)
            on = {name: bool(flags & bit) for name, bit in (("smooth", SMOOTH), ("lse", LSE), ("scale", SCALE), ("cap", CAP))}
            opts = SimpleNamespace(**on, eps=ps[0], zl=ps[1], scale_z=ps[3], x_scale=ps[4], cap_c=ps[5], w_sum=w_sum)
        k = builder.extract_value(context.make_array(z)(context, builder, zv).shape, 1)
        vec = _Vectors(builder)
        # blocks_per_call blocks of 16 rows, their steps interleaved: one block's steps are a chain
        # of latencies (the max, the exp's polynomial, the division, the log) that the
        # out-of-order core cannot overlap with the next block's, hundreds of
        # instructions later
        steps = []
        for b in range(blocks_per_call(with_grad)):
            first = ir.Constant(_I64, W * b)
            left = builder.sub(nrows, first)
            rows_b = builder.select(builder.icmp_signed("<", left, ir.Constant(_I64, 0)), ir.Constant(_I64, 0), left)
            rows_b = builder.select(builder.icmp_signed(">", rows_b, ir.Constant(_I64, W)), ir.Constant(_I64, W), rows_b)
            values = (zv, tv, ignore, wv, vv, sc, lv, gv, opts)
            steps.append((_block_steps if n_cols <= TRANSPOSED_MAX else _row_steps)(context, builder, vec, sig, values, builder.add(r0, first), rows_b, W * b, k, n_cols, with_grad))
        totals = [None] * len(steps)
        while any(t is None for t in totals):
            for b, gen in enumerate(steps):
                if totals[b] is None:
                    try:
                        next(gen)
                    except StopIteration as done:
                        totals[b] = done.value
        loss_sum = vec.tree(builder.fadd, [t[0] for t in totals])
        z_sum = vec.tree(builder.fadd, [t[1] for t in totals])
        return context.make_tuple(builder, sig.return_type, (loss_sum, z_sum))

    return sig, codegen


def _counted(context, builder, vec, sig, values, r0, nrows):
    """Which of the block's 16 rows count (live: not ignored, of weight != 0), their
    weights row_w (two float64 halves; 1 without per-row weights), their targets (i64
    lanes), and which lanes are rows of the block (in_block: the lanes < nrows). The
    lanes past nrows repeat the last row's target and weight, as _rows repeats its
    logits: such a lane's gradient is its row's, and only its loss is left out (in_block)."""
    target, v = sig.args[1], sig.args[4]
    tv, ignore, vv = values[1], values[2], values[4]
    t_bits = target.dtype.bitwidth
    d8 = ir.VectorType(_F64, W // 2)
    lane = _const_vector(_I64, range(W))
    in_block = builder.icmp_signed("<", lane, _splat(builder, nrows, W))
    t_ptr = builder.gep(_data(context, builder, target, tv), [r0])
    tvt = ir.VectorType(ir.IntType(t_bits), W)
    last = builder.add(r0, builder.sub(nrows, ir.Constant(_I64, 1)))
    y_last = _splat(builder, builder.load(builder.gep(_data(context, builder, target, tv), [last])), W)
    y = builder.call(_masked(builder, "load", tvt, t_ptr), [t_ptr, ir.Constant(_I32, t_bits // 8), in_block, y_last])
    y64 = y if t_bits == 64 else builder.sext(y, ir.VectorType(_I64, W))
    live = builder.icmp_signed("!=", y64, _splat(builder, ignore, W))
    has_v = builder.icmp_signed("!=", _size(context, builder, v, vv), ir.Constant(_I64, 0))
    v_data = _data(context, builder, v, vv)
    v_ptr = builder.gep(v_data, [r0])
    v_mask = builder.and_(in_block, _splat(builder, has_v, W))
    # past nrows the last row's weight (1 without row weights: v is then empty, and not read)
    with builder.if_else(has_v) as (then, otherwise):
        with then:
            v_last = builder.load(builder.gep(v_data, [last]))
            from_v = builder.block
        with otherwise:
            from_none = builder.block
    w_last = builder.phi(_F64)
    w_last.add_incoming(v_last, from_v)
    w_last.add_incoming(ir.Constant(_F64, 1.0), from_none)
    w_last = vec.half(_splat(builder, w_last, W), 0)
    row_w = [builder.call(_masked(builder, "load", d8, p), [p, ir.Constant(_I32, 8), vec.half(v_mask, h), vec.select(vec.half(in_block, h), 1.0, w_last)])
             for h, p in ((0, v_ptr), (1, builder.gep(v_ptr, [ir.Constant(_I64, W // 2)])))]  # fmt: skip
    live = builder.and_(live, vec.join(*(vec.cmp("!=", x, 0.0, unordered=True) for x in row_w)))
    return live, in_block, row_w, y64


def _looked_up(builder, tables, index, permute=None):
    """table[index & (16 len(tables) - 1)] in each lane: tables one or two vectors of 16
    float32 (one table of 16 or 32), index a vector of 16 i32. With ``permute`` (default:
    the CPU has AVX-512F, as simd.prefer_512bit asks) one vpermps / vpermt2ps; else a
    compare and select per entry, which any target compiles. (Each lane extracted at its
    index in plain IR left LLVM building half the lanes from the stack.)"""
    n = W * len(tables)
    wrapped = builder.and_(index, _splat(builder, ir.Constant(_I32, n - 1), W))
    if not (simd._HAS_AVX512 if permute is None else permute):
        out = ir.Constant(ir.VectorType(_F32, W), [0.0] * W)
        for j in range(n):
            entry = builder.extract_element(tables[j // W], ir.Constant(_I32, j % W))
            out = builder.select(builder.icmp_signed("==", wrapped, _splat(builder, ir.Constant(_I32, j), W)), _splat(builder, entry, W), out)
        return out
    vt, it = tables[0].type, index.type
    if len(tables) == 1:
        name, fnty, args = "llvm.x86.avx512.permvar.sf.512", ir.FunctionType(vt, [vt, it]), [tables[0], wrapped]
    else:
        name, fnty, args = "llvm.x86.avx512.vpermi2var.ps.512", ir.FunctionType(vt, [vt, it, vt]), [tables[0], wrapped, tables[1]]
    return builder.call(builder.module.declare_intrinsic(name, fnty=fnty), args)


def _row_factors(vec, live, row_w, z_y, w_y, m, s_other, sc, e_y32=None):
    """Per row, in float64 lanes (two halves of 8): the loss (0 where not counted), and
    the gradient's factors a = v scale w_y / s and gy = -v scale w_y s_other / s. z_y, w_y
    and m: float32 vectors of the 16 rows; s_other: two float64 halves; e_y32: the rows'
    float32 exp(z_y - m), or None (_target_exps)."""
    live_h = [vec.half(live, i) for i in (0, 1)]
    zy = [vec.select(live_h[i], vec.sub(a, b), -np.inf) for i, (a, b) in enumerate(zip(vec.wide(z_y), vec.wide(m)))]
    w_yd = vec.wide(w_y)
    e_yd = _target_exps(vec, live, zy, e_y32)
    losses_out, a_f, gy_f = [], [], []
    for i in (0, 1):
        e_y = e_yd[i]
        inv_s = vec.div(1.0, vec.add(s_other[i], e_y))
        loss = vec.times(w_yd[i], vec.lse_minus_target(s_other[i], e_y, zy[i], inv_s))
        losses_out.append(vec.select(live_h[i], vec.mul(row_w[i], loss), 0.0))
        hard = vec.mul(w_yd[i], vec.mul(sc, row_w[i]))
        a_f.append(vec.mul(hard, inv_s))
        gy_f.append(vec.mul(vec.sub(0.0, hard), vec.mul(s_other[i], inv_s)))
    return losses_out, a_f, gy_f


def _target_exps(vec, live, zy, e_y32):
    """e_y = exp(z_y - m) of the 16 rows, two float64 halves: e_y32 (the float32 exp the
    transposed blocks have of every class) widened, 0 where not counted; or, without it
    (the row-wise blocks), the float64 exp of zy (-inf where not counted). (There a
    float32 exp of the 16 rows' z_y - m took 1.06-1.10x the time at K = 60-64.)"""
    if e_y32 is None:
        return [vec.exp_f64(x) for x in zy]
    return vec.wide(vec.select(live, e_y32, 0.0))


def _in_block_only(vec, in_block, rows_out):
    """rows_out with the losses and z-terms (not the lse) of the lanes past the block's
    rows (repeats of its last row: _rows) set to 0, so that they are not counted twice."""
    return {row: [vec.select(vec.half(in_block, i), x, 0.0) for i, x in enumerate(halves)] if row < 2 else halves for row, halves in rows_out.items()}


def _store_lanes(context, builder, vec, lanes, lv, l_first, rows_out):
    """The 16 rows' values into lanes[row, l_first ..] for each row: [two float64 halves]
    of rows_out; returns the sum of each's lanes (a fixed order)."""
    d8 = ir.VectorType(_F64, W // 2)
    arr = context.make_array(lanes)(context, builder, lv)
    stride = builder.extract_value(arr.strides, 0)
    base = builder.ptrtoint(arr.data, _I64)
    sums = {}
    for row, halves in rows_out.items():
        row_ptr = builder.inttoptr(builder.add(base, builder.mul(stride, ir.Constant(_I64, row))), _F64.as_pointer())
        for i in (0, 1):
            builder.store(halves[i], builder.bitcast(builder.gep(row_ptr, [ir.Constant(_I64, l_first + 8 * i)]), d8.as_pointer()), align=8)
        sums[row] = vec.lane_sum(vec.add(halves[0], halves[1]))
    return sums


def _tanh_small(vec, u):
    """rows._softcap_small_block_f32's tanh(u) for |u| < 1: u P(u^2), degree 7."""
    q = vec.mul(u, u)
    p = vec.add(vec.mul(q, float(rows_kernels._S7)), float(rows_kernels._S6))
    for c in (rows_kernels._S5, rows_kernels._S4, rows_kernels._S3, rows_kernels._S2, rows_kernels._S1, rows_kernels._S0):
        p = vec.add(vec.mul(q, p), float(c))
    return vec.mul(u, p)


def _tanh_any(builder, vec, u):
    """rows._softcap_block_f32's tanh(u): u P(u^2) (degree 5) below |u| = 0.55, beyond
    sign(u) (1 - e) / (1 + e), e = exp(-2 |u|)."""
    q = vec.mul(u, u)
    p = vec.add(vec.mul(q, float(rows_kernels._T5)), float(rows_kernels._T4))
    for c in (rows_kernels._T3, rows_kernels._T2, rows_kernels._T1, rows_kernels._T0):
        p = vec.add(vec.mul(q, p), float(c))
    abs_u = vec.fabs(u)
    e = vec.exp_f32(vec.mul(abs_u, -2.0), vec.const(0.0, _F32, W))
    t = vec.div(vec.sub(1.0, e), vec.add(1.0, e))
    t = vec.select(vec.cmp("<", u, 0.0), vec.sub(0.0, t), t)
    return vec.select(vec.cmp("<", abs_u, 0.55), vec.mul(u, p), t)


def _cap_constants(builder, opts):
    """The softcap's float32 splats, once a block: r = a / c (rounded to float32), c, 1 / c
    and a (the logit scale)."""
    c32 = builder.fptrunc(opts.cap_c, _F32)
    r = builder.fptrunc(builder.fdiv(opts.x_scale, opts.cap_c), _F32)
    inv_c = builder.fdiv(ir.Constant(_F32, 1.0), c32)
    a32 = builder.fptrunc(opts.x_scale, _F32)
    return SimpleNamespace(**{name: _splat(builder, x, W) for name, x in (("r", r), ("c", c32), ("inv_c", inv_c), ("a", a32))})


def _capped(builder, vec, col, cap, k):
    """The softcap of a block's classes: z = c tanh(u), u = x a / c (cap: _cap_constants),
    as rows._softcap_row_f32: the degree-7 polynomial alone where every |u| of the block's
    rows and classes is below 1 (one branch a block), else _tanh_any."""
    us = [vec.mul(x, cap.r) for x in col]
    small = None
    for j, u in enumerate(us):  # |u| < 1 (not NaN) or a class past K (the lanes past the block's rows repeat its last row: _rows)
        past_k = _splat(builder, builder.icmp_signed(">=", ir.Constant(_I64, j), k), W)
        ok = builder.or_(vec.cmp("<", vec.fabs(u), 1.0), past_k)
        small = ok if small is None else builder.and_(small, ok)
    every = builder.icmp_unsigned("==", builder.bitcast(small, ir.IntType(W)), ir.Constant(ir.IntType(W), (1 << W) - 1))
    with builder.if_else(every, likely=True) as (then, otherwise):
        with then:
            z_small = [vec.mul(cap.c, _tanh_small(vec, u)) for u in us]
            from_small = builder.block
        with otherwise:
            z_any = [vec.mul(cap.c, _tanh_any(builder, vec, u)) for u in us]
            from_any = builder.block
    out = []
    for a, b in zip(z_small, z_any):
        phi = builder.phi(a.type)
        phi.add_incoming(a, from_small)
        phi.add_incoming(b, from_any)
        out.append(phi)
    return out


def _cap_slope(vec, z, cap):
    """dz/dx of the softcap at z (float32 lanes), as rows._softcap_slope: a (1 - q)(1 + q),
    q = z (1 / c), exactly 0 where z = +-c (saturated)."""
    q = vec.mul(z, cap.inv_c)
    slope = vec.mul(cap.a, vec.mul(vec.sub(1.0, q), vec.add(1.0, q)))
    return vec.select(vec.cmp("==", vec.fabs(z), cap.c), 0.0, slope)


def _block_steps(context, builder, vec, sig, values, r0, nrows, l_first, k, n_cols, with_grad):
    """The IR of one block of 16 rows (block_loss), a generator: it yields between steps
    so that block_loss can interleave its blocks; returns the block's sums of the losses
    and of the z-terms."""
    z, _, _, w, _, _, _, _, _, lanes, g = sig.args[:11]
    zv, _, _, wv, _, sc, lv, gv, opts = values
    f16 = ir.VectorType(_F32, W)
    z_held, g_held = _Stored(builder, z.dtype), _Stored(builder, g.dtype)
    minus_inf = vec.const(-np.inf, _F32, W)

    # the rows, transposed: col[j] = class j of the 16 rows (-inf past K), 16 classes
    # (one zmm of a row) at a time
    col = []
    for group in range(-(-n_cols // W)):
        addressed = _rows(context, builder, z, zv, r0, k, nrows, group)
        col += transposed(builder, [z_held.load(p, mask, -np.inf) for p, mask in addressed])
    col = col[:n_cols]
    if opts is not None and opts.scale:  # z = a x, each product rounded to float32 (simd.product); -inf past K
        a_x = _splat(builder, builder.fptrunc(opts.x_scale, _F32), W)
        col = [builder.select(builder.icmp_signed("<", ir.Constant(_I64, j), k), builder.fmul(a_x, c, flags=("arcp",)), minus_inf) for j, c in enumerate(col)]
    cap = _cap_constants(builder, opts) if opts is not None and opts.cap else None
    if cap is not None:  # z = c tanh(a x / c); -inf past K
        col = [builder.select(builder.icmp_signed("<", ir.Constant(_I64, j), k), c, minus_inf) for j, c in enumerate(_capped(builder, vec, col, cap, k))]

    yield
    live, in_block, row_w, y64 = _counted(context, builder, vec, sig, values, r0, nrows)
    lane = _const_vector(_I64, range(W))
    y32 = builder.trunc(y64, ir.VectorType(_I32, W))
    is_target = [builder.and_(live, builder.icmp_signed("==", y32, vec.const(j, _I32, W))) for j in range(n_cols)]
    zero = vec.const(0.0, _F32, W)
    w_ptr = _data(context, builder, w, wv)
    w_all = []
    for group in range(-(-n_cols // W)):
        first = ir.Constant(_I64, W * group)
        p = builder.gep(w_ptr, [first])
        class_mask = builder.icmp_signed("<", lane, _splat(builder, builder.sub(k, first), W))
        w_all.append(builder.call(_masked(builder, "load", f16, p), [p, ir.Constant(_I32, 4), class_mask, zero]))
    w_of = [builder.extract_element(w_all[j // W], ir.Constant(_I32, j % W)) for j in range(n_cols)]
    z_y, w_y = zero, zero
    for j in range(n_cols):
        z_y = builder.select(is_target[j], col[j], z_y)
    # w_y in one vpermps (vpermt2ps past 16 classes) of the class weights, not n_cols
    # broadcasts and selects. A row not counted gets some class's weight: its loss and
    # gradient are set to 0 all the same
    w_y = _looked_up(builder, w_all, y32)

    yield
    # the max, the exps, and the float64 sum of the exps but the target's
    m = vec.tree(vec.max_or_nan_somewhere, col)
    m_rows = m
    if opts is not None and opts.lse:  # a NaN may not reach m (vmaxps), but the row's lse must be NaN: of a row of NaN and -inf, m = -inf gave lse = -inf
        m_rows = vec.select(vec.any_nan(col), np.nan, m)
    w_shift = None
    if opts is not None and opts.smooth:  # sum_j w_j (z_j - m), each term in float32, summed in float64 (a zero weight adds 0)
        terms = []
        for j in range(n_cols):
            w_j = _splat(builder, w_of[j], W)
            term = vec.select(vec.cmp("!=", w_j, 0.0, unordered=True), vec.mul(w_j, vec.sub(col[j], m)), 0.0)
            terms.append(vec.wide(term))
        w_shift = [vec.tree(vec.add, (t[i] for t in terms)) for i in (0, 1)]
    e = [vec.exp_shifted_f32(col[j], m) for j in range(n_cols)]
    kept = [builder.select(is_target[j], zero, e[j]) for j in range(n_cols)]
    e_y = zero  # the target's exp, taken here: without the gradient the exps die here (2 blocks a call)
    for j in range(n_cols):
        e_y = builder.select(is_target[j], e[j], e_y)
    halves = [vec.wide(x) for x in kept]
    s_other = [vec.tree(vec.add, (h[i] for h in halves)) for i in (0, 1)]

    yield
    if opts is None:
        losses_out, a_f, gy_f = _row_factors(vec, live, row_w, z_y, w_y, m, s_other, sc, e_y)
        rows_out, b_f = {0: losses_out}, None
    else:
        rows_out, a_f, b_f, gy_f = _option_factors(builder, vec, live, row_w, z_y, w_y, m_rows, s_other, w_shift, sc, opts, k, e_y)
    yield
    sums = _store_lanes(context, builder, vec, lanes, lv, l_first, _in_block_only(vec, in_block, rows_out))
    totals = sums[0], sums.get(1, ir.Constant(_F64, 0.0))

    yield
    if with_grad:
        a32, gy32 = vec.narrow(*a_f), vec.narrow(*gy_f)
        b32 = None if b_f is None else vec.narrow(*b_f)
        out = []
        for j in range(n_cols):
            gj = vec.mul(a32, e[j])
            if b32 is not None:  # a e_j - b w_j
                gj = vec.sub(gj, vec.mul(b32, w_of[j]))
            gj = builder.select(is_target[j], gy32, gj)
            if cap is not None:
                gj = vec.mul(gj, _cap_slope(vec, col[j], cap))
            out.append(builder.select(live, gj, zero))
        out += [zero] * (-n_cols % W)
        for group in range(len(out) // W):
            rows_out = transposed(builder, out[W * group : W * group + W])
            for x, (p, mask) in zip(rows_out, _rows(context, builder, g, gv, r0, k, nrows, group)):
                g_held.store(x, p, mask)
    return totals


def _option_factors(builder, vec, live, row_w, z_y, w_y, m, s_other, w_shift, sc, opts, k, e_y32=None):
    """_row_factors with the options ``opts`` has (label smoothing; lse and the z-loss; a
    logit scale), as tiles._lane_loss, op for op, less the terms of the options it has
    not (each a 0 added or a factor 1 there: the same results): ({0: losses[, 1:
    z-terms, 2: lse with LSE]}, a, b (None without SMOOTH), gy), each two float64 halves;
    the gradient a e_j - b w_j, gy at the target."""
    live_h = [vec.half(live, i) for i in (0, 1)]
    zy = [vec.select(live_h[i], vec.sub(a, b), -np.inf) for i, (a, b) in enumerate(zip(vec.wide(z_y), vec.wide(m)))]
    w_yd = vec.wide(w_y)
    m_d = vec.wide(m)
    eps, zl, scale_z, x_scale, w_sum = opts.eps, opts.zl, opts.scale_z, opts.x_scale, opts.w_sum
    if opts.smooth:
        k_d = builder.sitofp(k, _F64)
        smooth = builder.fcmp_ordered(">", eps, ir.Constant(_F64, 0.0))
        eps_k = builder.fdiv(eps, k_d, flags=_FLAGS)
        one_eps = builder.fsub(ir.Constant(_F64, 1.0), eps, flags=_FLAGS)
        eps_w = builder.fdiv(builder.fmul(eps, w_sum, flags=_FLAGS), k_d, flags=_FLAGS)
    if opts.lse:
        has_z = builder.fcmp_ordered(">", zl, ir.Constant(_F64, 0.0))
    out = {0: [], 1: [], 2: []} if opts.lse else {0: []}
    e_yd = _target_exps(vec, live, zy, e_y32)
    a_f, b_f, gy_f = [], [], []
    for i in (0, 1):
        e_y = e_yd[i]
        inv_s = vec.div(1.0, vec.add(s_other[i], e_y))
        loss = vec.times(w_yd[i], vec.lse_minus_target(s_other[i], e_y, zy[i], inv_s))
        if opts.smooth or opts.lse:
            log_s = vec.log_normal(vec.add(s_other[i], e_y))
            p_y = vec.mul(e_y, inv_s)
        if opts.smooth:
            smoothed = vec.add(vec.mul(one_eps, loss), vec.mul(eps_k, vec.sub(vec.mul(w_sum, log_s), w_shift[i])))
            loss = vec.select(_splat(builder, smooth, W // 2), smoothed, loss)
        out[0].append(vec.select(live_h[i], vec.mul(row_w[i], loss), 0.0))
        sv = vec.mul(sc, row_w[i])
        if opts.scale:
            sv = vec.mul(sv, x_scale)
        hard = vec.mul(vec.mul(one_eps, w_yd[i]), sv) if opts.smooth else vec.mul(w_yd[i], sv)
        a_num = vec.add(hard, vec.mul(eps_w, sv)) if opts.smooth else hard
        gy = vec.mul(vec.sub(0.0, hard), vec.mul(s_other[i], inv_s))
        if opts.smooth:
            b_f.append(vec.mul(eps_k, sv))
            gy = vec.add(gy, vec.mul(vec.mul(eps_k, sv), vec.sub(vec.mul(w_sum, p_y), w_yd[i])))
        if opts.lse:
            lse = vec.select(vec.cmp("==", vec.fabs(m_d[i]), np.inf), m_d[i], vec.add(m_d[i], log_s))  # rows.row_lse
            z_live = builder.and_(live_h[i], _splat(builder, has_z, W // 2))
            out[1].append(vec.select(z_live, vec.mul(vec.mul(vec.mul(row_w[i], zl), lse), lse), 0.0))
            out[2].append(lse)
            zg = vec.mul(vec.mul(vec.mul(vec.like(2.0, sv), zl), scale_z), row_w[i])
            if opts.scale:
                zg = vec.mul(zg, x_scale)
            zg = vec.select(_splat(builder, has_z, W // 2), vec.mul(zg, lse), 0.0)
            a_num = vec.add(a_num, zg)
            gy = vec.add(gy, vec.mul(zg, p_y))
        a_f.append(vec.mul(a_num, inv_s))
        gy_f.append(gy)
    return out, a_f, b_f if opts.smooth else None, gy_f


def _rows_per_step(n_cols):
    """Rows a loop step of _row_steps interleaves: ROWS_PER_STEP up to 176 classes; one
    beyond, where two rows' zmm would outnumber the 32 registers (one thread, rows in
    cache, K = 300 / 384: 0.93 / 0.88x the time of two rows a step)."""
    return ROWS_PER_STEP if n_cols <= 176 else 1


def _row_steps(context, builder, vec, sig, values, r0, nrows, l_first, k, n_cols, with_grad):
    """block_loss's block of 16 rows for K > TRANSPOSED_MAX (n_cols = 16 n): a loop over
    the rows, each row held in n zmm along its classes (those a K of this width may
    leave short masked): the max (a tree, then across the lanes), the exps, the float64 sum of all but the
    target's; each row's m, z_y, w_y and s_other go to 16-lane stack arrays, and after
    the loop the rows' float64 arithmetic is _row_factors' 16 lanes, as in the
    transposed blocks. With the gradient the exps are stored (exps_row) and a second
    loop scales them into the gradient (the 16 rows' exps are in L1 by then). A generator
    like _block_steps (its loops are emitted whole between yields)."""
    z, target, _, w, _, _, _, _, _, losses, g = sig.args[:11]
    zv, tv, _, wv, _, sc, lv, gv, opts = values
    t_bits = target.dtype.bitwidth
    n_vec = n_cols // W
    f16 = ir.VectorType(_F32, W)
    i32x16 = ir.VectorType(_I32, W)
    zero = vec.const(0.0, _F32, W)
    lane = _const_vector(_I32, range(W))
    z_held, g_held, f32_held = _Stored(builder, z.dtype), _Stored(builder, g.dtype), _Stored(builder, types.float32)
    # a zmm of a row is loaded whole where every K of this width fills it, else masked
    # (its lanes below K; none for the K that leave it empty)
    min_k = max([c for c in (WIDTHS if opts is None else OPTION_WIDTHS) if c < n_cols], default=0) + 1
    masks = [None if W * (i + 1) <= min_k else builder.icmp_signed("<", lane, _splat(builder, builder.trunc(builder.sub(k, ir.Constant(_I64, W * i)), _I32), W)) for i in range(n_vec)]

    def vectors(base):
        """(pointer, mask or None) of each zmm of the row at base."""
        return [(builder.gep(base, [ir.Constant(_I64, W * i)]), masks[i]) for i in range(n_vec)]

    def row_target(row):
        """The row's target, and the same clamped into 0 .. K - 1 (an ignored row's
        ignore_index may lie outside)."""
        y = builder.load(builder.gep(_data(context, builder, target, tv), [row]))
        y = y if t_bits == 64 else builder.sext(y, _I64)
        inside = builder.and_(builder.icmp_signed(">=", y, ir.Constant(_I64, 0)), builder.icmp_signed("<", y, k))
        return y, builder.select(inside, y, ir.Constant(_I64, 0))

    def is_target(y, row):
        """The lanes of the row's target, left out of s_other. With LSE, only in a
        counted row: another row's lse needs every class in its sum, as in the
        transposed blocks (without, such a row's loss is dropped).
        (_counted's test, per row: taking _counted's lanes before the loop instead kept
        them live through it, 880 instructions a step with 122 stack operands against
        467 and 60, width 128.)"""
        y_lanes = _splat(builder, builder.trunc(y, _I32), W)
        found = [builder.icmp_signed("==", builder.add(lane, vec.const(W * i, _I32, W)), y_lanes) for i in range(n_vec)]
        if opts is None or not opts.lse:
            return found
        counted = builder.icmp_signed("!=", y, values[2])
        # the row's weight, or 1 without row weights (v is then empty: read a 1 instead)
        v_data = _data(context, builder, sig.args[4], values[4])
        has_v = builder.icmp_signed("!=", _size(context, builder, sig.args[4], values[4]), ir.Constant(_I64, 0))
        weight = builder.load(builder.select(has_v, builder.gep(v_data, [row]), one_f64))
        counted = builder.and_(counted, builder.fcmp_unordered("!=", weight, ir.Constant(_F64, 0.0)))
        return [builder.and_(f, _splat(builder, counted, W)) for f in found]

    def lanes_of(element):
        """A 16-lane stack array (zeroed), and a pointer to its lane r."""
        arr = cgutils.alloca_once(builder, ir.ArrayType(element, W))
        builder.store(ir.Constant(ir.ArrayType(element, W), None), arr)
        return arr, lambda r: builder.gep(arr, [ir.Constant(_I32, 0), r])

    def as_vector(arr, element, first, n):
        return builder.load(builder.bitcast(builder.gep(arr, [ir.Constant(_I32, 0), ir.Constant(_I32, first)]), ir.VectorType(element, n).as_pointer()), align=4)

    one_f64 = cgutils.alloca_once_value(builder, ir.Constant(_F64, 1.0))
    m_arr, m_at = lanes_of(_F32)
    zy_arr, zy_at = lanes_of(_F32)
    wy_arr, wy_at = lanes_of(_F32)
    s_arr, s_at = lanes_of(_F64)
    z_data, g_data, w_data = (_data(context, builder, t, x) for t, x in ((z, zv), (g, gv), (w, wv)))
    # where the exps wait for their scale: the gradient's row when it is float32 and K a
    # multiple of 16 (its zmm stores then split no cache line), else a float32 scratch
    # of the 16 rows (half gradients: rounded once, from float32). Against the exps
    # always in the gradient (one thread, 2048 rows in cache, 21 interleaved rounds):
    # 0.89-0.98x the time at K = 33, 50, 128, 150; 0.94-1.06x at 64, 100, 176 (noise)
    if with_grad:
        with builder.goto_entry_block():  # (cgutils.alloca_once would zero it, a 7 KB memset a chunk)
            scratch = builder.bitcast(builder.alloca(ir.ArrayType(_F32, W * n_cols)), _F32.as_pointer())
        in_place_exps = ir.Constant(ir.IntType(1), 0)
        if g_held.kind == 0:
            in_place_exps = builder.icmp_signed("==", builder.and_(k, ir.Constant(_I64, W - 1)), ir.Constant(_I64, 0))

    def exps_row(r, row):
        """Where row r of the block (the array's row ``row``) keeps its float32 exps."""
        in_scratch = builder.gep(scratch, [builder.mul(r, ir.Constant(_I64, n_cols))])
        if g_held.kind:
            return in_scratch
        return builder.select(in_place_exps, builder.gep(g_data, [builder.mul(row, k)]), in_scratch)

    scaling, smoothing = opts is not None and opts.scale, opts is not None and opts.smooth
    if scaling:  # the logit scale
        a_x = builder.fptrunc(opts.x_scale, _F32)
        a_v = _splat(builder, a_x, W)
    if smoothing:  # the class weights' zmm (0 past K)
        w_vecs = [f32_held.load(p, mask, 0.0) for p, mask in vectors(w_data)]
        ws_arr, ws_at = lanes_of(_F64)

    def scaled(x, mask):
        """z = a x, the product rounded to float32 (simd.product); -inf past K."""
        z = builder.fmul(a_v if isinstance(x.type, ir.VectorType) else a_x, x, flags=("arcp",))
        return z if mask is None else builder.select(mask, z, vec.const(-np.inf, _F32, W))

    # ROWS_PER_STEP rows a loop step, their instructions interleaved stage by stage:
    # one row's are a chain of latencies (loads, the max across lanes, the exp's
    # polynomial, the sum across lanes). A last step short of rows repeats the block's
    # last row, which stores the same values again (in place too: every copy loads the
    # row before any stores).
    last = builder.sub(nrows, ir.Constant(_I64, 1))
    per_step = _rows_per_step(n_cols)
    steps = builder.sdiv(builder.add(nrows, ir.Constant(_I64, per_step - 1)), ir.Constant(_I64, per_step))
    with cgutils.for_range(builder, steps) as loop:
        rs = []
        for q in range(per_step):
            r = builder.add(builder.mul(loop.index, ir.Constant(_I64, per_step)), ir.Constant(_I64, q))
            rs.append(builder.select(builder.icmp_signed(">", r, last), last, r))
        rows = [builder.add(r0, r) for r in rs]
        bases = [builder.gep(z_data, [builder.mul(row, k)]) for row in rows]
        ys = [row_target(row) for row in rows]
        # z_y and w_y before the exps are stored: g may be z (in place)
        for r, base, (_, y_in) in zip(rs, bases, ys):
            zy = z_held.widen(builder.load(builder.gep(base, [y_in])))
            builder.store(scaled(zy, None) if scaling else zy, zy_at(r))
            builder.store(builder.load(builder.gep(w_data, [y_in])), wy_at(r))
        xs = [[z_held.load(p, mask, -np.inf) for p, mask in vectors(base)] for base in bases]
        if scaling:
            xs = [[scaled(xi, masks[i]) for i, xi in enumerate(x)] for x in xs]
        ms = [vec.tree(vec.max_or_nan_somewhere, x) for x in xs]
        for step in (8, 4, 2, 1):  # every lane the row's max
            flip = _const_vector(_I32, [i ^ step for i in range(W)])
            ms = [vec.max_or_nan_somewhere(m, builder.shuffle_vector(m, m, flip)) for m in ms]
        for r, x, m in zip(rs, xs, ms) if smoothing else ():
            # sum_j w_j (z_j - m), each term in float32, summed in float64 (a zero weight adds 0)
            terms = [vec.select(vec.cmp("!=", wi, 0.0, unordered=True), vec.mul(wi, vec.sub(xi, m)), 0.0) for wi, xi in zip(w_vecs, x)]
            builder.store(vec.lane_sum(vec.tree(vec.add, [h for t in terms for h in vec.wide(t)])), ws_at(r))
        es = [[vec.exp_shifted_f32(xi, m) for xi in x] for x, m in zip(xs, ms)]
        for r, row, e, m, (y, _), x in zip(rs, rows, es, ms, ys, xs):
            kept = [builder.select(t, zero, ei) for t, ei in zip(is_target(y, row), e)]
            halves = [h for ki in kept for h in vec.wide(ki)]
            builder.store(vec.lane_sum(vec.tree(vec.add, halves)), s_at(r))
            m_row = builder.extract_element(m, ir.Constant(_I32, 0))
            if opts is not None and opts.lse:  # a row with a NaN: lse NaN (as _block_steps' m_rows)
                nan = builder.bitcast(vec.any_nan(x), ir.IntType(W))
                m_row = builder.select(builder.icmp_unsigned("!=", nan, ir.Constant(ir.IntType(W), 0)), ir.Constant(_F32, np.nan), m_row)
            builder.store(m_row, m_at(r))
        if with_grad:
            for r, row, e in zip(rs, rows, es):
                for ei, (p, mask) in zip(e, vectors(exps_row(r, row))):
                    f32_held.store(ei, p, mask)
    yield

    live, in_block, row_w, _ = _counted(context, builder, vec, sig, values, r0, nrows)
    m = as_vector(m_arr, _F32, 0, W)
    s_other = [as_vector(s_arr, _F64, 8 * i, W // 2) for i in (0, 1)]
    z_y, w_y = as_vector(zy_arr, _F32, 0, W), as_vector(wy_arr, _F32, 0, W)
    if opts is None:
        losses_out, a_f, gy_f = _row_factors(vec, live, row_w, z_y, w_y, m, s_other, sc)
        rows_out, b_f = {0: losses_out}, None
    else:
        w_shift = [as_vector(ws_arr, _F64, 8 * i, W // 2) for i in (0, 1)] if smoothing else None
        rows_out, a_f, b_f, gy_f = _option_factors(builder, vec, live, row_w, z_y, w_y, m, s_other, w_shift, sc, opts, k)
    sums = _store_lanes(context, builder, vec, losses, lv, l_first, _in_block_only(vec, in_block, rows_out))
    totals = sums[0], sums.get(1, ir.Constant(_F64, 0.0))
    yield

    if with_grad:
        a_arr, a_at = lanes_of(_F32)
        gy_arr, gy_at = lanes_of(g_held.element)  # as stored
        live_arr, live_at = lanes_of(_I32)
        builder.store(vec.narrow(*a_f), builder.bitcast(a_arr, f16.as_pointer()), align=4)
        if b_f is not None:
            b_arr, b_at = lanes_of(_F32)
            builder.store(vec.narrow(*b_f), builder.bitcast(b_arr, f16.as_pointer()), align=4)
        builder.store(g_held.narrow(vec.narrow(*gy_f)), builder.bitcast(gy_arr, g_held.vector.as_pointer()), align=g_held.align.constant)
        builder.store(builder.zext(live, i32x16), builder.bitcast(live_arr, i32x16.as_pointer()), align=4)
        with cgutils.for_range(builder, nrows) as loop:
            r = loop.index
            row = builder.add(r0, r)
            g_base = builder.gep(g_data, [builder.mul(row, k)])
            counted = builder.icmp_signed("!=", builder.load(live_at(r)), ir.Constant(_I32, 0))
            with builder.if_else(counted) as (then, otherwise):
                with then:  # a e_j (- b w_j), then the target's entry over it
                    a_r = _splat(builder, builder.load(a_at(r)), W)
                    b_r = None if b_f is None else _splat(builder, builder.load(b_at(r)), W)
                    for i, ((p, mask), (e, _)) in enumerate(zip(vectors(g_base), vectors(exps_row(r, row)))):
                        gj = vec.mul(a_r, f32_held.load(e, mask, 0.0))
                        if b_r is not None:
                            gj = vec.sub(gj, vec.mul(b_r, w_vecs[i]))
                        g_held.store(gj, p, mask)
                    builder.store(builder.load(gy_at(r)), builder.gep(g_base, [row_target(row)[1]]))
                with otherwise:  # zeros (its exps may be NaN)
                    for p, mask in vectors(g_base):
                        g_held.store(zero, p, mask)
    return totals


# --- the kernels: fastsce._kernels.tiles.hard_loss / hard_loss_grad's arguments -------------------
#
# One pair of kernels per block width (WIDTHS), each compiled when first used: a call
# compiles one width's block code, not every width's (float32 K = 10, 65536 rows, empty
# cache, when there were four widths: loss only 4.0-4.2 s with one width of one block a
# call, 6.3-7.0 s with all four widths of two).


@jit
def _chunk(z, target, ignore_index, w, w_sum, v, params, outs, g, lo, hi, grad, cols, options):
    """Rows lo .. hi, 16 or 32 at a time: the sums of their losses and z-terms (per row
    too, in outs' row arrays that are not empty)."""
    row_loss, row_z, lse_out = outs[0], outs[1], outs[2]
    step = W * blocks_per_call(grad)
    lanes = np.zeros((3, step))
    total = 0.0
    z_total = 0.0
    n, k = z.shape
    ahead = max(step, PREFETCH_BYTES // (k * z.itemsize))  # rows
    far = z.size * z.itemsize > PREFETCH_ABOVE
    z_ahead, g_ahead = far and (cols <= TRANSPOSED_MAX or not grad), far and cols <= TRANSPOSED_MAX and grad  # (PREFETCH_BYTES)
    for i in range(lo, hi, step):
        rows = min(step, hi - i)
        end = min(i + ahead + step, n) * k  # none past the last row
        first = min(end, (i + ahead) * k)
        for j in range(first if z_ahead else end, end, 64 // z.itemsize):
            prefetch(z, j)
        for j in range(first if g_ahead else end, end, 64 // g.itemsize):
            prefetch(g, j)
        dt, dz = block_loss(z, target, ignore_index, w, v, i, rows, params, w_sum, lanes, g, cols, grad, options)
        total += dt
        z_total += dz
        for r in range(rows if row_loss.size else 0):
            row_loss[i + r] = lanes[0, r] + lanes[1, r] if options else lanes[0, r]
        for r in range(rows if row_z.size else 0):
            row_z[i + r] = lanes[1, r]
        for r in range(rows if lse_out.size else 0):
            lse_out[i + r] = lanes[2, r]
    return total, z_total


def _kernels(cols, options):
    """hard_loss and hard_loss_grad for K <= cols and ``options`` (constants of the
    closure, so literals in the kernels' code)."""

    @parallel
    def hard_loss(z, target, ignore_index, w, w_sum, v, params, chunk_rows, outs):
        """tiles.hard_loss for float32 or half z of K <= cols and no softcap (fastsce.api
        checks), and no label smoothing, z-loss, logit scale or lse but those of ``options``."""
        chunk_loss, chunk_z = outs[3], outs[4]
        no_grad = np.empty((0, z.shape[1]), z.dtype)
        for c in prange(chunk_loss.size):
            lo = c * chunk_rows
            hi = min(lo + chunk_rows, z.shape[0])
            chunk_loss[c], chunk_z[c] = _chunk(borrowed(z), borrowed(target), ignore_index, borrowed(w), w_sum, borrowed(v), params, borrow_outs(outs), no_grad, lo, hi, False, cols, options)

    @parallel
    def hard_loss_grad(z, target, ignore_index, w, w_sum, v, params, chunk_rows, outs, g, in_place):
        """hard_loss, and the gradient into g (which may be z: a block is read whole
        before its gradient is written)."""
        chunk_loss, chunk_z = outs[3], outs[4]
        for c in prange(chunk_loss.size):
            lo = c * chunk_rows
            hi = min(lo + chunk_rows, z.shape[0])
            chunk_loss[c], chunk_z[c] = _chunk(borrowed(z), borrowed(target), ignore_index, borrowed(w), w_sum, borrowed(v), params, borrow_outs(outs), borrowed(g), lo, hi, True, cols, options)

    return SimpleNamespace(hard_loss=hard_loss, hard_loss_grad=hard_loss_grad)


_BY_WIDTH = {}  # (cols, options) -> the kernels, made on first use


def max_k(options: int = 0) -> int:
    """The most classes the blocks take with ``options``."""
    return TRANSPOSED_MAX if options & CAP else (OPTION_WIDTHS if options else WIDTHS)[-1]


def kernels(k: int, options: int = 0):
    """The kernels for rows of k <= MAX_K classes (attributes hard_loss, hard_loss_grad);
    ``options`` (options_of): those that take label smoothing, lse and the z-loss, a
    logit scale, a softcap (K <= TRANSPOSED_MAX)."""
    if k > max_k(options):
        raise ValueError(f"the blocks take K <= {max_k(options)} with options {options}, not {k}")
    cols = next(c for c in (OPTION_WIDTHS if options else WIDTHS) if k <= c)
    key = cols, options
    if key not in _BY_WIDTH:
        _BY_WIDTH.setdefault(key, _kernels(cols, options))  # (one of two threads' wins)
    return _BY_WIDTH[key]
