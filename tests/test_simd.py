"""The explicit-SIMD intrinsics of fastsce._kernels.vec, one by one against NumPy."""

import numba
import numpy as np
import pytest
from numba.core.unsafe.refcount import get_refcount

from fastsce._kernels.half import bits_view
from fastsce._kernels.jit import borrowed, keep_alive
from fastsce._kernels.simd import product, scaled
from fastsce._kernels.vec import (
    bfloat16_bits_to_float32,
    float16_bits_to_float32,
    float32_to_bfloat16_bits,
    float32_to_float16_bits,
    lanes,
    load_rows,
    narrow,
    prefetch,
    store_rows,
    transpose,
    transpose_indices,
    widen,
)

ml_dtypes = pytest.importorskip("ml_dtypes")

FLOATS = [np.float32, np.float64]


def width(dtype):
    return lanes(numba.from_dtype(np.dtype(dtype)))


@numba.njit
def _copy_block(a, start, stride, rows, cols, out, o_start, o_stride):
    store_rows(out, o_start, o_stride, rows, cols, load_rows(a, start, stride, rows, cols))


@numba.njit
def _transposed(a, out):
    store_rows(out, 0, out.shape[1], out.shape[0], out.shape[1], transpose(load_rows(a, 0, a.shape[1], a.shape[0], a.shape[1])))


@numba.njit
def _widened(h, out):
    w = out.shape[1]
    store_rows(out, 0, w, w, w, widen(load_rows(h, 0, w, w, w)))


@numba.njit
def _narrowed(x, out):
    w = x.shape[1]
    store_rows(out, 0, w, w, w, narrow(load_rows(x, 0, w, w, w), out))


@numba.njit
def _prefetched(a, i):
    prefetch(a, i)
    return a[i]


@numba.njit
def _prefetched_both(a, b, i):
    prefetch(a, i)  # two element types in one function: one declaration of llvm.prefetch
    prefetch(b, i)
    return a[i] + b[i]


@pytest.mark.parametrize("dtype", FLOATS + [np.int16, np.uint16])
@pytest.mark.parametrize("rows, cols", [(16, 16), (3, 5), (16, 1), (0, 7), (8, 8), (5, 0)])
def test_load_and_store_rows_move_only_the_masked_elements(dtype, rows, cols):
    w = width(dtype)
    rows, cols = min(rows, w), min(cols, w)
    stride = 11 if cols <= 11 else w + 3
    a = (np.arange(3 + w * stride + w) % 1000 + 100).astype(dtype)
    out = np.full(2 + w * (w + 1), 99, dtype=dtype)
    _copy_block(a, 3, stride, rows, cols, out, 2, w + 1)
    expect = np.full_like(out, 99)
    for i in range(rows):
        expect[2 + i * (w + 1) : 2 + i * (w + 1) + cols] = a[3 + i * stride : 3 + i * stride + cols]
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("dtype", FLOATS + [np.int16])
def test_transpose_is_numpys(dtype):
    w = width(dtype)
    a = np.arange(w * w).astype(dtype).reshape(w, w)
    out = np.zeros_like(a)
    _transposed(a, out)
    np.testing.assert_array_equal(out, a.T)


@pytest.mark.parametrize("w", [4, 8, 16])
def test_transpose_stages_are_a_transpose(w):
    """The stage masks alone, applied as NumPy would: every bit of row and lane swapped."""
    m = np.arange(w * w).reshape(w, w)
    bit = w // 2
    while bit:
        low, high = transpose_indices(w, bit)
        for i in range(w):
            if i & bit == 0:
                both = np.concatenate([m[i], m[i | bit]])
                m[i], m[i | bit] = both[low], both[high]
        bit //= 2
    np.testing.assert_array_equal(m, np.arange(w * w).reshape(w, w).T)


