"""Kernels cached on disk by one process load and run in another with a different
thread count (parallel kernels plus cache=True have crashed other packages there)."""

import os
import subprocess
import sys

SCRIPT = """
import numpy as np, numba, fastsce
rng = np.random.default_rng(0)
z = rng.standard_normal((300, 50)).astype(np.float32)
y = rng.integers(0, 50, 300)
loss, grad = fastsce.cross_entropy_with_grad(z, y)
print(numba.get_num_threads(), repr(float(loss)), float(np.abs(grad).sum()).hex())
"""


def _run(cache_dir, threads):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "NUMBA_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_cache_written_with_two_threads_loads_with_one_and_back(tmp_path):
    first = _run(tmp_path, 2)  # compiles and writes the cache
    assert any(tmp_path.rglob("*.nbi")), "the kernels were not cached"
    second = _run(tmp_path, 1)
    third = _run(tmp_path, 2)
    assert [first[0], second[0], third[0]] == ["2", "1", "2"]
    assert first[1:] == second[1:] == third[1:]  # bitwise the same whatever the thread count
