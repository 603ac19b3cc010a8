"""fastsce._kernels.tiles (tiles of rows, SIMD lanes across rows) against the NumPy reference.

The public API is called with its small-K thresholds raised so that every K here goes
to these kernels, except float32 calls of K <= blocks.MAX_K, which the API sends to
fastsce._kernels.blocks (with options up to its widths: so these cases check it too;
tests/test_blocks.py has its own). N runs over sizes that are not multiples of the tile (the last N % R rows
go through a zero-padded tile).
"""

import itertools

import numba
import numpy as np
import pytest

from _cases import DTYPES, REDUCTIONS, Case, assert_close, make_case, short
import fastsce
from fastsce import api, reference
from fastsce._kernels import blocks as block_kernels, tiles as tile_kernels
from fastsce._kernels.jit import jit
from fastsce._kernels.simd import log_normal

NS = (0, 1, 15, 17, 1000)
KS = (1, 2, 3, 10, 16, 17, 31, 64, 100, 128, 200)


def run_small(case: Case, grad: bool, in_place: bool = False):
    """(loss, gradient or None) through the public API, dispatched to the small-K kernels."""
    saved = api.SMALL_K, api.FLOAT_SMALL_K
    api.SMALL_K = {dtype: (1 << 30, 1 << 30) for dtype in saved[0]}  # every K is "small"
    api.FLOAT_SMALL_K = {dtype: {"other": bounds} for dtype, bounds in api.SMALL_K.items()}
    try:
        if not grad:
            return case.loss(fastsce), None
        if in_place:
            z = case.logits.copy()
            loss, g = fastsce.cross_entropy_with_grad(z, case.target, **case.kwargs, out=z)
            assert g is z
            return loss, g
        return case.loss_grad(fastsce)
    finally:
        api.SMALL_K, api.FLOAT_SMALL_K = saved


def test_small_k_kernels_are_really_taken(monkeypatch):
    """Plain calls in tiles.PLAIN's kernels (no option compiled), calls with an option in
    the general ones."""
    seen = []
    for tag, holder in (("plain", tile_kernels.PLAIN), ("general", tile_kernels)):
        for name in ("hard_loss", "hard_loss_grad"):
            real = getattr(holder, name)
            monkeypatch.setattr(holder, name, lambda *a, real=real, tag=f"{tag}.{name}": seen.append(tag) or real(*a))
    case = make_case(5, block_kernels.MAX_K + 1, np.float32)  # beyond the blocks and the default thresholds
    run_small(case, grad=True)
    run_small(case, grad=False)
    case.kwargs["label_smoothing"] = 0.1
    run_small(case, grad=True)
    run_small(case, grad=False)
    assert seen == ["plain.hard_loss_grad", "plain.hard_loss", "general.hard_loss_grad", "general.hard_loss"]


def check(case: Case, in_place=False):
    loss_unit, grad_unit = case.units()
    ref_loss, ref_grad = case.loss_grad(reference)
    loss, grad = run_small(case, grad=True, in_place=in_place)
    assert_close(loss, ref_loss, case.dtype, unit=loss_unit)
    assert_close(grad, ref_grad, case.dtype, unit=grad_unit)
    loss_only, _ = run_small(case, grad=False)
    assert_close(loss_only, ref_loss, case.dtype, unit=loss_unit)
    # Both kernels compute a row's loss with the same lane code (up to FMA contraction).
    np.testing.assert_allclose(loss_only, loss, rtol=8 * np.finfo(case.dtype).eps, equal_nan=True)


# --- every shape, a spread of options ----------------------------------------------------------


