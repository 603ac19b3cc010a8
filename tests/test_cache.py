"""Kernels cached on disk by one process load and run in another with a different
thread count (parallel kernels plus cache=True have crashed other packages there)."""

import os
import shutil
import subprocess
import sys

import pytest

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


@pytest.mark.full  # compiles a small-K path into an empty cache: 25 s of CPU
def test_cache_written_with_two_threads_loads_with_one_and_back(tmp_path):
    first = _run(tmp_path, 2)  # compiles and writes the cache
    assert any(tmp_path.rglob("*.nbi")), "the kernels were not cached"
    second = _run(tmp_path, 1)
    third = _run(tmp_path, 2)
    assert [first[0], second[0], third[0]] == ["2", "1", "2"]
    assert first[1:] == second[1:] == third[1:]  # bitwise the same whatever the thread count


# The cache is shared by every copy of the same kernel sources (the checkout, an installed
# copy, any working directory) and left alone after any of them changes.
PROBE = """
import numpy as np, fastsce
from fastsce._kernels import jit
x = np.random.default_rng(0).standard_normal((20, 30))
r = fastsce.logsumexp(x)
print(jit.compile_count(), jit.cache_dir(), float(r.sum()).hex())
"""


def _probe(package_parent, cache_dir, cwd):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(package_parent)}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    compiled, directory, result = done.stdout.split()
    return int(compiled), directory, result


def test_another_copy_in_another_directory_compiles_nothing_and_an_edit_recompiles(tmp_path):
    import fastsce

    here = os.path.dirname(os.path.dirname(fastsce.__file__))
    copy = tmp_path / "installed"
    shutil.copytree(os.path.join(here, "fastsce"), copy / "fastsce", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cache = tmp_path / "cache"

    compiled, directory, result = _probe(here, cache, tmp_path / "a")
    assert compiled > 0
    again, directory_again, result_again = _probe(copy, cache, tmp_path / "b")
    assert (again, directory_again, result_again) == (0, directory, result)

    helpers = copy / "fastsce" / "_kernels" / "simd.py"  # not the kernel's own file
    helpers.write_text(helpers.read_text() + "\n# edited\n")
    edited, directory_edited, result_edited = _probe(copy, cache, tmp_path / "b")
    assert edited > 0, "the cache of the old sources was used after an edit"
    assert directory_edited != directory and result_edited == result


def test_unwritable_cache_directory_falls_back_to_numbas_locators(monkeypatch, tmp_path):
    from numba.core import caching

    from fastsce._kernels import jit, rows

    fn = rows.hard_loss.py_func
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    assert isinstance(jit._CacheImpl(fn).locator, jit._Locator)
    assert str(jit.cache_dir()).startswith(str(tmp_path / "cache"))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "file" / "cache"))  # not a directory
    assert jit._Locator.from_function(fn, rows.__file__) is None
    # Numba's own: next to the source, or under the NUMBA_CACHE_DIR this process started with
    numbas = (caching.InTreeCacheLocator, caching.UserProvidedCacheLocator)
    assert isinstance(jit._CacheImpl(fn).locator, numbas)
    assert not isinstance(jit._CacheImpl(fn).locator, jit._Locator)


@pytest.mark.parametrize("k", [8, 1000])  # the tile kernels and the row kernels
def test_read_only_inputs_and_other_label_dtypes_reuse_the_compiled_kernels(k):
    """Numba compiles a kernel again for each writeable flag and dtype of its arguments:
    read-only inputs and int32 / uint8 labels must not compile a second set of kernels."""
    import numpy as np

    import fastsce
    from fastsce._kernels import jit

    rng = np.random.default_rng(0)
    z = rng.standard_normal((130, k)).astype(np.float32)
    y = rng.integers(0, k, 130)
    w, v = np.linspace(0.5, 2, k), np.ones(130)
    options = [dict(), dict(weight=w, sample_weight=v)]
    for kw in options:
        fastsce.cross_entropy_with_grad(z, y, **kw)
        fastsce.cross_entropy(z, y, **kw)
    before = jit.compile_count()

    def frozen(a):
        a = a.copy()
        a.flags.writeable = False
        return a

    for labels in (frozen(y), y.astype(np.int32), frozen(y.astype(np.int32)), (y % 200).astype(np.uint8)):
        for kw in options + [{name: frozen(a) for name, a in options[1].items()}]:
            loss, grad = fastsce.cross_entropy_with_grad(frozen(z), labels, **kw)
            np.testing.assert_array_equal(grad, fastsce.cross_entropy_with_grad(z, labels.astype(np.int64), **kw)[1])
            fastsce.cross_entropy(frozen(z), labels, **kw)
    assert jit.compile_count() == before
