"""Rows processed block by block with a running max (the path for rows longer than the
cache), forced on for small shapes so every block boundary case is cheap to check."""

import numpy as np
import pytest

import fastsce
from _cases import DTYPES, IMPLS, assert_close, make_case, short
from fastsce import api

K_BLOCKS = (1, 1024, 1025, 3000)  # one block, exactly one, one plus one element, three


@pytest.fixture
def long_rows(monkeypatch):
    monkeypatch.setattr(api, "LONG_ROW_BYTES", 0)


def with_masked_blocks(case):
    """Rows whose first block is all -inf, all -inf but the target, a NaN, all -inf."""
    z = case.logits
    n, k = z.shape
    if n >= 4 and k > 1:
        z[0, : min(k - 1, 1500)] = -np.inf
        z[1, :] = -np.inf
        z[2, k // 2] = np.nan
        z[3, : k - 1] = -np.inf
        if case.target.ndim == 1:
            case.target[0] = k - 1
            case.target[3] = k - 1
    return case


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in-place"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
@pytest.mark.parametrize("masked", [False, True], ids=["finite", "masked"])
@pytest.mark.parametrize("k", K_BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
def test_long_rows_match_reference(long_rows, dtype, k, masked, weighted, eps, in_place):
    case = make_case(7, k, dtype, weighted=weighted, label_smoothing=eps, reduction="none")
    if masked:
        case = with_masked_blocks(case)
    expected_loss, expected_grad = case.loss_grad(IMPLS["ref"])
    loss_only = case.loss(IMPLS["fast"])
    buffer = case.logits.copy()
    loss, grad = fastsce.cross_entropy_with_grad(buffer, case.target, **case.kwargs, out=buffer if in_place else None)
    loss_unit, grad_unit = case.units()
    assert_close(loss, expected_loss, unit=loss_unit)
    assert_close(loss_only, expected_loss, unit=loss_unit)
    assert_close(grad, expected_grad, unit=grad_unit)


def test_long_rows_are_really_taken(long_rows, monkeypatch):
    """The fixture reaches the kernel: the long-row flag is what the API passes."""
    seen = []
    real = api.row_kernels.hard_loss_grad

    def spy(*args):
        seen.append(args[11])  # long_rows
        return real(*args)

    monkeypatch.setattr(api.row_kernels, "hard_loss_grad", spy)
    case = make_case(3, 2000, np.float32)
    case.loss_grad(IMPLS["fast"])
    assert seen == [True]
