"""A training step's loss, forward and backward: fastsce.torch against PyTorch's own.

    python -m pytest bench/test_torch.py --benchmark-group-by=group

Each round computes the loss of a (N, K) logits tensor that requires grad and
backpropagates it to the logits (what a training step spends on the loss); both
implementations' loss and gradient are checked against fastsce.reference, with the
check of bench/test_throughput.py.
"""

import pytest

from fastsce import reference
from fastsce._tools import impls as _impls

torch = pytest.importorskip("torch")
F = torch.nn.functional
fastsce_torch = pytest.importorskip("fastsce.torch")

SHAPES = ((8192, 1000), (1024, 32000))
IMPLS = {"fastsce.torch": fastsce_torch.cross_entropy, "torch": F.cross_entropy}
CHECKS = {"fastsce.torch": _impls.IMPLEMENTATIONS["fastsce"], "torch": _impls.IMPLEMENTATIONS["torch"]}


def _step(fn, logits, target):
    logits.grad = None
    loss = fn(logits, target)
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
    benchmark.extra_info.update(n=n, k=k, step=impl)
    loss, grad = benchmark(_step, IMPLS[impl], logits, target)

    x, y = logits.detach().numpy(), target.numpy()
    expected = reference.cross_entropy_with_grad(x, y)
    CHECKS[impl].check((loss.numpy(), grad.numpy()), x, expected)
    benchmark.extra_info["checked"] = True
