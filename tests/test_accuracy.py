"""How close fastsce comes to the exact result, in ulps, against an extended-precision
oracle: float32 results against float64 maths on the same (float32) inputs, float64
results against long double. The float32 NumPy reference itself is 35-580 ulp off."""

import numpy as np
import pytest

import fastsce

F32_TINY = float(np.finfo(np.float32).tiny)

# Measured maxima over the cases below (x86-64, AVX-512): float32 gradient 7.2 ulp (99th
# percentile 3.1), float32 loss 2.7e-7 relative; float64 loss 8e-16, gradient 8e-15 relative.
# Bounds leave room.
F32_GRAD_ULP = 10
F32_LOSS_REL = 4 * float(np.finfo(np.float32).eps)
F64_REL = 1e-14


def exact(z, y, soft=False):
    """Per-row loss and gradient in long double, and the scale of each gradient entry
    (its largest term) for measuring errors in ulps.

    Integer targets are taken relative to the target logit: with r_j = exp(z_j - z_y)
    and R = sum_{j != y} r_j, the loss is log1p(R), p_j = r_j / (1 + R) and
    p_y - 1 = -R / (1 + R): nothing cancels, even for a confident row."""
    z = z.astype(np.longdouble)
    if soft:
        y = y.astype(np.longdouble)
        m = z.max(axis=1, keepdims=True)
        lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))
        pa = np.exp(z - lse) * y.sum(axis=1, keepdims=True)
        # p_j sum_k t_k - t_j can cancel: its error is measured against the larger term
        return (y * (lse - z)).sum(axis=1), pa - y, np.maximum(pa, y)
    rows = np.arange(len(y))
    r = np.exp(z - z[rows, y][:, None])
    r[rows, y] = 0
    others = r.sum(axis=1)
    grad = r / (1 + others)[:, None]
    grad[rows, y] = -others / (1 + others)
    return np.log1p(others), grad, np.abs(grad)


def ulp_error(actual, expected, scale):
    """|actual - expected| in float32 ulps of scale, where scale is in float32's normal range."""
    expected = np.asarray(expected, np.float64)
    scale = np.asarray(scale, np.float64)
    normal = scale >= F32_TINY
    ulp = np.spacing(scale[normal].astype(np.float32)).astype(np.float64)
    return np.abs(actual[normal] - expected[normal]) / ulp


CASES = [(4000, 10, 3.0), (4000, 100, 3.0), (1000, 1000, 3.0), (1000, 1000, 30.0), (64, 32000, 3.0), (4, 300000, 3.0)]


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probs"])
@pytest.mark.parametrize("n, k, spread", CASES, ids=[f"{n}x{k}-s{s:g}" for n, k, s in CASES])
def test_float32_within_a_few_ulp_of_float64(n, k, spread, soft):
    rng = np.random.default_rng(k)
    z = (spread * rng.standard_normal((n, k))).astype(np.float32)
    z[::7] *= 4  # some confident rows, where p_y - 1 and a tiny loss test cancellation
    if soft:
        t = rng.dirichlet(np.ones(k) / 2, size=n)
        y = t.astype(np.float32)
        exact_loss, exact_grad, grad_scale = exact(z, y, soft=True)
    else:
        y = rng.integers(0, k, n)
        exact_loss, exact_grad, grad_scale = exact(z, y)
    loss, grad = fastsce.cross_entropy_with_grad(z, y, reduction="none")
    assert ulp_error(grad, exact_grad, grad_scale).max() <= F32_GRAD_ULP
    # Entries under float32's smallest normal come out 0 or subnormal: absolutely tiny.
    assert np.abs(grad - exact_grad.astype(np.float64)).max() <= max(F32_TINY, 1e-6 * np.abs(exact_grad).max())
    rel = np.abs(loss - exact_loss.astype(np.float64)) / np.abs(exact_loss.astype(np.float64))
    assert rel.max() <= F32_LOSS_REL
    np.testing.assert_allclose(fastsce.cross_entropy(z, y, reduction="none"), loss, rtol=F32_LOSS_REL)


@pytest.mark.parametrize("n, k", [(4000, 10), (4000, 64), (1000, 1000), (16, 32000)])
def test_float64_within_1e_14(n, k):
    rng = np.random.default_rng(k)
    z = 3 * rng.standard_normal((n, k))
    z[::7] *= 4
    y = rng.integers(0, k, n)
    exact_loss, exact_grad, _ = exact(z, y)
    loss, grad = fastsce.cross_entropy_with_grad(z, y, reduction="none")
    big = np.abs(exact_grad) > 1e-300
    np.testing.assert_allclose(grad[big], exact_grad[big].astype(np.float64), rtol=F64_REL, atol=0)
    np.testing.assert_allclose(loss, exact_loss.astype(np.float64), rtol=F64_REL, atol=0)
