"""fastsce.softmax, log_softmax and logsumexp: fast against the NumPy reference, SciPy
and PyTorch over dtypes, shapes, axes and layouts; out= and in place; special values
(as PyTorch); the identities between the three; property tests with Hypothesis.
"""

import concurrent.futures
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastsce
from _cases import assert_close, assert_unchanged, seed_of, snapshot
from fastsce import api, reference

FUNCTIONS = ("softmax", "log_softmax", "logsumexp")
DTYPES = {"f32": np.float32, "f64": np.float64, "f16": np.float16}
try:
    import ml_dtypes

    DTYPES["bf16"] = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    pass

# (shape, axis)
SHAPES = {
    "K1": ((64, 1), -1),
    "K10": ((300, 10), -1),
    "K1000": ((64, 1000), -1),
    "K40000": ((3, 40000), -1),
    "3d-axis0": ((7, 5, 6), 0),
    "3d-axis1": ((4, 9, 6), 1),
    "3d-axis-1": ((4, 5, 11), -1),
    "1d": ((17,), 0),
}


def make_x(shape, dtype, *parts, scale=4.0):
    rng = np.random.default_rng(seed_of(shape, *parts))
    return (scale * rng.standard_normal(shape)).astype(dtype)


def call(module, name, x, axis=-1, **kwargs):
    return getattr(module, name)(x, axis, **kwargs)