OPTION_SETS = [  # (weighted, ignore_index inside [0, K), label_smoothing, reduction)
    (False, False, 0.0, "mean"),
    (True, True, 0.1, "sum"),
    (True, False, 0.0, "none"),
    (False, True, 0.1, "mean"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: f"w{int(o[0])}-in{int(o[1])}-ls{o[2]}-{o[3]}")
def test_shapes(dtype, k, n, options):
    weighted, ignore_inside, eps, reduction = options
    case = make_case(
        n, k, dtype, weighted=weighted, ignore_index=k // 2 if ignore_inside else -100,
        label_smoothing=eps, reduction=reduction,
    )  # fmt: skip
    check(case)


# --- every option, a few shapes ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("n, k", [(17, 3), (1000, 10), (130, 100)])
@pytest.mark.parametrize(
    "weighted, ignore_inside, eps, reduction, in_place",
    list(itertools.product((False, True), (False, True), (0.0, 0.1), REDUCTIONS, (False, True))),
)
def test_options(dtype, n, k, weighted, ignore_inside, eps, reduction, in_place):
    case = make_case(
        n, k, dtype, weighted=weighted, ignore_index=k // 2 if ignore_inside else -100,
        label_smoothing=eps, reduction=reduction,
    )  # fmt: skip
    check(case, in_place=in_place)


# --- special values -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("eps", (0.0, 0.1))
@pytest.mark.parametrize("k", (3, 10, 100))
def test_masked_classes(dtype, eps, k):
    """-inf logits are legal; a zero weight on a -inf target gives 0 (0 * inf = 0)."""
    n = 77
    rng = np.random.default_rng(k)
    z = (4 * rng.standard_normal((n, k))).astype(dtype)
    y = rng.integers(0, k, n)
    z[::3, 1] = -np.inf
    z[1::5, : k - 1] = -np.inf  # only the last class left
    z[2::7, 0] = -np.inf
    y[2::7] = 0  # target masked: weight 0 below
    y[::3] = np.where(y[::3] == 1, 2 % k, y[::3])
    y[1::5] = k - 1
    weight = rng.uniform(0.5, 2.0, k).astype(dtype)
    weight[0] = 0
    for reduction in ("none", "sum"):
        check(Case(z, y, dict(weight=weight, label_smoothing=eps, reduction=reduction)))


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("k", (2, 10, 100))
def test_nan_rows(dtype, k):
    """A NaN logit makes its row's loss and gradient NaN and leaves the other rows alone;
    an ignored row stays 0 even with NaN logits."""
    n = 70
    rng = np.random.default_rng(k)
    z = rng.standard_normal((n, k)).astype(dtype)
    y = rng.integers(0, k, n)
    z[5, k // 2] = np.nan
    z[40, 0] = np.nan
    z[41, :] = np.nan
    y[41] = -100
    loss, grad = run_small(Case(z, y, dict(reduction="none")), grad=True)
    bad = np.zeros(n, bool)
    bad[[5, 40]] = True
    assert np.isnan(loss[bad]).all() and np.isnan(grad[bad]).all()
    assert np.isfinite(loss[~bad]).all() and np.isfinite(grad[~bad]).all()
    assert loss[41] == 0 and (grad[41] == 0).all()
    check(Case(z, y, dict(reduction="none")))


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("k", (2, 10, 100))
def test_huge_logits(dtype, k):
    """Logits ~1e4: exp(z - m) underflows for all but the max, the loss keeps its digits."""
    n = 40
    rng = np.random.default_rng(k)
    z = (1e4 * rng.standard_normal((n, k))).astype(dtype)
    z[::4] = np.round(z[::4] / 1e4)  # also some O(1) rows
    y = rng.integers(0, k, n)
    for reduction in ("none", "mean"):
        check(Case(z, y, dict(reduction=reduction, label_smoothing=0.1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
def test_confident_rows(dtype):
    """The target dominating: p_y - 1 = -s_other / s without cancellation, and the tiny
    loss with its relative digits."""
    n, k = 33, 10
    rng = np.random.default_rng(1)
    z = rng.standard_normal((n, k)).astype(dtype)
    y = rng.integers(0, k, n)
    z[np.arange(n), y] = 30
    loss, grad = run_small(Case(z, y, dict(reduction="sum")), grad=True)
    z64 = z.astype(np.float64)
    e = np.exp(z64 - z64.max(1, keepdims=True))
    others = np.where(np.arange(k) == y[:, None], 0, e).sum(1)
    expected = -others / e.sum(1)  # p_y - 1, without cancellation
    np.testing.assert_allclose(grad[np.arange(n), y], expected, rtol=10 * np.finfo(dtype).eps)
    # The loss log(1 + s_other / e_y) ~ 1e-12 keeps its relative digits too.
    np.testing.assert_allclose(loss, np.log1p(others).sum(), rtol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
def test_thread_count_invariance(dtype):
    case = make_case(1000, 10, dtype, weighted=True, label_smoothing=0.1, reduction="none")
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run_small(case, grad=True)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = run_small(case, grad=True)
    finally:
        numba.set_num_threads(threads)
    assert one[0].tobytes() == many[0].tobytes()
    assert one[1].tobytes() == many[1].tobytes()


# --- the vectorised log --------------------------------------------------------------------------


@jit
def _log_all(x, out):
    for i in range(x.size):
        out[i] = log_normal(x[i])


def test_log_normal_accuracy():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            np.exp(rng.uniform(0, np.log(2.0**20), 200_000)),  # the kernels' range: sums >= 1
            1 + np.exp(rng.uniform(-50, -1, 100_000)),
            np.exp(rng.uniform(-700, 700, 100_000)),
            [1.0, 2.0, np.sqrt(2.0), np.finfo(np.float64).tiny, np.finfo(np.float64).max],
        ]
    )
    out = np.empty_like(x)
    _log_all(x, out)
    exact = np.log(x.astype(np.longdouble))
    ulps = np.abs((out - exact) / np.spacing(np.abs(out)).astype(np.longdouble))
    assert float(ulps.max()) < 1.0
    special = np.array([np.inf, np.nan])
    _log_all(special, special)
    assert special[0] == np.inf and np.isnan(special[1])
