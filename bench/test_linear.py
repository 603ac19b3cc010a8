"""A linear head's loss and gradients: fastsce.linear_cross_entropy_with_grad against the
three matrix products alone and PyTorch (eager, and F.linear_cross_entropy chunked).

    python -m pytest bench/test_linear.py --benchmark-group-by=group

Float32 input (N, H), weight (V, H), integer labels, "mean"; every result (loss, and the
gradients where computed) is checked against fastsce.reference. The full-size shapes of
the README's table (and their peak memory) are measured by bench/linear_table.py.
"""

import numpy as np
import pytest

import fastsce
from fastsce import reference

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = ((1024, 256, 8000),)


def _inputs(n, h, v):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h), dtype=np.float32)
    w = rng.standard_normal((v, h), dtype=np.float32) / np.float32(h**0.5)
    return x, w, rng.integers(0, v, n)


def _torch(fn):
    def run(x, w, y):
        xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
        loss = fn(xt, wt, torch.from_numpy(y))
        loss.backward()
        return loss.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()

    return run


def _products(x, w, y):
    z = np.matmul(x, w.T)
    return None, np.matmul(z, w), np.matmul(z.T, x)


VARIANTS = {
    "products": _products,  # h Wᵀ, G W, Gᵀ h with G = the logits: the floor
    "fastsce.linear": lambda x, w, y: fastsce.linear_cross_entropy_with_grad(x, w, y)[:3],
    "fastsce.linear loss": lambda x, w, y: (fastsce.linear_cross_entropy(x, w, y), None, None),
    "numpy+fastsce": lambda x, w, y: _unfused(x, w, y),
    "torch eager": _torch(lambda x, w, y: F.cross_entropy(F.linear(x, w), y)),
    "torch chunked": _torch(
        lambda x, w, y: F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions())
    ),
}


def _unfused(x, w, y):
    z = np.matmul(x, w.T)
    loss, g = fastsce.cross_entropy_with_grad(z, y, out=z)
    return loss, np.matmul(g, w), np.matmul(g.T, x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{h}x{v}" for n, h, v in SHAPES])
def test_linear_head(benchmark, shape, variant):
    x, w, y = _inputs(*shape)
    fn = VARIANTS[variant]
    torch.set_num_threads(2)
    fn(x, w, y)  # warm up (compile) outside the timing
    benchmark.group = "linear head %dx%dx%d float32" % shape
    benchmark.extra_info.update(shape=list(shape), linear=variant)
    loss, gx, gw = benchmark.pedantic(fn, (x, w, y), rounds=5, iterations=1)

    if variant == "products":
        z = x @ w.T
        np.testing.assert_allclose(gx, z @ w, rtol=1e-3, atol=1e-3)
    else:
        want = reference.linear_cross_entropy_with_grad(x, w, y)
        tol = reference.TOLERANCE[np.dtype(np.float32)]
        np.testing.assert_allclose(loss, want[0], **tol)
        if gx is not None:
            for got, expected in ((gx, want[1]), (gw, want[2])):
                scale = np.abs(expected).max()
                np.testing.assert_allclose(got / scale, expected / scale, rtol=tol["rtol"], atol=10 * tol["atol"])
    benchmark.extra_info["checked"] = True
