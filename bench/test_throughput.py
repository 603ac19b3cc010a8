"""Loss + gradient throughput against the NumPy reference, memcpy, PyTorch and JAX.

    python -m pytest bench/ --benchmark-group-by=group

Every benchmark checks its output against the reference; the first (compiling) call is
made before timing starts.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import SHAPES, make_batch
from implementations import IMPLEMENTATIONS

from fastsce import reference

_expected = {}


def _reference_result(shape):
    if shape not in _expected:
        logits, labels = make_batch(*shape)
        _expected[shape] = reference.cross_entropy_with_grad(logits, labels)
    return _expected[shape]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_loss_and_grad(benchmark, shape, impl):
    build, needs = IMPLEMENTATIONS[impl]
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    logits, labels = make_batch(*shape)
    run = build(logits, labels)
    run()  # warm-up: compile / trace outside the timing
    benchmark.group = f"{shape[0]}x{shape[1]} float32"
    loss, grad = benchmark(run)

    if impl == "memcpy":
        np.testing.assert_array_equal(grad, logits)
        return
    ref_loss, ref_grad = _reference_result(shape)
    tol = reference.TOLERANCE[logits.dtype]
    np.testing.assert_allclose(loss, ref_loss, **tol)
    if grad is not None:
        np.testing.assert_allclose(grad, ref_grad, rtol=tol["rtol"], atol=tol["atol"] / shape[0])


COMPILE_SCRIPT = textwrap.dedent(
    """
    import numpy as np, fastsce
    for dtype in (np.float32, np.float64):
        z = np.zeros((4, 3), dtype)
        fastsce.cross_entropy_with_grad(z, np.zeros(4, np.int64))
    """
)


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_first_call_latency(benchmark, tmp_path, cache):
    """A fresh process importing fastsce and making its first call for both dtypes:
    cold compiles into an empty on-disk cache, warm loads that cache."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def run():
        subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], check=True, env=env)

    def empty_cache():
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()

    if cache == "warm":
        run()
    benchmark.group = "first call in a new process (both dtypes)"
    benchmark.pedantic(run, setup=empty_cache if cache == "cold" else None, rounds=3, iterations=1)
