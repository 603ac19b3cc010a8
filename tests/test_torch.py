"""Both implementations against torch.nn.functional.cross_entropy and its autograd gradient.

Random inputs avoid the documented deviations (PyTorch gives NaN where fastsce takes
0 * log 0 = 0): logits here are finite except in the explicit -inf edge case, which has
no smoothing and nonzero weights.
"""

import numpy as np
import pytest

from _cases import DTYPES, IMPLS, REDUCTIONS, Case, assert_close, make_case, short

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(0, 3), (1, 1), (1, 5), (3, 2), (7, 10), (16, 1), (33, 100), (128, 1000), (4, 5000)]
N_RANDOM = 120


def torch_loss_grad(case):
    """F.cross_entropy's loss and d(loss)/d(logits) (of the summed row losses for "none")."""
    logits = torch.tensor(case.logits, requires_grad=True)
    kwargs = dict(case.kwargs)
    if kwargs.get("weight") is not None:
        kwargs["weight"] = torch.tensor(np.asarray(kwargs["weight"], case.dtype))
    loss = F.cross_entropy(logits, torch.tensor(case.target), **kwargs)
    (loss.sum() if kwargs["reduction"] == "none" else loss).backward()
    return loss.detach().numpy(), logits.grad.numpy()


def random_params():
    rng = np.random.default_rng(20240601)
    params = []
    for i in range(N_RANDOM):
        n, k = SHAPES[rng.integers(len(SHAPES))]
        dtype = DTYPES[rng.integers(2)]
        reduction = REDUCTIONS[rng.integers(3)]
        soft = bool(rng.integers(2))
        weighted = bool(rng.integers(2))
        eps = float(rng.choice([0.0, 0.05, 0.3, 1.0]))
        # ignore_index other than -100 only with class indices, as PyTorch requires
        ignore_index = -100 if soft or rng.random() < 0.5 else int(rng.integers(k))
        label = (
            f"{i:03d}-{short(dtype)}-{reduction}-{'soft' if soft else 'int'}-ii{ignore_index}"
            f"-{'w' if weighted else 'now'}-ls{eps}-{n}x{k}"
        )
        args = dict(
            soft=soft, weighted=weighted, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction, seed=i
        )
        params.append(pytest.param(n, k, dtype, args, id=label))
    return params


def check_against_torch(impl, case):
    expected_loss, expected_grad = torch_loss_grad(case)
    loss, grad = case.loss_grad(IMPLS[impl])
    loss_only = case.loss(IMPLS[impl])
    loss_unit, grad_unit = case.units()
    assert_close(loss, expected_loss, unit=loss_unit)
    assert_close(loss_only, expected_loss, unit=loss_unit)
    assert_close(grad, expected_grad, unit=grad_unit)
    return loss, grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n, k, dtype, args", random_params())
def test_matches_torch_on_random_inputs(impl, n, k, dtype, args):
    check_against_torch(impl, make_case(n, k, dtype, **args))


# --- edge cases ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("eps", (0.0, 0.1))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_matches_torch(impl, dtype, eps, reduction):
    case = make_case(5, 4, dtype, ignore_index=1, label_smoothing=eps, reduction=reduction, weighted=True)
    case.target[:] = 1
    loss, grad = check_against_torch(impl, case)
    if reduction == "mean":
        assert np.isnan(loss)
    else:
        assert np.all(loss == 0)
    assert np.all(grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_matches_torch(impl, dtype, soft, reduction):
    loss, grad = check_against_torch(impl, make_case(0, 4, dtype, soft=soft, reduction=reduction, label_smoothing=0.1))
    assert grad.shape == (0, 4)
    if reduction == "mean":
        assert np.isnan(loss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("weighted", (False, True), ids=("now", "w"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_logits_match_torch(impl, dtype, weighted, reduction):
    case = make_case(8, 6, dtype, weighted=weighted, reduction=reduction)
    masked = np.zeros(case.logits.shape, bool)
    masked[:, 1] = masked[::2, 4] = True
    case.logits[masked] = -np.inf
    case.target[case.target == 1] = 0
    case.target[(case.target == 4) & (np.arange(8) % 2 == 0)] = 3
    loss, grad = check_against_torch(impl, case)
    assert np.all(np.isfinite(loss))
    assert np.all(grad[masked] == 0)
    assert not np.isnan(grad).any()


LARGE = {
    np.float32: np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [5e3, 5e3 - 1, -1e4]], np.float32),
    np.float64: np.array([[1e300, -1e300, 0.0], [-1e300, 1e300, 1e300], [1e300, -1e300, -1e300]]),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("target", ([0, 2, 1], [1, 0, 2]), ids=("int-a", "int-b"))
@pytest.mark.parametrize("eps", (0.0, 0.1))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_logits_match_torch(impl, dtype, target, eps, reduction):
    case = Case(LARGE[dtype].copy(), np.array(target), dict(reduction=reduction, label_smoothing=eps))
    loss, grad = check_against_torch(impl, case)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
def test_large_logits_soft_targets_match_torch(impl, dtype):
    case = Case(LARGE[dtype].copy(), np.full((3, 3), 1 / 3, dtype), dict(reduction="none"))
    check_against_torch(impl, case)
