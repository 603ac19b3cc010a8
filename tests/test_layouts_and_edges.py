"""Memory layouts, the out= buffer, and edge values: -inf, NaN, huge logits, ignored rows,
N = 0, K = 1, and thread-count independence."""

import numba
import numpy as np
import pytest

from _cases import (
    DTYPES,
    IMPLS,
    REDUCTIONS,
    Case,
    assert_close,
    assert_grad_type,
    assert_loss_type,
    make_case,
    make_labels,
    make_logits,
    short,
)
from fastsce import api

ref = IMPLS["ref"]
impls = pytest.mark.parametrize("impl", IMPLS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=short)
reductions = pytest.mark.parametrize("reduction", REDUCTIONS)
target_kinds = pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))


def assert_same(actual, expected, impl):
    """The fast path copies other layouts to C order and runs the same kernel: bitwise equal.
    The reference may sum a strided array in another order: equal within tolerance."""
    if impl == "fast":
        np.testing.assert_array_equal(actual, expected, strict=True)
    else:
        assert_close(actual, expected)


# --- layouts -------------------------------------------------------------------------------


def in_layout(a, layout):
    """An array equal to ``a`` (N, K) but laid out as ``layout``."""
    n, k = a.shape
    if layout == "rows-strided":  # logits[::2]
        big = np.full((2 * n, k), np.nan, a.dtype)
        big[::2] = a
        return big[::2]
    if layout == "cols-strided":  # logits[:, ::2]
        big = np.full((n, 2 * k), np.nan, a.dtype)
        big[:, ::2] = a
        return big[:, ::2]
    if layout == "transposed":  # x.T of a (K, N) array
        return np.ascontiguousarray(a.T).T
    if layout == "fortran":
        return np.asfortranarray(a)
    raise ValueError(layout)


LAYOUTS = ("rows-strided", "cols-strided", "transposed", "fortran")


@impls
@dtypes
@target_kinds
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_logits_give_the_c_contiguous_result(impl, dtype, soft, layout):
    case = make_case(37, 19, dtype, soft=soft, weighted=True, label_smoothing=0.1, reduction="none")
    z = in_layout(case.logits, layout)
    assert not z.flags.c_contiguous and np.array_equal(z, case.logits)
    # probability targets in the same layout as the logits
    t = in_layout(case.target, layout) if soft else case.target
    strided = Case(z, t, case.kwargs)
    loss, grad = strided.loss_grad(IMPLS[impl])
    c_loss, c_grad = case.loss_grad(IMPLS[impl])
    assert_same(loss, c_loss, impl)
    assert_same(grad, c_grad, impl)
    assert_same(strided.loss(IMPLS[impl]), case.loss(IMPLS[impl]), impl)


@impls
@dtypes
@target_kinds
@reductions
def test_out_buffer_is_filled_and_returned(impl, dtype, soft, reduction):
    case = make_case(23, 11, dtype, soft=soft, weighted=True, label_smoothing=0.1, reduction=reduction)
    out = np.full(case.logits.shape, np.nan, dtype)
    loss, grad = case.loss_grad(IMPLS[impl], out=out)
    assert grad is out
    expected_loss, expected_grad = case.loss_grad(IMPLS[impl])
    np.testing.assert_array_equal(out, expected_grad, strict=True)
    np.testing.assert_array_equal(loss, expected_loss, strict=True)


@impls
@dtypes
@target_kinds
@reductions
@pytest.mark.parametrize("eps", (0.0, 0.1))
def test_out_is_logits_computes_in_place(impl, dtype, soft, reduction, eps):
    case = make_case(23, 11, dtype, soft=soft, weighted=True, label_smoothing=eps, reduction=reduction)
    expected_loss, expected_grad = case.loss_grad(IMPLS[impl])
    loss_unit, grad_unit = case.units()
    z = case.logits.copy()
    loss, grad = IMPLS[impl].cross_entropy_with_grad(z, case.target, **case.kwargs, out=z)
    assert grad is z
    assert_close(loss, expected_loss, unit=loss_unit)
    assert_close(z, expected_grad, unit=grad_unit)


