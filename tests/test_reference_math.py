"""The reference against closed-form facts, and property tests of fast vs reference."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from _cases import (
    DTYPES,
    FD_STEP,
    FD_TOL,
    IMPLS,
    REDUCTIONS,
    Case,
    assert_close,
    make_case,
    short,
)

ref = IMPLS["ref"]

# Target kinds: class indices (ignore_index -100 or inside [0, K)), and probabilities.
TARGETS = {
    "int": dict(soft=False),
    "int-ignore-in": dict(soft=False, ignore_index=2),
    "soft": dict(soft=True),
    "soft-zeros": dict(soft=True, zeros=True),  # some probabilities exactly 0
}
OPTION_GRID = [
    pytest.param(reduction, target, weighted, eps, id=f"{reduction}-{target}-{'w' if weighted else 'now'}-ls{eps}")
    for reduction, target, weighted, eps in itertools.product(REDUCTIONS, TARGETS, (False, True), (0.0, 0.1))
]


def total_loss(case, logits):
    """The loss as a scalar function of the logits; for "none" the sum of the row losses."""
    return float(np.sum(ref.cross_entropy(logits, case.target, **case.kwargs)))


@pytest.mark.parametrize("reduction, target, weighted, eps", OPTION_GRID)
def test_gradient_matches_central_differences(reduction, target, weighted, eps):
    case = make_case(6, 5, np.float64, weighted=weighted, label_smoothing=eps, reduction=reduction, **TARGETS[target])
    _, grad = case.loss_grad(ref)
    numeric = np.empty_like(case.logits)
    for idx in np.ndindex(*case.logits.shape):
        up, down = case.logits.copy(), case.logits.copy()
        up[idx] += FD_STEP
        down[idx] -= FD_STEP
        numeric[idx] = (total_loss(case, up) - total_loss(case, down)) / (2 * FD_STEP)
    assert np.any(grad != 0)
    np.testing.assert_allclose(grad, numeric, **FD_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction, target, weighted, eps", OPTION_GRID)
def test_adding_a_constant_per_row_changes_nothing(impl, reduction, target, weighted, eps):
    case = make_case(9, 7, np.float64, weighted=weighted, label_smoothing=eps, reduction=reduction, **TARGETS[target])
    shift = np.random.default_rng(1).uniform(-50, 50, size=(9, 1))
    shifted = Case(case.logits + shift, case.target, case.kwargs)
    loss, grad = case.loss_grad(IMPLS[impl])
    loss_shifted, grad_shifted = shifted.loss_grad(IMPLS[impl])
    loss_unit, grad_unit = case.units()
    assert_close(loss_shifted, loss, unit=loss_unit, rtol=1e-12)
    assert_close(grad_shifted, grad, unit=grad_unit, rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("k", (2, 10, 1000))
@pytest.mark.parametrize(
    "target, weighted, eps",
    [
        pytest.param("int", False, 0.0, id="int"),
        pytest.param("soft", False, 0.0, id="soft"),
        pytest.param("soft-zeros", False, 0.0, id="soft-zeros"),
        # Not required by the closed form's usual statement, but true all the same:
        # sum_j (p_j A - w_j t'_j) = A - A for any weights, smoothing and targets.
        pytest.param("int-ignore-in", True, 0.1, id="int-ignore-in-w-ls0.1"),
        pytest.param("soft", True, 0.1, id="soft-w-ls0.1"),
    ],
)
def test_gradient_rows_sum_to_zero(impl, dtype, k, target, weighted, eps):
    case = make_case(20, k, dtype, weighted=weighted, label_smoothing=eps, reduction="sum", **TARGETS[target])
    _, grad = case.loss_grad(IMPLS[impl])
    assert np.any(grad != 0)
    _, grad_unit = case.units()
    # a sum of K terms: allow sqrt(K) roundings of the gradient's unit
    assert_close(grad.sum(axis=1), np.zeros(20, dtype), unit=grad_unit * np.sqrt(k))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("reduction, target, weighted, eps", OPTION_GRID)
def test_loss_is_nonnegative_for_probability_targets(impl, dtype, reduction, target, weighted, eps):
    case = make_case(50, 6, dtype, weighted=weighted, label_smoothing=eps, reduction=reduction, **TARGETS[target])
    # make some rows confident, where the exact loss is ~0 and rounding could push it below
    case.logits[::3, 0] += 40
    loss = case.loss(IMPLS[impl])
    assert np.all(loss >= 0), loss


# --- property tests: fast vs reference over random inputs ------------------------------


@st.composite
def problems(draw, values, finite_in_every_row=False):
    """A random legal call: shape, dtype, target kind and every option; logits from values(dtype).

    With finite_in_every_row, a row whose logits are all infinite gets a 0 in a random column.
    """
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 6))
    k = draw(st.integers(1, 6))
    logits = draw(hnp.arrays(dtype, (n, k), elements=values(dtype)))
    if finite_in_every_row:
        for row in np.flatnonzero(~np.isfinite(logits).any(axis=1)):
            logits[row, draw(st.integers(0, k - 1))] = 0
    kwargs = dict(
        reduction=draw(st.sampled_from(REDUCTIONS)),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
    )
    if draw(st.booleans()):
        kwargs["weight"] = draw(hnp.arrays(np.float64, k, elements=st.sampled_from([0.0, 0.5, 1.0, 2.5])))
    if draw(st.booleans()):
        # probabilities: non-negative integer counts normalised per row (a zero row -> uniform)
        counts = draw(hnp.arrays(np.float64, (n, k), elements=st.sampled_from([0.0, 1.0, 2.0, 5.0])))
        counts[counts.sum(axis=1) == 0] = 1.0
        target = (counts / counts.sum(axis=1, keepdims=True)).astype(dtype)
    else:
        ignore_index = draw(st.sampled_from([-100, -1, 0, k - 1]))
        kwargs["ignore_index"] = ignore_index
        classes = st.sampled_from(sorted({ignore_index, *range(k)}))
        target = np.asarray(draw(st.lists(classes, min_size=n, max_size=n)), np.int64)
    return Case(logits, target, kwargs)


def moderate(dtype):
    return st.floats(-30, 30, width=np.dtype(dtype).itemsize * 8)


def huge(dtype):
    big = 1e4 if dtype == np.float32 else 1e300
    return st.one_of(
        st.sampled_from([-big, -big / 2, -1.0, 0.0, 1.0, big / 2, big]),
        st.floats(-big, big, width=np.dtype(dtype).itemsize * 8),
    )


def masked(dtype):
    """-inf (a masked class) or a moderate value."""
    return st.one_of(st.just(-np.inf), moderate(dtype))


def with_infinities(dtype):
    return st.one_of(st.sampled_from([-np.inf, np.inf]), moderate(dtype))


def check_fast_vs_reference(case):
    loss, grad = case.loss_grad(IMPLS["fast"])
    ref_loss, ref_grad = case.loss_grad(ref)
    loss_only = case.loss(IMPLS["fast"])
    loss_unit, grad_unit = case.units()
    assert_close(loss, ref_loss, unit=loss_unit)
    assert_close(grad, ref_grad, unit=grad_unit)
    assert_close(loss_only, ref_loss, unit=loss_unit)


@given(problems(moderate))
def test_property_fast_matches_reference_moderate_logits(case):
    check_fast_vs_reference(case)


@given(problems(huge))
def test_property_fast_matches_reference_huge_logits(case):
    check_fast_vs_reference(case)


@given(problems(masked, finite_in_every_row=True))
def test_property_fast_matches_reference_masked_logits(case):
    check_fast_vs_reference(case)


@given(problems(with_infinities))
def test_property_fast_matches_reference_with_infinities(case):
    check_fast_vs_reference(case)
