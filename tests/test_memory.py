"""Extra memory of a call beyond its inputs and outputs, traced with tracemalloc (which
sees every NumPy allocation, and the kernels' own through Numba's allocator): at most 1%
of the logits' size plus the kernels' per-thread scratch (a 64-row tile for small K, a
row or two otherwise; independent of N), and no (N, K) buffer for an in-place gradient.

tracemalloc counts the allocations of every thread of the process, and other tests
leave threads running (Dask's, for one), so the calls are measured in a fresh
interpreter, all in one run.
"""

import json
import subprocess
import sys
import textwrap

import numba
import pytest

from fastsce import api

SHAPES = [(65536, 10), (16384, 100), (8192, 1000), (64, 32000)]

# id -> (logits shape, logits dtype, label dtype or "soft", class axis, call)
CASES = {
    **{
        f"{n}x{k}-{labels}-{call}": ((n, k), "float32", labels, -1, call)
        for n, k in SHAPES
        for labels in ("int64", "int32")
        for call in ("grad-out", "loss-sum", "loss-none")
    },
    **{f"{n}x{k}-in-place": ((n, k), "float32", "int64", -1, "grad-in-place") for n, k in SHAPES},
    "soft-4096x1000": ((4096, 1000), "float32", "soft", -1, "grad-out"),
    "float16-8192x1000": ((8192, 1000), "float16", "int64", -1, "grad-out"),
    "float16-8192x1000-in-place": ((8192, 1000), "float16", "int64", -1, "grad-in-place"),
    "options-8192x1000": ((8192, 1000), "float32", "int64", -1, "grad-out-options"),
    # another class axis: copied a block of rows at a time
    "axis1-64x1000x128": ((64, 1000, 128), "float32", "int64", 1, "grad-out"),
    "axis1-64x1000x128-loss": ((64, 1000, 128), "float32", "int64", 1, "loss-sum"),
}

SCRIPT = textwrap.dedent(
    """
    import json, sys, tracemalloc
    import numpy as np
    import fastsce

    def peak_bytes(fn):
        fn()  # compile and warm up outside the trace
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peaks = {}
    for name, (shape, dtype, labels, axis, call) in json.loads(sys.argv[1]).items():
        rng = np.random.default_rng(0)
        z = rng.standard_normal(shape).astype(dtype)
        k = shape[axis]
        lead = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
        if labels == "soft":
            y = np.full_like(z, 1 / k)
        else:
            y = rng.integers(0, k, lead).astype(labels)
        options = {"axis": axis}
        if call == "grad-out-options":
            options.update(z_loss=1e-4, softcap=30.0, sample_weight=rng.random(lead), return_lse=True)
        out = np.empty_like(z)
        fn = {
            "grad-out": lambda: fastsce.cross_entropy_with_grad(z, y, out=out, **options),
            "grad-out-options": lambda: fastsce.cross_entropy_with_grad(z, y, out=out, **options),
            "grad-in-place": lambda: fastsce.cross_entropy_with_grad(z, y, out=z, **options),
            "loss-sum": lambda: fastsce.cross_entropy(z, y, reduction="sum", **options),
            "loss-none": lambda: fastsce.cross_entropy(z, y, reduction="none", **options),
        }[call]
        peaks[name] = peak_bytes(fn)
    print(json.dumps(peaks))
    """
)


@pytest.fixture(scope="module")
def peaks():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CASES)
def test_extra_memory(peaks, name):
    shape, dtype, labels, axis, call = CASES[name]
    size = 1
    for s in shape:
        size *= s
    rows = size // shape[axis]
    itemsize = 2 if dtype == "float16" else 4
    k = shape[axis]
    tile = 64 if k <= max(max(v) for v in api.SMALL_K.values()) else 2  # rows of scratch per thread
    scratch = numba.get_num_threads() * (tile * k * 4 + 16 * 1024)
    budget = 0.01 * size * itemsize + scratch
    if call == "loss-none":
        budget += rows * itemsize  # the (N,) result is an output, allowed on top
    if call == "grad-out-options":
        budget += rows * (8 + 4)  # the (N,) float64 row weights, the (N,) lse output
    if labels != "int64":
        budget += rows * 8  # the labels as the kernels take them: an int64 copy
    if axis != -1:
        # two blocks (logits and gradient) of about COPY_BLOCK_LOGITS each, whatever N
        budget += 2.2 * api.COPY_BLOCK_LOGITS * itemsize
    assert peaks[name] <= budget, (peaks[name], budget)