# --- -inf, NaN and huge logits ---------------------------------------------------------------

MASKED_COLUMNS = [1, 4]


def masked_case(dtype, soft, weighted, reduction):
    """Logits with classes 1 and 4 masked (-inf) in every row, plus class 3 in even rows;
    targets never on a masked class (probability exactly 0 there)."""
    case = make_case(12, 6, dtype, soft=soft, weighted=weighted, reduction=reduction, zeros=True)
    mask = np.zeros(case.logits.shape, bool)
    mask[:, MASKED_COLUMNS] = True
    mask[::2, 3] = True
    case.logits[mask] = -np.inf
    if soft:
        case.target[mask] = 0
        case.target[:, 0] += 1 - case.target.sum(axis=1)  # rows still sum to 1
    else:
        case.target[np.isin(case.target, [1, 3, 4])] = 0
    return case, mask


@impls
@dtypes
@target_kinds
@reductions
@pytest.mark.parametrize("weighted", (False, True), ids=("now", "w"))
def test_masked_classes_get_exactly_zero_probability_and_gradient(impl, dtype, soft, reduction, weighted):
    case, mask = masked_case(dtype, soft, weighted, reduction)
    loss, grad = case.loss_grad(IMPLS[impl])
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert np.all(grad[mask] == 0)
    assert np.all(np.isfinite(case.loss(IMPLS[impl])))
    # A class masked in every row is as good as absent: compare with the problem without it.
    keep = np.setdiff1d(np.arange(6), MASKED_COLUMNS)
    kwargs = dict(case.kwargs)
    if weighted:
        kwargs["weight"] = kwargs["weight"][keep]
    if soft:
        target = case.target[:, keep]
    else:  # renumber the classes, keeping ignored rows ignored
        target = np.where(case.target == -100, -100, np.searchsorted(keep, case.target))
    smaller = Case(case.logits[:, keep], target, kwargs)
    expected_loss, expected_grad = smaller.loss_grad(ref)
    loss_unit, grad_unit = case.units()
    assert_close(loss, expected_loss, unit=loss_unit)
    assert_close(grad[:, keep], expected_grad, unit=grad_unit)


@impls
@dtypes
@target_kinds
def test_nan_logit_poisons_only_its_row(impl, dtype, soft):
    case = make_case(7, 5, dtype, soft=soft, weighted=True, label_smoothing=0.1, reduction="none")
    case.logits[3, 2] = np.nan
    loss, grad = case.loss_grad(IMPLS[impl])
    others = np.arange(7) != 3
    assert np.isnan(loss[3])
    assert np.isnan(case.loss(IMPLS[impl])[3])
    assert np.all(np.isfinite(loss[others])) and np.all(np.isfinite(grad[others]))
    for reduction in ("mean", "sum"):
        assert np.isnan(IMPLS[impl].cross_entropy(case.logits, case.target, **{**case.kwargs, "reduction": reduction}))


@impls
@dtypes
@pytest.mark.parametrize("poison", ("nan", "+inf", "all-masked"))
def test_undefined_softmax_gives_nan_even_when_the_target_class_weighs_zero(impl, dtype, poison):
    """A row whose softmax is undefined (a NaN or +inf logit, or every class masked) has a
    NaN loss, as in PyTorch, even if its target class has weight 0 (its gradient is NaN in
    both implementations, so a loss of 0 would not match it)."""
    z = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0]], dtype)
    z[0] = {"nan": [0.5, np.nan, 2.0], "+inf": [0.5, np.inf, 2.0], "all-masked": [-np.inf] * 3}[poison]
    case = Case(z, np.array([0, 1]), dict(weight=[0.0, 1.0, 1.0], reduction="none"))
    loss, grad = case.loss_grad(IMPLS[impl])
    assert np.isnan(grad[0]).all() and np.isfinite(grad[1]).all()
    assert np.isnan(loss[0]) and np.isfinite(loss[1]), loss
    assert np.isnan(case.loss(IMPLS[impl])[0])