def f32(a):
    """Half-precision results compared in float32 (with the half dtype's tolerance)."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.itemsize == 2 else a


def check(got, want, dtype):
    got, want = f32(got), f32(want)
    assert got.shape == want.shape
    assert_close(got, want, dtype, unit=1.0)


def rounded(values, dtype):
    """A float64 result rounded to ``dtype``, as a library computing in float64 returns it."""
    return np.asarray(values, np.float64).astype(dtype)


def scipy_result(name, x, axis):
    special = pytest.importorskip("scipy.special")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return getattr(special, name)(x.astype(np.float64), axis=axis)


def torch_result(name, x, axis):
    torch = pytest.importorskip("torch")
    # torch on x's own dtype (float32 for the half dtypes: what fastsce computes in)
    t = torch.from_numpy(np.ascontiguousarray(x, np.float64 if x.dtype == np.float64 else np.float32))
    return getattr(torch, name)(t, axis).numpy()


# --- against the reference, SciPy and PyTorch -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_matches_reference_scipy_and_torch(name, shape, dtype):
    dt = np.dtype(DTYPES[dtype])
    shape, axis = SHAPES[shape]
    x = make_x(shape, dt, name)
    before = snapshot(x)
    got = call(fastsce, name, x, axis)
    want_shape = shape if name != "logsumexp" else shape[:axis % len(shape)] + shape[axis % len(shape) + 1 :]
    assert np.shape(got) == want_shape and np.asarray(got).dtype == dt
    check(got, call(reference, name, x, axis), dt)
    check(got, rounded(scipy_result(name, x, axis), dt), dt)
    check(got, rounded(torch_result(name, x, axis), dt), dt)
    assert_unchanged(before)


def test_logsumexp_of_one_row_is_a_scalar():
    x = make_x((9,), np.float32, "scalar")
    got = fastsce.logsumexp(x)
    assert isinstance(got, np.float32)
    assert isinstance(reference.logsumexp(x), np.float32)
    assert_close(got, reference.logsumexp(x), np.float32)


@pytest.mark.parametrize("axis", (0, 1, 2, -1))
def test_logsumexp_keepdims(axis):
    x = make_x((3, 4, 5), np.float64, "keepdims")
    got = fastsce.logsumexp(x, axis, keepdims=True)
    assert got.shape == np.sum(x, axis=axis, keepdims=True).shape
    assert_close(got, reference.logsumexp(x, axis, keepdims=True), np.float64)
    np.testing.assert_array_equal(np.squeeze(got, axis), fastsce.logsumexp(x, axis))


# --- layouts, out=, in place ------------------------------------------------------------------

LAYOUTS = {
    "C": lambda x: x,
    "F": np.asfortranarray,
    "transposed": lambda x: x.T.copy().T,  # an F-ordered view of a C array
    "strided": lambda x: np.repeat(x, 2, axis=-1)[..., ::2],
    "reversed": lambda x: x[::-1, ::-1].copy()[::-1, ::-1],
}


@pytest.mark.parametrize("blocks", ("one", "many"))
@pytest.mark.parametrize("axis", (0, -1))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_any_layout_equals_c_contiguous(name, layout, axis, blocks, monkeypatch):
    if blocks == "many":  # a handful of rows per copied block
        monkeypatch.setattr(api, "COPY_BLOCK_LOGITS", 40)
    c = make_x((37, 13), np.float32, "layout")
    x = LAYOUTS[layout](c)
    np.testing.assert_array_equal(x, c)
    want = call(fastsce, name, np.ascontiguousarray(np.moveaxis(c, axis, -1)), -1)
    got = call(fastsce, name, x, axis)
    if name != "logsumexp":
        got = np.moveaxis(got, axis, -1)
    # Not bitwise: a block copy and its output buffer can sit close enough in memory for
    # LLVM's runtime overlap check to pick the scalar loop, which sums in another order.
    check(got, want, np.float32)


OUTS = {
    "C": lambda shape, dtype: np.empty(shape, dtype),
    "F": lambda shape, dtype: np.empty(shape, dtype, order="F"),
    "strided": lambda shape, dtype: np.empty(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2],
}


@pytest.mark.parametrize("dtype", ("f32", "f64", "f16"))
@pytest.mark.parametrize("out_layout", OUTS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_out(name, out_layout, dtype):
    dt = np.dtype(DTYPES[dtype])
    x = make_x((6, 8, 5), dt, "out")
    for axis in (0, 1, 2):
        shape = x.shape if name != "logsumexp" else x.shape[:axis] + x.shape[axis + 1 :]
        out = OUTS[out_layout](shape, dt)
        before = snapshot(x)
        got = call(fastsce, name, x, axis, out=out)
        assert got is out
        check(out, call(fastsce, name, x, axis), dt)
        assert_unchanged(before)
        ref_out = OUTS[out_layout](shape, dt)
        assert call(reference, name, x, axis, out=ref_out) is ref_out
        check(out, ref_out, dt)


@pytest.mark.parametrize("long_rows", (False, True))
@pytest.mark.parametrize("dtype", ("f32", "f64", "f16"))
@pytest.mark.parametrize("axis", (0, -1))
@pytest.mark.parametrize("name", ("softmax", "log_softmax"))
def test_in_place(name, axis, dtype, long_rows, monkeypatch):
    if long_rows:
        monkeypatch.setattr(api, "LONG_ROW_BYTES", 1024)
    dt = np.dtype(DTYPES[dtype])
    x = make_x((9, 3000), dt, "in-place")
    x[1, :1500] = -np.inf  # masked entries, a whole first block of a long row among them
    x[2, 2999] = 40  # the max in the last block: a running max rises late
    original = x.copy()
    want = call(fastsce, name, x, axis)
    got = call(fastsce, name, x, axis, out=x)
    assert got is x
    check(x, want, dt)
    check(x, call(reference, name, original, axis), dt)


def test_in_place_matches_reference():
    x = make_x((50, 1000), np.float32, "in-place-ref")
    for name in ("softmax", "log_softmax"):
        y = x.copy()
        fastsce_result = call(fastsce, name, y, out=y)
        check(fastsce_result, call(reference, name, x), np.float32)
        z = x.copy()
        assert call(reference, name, z, out=z) is z
        check(z, call(reference, name, x), np.float32)


# --- long rows: one streaming read with a running max ---------------------------------------


@pytest.mark.parametrize("dtype", ("f32", "f64"))
@pytest.mark.parametrize("name", FUNCTIONS)
def test_long_rows_forced(name, dtype, monkeypatch):
    monkeypatch.setattr(api, "LONG_ROW_BYTES", 1024)
    dt = np.dtype(DTYPES[dtype])
    x = make_x((8, 5000), dt, "long", name)
    x[0] += np.linspace(0, 60, 5000).astype(dt)  # the max rises block after block
    x[1, :2048] = -np.inf  # leading blocks entirely masked
    x[2, 4000] = np.inf  # +inf in a late block
    x[3, 4500] = np.nan  # NaN in a late block
    x[4, 10] = np.nan  # NaN in an early block, then a larger finite max later
    x[4, 4999] = 1e3
    x[5, :] = -np.inf  # all masked
    x[6, 100] = np.nan  # NaN, then +inf later
    x[6, 4900] = np.inf
    got = call(fastsce, name, x)
    check(got, call(reference, name, x), dt)
    check(got, torch_result(name, x, -1), dt)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_long_rows_beyond_the_threshold(name):
    k = api.LONG_ROW_BYTES // 4 + 1000  # float32 rows just past LONG_ROW_BYTES
    x = make_x((2, k), np.float32, "long-real", name)
    check(call(fastsce, name, x), call(reference, name, x), np.float32)


# --- special values, as PyTorch ---------------------------------------------------------------

INF, NAN = np.inf, np.nan
SPECIAL_ROWS = {
    "all -inf": [-INF, -INF, -INF],
    "some -inf": [-INF, 0.0, 1.0],
    "+inf": [INF, 0.0, 1.0],
    "two +inf": [INF, INF, 0.0],
    "+inf and -inf": [INF, -INF, 0.0],
    "NaN": [NAN, 0.0, 1.0],
    "NaN and +inf": [NAN, INF, 0.0],
    "NaN and -inf": [-INF, NAN, -INF],
}


@pytest.mark.parametrize("dtype", ("f32", "f64"))
@pytest.mark.parametrize("row", SPECIAL_ROWS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_special_values_as_torch(name, row, dtype):
    torch = pytest.importorskip("torch")
    dt = np.dtype(DTYPES[dtype])
    x = np.array([SPECIAL_ROWS[row], [0.5, -1.0, 2.0]], dt)  # a finite row alongside
    want = getattr(torch, name)(torch.from_numpy(x), -1).numpy()
    for module in (fastsce, reference):
        got = call(module, name, x)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got) & (got > 0), np.isinf(want) & (want > 0))
        np.testing.assert_array_equal(np.isinf(got) & (got < 0), np.isinf(want) & (want < 0))
        assert_close(got, want, dt, unit=1.0)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_one_class(name):
    x = np.array([[3.0], [-np.inf], [np.inf], [np.nan], [-1e300]])
    torch = pytest.importorskip("torch")
    want = getattr(torch, name)(torch.from_numpy(x), -1).numpy()
    np.testing.assert_array_equal(call(fastsce, name, x), want)  # 1 / 0, NaN, x itself
    np.testing.assert_array_equal(call(reference, name, x), want)


@pytest.mark.parametrize("shape, axis", (((0, 5), -1), ((2, 0, 3), -1), ((0,), 0), ((3, 0), -1), ((0, 4), 0)))
@pytest.mark.parametrize("name", FUNCTIONS)
def test_empty(name, shape, axis):
    """No rows: an empty result. No classes (K = 0): an empty softmax, and a logsumexp of
    -inf (log of an empty sum), as in PyTorch (and SciPy's logsumexp)."""
    x = np.zeros(shape, np.float32)
    want = torch_result(name, x, axis)
    for module in (fastsce, reference):
        got = call(module, name, x, axis)
        assert np.shape(got) == np.shape(want) and np.asarray(got).dtype == np.float32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype, big", ((np.float32, 1e4), (np.float64, 1e300)))
@pytest.mark.parametrize("name", FUNCTIONS)
def test_huge_values_do_not_overflow(name, dtype, big):
    rng = np.random.default_rng(seed_of("huge", name))
    x = (big * rng.uniform(-1, 1, (20, 300))).astype(dtype)
    x[:, 7] = big  # a clear max per row
    x[0, :] = big  # a row of ties
    got = call(fastsce, name, x)
    assert np.isfinite(got).all()
    check(got, call(reference, name, x), dtype)
    check(got, torch_result(name, x, -1), dtype)


# --- identities -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ("f32", "f64"))
@pytest.mark.parametrize("k", (1, 10, 1000, 40000))
def test_identities(k, dtype):
    dt = np.dtype(DTYPES[dtype])
    x = make_x((max(1, 40000 // k), k), dt, "identities")
    p = fastsce.softmax(x)
    np.testing.assert_allclose(p.sum(axis=1, dtype=np.float64), 1.0, **reference.TOLERANCE[dt])
    lse = fastsce.logsumexp(x, keepdims=True)
    assert_close(fastsce.log_softmax(x), x - lse, dt, unit=float(np.abs(x).max()))  # x - lse: ulps of |x|
    assert_close(np.exp(fastsce.log_softmax(x).astype(np.float64)), p, dt, unit=1.0)
    # adding a constant to a row changes only logsumexp, by that constant
    c = dt.type(8.0)  # x + 8 is exact for |x| < 2^21 (float32)
    assert_close(fastsce.softmax(x + c), p, dt, unit=1.0)
    assert_close(fastsce.log_softmax(x + c), fastsce.log_softmax(x), dt, unit=1.0)
    assert_close(fastsce.logsumexp(x + c), lse[:, 0] + c, dt, unit=1.0)


def test_threads():
    """Calls from several Python threads, mixed with the loss, give the serial results."""
    x = make_x((512, 700), np.float32, "threads")
    y = np.arange(512) % 700
    jobs = [("softmax", x), ("log_softmax", x), ("logsumexp", x)] * 4
    want = [call(fastsce, name, a) for name, a in jobs]
    loss = fastsce.cross_entropy(x, y)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, fastsce, name, a) for name, a in jobs]
        losses = [pool.submit(fastsce.cross_entropy, x, y) for _ in range(4)]
        for f, w in zip(futures, want):
            np.testing.assert_array_equal(f.result(), w)
        assert all(f.result() == loss for f in losses)


# --- bad input --------------------------------------------------------------------------------

BAD = {
    "int x": (TypeError, dict(x=np.arange(6).reshape(2, 3))),
    "complex x": (TypeError, dict(x=np.ones((2, 3), complex))),
    "0-d x": (ValueError, dict(x=np.float32(1.0))),
    "float axis": (TypeError, dict(axis=1.0)),
    "bool axis": (TypeError, dict(axis=True)),
    "None axis": (TypeError, dict(axis=None)),
    "axis out of range": (ValueError, dict(axis=2)),
    "out shape": (ValueError, dict(out=np.empty((3, 2), np.float32))),
    "out dtype": (ValueError, dict(out="f64")),
    "out not an array": (TypeError, dict(out=[[0.0] * 3] * 2)),
    "out read-only": (ValueError, dict(out="read-only")),
    "out overlapping x": (ValueError, dict(out="overlap")),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_input_raises_the_same_in_both(name, case):
    error, spec = BAD[case]
    x = np.ones((4, 6), np.float32)[:2, :3]
    x = spec.get("x", x)
    axis = spec.get("axis", -1)
    out_shape = x.shape if name != "logsumexp" else x.shape[:-1]
    out = spec.get("out")
    base = np.zeros((4, 6), np.float32)
    kind = out if isinstance(out, str) else None
    if kind == "f64":
        out = np.empty(out_shape, np.float64)
    elif kind == "read-only":
        out = np.empty(out_shape, np.float32)
        out.flags.writeable = False
    elif kind == "overlap":  # x itself inside a larger array, out shifted by a column
        x = base[:2, :3]
        out = base[:2, 1:4] if name != "logsumexp" else base[0, :2]
    kwargs = {} if out is None else {"out": out}
    messages = []
    for module in (fastsce, reference):
        with pytest.raises(error) as info:
            call(module, name, x, axis, **kwargs)
        messages.append(str(info.value))
        assert name in messages[-1]
    assert messages[0] == messages[1]


def test_keepdims_must_be_a_bool():
    for module in (fastsce, reference):
        with pytest.raises(TypeError, match="keepdims"):
            module.logsumexp(np.ones((2, 3)), keepdims="yes")


def test_logsumexp_refuses_out_overlapping_x():
    x = np.ones((3, 3))
    with pytest.raises(ValueError, match="overlaps x"):
        fastsce.logsumexp(x, out=x[0])


# --- property tests ---------------------------------------------------------------------------

finite_rows = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
    elements=dict(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False),
)


@given(x=finite_rows, data=st.data())
def test_property_matches_reference(x, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1), label="axis")
    if data.draw(st.booleans(), label="mask"):  # some -inf, each row keeping a finite max
        mask = data.draw(hnp.arrays(np.bool_, x.shape), label="where")
        x = np.where(mask & (x != x.max(axis=axis, keepdims=True)), -np.inf, x).astype(x.dtype)
    before = snapshot(x)
    for name in FUNCTIONS:
        got = call(fastsce, name, x, axis)
        check(got, call(reference, name, x, axis), x.dtype)
    assert_unchanged(before)


@given(x=finite_rows, c=st.floats(-100, 100, width=16))
def test_property_identities(x, c):
    p = fastsce.softmax(x)
    np.testing.assert_allclose(p.sum(axis=-1, dtype=np.float64), 1.0, **reference.TOLERANCE[x.dtype])
    assert (p >= 0).all() and (p <= 1).all()
    lse = fastsce.logsumexp(x, keepdims=True)
    # x - lse rounds to ulps of |x| (cancelling where x is the max)
    assert_close(fastsce.log_softmax(x), x - lse, x.dtype, unit=max(1.0, float(np.abs(x).max())))
    shifted = (x.astype(np.float64) + c).astype(x.dtype)
    exact = shifted.astype(np.float64) - x.astype(np.float64) == c  # only rows shifted exactly
    rows = exact.all(axis=-1)
    assert_close(fastsce.softmax(shifted)[rows], p[rows], x.dtype, unit=1.0)
    want = np.asarray(lse[..., 0] + x.dtype.type(c))
    assert_close(np.asarray(fastsce.logsumexp(shifted))[rows], want[rows], x.dtype, unit=1.0)


# --- byte order, masked arrays, overlapping out --------------------------------------------


@pytest.mark.parametrize("axis", (0, -1))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_either_byte_order(name, dtype, axis):
    """x (and out) of the non-native byte order give the values of native x, in x's dtype in
    native order ('>f4' / '>f8' used to be refused while '>f2' was computed)."""
    x = make_x((5, 7), DTYPES[dtype], "byte-order")
    other = x.astype(x.dtype.newbyteorder("S"))
    want = call(fastsce, name, x, axis)
    for module in (fastsce, reference):
        got = call(module, name, other, axis)
        assert np.asarray(got).dtype == x.dtype and np.asarray(got).dtype.isnative
        check(got, want, x.dtype)
        out = np.empty_like(np.asarray(want)).astype(other.dtype)
        assert call(module, name, other, axis, out=out) is out
        check(out.astype(x.dtype), want, x.dtype)
    if name != "logsumexp":
        in_place = other.copy()
        assert call(fastsce, name, in_place, axis, out=in_place) is in_place
        check(in_place.astype(x.dtype), want, x.dtype)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_masked_arrays_are_refused(name):
    x = np.ma.array(make_x((3, 4), np.float64, "masked"), mask=np.eye(3, 4, dtype=bool))
    for module in (fastsce, reference):
        with pytest.raises(TypeError, match=f"{name}: x is a numpy.ma masked array|x is a numpy.ma masked array"):
            call(module, name, x)
        out = np.ma.array(np.empty(3 if name == "logsumexp" else (3, 4)))
        with pytest.raises(TypeError, match="out is a numpy.ma masked array"):
            call(module, name, x.data, out=out)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_out_overlapping_itself_is_refused(name):
    x = make_x((3, 4), np.float64, "overlap")
    buf = np.zeros(4)
    shape, strides = ((3,), (0,)) if name == "logsumexp" else ((3, 4), (0, 8))
    out = np.lib.stride_tricks.as_strided(buf, shape, strides, writeable=True)
    for module in (fastsce, reference):
        with pytest.raises(ValueError, match=f"{name}: out has overlapping elements"):
            call(module, name, x, out=out)
