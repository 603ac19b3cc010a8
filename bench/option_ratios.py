"""What each row or class option costs next to the plain call, at one shape: float32
loss+grad with out= preallocated, medians of interleaved rounds in one process.

    PYTHONPATH=. python bench/option_ratios.py [--n 65536 --k 10 --threads 2 --rounds 15]

Every option's result is checked against the NumPy reference before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

import fastsce
from fastsce import reference


def options(rng, n, k):
    """name -> keyword arguments of one call."""
    return {
        "plain": {},
        "weight": dict(weight=rng.uniform(0.5, 1.5, k)),
        "sample_weight": dict(sample_weight=rng.uniform(0.5, 1.5, n)),
        "where": dict(where=rng.random(n) > 0.1),
        "sample_weight+where": dict(sample_weight=rng.uniform(0.5, 1.5, n), where=rng.random(n) > 0.1),
        "z_loss": dict(z_loss=1e-4),
        "return_lse": dict(return_lse=True),
        "label_smoothing": dict(label_smoothing=0.1),
        "logit_scale": dict(logit_scale=0.5),
        "softcap": dict(softcap=30.0),
    }


def interleaved(calls: dict, rounds: int, clock=time.perf_counter, seconds_per_call: float = 0.03) -> dict[str, list[float]]:
    """Time per call of each callable (by ``clock``), one batch of each per round, in turn."""
    for call in calls.values():  # compile and warm up outside the timing
        call()
    first = next(iter(calls.values()))
    t = time.perf_counter()
    first()
    reps = max(1, int(seconds_per_call / max(time.perf_counter() - t, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t = clock()
            for _ in range(reps):
                call()
            times[name].append((clock() - t) / reps)
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over the rounds of name's time over base's in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))


def check(z, y, kwargs, got) -> None:
    want = reference.cross_entropy_with_grad(z, y, **kwargs)
    for a, b in zip(got, want, strict=True):
        b = np.asarray(b)
        tol = reference.TOLERANCE[b.dtype]
        atol = tol["atol"] * float(np.max(np.abs(b)))
        np.testing.assert_allclose(np.asarray(a, np.float64), b.astype(np.float64), rtol=tol["rtol"], atol=atol)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    z = (3 * rng.standard_normal((args.n, args.k))).astype(np.float32)
    y = rng.integers(0, args.k, args.n)
    out = np.empty_like(z)
    calls = {}
    for name, kwargs in options(rng, args.n, args.k).items():
        check(z, y, kwargs, fastsce.cross_entropy_with_grad(z, y, **kwargs))

        def call(kwargs=kwargs):
            return fastsce.cross_entropy_with_grad(z, y, out=out, **kwargs)

        calls[name] = call
    # one thread: the calling thread's CPU time, which other processes inflate far less
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    times = interleaved(calls, args.rounds, clock)
    print(
        f"{args.n} x {args.k} float32 loss+grad, out=, {args.threads} thread(s), {args.rounds} interleaved rounds"
        f" ({'CPU' if args.threads == 1 else 'wall'} time; ratio: median of the rounds' ratios):"
    )
    for name, ts in times.items():
        print(f"  {name:<20} {statistics.median(ts) * 1e6:9.1f} us   {ratio(times, name, 'plain'):5.3f}x plain")


if __name__ == "__main__":
    main()
