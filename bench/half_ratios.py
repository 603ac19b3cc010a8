"""What float16 and bfloat16 logits cost next to float32 logits of the same shape:
loss+grad with out= preallocated and the loss alone, medians of interleaved rounds in
one process.

    PYTHONPATH=. python bench/half_ratios.py [--shapes 65536x10,16384x100 --threads 2 --rounds 31]

The logits are the same values in every dtype (rounded to bfloat16's precision there);
each call timed is first checked against the NumPy reference.
bfloat16 needs ml_dtypes (left out without it).
"""

from __future__ import annotations

import argparse
import statistics

import numba
import numpy as np

import fastsce
from fastsce import reference
from option_ratios import check, interleaved, ratio

SHAPES = "65536x10,32768x32,16384x100,8192x1000,1024x32000"


def dtypes() -> dict[str, np.dtype]:
    found = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
    try:
        import ml_dtypes

        found["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return found


def check_rounded(z32, y, got) -> None:
    """A half call's loss and gradient against the reference of its logits' float32 copy
    z32, within
    an ulp of the half dtype (its results are float32 ones rounded once)."""
    import ml_dtypes

    info = ml_dtypes.finfo(got[1].dtype)
    loss, grad = reference.cross_entropy_with_grad(z32.astype(np.float64), y)
    np.testing.assert_allclose(float(got[0]), loss, rtol=float(info.eps))
    np.testing.assert_allclose(got[1].astype(np.float64), grad, rtol=float(info.eps), atol=float(info.smallest_subnormal))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated NxK")
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"loss+grad (out=) and loss only, {args.threads} thread(s), {args.rounds} interleaved rounds; time over float32's")
    for shape in args.shapes.split(","):
        n, k = (int(x) for x in shape.split("x"))
        z32 = (3 * rng.standard_normal((n, k))).astype(np.float16).astype(np.float32)
        y = rng.integers(0, k, n)
        calls = {}
        for name, dtype in dtypes().items():
            z = z32.astype(dtype)
            out = np.empty_like(z)
            got = fastsce.cross_entropy_with_grad(z, y)  # the calls timed below, checked
            if dtype == np.float32:
                check(z, y, {}, got)
            else:
                check_rounded(z.astype(np.float32), y, got)  # (bfloat16 rounds z32)
            assert fastsce.cross_entropy(z, y) == got[0]  # (the loss alone: the same bits)
            calls[f"{name} loss+grad"] = lambda z=z, out=out: fastsce.cross_entropy_with_grad(z, y, out=out)
            calls[f"{name} loss"] = lambda z=z: fastsce.cross_entropy(z, y)
        times = interleaved(calls, args.rounds)
        cells = []
        for name in dtypes():
            for what in ("loss+grad", "loss"):
                label = f"{name} {what}"
                cells.append(f"{label:<19} {statistics.median(times[label]) * 1e6:8.0f} us {ratio(times, label, f'float32 {what}'):5.2f}x")
        print(f"{n} x {k}:\n  " + "\n  ".join(cells))


if __name__ == "__main__":
    main()
