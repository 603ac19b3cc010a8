"""The fast path of the common call (fastsce.api._fast) and the general path give the same
results, bit for bit, and the same errors: each call is made twice, once as it comes and once
with the fast path turned off."""

from __future__ import annotations

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


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
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


def test_fast_path_in_place_and_axis_1(monkeypatch):
    z, y = problem(64, 10)
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_edge_values(monkeypatch, dtype):
    """inf / NaN logits, a loss beyond the dtype's range, every row ignored, read-only inputs."""
    big = np.finfo(dtype).max / 2
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


def test_fast_path_leaves_every_error_to_the_general_path(monkeypatch):
    for name, call in _bad_calls():
        got, want, _ = both_ways(monkeypatch, call)
        assert isinstance(want, tuple) and isinstance(want[0], type), f"{name}: no error"
        assert got == want, name


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
        lambda: fastsce.cross_entropy(z, y, z_loss=1e-4),
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
