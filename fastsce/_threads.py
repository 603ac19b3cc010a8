"""How fastsce runs its parallel kernels: the threading layer, one pool launch at a time,
small problems without the pool, and what happens after ``os.fork()``.

Every kernel made by :func:`fastsce._kernels.jit.parallel` has a ``.serial`` twin, the
same code compiled without threads (``prange`` runs as ``range``, over the same chunks,
so its results are bitwise those of the threaded kernel). :func:`launching` picks one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

import numba
from numba.np.ufunc import parallel as _numba_parallel

# Problems of at most this many logits run on the calling thread: waking a thread team
# costs more than they take, and far more when other processes keep every core busy
# (20 x 1000 loss+grad under two busy-loop processes: 90th percentile 2.3-3.6 ms through
# the workqueue pool, ~8 ms through OpenMP's, 0.15-0.22 ms on the calling thread;
# bench/small_calls.py).
SERIAL_LOGITS = 1 << 16

# Numba's threading layers in the order fastsce asks for them, when neither the user
# (NUMBA_THREADING_LAYER, numba.config) nor another library has chosen one before
# fastsce's first parallel call: GNU OpenMP first, as it is the fastest here. float32
# loss+grad, workqueue time / OpenMP time, 9 interleaved rounds on an idle 2-core machine
# (bench/threading_layers.py): 2.15x at 65536 x 10, 2.08x at 16384 x 100, 1.23x at
# 8192 x 1000, 1.10x at 1024 x 32000. (Under two busy-loop processes the order turned,
# workqueue 1.45-3.3x faster: OpenMP's threads spin while waiting for a core.) OpenMP
# cannot run a parallel region in a child forked after it ran one: such a child runs the
# serial twins (see _after_fork_in_child). TBB (fork-safe) when OpenMP is missing.
LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_lock = threading.Lock()
_pool_unusable = False  # set in a forked child of a process whose OpenMP pool ran


def pin_layer() -> None:
    """Ask for LAYER_PRIORITY unless the user chose a layer (environment or numba.config)
    or the pool runs. Numba takes the first of them that loads; the launch lock below
    serves every layer (the workqueue takes one launch at a time)."""
    if _numba_parallel._is_initialized or "NUMBA_THREADING_LAYER" in os.environ:
        return
    if str(numba.config.THREADING_LAYER).lower() == "default":
        numba.config.THREADING_LAYER_PRIORITY = list(LAYER_PRIORITY)


def _after_fork_in_child() -> None:
    # A lock held by another thread at the fork would stay held forever in the child.
    global _lock, _pool_unusable
    _lock = threading.Lock()
    # GNU OpenMP cannot run a parallel region in a child forked after it started one
    # (Numba terminates the child); TBB and the workqueue start afresh in the child.
    if _numba_parallel._is_initialized and numba.threading_layer() == "omp":
        _pool_unusable = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _serial(kernel):
    return getattr(kernel, "serial", kernel)  # (a plain function, e.g. a test's wrapper, is its own twin)


def _threaded(kernel):
    return kernel


def _start_pool() -> None:
    """Start Numba's thread pool (as its first parallel call would) without changing another
    library's thread settings: GNU OpenMP's start calls omp_set_num_threads(NUMBA_NUM_THREADS)
    on the calling thread, and PyTorch (sharing libgomp) reads that as its own thread count."""
    gomp = None
    if str(numba.config.THREADING_LAYER).lower() not in ("workqueue", "tbb"):
        try:
            gomp = ctypes.CDLL("libgomp.so.1")  # the copy already loaded, if any (by soname)
        except OSError:
            pass
    before = gomp.omp_get_max_threads() if gomp is not None else None
    _numba_parallel._launch_threads()
    if gomp is not None and numba.threading_layer() == "omp" and gomp.omp_get_max_threads() != before:
        gomp.omp_set_num_threads(before)  # Numba's regions pass their own thread count


@contextlib.contextmanager
def launching(n_logits: int):
    """Yields ``pick``, which maps a parallel kernel to the one to call for a problem of
    ``n_logits`` logits: its serial twin for small problems (and in a forked child of an
    OpenMP process), else the kernel itself, launched under the lock."""
    if runs_serial(n_logits):
        yield _serial  # no pool, no lock: small calls from several threads run at once
        return
    with _lock:
        if not _numba_parallel._is_initialized:
            _start_pool()
        yield _threaded


def runs_serial(n_logits: int) -> bool:
    """True when launching(n_logits) would pick the serial twins (no pool, no lock): a
    caller may then call them directly, without the context manager (~2 us of a small call)."""
    return n_logits <= SERIAL_LOGITS or _pool_unusable


def serial_only() -> bool:
    """True in a forked child whose pool cannot run (every call is then serial)."""
    return _pool_unusable


pin_layer()
