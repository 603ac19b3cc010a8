"""float16 and bfloat16 rows inside the kernels, computed in float32.

Numba has no half-precision arithmetic on the CPU, so half arrays reach the kernels as
their bit patterns: float16 viewed as uint16, bfloat16 as int16 (the signedness of the
view is how a kernel tells the two apart, at compile time). A row is converted to
float32 into a scratch row before anything else and its gradient, formed in float32
(the target's p_y - 1 as -sum_{j != y} p_j, without cancellation), is rounded once,
to nearest even, when stored. The conversions vectorise (no lookup table, no branch):
float16's are LLVM's fpext / fptrunc (vcvtph2ps / vcvtps2ph), bfloat16's integer arithmetic.

The overloads below let one driver serve float and half rows: for float arrays they
fold away at compile time.
"""

import numpy as np
from numba import types
from numba.extending import overload

from fastsce._kernels.jit import copy_into, vector
from fastsce._kernels.simd import like, maximum, prefer_512bit, scaled
from fastsce._kernels.vec import (
    bfloat16_bits_to_float32, float16_bits_to_float32, float32_to_bfloat16_bits, float32_to_float16_bits,
)

# float16 <-> float32 are single instructions (vcvtph2ps / vcvtps2ph) once a loop over
# them vectorises: LLVM's fpext / fptrunc (fastsce._kernels.vec). Measured, the integer
# emulation they replace made float16 rows 1.2x slower than float32 ones at K = 1000.
# bfloat16's rounding is integer arithmetic, kept in 32-bit lanes by vec's intrinsics:
# written in Numba it ran in 64-bit lanes (vpmovzxdq, vpaddq), half as many per instruction.
_float16_to_float32 = float16_bits_to_float32
_float32_to_float16 = float32_to_float16_bits
_bfloat16_to_float32 = bfloat16_bits_to_float32
_float32_to_bfloat16 = float32_to_bfloat16_bits


@vector
def _load_float16(h, out):
    prefer_512bit()
    for j in range(h.size):
        out[j] = _float16_to_float32(h[j])


@vector
def _load_bfloat16(b, out):
    prefer_512bit()
    for j in range(b.size):
        out[j] = _bfloat16_to_float32(b[j])


@vector
def _store_float16(x, h):
    prefer_512bit()
    for j in range(x.size):
        h[j] = _float32_to_float16(x[j])


@vector
def _store_bfloat16(x, b):
    prefer_512bit()
    for j in range(x.size):
        b[j] = _float32_to_bfloat16(x[j])


def _bits(dtype):
    """0 for a float array, 16 for float16 bits (uint16), -16 for bfloat16 bits (int16)."""
    if isinstance(dtype, types.Integer):
        return 16 if not dtype.signed else -16
    return 0


# --- the overloads the drivers call --------------------------------------------------------


def is_half(z):
    """True when z holds half-precision bits (compile-time constant)."""


def float_rows(z):
    """z itself for float rows; for half rows a stand-in never read (they always go
    through a converted scratch row), so the float code path still compiles."""


def scratch_row(z, k):
    """An empty row of k elements of z's compute dtype."""


def load_row(src, dst):
    """dst = src as floats: a conversion for half rows, a copy otherwise."""


def store_row(src, dst):
    """dst = src (float32 or float) rounded to dst's half dtype, or copied."""


def as_float(x):
    """One element as a float: a half's bits converted, a float unchanged."""


def as_stored(x, a):
    """One float element as a's element: rounded to half bits, or cast to a's float."""


def grad_row(g, i, scratch):
    """Where row i's gradient is formed: g[i] itself, or the float32 scratch for half g."""


def store_grad_row(g, i, scratch):
    """Round a half row's gradient from the scratch into g[i] (nothing for float g)."""


@overload(is_half)
def _is_half(z):
    half = _bits(z.dtype) != 0
    return lambda z: half


@overload(float_rows)
def _float_rows(z):
    if _bits(z.dtype):
        return lambda z: np.empty((0, z.shape[1]), np.float32)
    return lambda z: z


@overload(scratch_row)
def _scratch_row(z, k):
    if _bits(z.dtype):
        return lambda z, k: np.empty(k, np.float32)
    return lambda z, k: np.empty(k, z.dtype)


@overload(load_row)
def _load_row(src, dst):
    bits = _bits(src.dtype)
    if bits == 16:
        return lambda src, dst: _load_float16(src, dst)
    if bits == -16:
        return lambda src, dst: _load_bfloat16(src, dst)

    return lambda src, dst: copy_into(dst, src)


@overload(store_row)
def _store_row(src, dst):
    bits = _bits(dst.dtype)
    if bits == 16:
        return lambda src, dst: _store_float16(src, dst)
    if bits == -16:
        return lambda src, dst: _store_bfloat16(src, dst)

    return lambda src, dst: copy_into(dst, src)


@overload(as_float)
def _as_float(x):
    if isinstance(x, types.Integer):
        if x.signed:
            return lambda x: _bfloat16_to_float32(x)
        return lambda x: _float16_to_float32(x)
    return lambda x: x


@overload(as_stored)
def _as_stored(x, a):
    bits = _bits(a.dtype)
    if bits == 16:
        return lambda x, a: np.uint16(_float32_to_float16(np.float32(x)))
    if bits == -16:
        return lambda x, a: np.int16(_float32_to_bfloat16(np.float32(x)))
    dtype = a.dtype
    return lambda x, a: dtype(x)


@overload(grad_row)
def _grad_row(g, i, scratch):
    if _bits(g.dtype):
        return lambda g, i, scratch: scratch
    return lambda g, i, scratch: g[i]


@overload(store_grad_row)
def _store_grad_row(g, i, scratch):
    if _bits(g.dtype):
        return lambda g, i, scratch: store_row(scratch, g[i])
    return lambda g, i, scratch: None


# --- conversions fused into a kernel's passes over the row ------------------------------------
#
# A half row's conversions, each a pass of its own, made it slower than a float32 row of
# the same shape at K >= 1000, where the passes over a row in cache bound the kernel:
# so the row's max joins the pass converting it in, and the gradient's scaling the pass
# rounding it out.


@vector
def load_row_max(src, dst, a):
    """dst = a src as float32, each product rounded (simd.product: the values a scaled
    float32 row holds; a None: src as it is); returns max(dst), NaN-propagating."""
    prefer_512bit()
    m = like(-np.inf, dst)
    for j in range(src.size):
        x = scaled(as_float(src[j]), a)
        dst[j] = x
        m = maximum(m, x)
    return m


@vector
def store_scaled(x, f, h):
    """h = f x, rounded to h's half dtype."""
    prefer_512bit()
    for j in range(x.size):
        h[j] = as_stored(f * x[j], h)


@vector
def store_scaled_minus(x, f, b, w, h):
    """h = f x - b w, rounded to h's half dtype."""
    prefer_512bit()
    for j in range(x.size):
        h[j] = as_stored(f * x[j] - b * w[j], h)


def bits_view(a: np.ndarray) -> np.ndarray:
    """How a float16 / bfloat16 array is passed to the kernels (others unchanged)."""
    if a.dtype.itemsize != 2:
        return a
    if a.dtype == np.float16:
        return a.view(np.uint16)
    if a.dtype.name == "bfloat16":
        return a.view(np.int16)
    return a