HUGE = {np.float32: 1e4, np.float64: 1e300}


@impls
@dtypes
@target_kinds
@pytest.mark.parametrize("eps", (0.0, 0.1))
def test_huge_logits_do_not_overflow(impl, dtype, soft, eps):
    """Rows (a, -a), (a, a), (-a, -a) with a = 1e4 (float32) or 1e300 (float64) against the
    closed form: p = (1, 0) with log p = (0, -2a), or p = (1/2, 1/2) with log p = -log 2."""
    a = HUGE[dtype]
    z = np.array([[a, -a], [a, -a], [a, a], [-a, -a]], dtype)
    p = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    log_p = np.array([[0.0, -2 * a], [0.0, -2 * a], [-np.log(2)] * 2, [-np.log(2)] * 2])
    if soft:
        target = np.array([[0.75, 0.25], [0.0, 1.0], [0.25, 0.75], [1.0, 0.0]], dtype)
        t = target.astype(np.float64)
    else:
        target = np.array([0, 1, 0, 1])
        t = np.eye(2)[target]
    t = (1 - eps) * t + eps / 2
    expected_loss = -(t * log_p).sum(axis=1)
    expected_grad = p - t  # each row's own loss: reduction "none"
    case = Case(z, target, dict(reduction="none", label_smoothing=eps))
    loss, grad = case.loss_grad(IMPLS[impl])
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert_close(loss, expected_loss.astype(dtype), unit=1.0)
    assert_close(grad, expected_grad.astype(dtype), unit=1.0)
    assert_close(case.loss(IMPLS[impl]), expected_loss.astype(dtype), unit=1.0)


@impls
@dtypes
@reductions
@pytest.mark.parametrize("eps", (0.0, 0.1))
def test_zero_weight_target_on_a_masked_class_adds_nothing(impl, dtype, reduction, eps):
    """fastsce's convention 0 * log 0 = 0: a target class with weight 0 contributes nothing,
    even where its logit is -inf (PyTorch gives NaN here; a documented deviation)."""
    z = np.array([[-np.inf, 1.0, 2.0], [0.5, -1.0, 2.0]], dtype)
    w = np.array([0.0, 1.0, 1.0])
    case = Case(z, np.array([0, 2]), dict(weight=w, label_smoothing=eps, reduction=reduction))
    z64 = z.astype(np.float64)
    lse = np.log(np.exp(z64).sum(axis=1))
    # (1 - eps) w_y (lse - z_y) + eps / K sum_{j: w_j > 0} w_j (lse - z_j); row 0 has w_y = 0
    smooth = eps / 3 * (w[1:] * (lse[:, None] - z64[:, 1:])).sum(axis=1)
    rows = np.array([0.0, (1 - eps) * (lse[1] - z64[1, 2])]) + smooth
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / 1.0}[reduction]  # D = w_0 + w_2 = 1
    loss, grad = case.loss_grad(IMPLS[impl])
    assert np.all(np.isfinite(grad)) and grad[0, 0] == 0
    assert_close(loss, np.asarray(expected).astype(dtype), unit=1.0)
    assert_close(case.loss(IMPLS[impl]), np.asarray(expected).astype(dtype), unit=1.0)


@impls
@pytest.mark.parametrize("reduction", ("sum", "none"))
def test_float32_loss_beyond_float32_range_is_inf_without_a_warning(impl, reduction):
    """Finite float32 logits whose weighted loss, 4 * 2e38, exceeds the float32 range: the
    result is inf and no RuntimeWarning is emitted (pytest turns warnings into errors here).
    ("mean" is left out: 2e38 fits, but the reference, like PyTorch, overflows the float32
    row loss first and gives inf.)"""
    case = Case(np.array([[1e38, -1e38]], np.float32), np.array([1]), dict(weight=[1.0, 4.0], reduction=reduction))
    for loss in (case.loss(IMPLS[impl]), case.loss_grad(IMPLS[impl])[0]):
        assert_loss_type(loss, np.float32, reduction, 1)
        assert np.all(loss == np.inf)


