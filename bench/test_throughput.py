"""Loss + gradient throughput against the NumPy reference, memcpy, PyTorch and JAX.

    python -m pytest bench/ --benchmark-group-by=group

The implementations are those of fastsce._impls. Every benchmark checks its output
against the reference; the first (compiling) call is made before timing starts.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import SHAPES

from fastsce import _impls

_expected = {}


def _reference_result(shape, logits, labels):
    if shape not in _expected:
        _expected.clear()  # one shape's reference result at a time: they are large
        _expected[shape] = _impls.reference_result(logits, labels)
    return _expected[shape]


@pytest.mark.parametrize("impl", list(_impls.IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_loss_and_grad(benchmark, shape, impl):
    implementation = _impls.IMPLEMENTATIONS[impl]
    if not implementation.available():
        pytest.skip(f"{implementation.requires} is not installed")
    logits, labels = _impls.make_batch(*shape)
    run = implementation.build(logits, labels)
    run()  # warm-up: compile / trace outside the timing
    benchmark.group = f"{shape[0]}x{shape[1]} float32"
    result = benchmark(run)

    implementation.check(result, logits, _reference_result(shape, logits, labels))


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
