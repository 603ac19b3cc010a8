"""Vectorisable building blocks for the kernels: exp, max, and 512-bit loops.

The llvmlite wheels ship without SVML, so ``math.exp`` in a loop stays a scalar libm
call (~6 ns per element here) and keeps the loop from vectorising; a ``max()`` or
``if z > m`` reduction does not vectorise either. The pieces below are plain arithmetic
that LLVM turns into AVX-512/AVX2 code (checked with ``inspect_asm``: vfmadd*ps,
vpslld, vmaxps on zmm registers, no calls in the loop).

The kernels' on-disk cache is keyed on every file of fastsce/_kernels (see jit.py): an
edit here recompiles the kernels that use it.
"""

import math

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from fastsce._kernels.jit import jit

# --- bit casts and LLVM intrinsics ---------------------------------------------------


def _bitcast(src, dst, dst_ir):
    @intrinsic
    def cast(typingctx, x):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], dst_ir)

        return dst(src), codegen

    return cast


_i32_as_f32 = _bitcast(types.int32, types.float32, ir.FloatType())
_f32_as_i32 = _bitcast(types.float32, types.int32, ir.IntType(32))
_i64_as_f64 = _bitcast(types.int64, types.float64, ir.DoubleType())
_f64_as_i64 = _bitcast(types.float64, types.int64, ir.IntType(64))


@intrinsic
def maximum(typingctx, a, b):
    """IEEE maximum (llvm.maximum): NaN-propagating, and unlike ``max()`` or a compare
    and branch, LLVM vectorises a reduction over it (vmaxps) without fast-math nnan."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        name = "llvm.maximum.f32" if ty == ir.FloatType() else "llvm.maximum.f64"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ty, [ty, ty]), name)
        return builder.call(fn, args)

    return a(a, b), codegen


@intrinsic
def product(typingctx, a, x):
    """a * x rounded to the type of both, as if stored and reloaded: never fused with a
    following add or subtract into one FMA rounding. Numba gives every float operation
    without fast-math flags the kernels' flags, "contract" among them, which let LLVM
    turn a x - m into one FMA (seen in the exp loops: results 1 ulp off those of a
    scaled row); an fmul carrying "arcp" alone (meaningless for a product) keeps its
    own rounding and still vectorises. (llvm.arithmetic.fence kept the loops scalar.)"""
    if not (isinstance(a, types.Float) and a == x):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1], flags=("arcp",))

    return x(a, x), codegen


def scaled(x, a):
    """x itself when a is None (or an omitted argument), else product(a, x): the loop
    helpers' optional logit scale, so a kernel can read unscaled rows and see a x."""
    raise NotImplementedError  # only callable from jitted code


@overload(scaled)
def _scaled(x, a):
    if isinstance(a, (types.NoneType, types.Omitted)):
        return lambda x, a: x
    return lambda x, a: product(a, x)


_HAS_AVX512 = bool(llvm.get_host_cpu_features().get("avx512f", False))


@intrinsic
def prefer_512bit(typingctx):
    """Call first thing in a loop helper: lets LLVM use 512-bit vectors in that function.

    LLVM's tuning for Skylake-SP and later sets prefer-256-bit, so loops get ymm even on
    AVX-512 machines; measured here the exp loop runs 1.37x faster on zmm. This adds the
    function attribute "prefer-vector-width"="512" (set.add: llvmlite's attribute set
    only knows keyword attributes). A no-op without AVX-512F.
    """

    def codegen(context, builder, sig, args):
        if _HAS_AVX512:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


# --- exp for x <= 0 ------------------------------------------------------------------
#
# exp(x) = 2^n exp(r), n = round(x / ln2), r = x - n ln2 (ln2 split in two, Cody-Waite),
# exp(r) = 1 + r q(r) with q a near-minimax polynomial on |r| <= ln2 / 2. n comes from
# the "magic number" rounding t = x log2(e) + 1.5 * 2^p + bias: n + bias sits in the low
# bits of t, so 2^n is bits(t) shifted into the exponent field (no float-to-int
# conversion, so NaN cannot make LLVM poison). While n is a normal exponent (x down to
# -126.5 ln2 for float32, -1022.5 ln2 for float64) the result is right even where it
# underflows into the subnormals; below that it is 0, as is exp(-inf). NaN propagates.
# Measured max error over [threshold, 0] against float64/long double: 0.93 ulp (float32),
# 0.90 ulp (float64). These helpers must not be compiled with "reassoc" (or inlined into
# a function that has it with inline="always"): it folds (a + M) - M to a.

