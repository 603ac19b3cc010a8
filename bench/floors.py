"""How close the kernels are to what their arithmetic allows: at each shape, the time of
fastsce (float32 loss+grad with out=, and the loss alone) next to two floors, each in
multiples of memcpy (the median over interleaved rounds in one process of each round's ratio).

    PYTHONPATH=. python bench/floors.py [--threads 2 --rounds 15 --shapes 65536x10,16384x100]

The floors are loops over the same logits, compiled as the kernels are (fastsce's fast-math
flags, zmm), that do one part of the work and nothing else:

    exps + store   the row kernels' exp pass with the gradient: g = exp(z - c) for every
                   logit (simd.exp_shifted: as if z - c were exact, within an ulp) stored,
                   and summed: a loss+grad kernel with this exp computes these exps and
                   writes a gradient of this size, so its time is at least this loop's
    exps, summed   the loss kernels' exp pass: the same exps' sum, nothing stored

c is a constant above every logit (no max pass: that is kernel work the floors leave out).
Where "exps + store" is above a target in multiples of memcpy, that target cannot be met
with this exp; where fastsce is far above its floor, the rest of its work (the max, the
float64 sums, the row's loss and the transposes of the few-class blocks) is what costs.
fastsce's results are checked against the NumPy reference before timing.
"""

from __future__ import annotations

import argparse
import statistics

import numba
import numpy as np
from numba import prange

import fastsce
from fastsce import reference
from fastsce._kernels import rows
from fastsce._kernels.jit import parallel
from option_ratios import interleaved, ratio  # (bench/ is the script's directory)

ABOVE = np.float32(8.0)  # above every logit of make_logits (standard normal)
CHUNKS = 64  # the flat logits' share of each thread, as prange spreads them


@parallel
def exps_stored(zf, gf, c, sums):
    """The row kernels' exp pass with the gradient (rows._store_exp_block: g = exp(z - c),
    stored, and their sum) over the logits as one flat array, 1024 at a time: the loop at
    full vector width whatever K (rows of K < 16 would leave it scalar)."""
    step = -(-zf.size // CHUNKS)
    for chunk in prange(CHUNKS):
        zc, gc = zf[chunk * step : (chunk + 1) * step], gf[chunk * step : (chunk + 1) * step]
        s = 0.0
        for lo in range(0, zc.size, rows.BLOCK):
            s += rows._store_exp_block(zc[lo : lo + rows.BLOCK], c, gc[lo : lo + rows.BLOCK], None)
        sums[chunk] = s


@parallel
def exps_summed(zf, c, sums):
    """The loss kernels' exp pass (rows._sum_exp_block: the exps' sum, nothing stored)
    over the flat logits."""
    step = -(-zf.size // CHUNKS)
    for chunk in prange(CHUNKS):
        zc = zf[chunk * step : (chunk + 1) * step]
        s = 0.0
        for lo in range(0, zc.size, rows.BLOCK):
            s += rows._sum_exp_block(zc[lo : lo + rows.BLOCK], c, None)
        sums[chunk] = s


def make_logits(n, k):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, k), dtype=np.float32), rng.integers(0, k, n)


def calls(z, y):
    """name -> zero-argument callable, every one checked."""
    g, copy, sums = np.empty_like(z), np.empty_like(z), np.empty(CHUNKS)
    loss, grad = fastsce.cross_entropy_with_grad(z, y)
    ref_loss, ref_grad = reference.cross_entropy_with_grad(z.astype(np.float64), y)
    assert np.isclose(loss, ref_loss, rtol=1e-5) and np.allclose(grad, ref_grad, rtol=1e-4, atol=1e-9)
    zf, gf = z.reshape(-1), g.reshape(-1)
    exact = np.exp(z.astype(np.float64) - ABOVE)
    exps_stored(zf, gf, ABOVE, sums)
    assert np.allclose(g, exact, rtol=1e-6, atol=0) and np.isclose(sums.sum(), exact.sum(), rtol=1e-5)
    exps_summed(zf, ABOVE, sums)
    assert np.isclose(sums.sum(), exact.sum(), rtol=1e-5)
    return {
        "memcpy": lambda: np.copyto(copy, z),
        "fastsce": lambda: fastsce.cross_entropy_with_grad(z, y, out=g),
        "exps + store": lambda: exps_stored(zf, gf, ABOVE, sums),
        "fastsce loss": lambda: fastsce.cross_entropy(z, y),
        "exps, summed": lambda: exps_summed(zf, ABOVE, sums),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", default="65536x10,16384x100,8192x1000,1024x32000,256x128256")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    names = None
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        z, y = make_logits(n, k)
        times = interleaved(calls(z, y), args.rounds)
        if names is None:
            names = [name for name in times if name != "memcpy"]
            print(f"float32, {args.threads} threads, {args.rounds} interleaved rounds; x memcpy: median of the rounds' ratios (memcpy's median in us)")
            print(f"{'N x K':>14} {'memcpy':>8} " + " ".join(f"{name:>13}" for name in names))
        row = " ".join(f"{ratio(times, name, 'memcpy'):13.2f}" for name in names)
        print(f"{n:>7} x {k:<6} {statistics.median(times['memcpy']) * 1e6:8.1f} {row}", flush=True)


if __name__ == "__main__":
    main()
