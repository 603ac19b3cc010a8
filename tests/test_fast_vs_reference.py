"""The fused kernels against the NumPy reference over the full option matrix."""

import itertools

import pytest

from _cases import (
    DTYPES,
    IMPLS,
    REDUCTIONS,
    assert_close,
    assert_grad_type,
    assert_loss_type,
    make_case,
    short,
)

NS = (0, 1, 7, 1000)
KS = (1, 2, 10, 1000, 32000)
BIG = (1000, 32000)
SHAPES = [shape for shape in itertools.product(NS, KS) if shape != BIG]

# Target kinds: class indices with the default ignore_index -100, class indices with an
# ignore_index inside [0, K) (K // 2), and probabilities (only ignore_index -100 exists).
TARGETS = ("int", "int-ignore-in", "soft")


def param(dtype, reduction, target, weighted, eps):
    label = f"{short(dtype)}-{reduction}-{target}-{'w' if weighted else 'now'}-ls{eps}"
    return pytest.param(dtype, reduction, target, weighted, eps, id=label)


OPTIONS = [param(*combo) for combo in itertools.product(DTYPES, REDUCTIONS, TARGETS, (False, True), (0.0, 0.1))]

# The N=1000, K=32000 shape (32M logits; the reference needs several (N, K) temporaries)
# runs a reduced set: every dtype, reduction and target kind, weights and smoothing varied.
BIG_OPTIONS = [
    param(dtype, *combo)
    for dtype in DTYPES
    for combo in (("mean", "int", True, 0.1), ("sum", "int-ignore-in", False, 0.0), ("none", "soft", True, 0.1))
]


def build(n, k, dtype, reduction, target, weighted, eps):
    return make_case(
        n,
        k,
        dtype,
        soft=target == "soft",
        weighted=weighted,
        ignore_index=k // 2 if target == "int-ignore-in" else -100,
        label_smoothing=eps,
        reduction=reduction,
    )


def check_against_reference(case, n, k):
    dtype, reduction = case.dtype, case.kwargs["reduction"]
    fast, ref = IMPLS["fast"], IMPLS["ref"]

    loss, grad = case.loss_grad(fast)
    ref_loss, ref_grad = case.loss_grad(ref)
    loss_only = case.loss(fast)

    for value in (loss, ref_loss, loss_only):
        assert_loss_type(value, dtype, reduction, n)
    for g in (grad, ref_grad):
        assert_grad_type(g, dtype, (n, k))

    loss_unit, grad_unit = case.units()
    assert_close(loss, ref_loss, unit=loss_unit)
    assert_close(grad, ref_grad, unit=grad_unit)
    assert_close(loss_only, loss, unit=loss_unit)  # the loss-only kernel agrees with the fused one


@pytest.mark.parametrize("dtype, reduction, target, weighted, eps", OPTIONS)
@pytest.mark.parametrize("n, k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_fast_matches_reference(n, k, dtype, reduction, target, weighted, eps):
    check_against_reference(build(n, k, dtype, reduction, target, weighted, eps), n, k)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, reduction, target, weighted, eps", BIG_OPTIONS)
def test_fast_matches_reference_big(dtype, reduction, target, weighted, eps):
    n, k = BIG
    check_against_reference(build(n, k, dtype, reduction, target, weighted, eps), n, k)
