"""Classes split across 4 shards (fastsce.sharded) against the unsharded fused call.

    python -m pytest bench/test_sharded.py --benchmark-group-by=group

Both compute the loss and the full gradient of the benchmark batch (1024 x 32000 float32,
integer labels, "mean") into preallocated buffers: the sharded path runs partial_stats
on each shard, combine, finish and finish_grad on each shard, every shard's logits a
C-contiguous array of its own (as on separate devices). Both check their output against
the NumPy reference; the first (compiling) call is made before timing starts. The
summary at the end of the run gives the sharded median over the unsharded one.
"""

import time

import numpy as np
import pytest

import fastsce
from fastsce._tools import impls as _impls

SHAPE = (1024, 32000)
SHARDS = 4
DTYPE = np.dtype(np.float32)


@pytest.fixture(scope="module")
def batch():
    logits, labels = _impls.make_batch(*SHAPE, DTYPE)
    return logits, labels, _impls.reference_result(logits, labels)


def _sharded(logits, labels):
    cuts = np.linspace(0, logits.shape[1], SHARDS + 1).astype(int)
    shards = [(int(lo), np.ascontiguousarray(logits[:, lo:hi])) for lo, hi in zip(cuts[:-1], cuts[1:])]
    outs = [np.empty_like(z) for _, z in shards]

    def run():
        total = fastsce.combine(*(fastsce.partial_stats(z, labels, lo) for lo, z in shards))
        loss = fastsce.finish(total)
        for (lo, z), out in zip(shards, outs):
            fastsce.finish_grad(z, labels, total, lo, out=out)
        return loss, outs

    return run


def _unsharded(logits, labels):
    out = np.empty_like(logits)
    return lambda: fastsce.cross_entropy_with_grad(logits, labels, out=out)


@pytest.mark.parametrize("path", ["unsharded", f"sharded{SHARDS}"])
def test_sharded_vs_unsharded(benchmark, batch, path):
    logits, labels, expected = batch
    run = (_unsharded if path == "unsharded" else _sharded)(logits, labels)
    t0 = time.perf_counter()
    run()  # warm-up: compile outside the timing
    benchmark.group = f"classes in {SHARDS} shards, {SHAPE[0]}x{SHAPE[1]} {DTYPE}"
    benchmark.extra_info.update(shape=list(SHAPE), shards=SHARDS, path=path, first_call_s=time.perf_counter() - t0)
    loss, grad = benchmark(run)

    if path != "unsharded":
        grad = np.concatenate(grad, axis=1)
    # the Implementation check of bench/test_throughput.py: reference tolerance, gradient atol / N
    _impls.IMPLEMENTATIONS["fastsce"].check((loss, grad), logits, expected)
    benchmark.extra_info["checked"] = True
