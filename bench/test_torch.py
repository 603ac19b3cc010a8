"""A training step's loss, forward and backward: fastsce.torch against PyTorch's own.

    python -m pytest bench/test_torch.py --benchmark-group-by=group

Each round computes the loss of a (N, K) logits tensor that requires grad and
backpropagates it to the logits (what a training step spends on the loss); both
implementations' loss and gradient are checked against each other.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
fastsce_torch = pytest.importorskip("fastsce.torch")

SHAPES = ((8192, 1000), (1024, 32000))
IMPLS = {"fastsce.torch": fastsce_torch.cross_entropy, "torch": F.cross_entropy}


def _step(fn, logits, target):
    logits.grad = None
    loss = fn(logits, target, label_smoothing=0.1)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_training_step(benchmark, shape, impl):
    n, k = shape
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(n, k, generator=gen)).requires_grad_()
    target = torch.randint(0, k, (n,), generator=gen)
    _step(IMPLS[impl], logits, target)  # warm up (compile) outside the timing
    benchmark.group = f"training step {n}x{k} float32"
    benchmark.extra_info.update(n=n, k=k, impl=impl)
    loss, grad = benchmark(_step, IMPLS[impl], logits, target)

    # PyTorch's float32 gradient is the less accurate one (up to ~1e-4 relative at
    # K = 32000, where fastsce is within 8 ulp): compared to that.
    want_loss, want_grad = _step(F.cross_entropy, logits.detach().clone().requires_grad_(), target)
    np.testing.assert_allclose(loss.numpy(), want_loss.numpy(), rtol=2e-5)
    scale = float(want_grad.abs().max())
    np.testing.assert_allclose(grad.numpy() / scale, want_grad.numpy() / scale, rtol=1e-4, atol=2e-6)
