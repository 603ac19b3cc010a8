"""The fast path of the common call (fastsce.api._fast) and the general path give the same
results, bit for bit, and the same errors: each call is made twice, once as it comes and once
with the fast path turned off."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastsce
from fastsce import _threads, api


def both_ways(monkeypatch, call):
    """(what call() gives with the fast path, without it, whether the fast path answered):
    a result, or the exception's type and message."""
    taken = []
    fast = api._fast

    def spy(*args):
        result = fast(*args)
        taken.append(result is not None)
        return result

    def outcome():
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - compared as type and message
            return type(e), str(e)

    monkeypatch.setattr(api, "_fast", spy)
    with_fast = outcome()
    monkeypatch.setattr(api, "_fast", lambda *args: None)
    without = outcome()
    monkeypatch.setattr(api, "_fast", fast)
    return with_fast, without, any(taken)


def assert_same(a, b):
    if isinstance(a, tuple) and a and isinstance(a[0], type):  # an error: (type, message)
        assert a == b
        return
    if not isinstance(a, tuple):
        a, b = (a,), (b,)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y)
        np.testing.assert_array_equal(x, y, strict=True)


def problem(n, k, dtype=np.float32, label_dtype=np.int64, seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, k)) * 3).astype(dtype)
    y = rng.integers(0, k, n).astype(label_dtype)
    return z, y