def _special_float32(n, seed=0):
    """Values across float32's range, half subnormals, NaN, infinities, ties."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))).astype(np.float32)
    x[:12] = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 6e-8, 3e-8, 1e-45, 1.0 + 2**-11, -1e-40]
    return x


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_widen_is_numpys(half):
    with np.errstate(over="ignore"):  # beyond float16: inf
        x = _special_float32(256).astype(ml_dtypes.bfloat16 if half == "bfloat16" else np.float16)
    bits = bits_view(x).reshape(16, 16)
    out = np.zeros((16, 16), np.float32)
    _widened(bits, out)
    np.testing.assert_array_equal(out, x.astype(np.float32).reshape(16, 16))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_narrow_rounds_to_nearest_even(half):
    dtype = ml_dtypes.bfloat16 if half == "bfloat16" else np.float16
    x = _special_float32(256, seed=1)
    out_bits = bits_view(np.zeros(256, dtype)).reshape(16, 16)
    _narrowed(x.reshape(16, 16), out_bits)
    got = out_bits.view(dtype).reshape(-1).astype(np.float32)
    with np.errstate(over="ignore"):
        expect = x.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(got, expect)  # NaN == NaN here
    np.testing.assert_array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(x[~np.isnan(got)]))


@pytest.mark.parametrize("dtype", FLOATS)
def test_floats_pass_widen_and_narrow_unchanged(dtype):
    w = width(dtype)
    x = np.random.default_rng(2).standard_normal((w, w)).astype(dtype)
    out = np.zeros_like(x)
    _widened(x, out)
    np.testing.assert_array_equal(out, x)
    _narrowed(x, out)
    np.testing.assert_array_equal(out, x)


def test_prefetch_changes_nothing():
    a = np.arange(100.0)
    assert _prefetched(a, 50) == 50.0
    np.testing.assert_array_equal(a, np.arange(100.0))
    b = np.arange(100, dtype=np.uint16)
    assert _prefetched_both(b, a.astype(np.float32), 7) == 14.0


@numba.njit
def _scalar_conversions(bits, x, out_f32, out_bits, bf16):
    """Each element through the scalar intrinsics of float16 (bf16 False) or bfloat16."""
    for i in range(bits.size):
        out_f32[i] = bfloat16_bits_to_float32(bits[i]) if bf16 else float16_bits_to_float32(bits[i])
    for i in range(x.size):
        out_bits[i] = float32_to_bfloat16_bits(x[i]) if bf16 else float32_to_float16_bits(x[i])


def test_scalar_float16_conversions_are_numpys():
    every = np.arange(1 << 16).astype(np.uint16)  # every float16, NaNs and subnormals included
    x = _special_float32(4096, seed=3)
    out_f32 = np.zeros(every.size, np.float32)
    out_bits = np.zeros(x.size, np.uint16)
    _scalar_conversions(every, x, out_f32, out_bits, False)
    np.testing.assert_array_equal(out_f32, every.view(np.float16).astype(np.float32))
    with np.errstate(over="ignore"):
        expect = x.astype(np.float16)
    got = out_bits.view(np.float16)
    np.testing.assert_array_equal(got, expect)
    finite = ~np.isnan(expect)
    np.testing.assert_array_equal(out_bits[finite], expect.view(np.uint16)[finite])  # bit for bit, signs too


def test_scalar_bfloat16_conversions_are_ml_dtypes():
    every = np.arange(1 << 16).astype(np.uint16).view(np.int16)  # every bfloat16, NaNs and subnormals included
    x = _special_float32(4096, seed=4)
    x[-4:] = [np.float32(1 + 2**-8), np.float32(1 + 3 * 2**-8), np.float32(-(1 + 2**-8)), np.float32(3.4e38)]  # ties, overflow
    out_f32 = np.zeros(every.size, np.float32)
    out_bits = np.zeros(x.size, np.int16)
    _scalar_conversions(every, x, out_f32, out_bits, True)
    want = every.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(out_f32.view(np.uint32), want.view(np.uint32))  # bit for bit, NaN payloads too
    with np.errstate(over="ignore"):
        expect = x.astype(ml_dtypes.bfloat16)
    got = out_bits.view(ml_dtypes.bfloat16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(out_bits[finite], expect.view(np.int16)[finite])
    assert np.all(np.isnan(got[~finite].astype(np.float32)))


@numba.njit
def _refcounts_around_views(a, borrow):
    before = get_refcount(a)
    b = borrowed(a) if borrow else a
    head, tail = b[:2], b[2:]  # two views, alive past the second count
    during = get_refcount(a)
    total = head.sum() + tail.sum()
    keep_alive(a)
    return before, during, total


def test_views_of_a_borrowed_array_hold_no_reference():
    # A view of a counted array holds a reference (the control case shows the test can
    # fail); a borrowed array's views do not, and read the same memory.
    a = np.arange(5.0)
    before, during, total = _refcounts_around_views(a, False)
    assert during > before and total == 10.0
    before, during, total = _refcounts_around_views(a, True)
    assert during == before and total == 10.0


@numba.njit(fastmath={"contract"})
def _product_minus(a, x, m, out):
    for j in range(x.size):
        out[j] = product(a, x[j]) - m


@numba.njit(fastmath={"contract"})
def _times_minus(a, x, m, out):
    for j in range(x.size):
        out[j] = a * x[j] - m


@numba.njit
def _scaled_or_not(x, a):
    return scaled(x, a), scaled(x, None)


@pytest.mark.parametrize("dtype", FLOATS)
def test_product_is_rounded_before_a_subtraction(dtype):
    """product(a, x) - m is two roundings, as a scaled row stored and read back gives, even
    where "contract" lets LLVM fuse a x - m into one FMA (the control case: that it does
    here shows the test can fail)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(4096).astype(dtype)
    a, m = dtype(0.7305), dtype(0.25)
    want = (a * x) - m  # NumPy: the product rounded, then the difference
    got = np.empty_like(x)
    _product_minus(a, x, m, got)
    np.testing.assert_array_equal(got, want)
    fused = np.empty_like(x)
    _times_minus(a, x, m, fused)
    assert np.any(fused != want)
    assert _scaled_or_not(dtype(1.5), dtype(3.0)) == (4.5, 1.5)