# --- ignored rows ------------------------------------------------------------------------


@impls
@dtypes
@pytest.mark.parametrize("ignore_index", (-100, 2))
@pytest.mark.parametrize("eps", (0.0, 0.1))
def test_ignored_rows_contribute_exactly_zero_even_with_nan_or_all_masked_logits(impl, dtype, ignore_index, eps):
    case = make_case(9, 5, dtype, weighted=True, ignore_index=ignore_index, label_smoothing=eps, reduction="none")
    counted = case.target != ignore_index
    case.target[[1, 3]] = ignore_index
    counted[[1, 3]] = False
    case.logits[1] = np.nan
    case.logits[3] = -np.inf
    case.logits[5, 0] = np.nan  # rows 2 and 6 are ignored as well (make_labels)
    case.target[5] = ignore_index
    counted[5] = False
    loss, grad = case.loss_grad(IMPLS[impl])
    assert np.all(loss[~counted] == 0) and np.all(grad[~counted] == 0)
    assert np.all(case.loss(IMPLS[impl])[~counted] == 0)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    # The batch reductions equal those of the counted rows alone.
    for reduction in ("mean", "sum"):
        kwargs = {**case.kwargs, "reduction": reduction}
        full = Case(case.logits, case.target, kwargs)
        alone = Case(case.logits[counted], case.target[counted], kwargs)
        loss, grad = full.loss_grad(IMPLS[impl])
        expected_loss, expected_grad = alone.loss_grad(ref)
        loss_unit, grad_unit = alone.units()
        assert_close(loss, expected_loss, unit=loss_unit)
        assert_close(full.loss(IMPLS[impl]), expected_loss, unit=loss_unit)
        assert_close(grad[counted], expected_grad, unit=grad_unit)
        assert np.all(grad[~counted] == 0)