_F = np.float32
_L2E_F = _F(1.4426950408889634)
_MAGIC_F = _F(12582912.0 + 127.0)  # 1.5 * 2^23 + exponent bias
_LN2_HI_F = _F(0.693359375)
_LN2_LO_F = _F(-2.12194440e-4)
_MIN_F = _F(-87.68)  # -126.5 ln2: n = -126 is the last normal scale factor
_Q_F = tuple(
    _F(c)
    for c in (
        0.0013933649996309251,
        0.008369155667697397,
        0.041666464925285904,
        0.1666650519575811,
        0.500000001346581,
        1.00000001077804,
    )
)
_Q5_F, _Q4_F, _Q3_F, _Q2_F, _Q1_F, _Q0_F = _Q_F
_ONE_F = _F(1.0)
_ZERO_F = _F(0.0)


@jit
def _exp_f32(x, err):
    """exp(x + err), err a correction below half an ulp of x (0 folds away under nsz)."""
    t = x * _L2E_F + _MAGIC_F
    n = t - _MAGIC_F
    r = x - n * _LN2_HI_F
    r = (r - n * _LN2_LO_F) + err
    q = ((((_Q5_F * r + _Q4_F) * r + _Q3_F) * r + _Q2_F) * r + _Q1_F) * r + _Q0_F
    v = (q * r + _ONE_F) * _i32_as_f32(_f32_as_i32(t) << np.int32(23))
    return _ZERO_F if x < _MIN_F else v


_L2E_D = 1.4426950408889634
_MAGIC_D = 6755399441055744.0 + 1023.0  # 1.5 * 2^52 + exponent bias
_LN2_HI_D = 6.93147180369123816490e-01  # fdlibm's split: 32 trailing zero bits
_LN2_LO_D = 1.90821492927058770002e-10
_MIN_D = -708.7  # -1022.5 ln2
_Q_D = (
    2.5105217004720745e-08,
    2.7626371065696354e-07,
    2.7557255400206422e-06,
    2.480150431378554e-05,
    0.00019841269874820627,
    0.001388888893251478,
    0.008333333333326136,
    0.041666666666573066,
    0.1666666666666667,
    0.5000000000000006,
    1.0,
)
_Q10_D, _Q9_D, _Q8_D, _Q7_D, _Q6_D, _Q5_D, _Q4_D, _Q3_D, _Q2_D, _Q1_D, _Q0_D = _Q_D


@jit
def _exp_f64(x):
    t = x * _L2E_D + _MAGIC_D
    n = t - _MAGIC_D
    r = x - n * _LN2_HI_D
    r = r - n * _LN2_LO_D
    q = _Q10_D * r + _Q9_D
    q = ((((q * r + _Q8_D) * r + _Q7_D) * r + _Q6_D) * r + _Q5_D) * r + _Q4_D
    q = (((q * r + _Q3_D) * r + _Q2_D) * r + _Q1_D) * r + _Q0_D
    v = (q * r + 1.0) * _i64_as_f64(_f64_as_i64(t) << np.int64(52))
    return 0.0 if x < _MIN_D else v


def exp_nonpositive(x):
    """exp(x) for x <= 0 in x's precision, vectorisable; see the notes above."""
    raise NotImplementedError  # only callable from jitted code


@overload(exp_nonpositive)
def _exp_nonpositive(x):
    if x == types.float32:
        return lambda x: _exp_f32(x, _ZERO_F)
    if x == types.float64:
        return lambda x: _exp_f64(x)
    return None


