"""Concurrent calls from several Python threads give the results of serial calls, bit for bit;
the serial twins of the kernels (small problems) give the threaded kernels' results, bit for bit."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _cases import IMPLS, REDUCTIONS, make_case

import fastsce
from fastsce import _threads

fast = IMPLS["fast"]
N_CALLS = 32
N_WORKERS = 4
ROUNDS = 3  # each round a fresh pool, so the interleavings differ


# float64 in the full run only (the default run compiles the float32 kernels)
DTYPE_PARAMS = pytest.mark.parametrize(
    "dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.f64)], ids=["f32", "f64"]
)


def cases(dtype):
    """32 different problems of one dtype: every reduction, target kind, with and without out=."""
    result = []
    for i in range(N_CALLS):
        case = make_case(
            (200, 37, 1, 500)[i % 4],
            (300, 1000, 7, 64)[i // 4 % 4],
            dtype,
            soft=i % 3 == 0,
            weighted=i % 5 < 3,
            ignore_index=-100 if i % 3 == 0 or i % 4 else 1,
            label_smoothing=(0.0, 0.1)[i // 2 % 2],
            reduction=REDUCTIONS[i % 3],
            seed=i,
        )
        result.append((case, i % 4 == 1))
    return result


def run(case, use_out):
    """Loss only, then loss and gradient (into a fresh out= buffer for some calls)."""
    out = np.empty_like(case.logits) if use_out else None
    loss_only = case.loss(fast)
    loss, grad = case.loss_grad(fast, out=out)
    return loss_only, loss, grad


@DTYPE_PARAMS
def test_concurrent_calls_match_serial_calls_bitwise(dtype):
    work = cases(dtype)
    serial = [run(case, use_out) for case, use_out in work]
    for _ in range(ROUNDS):
        with ThreadPoolExecutor(max_workers=N_WORKERS) as pool:
            concurrent = list(pool.map(lambda item: run(*item), work))
        for i, (got, want) in enumerate(zip(concurrent, serial, strict=True)):
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b, strict=True, err_msg=f"call {i}")


def run_all(case, use_out):
    """run() and the primitives on the case's logits."""
    z = case.logits
    return (*run(case, use_out), fastsce.softmax(z), fastsce.log_softmax(z), fastsce.logsumexp(z))


@DTYPE_PARAMS
@pytest.mark.parametrize("threads", [1, 2])
def test_serial_twins_match_the_threaded_kernels_bitwise(monkeypatch, threads, dtype):
    """Small problems run on the kernels' serial twins (fastsce._threads): same chunks,
    same order of float64 sums, so the same bits as the thread pool at any thread count."""
    import numba

    work = cases(dtype)
    monkeypatch.setattr(_threads, "SERIAL_LOGITS", 1 << 62)
    serial = [run_all(case, use_out) for case, use_out in work]
    monkeypatch.setattr(_threads, "SERIAL_LOGITS", -1)
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        threaded = [run_all(case, use_out) for case, use_out in work]
    finally:
        numba.set_num_threads(saved)
    for i, (got, want) in enumerate(zip(threaded, serial, strict=True)):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b, strict=True, err_msg=f"call {i}")
