"""fastsce.dask (threaded scheduler) against one in-memory call: what Dask costs, for
logits chunked along the rows (65536 x 1000) and along the classes (8192 x 32000).

    python -m pytest bench/test_dask.py --benchmark-group-by=group

The batch is in memory in both cases (a Dask array wrapping the NumPy logits), so the
difference is the price of the graph and the scheduler. Each block's task calls the
fused kernel, and fastsce runs one kernel launch at a time (each already uses every core
through Numba's thread pool): more scheduler threads do not add parallelism. Every
benchmark checks its output against the reference; the first call is made before timing.
"""

import numpy as np
import pytest

import fastsce
from fastsce._tools import impls as _impls

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
fastsce_dask = pytest.importorskip("fastsce.dask")

SHAPE = (65536, 1000)
DTYPE = np.dtype(np.float32)
_batch = {}


def batch():
    """(logits, labels, reference loss, reference gradient), made once."""
    if not _batch:
        logits, labels = _impls.make_batch(*SHAPE, DTYPE)
        _batch["data"] = (logits, labels, *_impls.reference_result(logits, labels))
    return _batch["data"]


def in_memory(logits, labels, grad):
    if grad:
        return lambda: fastsce.cross_entropy_with_grad(logits, labels)
    return lambda: (fastsce.cross_entropy(logits, labels), None)


def dask_threads(row_chunks):
    def build(logits, labels, grad):
        z = da.from_array(logits, chunks=(-(-len(logits) // row_chunks), -1))
        y = da.from_array(labels, chunks=z.chunks[0])

        def run():
            if grad:  # the gradient is assembled into one NumPy array: a copy of it
                return dask.compute(*fastsce_dask.cross_entropy_with_grad(z, y), scheduler="threads")
            return dask.compute(fastsce_dask.cross_entropy(z, y), scheduler="threads")[0], None

        return run

    return build


RUNS = {
    "in-memory": in_memory,
    "dask-threads-1-chunk": dask_threads(1),
    "dask-threads-8-chunks": dask_threads(8),
    "dask-threads-64-chunks": dask_threads(64),
}


@pytest.mark.parametrize("what", ["loss+grad", "loss"])
@pytest.mark.parametrize("run", RUNS)
def test_dask(benchmark, run, what):
    logits, labels, ref_loss, ref_grad = batch()
    fn = RUNS[run](logits, labels, grad=what == "loss+grad")
    fn()  # warm-up: compile outside the timing
    n, k = SHAPE
    benchmark.group = f"dask: {n}x{k} {DTYPE} {what}"
    benchmark.extra_info.update(n=n, k=k, dtype=str(DTYPE), dask_run=run)
    loss, grad = benchmark(fn)
    tol = fastsce.reference.TOLERANCE[DTYPE]
    np.testing.assert_allclose(loss, ref_loss, **tol)
    if grad is not None:
        np.testing.assert_allclose(grad, ref_grad, rtol=tol["rtol"], atol=tol["atol"] / n)
    benchmark.extra_info["checked"] = True


# --- logits chunked along the classes ----------------------------------------------------

SHAPE_CLASSES = (8192, 32000)
_batch_classes = {}


def batch_classes():
    if not _batch_classes:
        logits, labels = _impls.make_batch(*SHAPE_CLASSES, DTYPE)
        _batch_classes["data"] = (logits, labels, *_impls.reference_result(logits, labels))
    return _batch_classes["data"]


def dask_chunks(row_chunks, class_chunks, rechunk=False):
    """Logits in row_chunks x class_chunks blocks; with ``rechunk``, rechunked (by the
    caller) to whole rows first, which gives the fused one-class-chunk path."""

    def build(logits, labels, grad):
        n, k = logits.shape
        # Each block a C-contiguous array of its own, as a store (zarr, HDF5) returns it;
        # column slices of the one NumPy array would be copied by every task.
        r, c = -(-n // row_chunks), -(-k // class_chunks)
        blocks = [
            [da.from_array(np.ascontiguousarray(logits[i : i + r, j : j + c]), chunks=-1) for j in range(0, k, c)]
            for i in range(0, n, r)
        ]
        z = da.block(blocks)
        if rechunk:
            z = z.rechunk({1: -1})
        y = da.from_array(labels, chunks=z.chunks[0])

        def run():
            if grad:
                return dask.compute(*fastsce_dask.cross_entropy_with_grad(z, y), scheduler="threads")
            return dask.compute(fastsce_dask.cross_entropy(z, y), scheduler="threads")[0], None

        return run

    return build


RUNS_CLASSES = {
    "in-memory": in_memory,
    "dask-4-class-chunks": dask_chunks(1, 4),
    "dask-4x4-chunks": dask_chunks(4, 4),
    "dask-4-class-chunks-rechunked": dask_chunks(1, 4, rechunk=True),
}


@pytest.mark.parametrize("what", ["loss+grad", "loss"])
@pytest.mark.parametrize("run", RUNS_CLASSES)
def test_dask_class_chunks(benchmark, run, what):
    logits, labels, ref_loss, ref_grad = batch_classes()
    fn = RUNS_CLASSES[run](logits, labels, grad=what == "loss+grad")
    fn()  # warm-up: compile outside the timing
    n, k = SHAPE_CLASSES
    benchmark.group = f"dask: {n}x{k} {DTYPE} {what}, class chunks"
    benchmark.extra_info.update(n=n, k=k, dtype=str(DTYPE), dask_run=run)
    loss, grad = benchmark.pedantic(fn, rounds=5, iterations=1)
    tol = fastsce.reference.TOLERANCE[DTYPE]
    np.testing.assert_allclose(loss, ref_loss, **tol)
    if grad is not None:
        np.testing.assert_allclose(grad, ref_grad, rtol=tol["rtol"], atol=tol["atol"] / n)
    benchmark.extra_info["checked"] = True