@jit
def _exp_diff_f32(z, m):
    # z - m rounded to float32 is off by up to |z - m| 2^-24, which exp turns into that
    # much relative error (64 ulp at z - m = -100). TwoSum recovers the rounding error
    # and it joins the reduced argument: 0.93 ulp again, for ~8% more time in the loop.
    d = z - m
    bb = d - z
    err = (z - (d - bb)) - (m + bb)
    return _exp_f32(d, err)


def exp_shifted(z, m):
    """exp(z - m) for z <= m, as if z - m were exact; vectorisable."""
    raise NotImplementedError  # only callable from jitted code


@overload(exp_shifted)
def _exp_shifted(z, m):
    if z == types.float32 and m == types.float32:
        return lambda z, m: _exp_diff_f32(z, m)
    if z == types.float64 and m == types.float64:  # rounding z - m costs 1e-16 |z - m|
        return lambda z, m: _exp_f64(z - m)
    return None


@jit
def times(w, x):
    """w * x with 0 * inf = 0: a zero weight removes a -inf log-probability; NaN stays NaN."""
    return 0.0 if w == 0 and math.isinf(x) else w * x


def like(x, a):
    """x converted to the element type of array a, or to the type of float a (float32
    lanes stay float32)."""
    raise NotImplementedError  # only callable from jitted code


@overload(like)
def _like(x, a):
    if (a if isinstance(a, types.Float) else a.dtype) == types.float32:
        return lambda x, a: np.float32(x)
    return lambda x, a: np.float64(x)


# --- log for x >= 1 (small-K kernels) ------------------------------------------------
#
# fdlibm's __ieee754_log with the branches turned into selects, so a loop over it
# vectorises: x = 2^k (1 + f), 1 + f in [sqrt(2)/2, sqrt(2)), s = f / (2 + f),
# log(1 + f) = f - (f^2/2 - s (f^2/2 + R(s^2))), R a degree-7 minimax polynomial, and
# k ln2 added in two parts. Meant for x >= the smallest normal number (the kernels pass
# a sum of exps that is >= 1); NaN and +inf return x. Float64 in and out. Measured max
# error against np.log over [1, 2^20] and around 1: see tests/test_small_k.py.

_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_LN2_HI_LOG = 6.93147180369123816490e-01
_LN2_LO_LOG = 1.90821492927058770002e-10
_MANT_MASK = np.int64(0x000FFFFFFFFFFFFF)
_ONE_EXP = np.int64(0x3FF0000000000000)
_SQRT2_ROUND = np.int64(0x95F64 << 32)  # carries into bit 52 when the mantissa is >= sqrt(2) - 1
_BIT52 = np.int64(1 << 52)


@jit
def log_normal(x):
    """log(x) for a float64 x >= the smallest normal number (< 1 ulp), vectorisable."""
    bits = _f64_as_i64(x)
    mant = bits & _MANT_MASK
    i = (mant + _SQRT2_ROUND) & _BIT52
    k = (bits >> np.int64(52)) - np.int64(1023) + (i >> np.int64(52))
    f = _i64_as_f64(mant | (i ^ _ONE_EXP)) - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    dk = float(k)
    v = dk * _LN2_HI_LOG - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO_LOG)) - f)
    return v if x < np.inf else x


@jit
def lse_minus_target(s_other, e_y, zy):
    """log(s_other + e_y) - zy with e_y = exp(zy), zy = z_y - max: the integer-target loss
    log(sum_j exp(z_j - z_y)). While e_y has not underflowed it is taken as
    log1p(s_other / e_y), so a tiny loss (a confident, right prediction) keeps its
    relative digits: with u = 1 + x rounded, log1p(x) = log(u) - ((u - 1) - x) / u.
    One log and selects, no branch: the small-K kernels vectorise this across rows.
    1 / u is taken as e_y / s, s = s_other + e_y: the kernels divide by s anyway (one
    division fewer where vdivpd bounds the loop), and the correction is a rounding
    error, which a relative 1e-16 more does not change."""
    x = s_other / e_y
    as_ratio = e_y > 1e-30
    u = 1.0 + x if as_ratio else s_other + e_y
    correction = ((u - 1.0) - x) * (e_y * (1.0 / (s_other + e_y))) if as_ratio else zy
    return log_normal(u) - correction