# (N, K): one row, one class, small K (tile kernels), large K (row kernels), a long row
# (two-read gradient), above SERIAL_LOGITS (the thread pool), several tile chunks
SHAPES = [(1, 10), (64, 10), (5, 1), (20, 1000), (300, 300), (2, 300_000), (5000, 7)]
# float16 / bfloat16 logits take the fast path too (computed in float32, the kernels reading their bits)
DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path_gives_the_general_results(monkeypatch, n, k, dtype):
    label_dtype = (np.int64, np.int32)[(n + k) % 2]  # both, over the shapes
    z, y = problem(n, k, dtype, label_dtype)
    y_ignored = y.copy()
    y_ignored[n // 2] = -100  # a row that does not count
    for reduction in ("mean", "sum", "none"):
        for kwargs in (
            {"target": y_ignored},
            {"target": y_ignored, "label_smoothing": 0.1},
            {"target": y, "ignore_index": int(y[0]), "all_ignored": "zero"},
        ):
            kw = dict(reduction=reduction, **kwargs)
            for call in (
                lambda: fastsce.cross_entropy(z, **kw),
                lambda: fastsce.cross_entropy_with_grad(z, **kw),
                lambda: fastsce.cross_entropy_with_grad(z, out=np.full_like(z, np.nan), **kw),
            ):
                got, want, taken = both_ways(monkeypatch, call)
                assert taken, kw
                assert_same(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path_in_place_and_axis_1(monkeypatch, dtype):
    z, y = problem(64, 10, dtype)
    for kwargs in ({}, {"axis": 1}, {"axis": -1, "label_smoothing": 1}):
        results = []
        for use_fast in (True, False):
            x = z.copy()
            call = lambda: fastsce.cross_entropy_with_grad(x, y, out=x, **kwargs)  # noqa: E731
            if not use_fast:
                monkeypatch.setattr(api, "_fast", lambda *args: None)
            results.append(call())
            monkeypatch.undo()
            assert results[-1][1] is x
        assert_same(results[0], results[1])


def test_fast_path_on_the_thread_pool_and_serially(monkeypatch):
    z, y = problem(300, 300)
    for limit in (-1, 1 << 62):
        monkeypatch.setattr(_threads, "SERIAL_LOGITS", limit)
        got, want, taken = both_ways(monkeypatch, lambda: fastsce.cross_entropy_with_grad(z, y))
        assert taken
        assert_same(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path_edge_values(monkeypatch, dtype):
    """inf / NaN logits, a loss beyond the dtype's range, every row ignored, read-only inputs."""
    big = float(ml_dtypes.finfo(dtype).max) / 2
    z = np.array([[big, -big, 0.0], [-np.inf, 1.0, 2.0], [np.nan, 0.0, 0.0], [1.0, np.inf, 0.0]], dtype)
    y = np.array([1, 0, 2, 1])
    cases = [(z, y), (z[:2], y[:2]), (z[[0, 0]], y[[0, 0]]), (z, np.full(4, -100))]
    ro_z, ro_y = z.copy(), y.copy()
    ro_z.flags.writeable = ro_y.flags.writeable = False
    cases.append((ro_z, ro_y))
    for zz, yy in cases:
        for reduction in ("mean", "sum", "none"):
            for all_ignored in ("nan", "zero"):
                for call in (
                    lambda: fastsce.cross_entropy(zz, yy, reduction=reduction, all_ignored=all_ignored),
                    lambda: fastsce.cross_entropy_with_grad(zz, yy, reduction=reduction, all_ignored=all_ignored),
                ):
                    got, want, taken = both_ways(monkeypatch, call)
                    assert taken
                    assert_same(got, want)


def _bad_calls():
    z, y = problem(8, 5)
    ro = np.empty_like(z)
    ro.flags.writeable = False
    yield "label out of range", lambda: fastsce.cross_entropy(z, np.array([0, 1, 2, 3, 4, 5, 0, 1]))
    yield "negative label", lambda: fastsce.cross_entropy_with_grad(z, np.array([0, 1, 2, 3, 4, -1, 0, 1]))
    yield "label out of range, out=", lambda: fastsce.cross_entropy_with_grad(z, y + 5, out=np.empty_like(z))
    target_buffer = np.zeros(80, np.int64)
    yield "out shares target's memory", lambda: fastsce.cross_entropy_with_grad(
        np.zeros((8, 10)), target_buffer[:8], out=target_buffer.view(np.float64).reshape(8, 10)
    )
    shared = np.zeros((9, 10), np.float32)
    yield "out overlaps logits (shifted)", lambda: fastsce.cross_entropy_with_grad(shared[:8], y, out=shared[1:])
    yield "out read-only", lambda: fastsce.cross_entropy_with_grad(z, y, out=ro)
    yield "out wrong dtype", lambda: fastsce.cross_entropy_with_grad(z, y, out=np.empty(z.shape, np.float64))
    yield "out wrong shape", lambda: fastsce.cross_entropy_with_grad(z, y, out=np.empty((8, 6), np.float32))
    yield "out not an array", lambda: fastsce.cross_entropy_with_grad(z, y, out=[[0.0] * 5] * 8)
    yield "out masked", lambda: fastsce.cross_entropy_with_grad(z, y, out=np.ma.masked_array(np.empty_like(z)))
    yield "no classes", lambda: fastsce.cross_entropy(np.empty((8, 0), np.float32), y)
    yield "target shape", lambda: fastsce.cross_entropy(z, y[:7])
    yield "float target", lambda: fastsce.cross_entropy(z, y.astype(np.float32))
    yield "masked logits", lambda: fastsce.cross_entropy(np.ma.masked_array(z), y)
    yield "bool axis", lambda: fastsce.cross_entropy(z, y, axis=True)
    yield "axis 0", lambda: fastsce.cross_entropy(z, y, axis=0)
    yield "axis 2", lambda: fastsce.cross_entropy(z, y, axis=2)
    yield "bool ignore_index", lambda: fastsce.cross_entropy(z, y, ignore_index=True)
    yield "huge ignore_index", lambda: fastsce.cross_entropy(z, y, ignore_index=1 << 63)
    yield "float ignore_index", lambda: fastsce.cross_entropy(z, y, ignore_index=1.0)
    yield "reduction", lambda: fastsce.cross_entropy(z, y, reduction="avg")
    yield "reduction not a string", lambda: fastsce.cross_entropy(z, y, reduction=None)
    yield "all_ignored", lambda: fastsce.cross_entropy(z, y, all_ignored="inf")
    yield "label_smoothing > 1", lambda: fastsce.cross_entropy(z, y, label_smoothing=1.5)
    yield "label_smoothing NaN", lambda: fastsce.cross_entropy(z, y, label_smoothing=float("nan"))
    yield "label_smoothing bool", lambda: fastsce.cross_entropy(z, y, label_smoothing=True)
    yield "label_smoothing string", lambda: fastsce.cross_entropy(z, y, label_smoothing="0.1")
    yield "z_loss < 0", lambda: fastsce.cross_entropy(z, y, z_loss=-1.0)
    yield "z_loss NaN", lambda: fastsce.cross_entropy_with_grad(z, y, z_loss=float("nan"))
    yield "return_lse not a bool", lambda: fastsce.cross_entropy(z, y, return_lse=None)
    yield "uint64 label beyond int64", lambda: fastsce.cross_entropy(z, np.full(8, 1 << 63, np.uint64))


def test_fast_path_declines_what_it_does_not_handle(monkeypatch):
    """Inputs it leaves to the general path still get the general path's results."""
    z, y = problem(16, 5)

    def in_place_through_a_view():  # out= another array object on the logits' memory
        x = z.copy()
        return fastsce.cross_entropy_with_grad(x, y, out=x[:])

    calls = [
        lambda: fastsce.cross_entropy(np.asfortranarray(z), y),  # another layout
        lambda: fastsce.cross_entropy(z.astype(">f4"), y),  # another byte order
        lambda: fastsce.cross_entropy(z, y.astype(np.uint8)),  # other label dtypes
        lambda: fastsce.cross_entropy(z, y.astype(np.int16)),
        lambda: fastsce.cross_entropy(z.reshape(4, 4, 5), y.reshape(4, 4)),  # 3-d
        lambda: fastsce.cross_entropy(z[0], y[0]),  # one row, 1-d
        lambda: fastsce.cross_entropy(z.tolist(), y.tolist()),  # lists
        lambda: fastsce.cross_entropy(z, y[::-1]),  # strided labels
        lambda: fastsce.cross_entropy_with_grad(z[:0], y[:0]),  # no rows
        lambda: fastsce.cross_entropy(z, y, label_smoothing=np.float64(0.1)),
        lambda: fastsce.cross_entropy(z, y, ignore_index=np.int64(2)),
        lambda: fastsce.cross_entropy(z, y, return_lse=np.False_),
        lambda: fastsce.cross_entropy_with_grad(z, y, out=np.asfortranarray(np.empty_like(z))),
        lambda: fastsce.cross_entropy_with_grad(z, y, out=np.empty(z.shape, ">f4")),
        in_place_through_a_view,
    ]
    for i, call in enumerate(calls):
        got, want, taken = both_ways(monkeypatch, call)
        assert not taken, i
        assert_same(got, want)


# --- the options the fast path takes: weight, sample_weight, where, z_loss, logit_scale,
# softcap, return_z_loss, return_lse -------------------------------------------------------


def _option_sets(rng, n, k):
    v = rng.uniform(0, 2, n) * (rng.random(n) > 0.2)  # some rows of weight 0
    keep = rng.random(n) > 0.3
    return [
        dict(weight=rng.uniform(0.5, 2, k)),
        dict(weight=rng.uniform(0.5, 2, k).astype(np.float32)),
        dict(weight=np.arange(1, k + 1)),  # integer class weights
        dict(weight=np.zeros(k)),  # every row weighs 0
        dict(sample_weight=v),  # float64: used as it is
        dict(sample_weight=v.astype(np.float32)),  # converted
        dict(sample_weight=np.arange(n)),
        dict(where=keep),
        dict(sample_weight=v, where=keep),
        dict(sample_weight=np.where(v > 1, -0.0, v), where=keep),  # negative zeros
        dict(z_loss=1e-3, return_z_loss=True),
        dict(z_loss=2, return_z_loss=True, return_lse=True),
        dict(return_lse=True),
        dict(return_z_loss=True),
        dict(logit_scale=0.5),
        dict(logit_scale=-2),
        dict(softcap=3.0),
        dict(logit_scale=1.5, softcap=4),
        dict(
            weight=rng.uniform(0.5, 2, k), sample_weight=v, where=keep, z_loss=1e-3, logit_scale=1.3, softcap=5.0,
            label_smoothing=0.1, return_z_loss=True, return_lse=True,
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_with_options_gives_the_general_results(monkeypatch, n, k, dtype):
    z, y = problem(n, k, dtype, (np.int64, np.int32)[(n + k) % 2])
    y[n // 2] = -100
    rng = np.random.default_rng(n * k)
    for options in _option_sets(rng, n, k):
        for reduction in ("mean", "sum", "none"):
            kw = dict(reduction=reduction, **options)
            for call in (
                lambda: fastsce.cross_entropy(z, y, **kw),
                lambda: fastsce.cross_entropy_with_grad(z, y, **kw),
                lambda: fastsce.cross_entropy_with_grad(z, y, out=np.full_like(z, np.nan), **kw),
            ):
                got, want, taken = both_ways(monkeypatch, call)
                assert taken, kw
                assert_same(got, want)


def test_fast_path_with_options_on_the_thread_pool(monkeypatch):
    z, y = problem(300, 300)
    rng = np.random.default_rng(3)
    options = dict(weight=rng.uniform(0.5, 2, 300), sample_weight=rng.uniform(0, 2, 300), z_loss=1e-3, return_lse=True)
    monkeypatch.setattr(_threads, "SERIAL_LOGITS", -1)
    got, want, taken = both_ways(monkeypatch, lambda: fastsce.cross_entropy_with_grad(z, y, **options))
    assert taken
    assert_same(got, want)


def test_fast_path_leaves_the_row_weights_untouched_and_unshared(monkeypatch):
    """A float64 sample_weight goes to the kernels as it is (no copy): it must come back
    unchanged, and one that shares the gradient's memory must still be copied first."""
    z, y = problem(64, 10, np.float64)
    v = np.random.default_rng(4).uniform(0, 2, 64)
    before = v.copy()
    got, want, taken = both_ways(monkeypatch, lambda: fastsce.cross_entropy_with_grad(z, y, sample_weight=v))
    assert taken
    assert_same(got, want)
    np.testing.assert_array_equal(v, before)

    def sample_weight_in_out():  # out's first 64 values are the sample weights
        out = np.empty_like(z)
        out.reshape(-1)[:64] = before
        return fastsce.cross_entropy_with_grad(z, y, sample_weight=out.reshape(-1)[:64], out=out)

    got, want, taken = both_ways(monkeypatch, sample_weight_in_out)
    assert taken
    assert_same(got, want)
    assert_same(got, fastsce.cross_entropy_with_grad(z, y, sample_weight=before))


def _bad_option_calls():
    z, y = problem(8, 5)
    v = np.ones(8)
    bad_y = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    for value in (np.nan, np.inf, -np.inf, -1.0, -1e-300):
        bad_v = v.copy()
        bad_v[[3, 6]] = value
        yield f"sample_weight {value}", lambda bad_v=bad_v: fastsce.cross_entropy(z, y, sample_weight=bad_v)
        yield f"sample_weight {value}, where", lambda bad_v=bad_v: fastsce.cross_entropy_with_grad(
            z, y, sample_weight=bad_v, where=v > 0
        )
        yield f"sample_weight {value} and a bad label", lambda bad_v=bad_v: fastsce.cross_entropy(
            z, bad_y, sample_weight=bad_v
        )
        bad_w = np.ones(5)
        bad_w[2] = value
        yield f"weight {value}", lambda bad_w=bad_w: fastsce.cross_entropy(z, y, weight=bad_w)
        yield f"weight {value} and sample_weight", lambda bad_w=bad_w, bad_v=bad_v: fastsce.cross_entropy(
            z, y, weight=bad_w, sample_weight=bad_v
        )
    yield "sample_weight shape", lambda: fastsce.cross_entropy(z, y, sample_weight=np.ones(7))
    yield "sample_weight 2-d", lambda: fastsce.cross_entropy(z, y, sample_weight=np.ones((8, 1)))
    yield "sample_weight complex", lambda: fastsce.cross_entropy(z, y, sample_weight=np.ones(8, complex))
    yield "sample_weight bool", lambda: fastsce.cross_entropy(z, y, sample_weight=np.ones(8, bool))
    yield "sample_weight masked", lambda: fastsce.cross_entropy(z, y, sample_weight=np.ma.masked_array(v))
    yield "where int", lambda: fastsce.cross_entropy(z, y, where=np.ones(8, int))
    yield "where shape", lambda: fastsce.cross_entropy_with_grad(z, y, where=np.ones(9, bool))
    yield "where masked", lambda: fastsce.cross_entropy(z, y, where=np.ma.masked_array(v > 0))
    yield "sample_weight bad, reduction bad", lambda: fastsce.cross_entropy(
        z, y, sample_weight=-v, reduction="avg"
    )
    yield "sample_weight bad, z_loss bad", lambda: fastsce.cross_entropy(z, y, sample_weight=-v, z_loss=-1)
    yield "sample_weight bad, out bad", lambda: fastsce.cross_entropy_with_grad(
        z, y, sample_weight=-v, out=np.empty((8, 6), np.float32)
    )
    yield "sample_weight bad, return_lse bad", lambda: fastsce.cross_entropy(
        z, y, sample_weight=-v, return_lse=1
    )
    yield "weight shape", lambda: fastsce.cross_entropy(z, y, weight=np.ones(4))
    yield "weight complex", lambda: fastsce.cross_entropy(z, y, weight=np.ones(5, complex))
    yield "weight bool", lambda: fastsce.cross_entropy(z, y, weight=np.ones(5, bool))
    yield "weight and a bad label", lambda: fastsce.cross_entropy_with_grad(z, bad_y, weight=np.ones(5))
    yield "sample_weight and a bad label, sum", lambda: fastsce.cross_entropy(
        z, bad_y, sample_weight=v, reduction="sum"
    )
    yield "out is weight", lambda: fastsce.cross_entropy_with_grad(
        z.astype(np.float64), y, weight=(o := np.ones((8, 5)))[0], out=o
    )
    yield "z_loss inf", lambda: fastsce.cross_entropy(z, y, z_loss=np.inf)
    yield "z_loss huge int", lambda: fastsce.cross_entropy(z, y, z_loss=10**400)
    yield "z_loss bool", lambda: fastsce.cross_entropy(z, y, z_loss=True)
    yield "logit_scale NaN", lambda: fastsce.cross_entropy(z, y, logit_scale=float("nan"))
    yield "logit_scale string", lambda: fastsce.cross_entropy(z, y, logit_scale="2")
    yield "softcap 0", lambda: fastsce.cross_entropy(z, y, softcap=0.0)
    yield "softcap < 0", lambda: fastsce.cross_entropy_with_grad(z, y, softcap=-1)
    yield "softcap inf", lambda: fastsce.cross_entropy(z, y, softcap=np.inf)
    yield "return_z_loss None", lambda: fastsce.cross_entropy(z, y, return_z_loss=None)
    yield "return_lse int", lambda: fastsce.cross_entropy_with_grad(z, y, return_lse=0)


@pytest.mark.parametrize("bad_calls", [_bad_calls, _bad_option_calls], ids=["common", "options"])
def test_fast_path_raises_the_general_errors(monkeypatch, bad_calls):
    """Every bad call raises what the general path raises: the common arguments' errors
    are all left to it, the row weights' raised alike by the fast path (_bad_option_calls)."""
    for name, call in bad_calls():
        got, want, _ = both_ways(monkeypatch, call)
        assert isinstance(want, tuple) and isinstance(want[0], type), f"{name}: no error"
        assert got == want, name


def test_fast_path_declines_the_options_it_does_not_handle(monkeypatch):
    """Weights that scale_weights rescales, argument types it does not check, dtype= and
    denominator=: the general path's results."""
    z, y = problem(16, 5)
    v = np.random.default_rng(5).uniform(0.5, 2, 16)
    calls = [
        lambda: fastsce.cross_entropy(z, y, weight=np.full(5, 1e35)),  # beyond float32's range
        lambda: fastsce.cross_entropy(z, y, weight=np.full(5, 1e-35)),
        lambda: fastsce.cross_entropy(z, y, sample_weight=v * 1e300),  # the mean rescales them
        lambda: fastsce.cross_entropy(z, y, sample_weight=v * 1e-300, where=v > 1),
        lambda: fastsce.cross_entropy(z, y, weight=[1.0] * 5),  # lists
        lambda: fastsce.cross_entropy(z, y, sample_weight=v.tolist()),
        lambda: fastsce.cross_entropy(z, y, where=(v > 1).tolist()),
        lambda: fastsce.cross_entropy(z, y, z_loss=np.float64(1e-3)),  # NumPy scalars
        lambda: fastsce.cross_entropy(z, y, logit_scale=np.float32(2)),
        lambda: fastsce.cross_entropy(z, y, return_lse=np.True_),
        lambda: fastsce.cross_entropy(z, y, dtype=np.float32),
        lambda: fastsce.cross_entropy(z, y, denominator=3.0),
        lambda: fastsce.cross_entropy_with_grad(z, y, weight=v[:5], out=np.empty_like(z)),  # (taken: control)
    ]
    for i, call in enumerate(calls):
        got, want, taken = both_ways(monkeypatch, call)
        assert taken == (i == len(calls) - 1), i
        assert_same(got, want)
    # rescaled sample weights with another reduction: nothing to rescale, taken
    got, want, taken = both_ways(monkeypatch, lambda: fastsce.cross_entropy(z, y, sample_weight=v * 1e300, reduction="sum"))
    assert taken
    assert_same(got, want)


def test_row_weights_borrow_only_what_the_kernels_can_take_as_it_is():
    from fastsce._validate import row_weights

    v = np.linspace(0, 2, 12)
    ro = v.copy()
    ro.flags.writeable = False
    keep = v > 0.5
    assert np.shares_memory(row_weights(v, None, (12,), borrow=True)[0], v)  # no copy
    assert np.shares_memory(row_weights(v.reshape(3, 4), None, (3, 4), borrow=True)[0], v)
    for args in ((v, None, False), (ro, None, True), (v[::-1], None, True), (v.astype(">f8"), None, True),
                 (v.astype(np.float32), None, True), (v, keep, True)):  # fmt: skip
        got, top = row_weights(args[0], args[1], (12,), borrow=args[2])
        assert not np.shares_memory(got, v) and got.flags.writeable and got.dtype == np.float64
        assert top == got.max()
    assert row_weights(None, keep, (12,))[1] == 1.0  # 0s and 1s: never rescaled
    signed = np.array([0.5, -0.0, 0.0, -0.0, 3.0, 1e-310] * 4)
    mask = np.array([True, True, False, False, True, False] * 4)
    for v_given, mask_given in ((signed, mask), (signed[::2], mask[::2]), (signed.reshape(4, 6), mask.reshape(4, 6))):
        got = row_weights(v_given, mask_given, mask_given.shape)[0]
        want = np.where(mask_given, v_given, 0.0).reshape(-1)
        np.testing.assert_array_equal(got.view(np.int64), want.view(np.int64))  # the zeros' signs too
        assert not np.shares_memory(got, v_given)
    assert row_weights(None, None, (12,)) == (None, 1.0)


@pytest.mark.parametrize("ignored", [0.0, 0.3, 1.0])
def test_label_stats_shortcut_gives_label_stats_bits(ignored):
    """api._label_stats (no class weights, row weights) against the kernel it stands in for:
    the same first bad row and the same float64 denominators, bit for bit."""
    from fastsce._kernels import rows

    rng = np.random.default_rng(int(ignored * 10))
    for n in (1, 7, 1000, 70_000):
        y = rng.integers(0, 10, n)
        y[rng.random(n) < ignored] = -100
        ones = api._ones(10, np.dtype(np.float32))
        keep = rng.random(n) > 0.4
        v = rng.uniform(0, 3, n) ** 8  # wide range: rounding differs with the order
        v[rng.random(n) < 0.1] = -0.0
        cases = [(v, None), (keep.astype(np.float64), keep), (np.where(keep, v, 0.0), None)]
        for vv, mask in cases:
            for target in (y, np.where(np.arange(n) == n // 2, 10, y)):  # a bad label
                got = api._label_stats(target, 10, -100, ones, vv, True, mask)
                want = rows.label_stats(target, 10, -100, ones, vv)
                assert got[0] == want[0]
                if want[0] < 0:
                    assert np.array(got[1:]).tobytes() == np.array(want[1:]).tobytes(), (n, mask is None)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_label_stats_denominators_against_exact_sums(label_dtype):
    """label_stats' D = sum v_n w[y_n] and D_z = sum v_n over the counted rows (added in
    vector lanes) against math.fsum, with and without class and row weights; the first bad
    label's row."""
    import math

    from fastsce._kernels import rows

    rng = np.random.default_rng(7)
    for n in (1, 5, 17, 1000, 65_537):
        y = rng.integers(0, 10, n).astype(label_dtype)
        y[rng.random(n) < 0.2] = -100
        w = rng.uniform(0, 2, 10).astype(np.float32)
        v = rng.uniform(0, 3, n) ** 4
        for ww, vv in ((w, v), (np.ones(10, np.float32), v), (w, np.empty(0))):
            bad_row, d, d_z = rows.label_stats(y, 10, -100, ww, vv)
            keep = y != -100
            vk = vv[keep] if vv.size else np.ones(int(keep.sum()))
            assert bad_row == -1
            assert d == pytest.approx(math.fsum(vk * ww[y[keep]].astype(np.float64)), rel=1e-13, abs=0)
            assert d_z == pytest.approx(math.fsum(vk), rel=1e-13, abs=0)
        for first in (10, -1, -101):  # past K, negative, next to ignore_index
            bad = y.copy()
            bad[[n // 2, n - 1]] = first
            for ww, vv in ((w, v), (np.ones(10, np.float32), v), (w, np.empty(0)), (np.ones(10, np.float32), np.empty(0))):
                assert rows.label_stats(bad, 10, -100, ww, vv) == (n // 2, 0.0, 0.0)
