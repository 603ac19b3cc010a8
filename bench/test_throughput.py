"""Loss + gradient throughput against memcpy, the NumPy reference and the peers installed
(PyTorch eager, torch.compile, optax under jax.jit, TensorFlow's fused op).

    python -m pytest bench/ --benchmark-group-by=group
    python -m pytest bench/ --benchmark-json=bench.json && python -m fastsce bench --from-json bench.json

The implementations are those of ``python -m fastsce bench`` (fastsce._tools.impls). Every
benchmark checks its output against the reference; the first (compiling) call is made
before timing starts. Every peer runs on Numba's thread count where its library allows.
``extra_info`` carries the shape, dtype and implementation, and ``checked`` once the
output has passed, for ``--from-json``.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numba
import numpy as np
import pytest
from conftest import SHAPES

from fastsce._tools import impls as _impls, report as _report

DTYPE = np.dtype(np.float32)
_expected = {}


def _reference_result(shape, logits, labels):
    if shape not in _expected:
        _expected.clear()  # one shape's reference result at a time: they are large
        _expected[shape] = _impls.reference_result(logits, labels)
    return _expected[shape]


@pytest.fixture(scope="session")
def pin_threads():
    """pin(implementation): the peer's library on Numba's thread count, once per session,
    restored at its end; returns what the library runs with."""
    pinned, undo = {}, []

    def pin(implementation):
        if implementation.pin_threads is not None and implementation.name not in pinned:
            pinned[implementation.name], restore = implementation.pin_threads(numba.get_num_threads())
            if restore is not None:
                undo.append(restore)
        return pinned.get(implementation.name)

    yield pin
    for restore in reversed(undo):
        restore()


@pytest.mark.parametrize("impl", list(_impls.IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_loss_and_grad(benchmark, pin_threads, shape, impl):
    implementation = _impls.IMPLEMENTATIONS[impl]
    if not implementation.available():
        pytest.skip(f"{' and '.join(implementation.requires)} not installed (pip install '.[peers]')")
    n, k = shape
    logits, labels = _impls.make_batch(n, k, DTYPE)
    threads = pin_threads(implementation)
    t0 = time.perf_counter()
    try:
        run = implementation.build(logits, labels)  # peers compile here
    except _impls.Skip as e:  # torch.compile with no working C++ compiler
        pytest.skip(str(e))
    run()  # warm-up: compile / trace outside the timing
    first_call = time.perf_counter() - t0
    benchmark.group = f"{n}x{k} {DTYPE}"
    benchmark.extra_info.update(n=n, k=k, dtype=str(DTYPE), impl=impl, first_call_s=first_call)
    if threads is not None:
        benchmark.extra_info["threads"] = threads
    if impl == "fastsce":
        benchmark.extra_info["extra_memory"] = _report.extra_memory(run)
    result = benchmark(run)

    implementation.check(result, logits, _reference_result(shape, logits, labels), labels)
    benchmark.extra_info["checked"] = True


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
    benchmark.extra_info["first_call_in_new_process"] = cache
    benchmark.pedantic(run, setup=empty_cache if cache == "cold" else None, rounds=3, iterations=1)