@impls
@dtypes
@reductions
@pytest.mark.parametrize("ignore_index", (-100, 0))
@pytest.mark.parametrize("eps", (0.0, 0.1))
def test_all_rows_ignored(impl, dtype, reduction, ignore_index, eps):
    case = make_case(6, 4, dtype, weighted=True, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
    case.target[:] = ignore_index
    loss, grad = case.loss_grad(IMPLS[impl])
    assert_loss_type(loss, dtype, reduction, 6)
    if reduction == "mean":  # 0 / 0, as PyTorch
        assert np.isnan(loss) and np.isnan(case.loss(IMPLS[impl]))
    else:
        assert np.all(loss == 0) and np.all(case.loss(IMPLS[impl]) == 0)
    assert np.all(grad == 0)


# --- N = 0, K = 1, ignore_index inside [0, K) -----------------------------------------------------


@impls
@dtypes
@target_kinds
@reductions
def test_empty_batch(impl, dtype, soft, reduction):
    case = make_case(0, 5, dtype, soft=soft, weighted=True, label_smoothing=0.1, reduction=reduction)
    out = np.empty((0, 5), dtype)
    for loss, grad in (case.loss_grad(IMPLS[impl]), case.loss_grad(IMPLS[impl], out=out)):
        assert_loss_type(loss, dtype, reduction, 0)
        assert_grad_type(grad, dtype, (0, 5))
        if reduction == "mean":
            assert np.isnan(loss)
        elif reduction == "sum":
            assert loss == 0
    assert_loss_type(case.loss(IMPLS[impl]), dtype, reduction, 0)


@impls
@dtypes
@target_kinds
@reductions
@pytest.mark.parametrize("eps", (0.0, 0.1))
def test_single_class_gives_zero_loss_and_gradient(impl, dtype, soft, reduction, eps):
    case = make_case(9, 1, dtype, soft=soft, weighted=True, label_smoothing=eps, reduction=reduction)
    loss, grad = case.loss_grad(IMPLS[impl])
    assert np.all(loss == 0) and np.all(case.loss(IMPLS[impl]) == 0)
    assert np.all(grad == 0)


@impls
@dtypes
def test_ignored_class_still_takes_part_in_other_rows_softmax(impl, dtype):
    """With ignore_index = 2 inside [0, K), logit 2 still enters every counted row's
    log-sum-exp: loss_n = log sum_j exp z_nj - z_ny, gradient p_nj - [j = y] (sum)."""
    rng = np.random.default_rng(7)
    z = make_logits(rng, 10, 4, dtype)
    z[:, 2] += 3  # make class 2 matter
    y = make_labels(rng, 10, 4, ignore_index=2)
    case = Case(z, y, dict(ignore_index=2, reduction="none"))
    z64 = z.astype(np.float64)
    p = np.exp(z64) / np.exp(z64).sum(axis=1, keepdims=True)
    counted = y != 2
    expected_loss = np.where(counted, np.log(np.exp(z64).sum(axis=1)) - z64[np.arange(10), np.where(counted, y, 0)], 0)
    expected_grad = np.where(counted[:, None], p - np.eye(4)[np.where(counted, y, 0)], 0)
    loss, grad = case.loss_grad(IMPLS[impl])
    assert_close(loss, expected_loss.astype(dtype), unit=1.0)
    assert_close(grad, expected_grad.astype(dtype), unit=1.0)
    assert np.all(grad[counted, 2] > 0)


# --- thread count -----------------------------------------------------------------------------


@dtypes
@target_kinds
@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_batch_reduction_is_bitwise_identical_for_any_thread_count(dtype, soft, reduction):
    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    if threads < 2:
        pytest.skip("Numba has a single thread on this machine")
    case = make_case(1000, 1000, dtype, soft=soft, weighted=True, label_smoothing=0.1, reduction=reduction)
    fast = IMPLS["fast"]
    before = numba.get_num_threads()
    try:
        results = {}
        for n_threads in (1, threads):
            numba.set_num_threads(n_threads)
            results[n_threads] = (case.loss(fast), *case.loss_grad(fast))
    finally:
        numba.set_num_threads(before)
    assert numba.get_num_threads() == before
    for a, b in zip(results[1], results[threads], strict=True):
        np.testing.assert_array_equal(a, b, strict=True)


@pytest.mark.parametrize("long_rows", [False, True], ids=["rows-in-cache", "long-rows"])
@pytest.mark.parametrize("k", [10, 1000, 2000])
@target_kinds
@dtypes
def test_read_only_inputs_work_on_every_path(dtype, soft, k, long_rows, monkeypatch):
    """Read-only arrays (np.load(mmap_mode="r"), frozen buffers) are valid input
    everywhere: small K, rows in cache, long rows, probability targets."""
    if long_rows:
        monkeypatch.setattr(api, "LONG_ROW_BYTES", 0)
    case = make_case(70, k, dtype, soft=soft, weighted=True, label_smoothing=0.1, reduction="none")
    expected_loss, expected_grad = case.loss_grad(IMPLS["fast"])
    expected_loss_only = case.loss(IMPLS["fast"])
    for array in (case.logits, case.target, case.kwargs["weight"]):
        array.flags.writeable = False
    loss, grad = case.loss_grad(IMPLS["fast"])
    # Read-only arrays are a separate Numba specialization, compiled on its own: the
    # results may differ in the last bits (seen: 1 float32 ulp), not beyond the tolerance.
    loss_unit, grad_unit = case.units()
    assert_close(loss, expected_loss, unit=loss_unit)
    assert_close(grad, expected_grad, unit=grad_unit)
    assert_close(case.loss(IMPLS["fast"]), expected_loss_only, unit=loss_unit)
