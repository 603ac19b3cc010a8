"""Small calls: what a call costs over its kernel, and what it takes while other processes
keep every core busy (float32, integer targets, mean).

    PYTHONPATH=. python bench/small_calls.py [--load-seconds 60]

Overhead: the calling thread's CPU time per whole call minus that spent inside the kernel
(the kernels are wrapped by a timer for that run only; the kernel's own dispatch counts
as kernel time). Under load: two busy-loop
processes (killed after --load-seconds) run while calls on the serial path (the default
for <= 64K logits) and calls forced onto the thread pool alternate.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

import fastsce
from fastsce import _threads
from fastsce._kernels import rows, tiles

SHAPES = [(1, 10), (64, 10), (20, 1000), (64, 1000), (16, 4000)]
CALLS = 2000


def timed_kernels(spent: list[float]):
    """Wrap every serial twin the API may pick so that its time is added to spent[0]."""
    saved = []
    for module in (rows, tiles):
        for name in ("hard_loss", "hard_loss_grad", "soft_loss", "soft_loss_grad", "class_major_loss"):
            kernel = getattr(module, name, None)
            if kernel is None:
                continue
            inner = kernel.serial

            def wrapper(*args, _inner=inner):
                t = time.thread_time()
                result = _inner(*args)
                spent[0] += time.thread_time() - t
                return result

            saved.append((kernel, inner))
            kernel.serial = wrapper
    return saved


def per_call(fn, calls=CALLS, clock=time.thread_time) -> float:
    """Median over 7 samples of the time per call; by default the calling thread's CPU
    time, which a busy machine inflates far less than wall time (small calls run on the
    calling thread)."""
    samples = []
    for _ in range(7):
        t = clock()
        for _ in range(calls // 7):
            fn()
        samples.append((clock() - t) / (calls // 7))
    return statistics.median(samples)


def overhead() -> None:
    print("N x K        call        kernel      overhead   (loss+grad, out=)  |  loss only: call, overhead")
    for n, k in SHAPES:
        rng = np.random.default_rng(0)
        z = rng.standard_normal((n, k), dtype=np.float32)
        y = rng.integers(0, k, n)
        out = np.empty_like(z)
        row = []
        for fn in (lambda: fastsce.cross_entropy_with_grad(z, y, out=out), lambda: fastsce.cross_entropy(z, y)):
            fn()
            total = per_call(fn)
            spent = [0.0]
            saved = timed_kernels(spent)
            try:
                per_call(fn, calls=700)
                kernel = spent[0] / 700  # (the timer's own ~0.2 us included)
            finally:
                for kern, inner in saved:
                    kern.serial = inner
            row.append((total, kernel))
        (t1, k1), (t2, k2) = row
        print(
            f"{n:>5} x {k:<6}{t1 * 1e6:8.1f} us {k1 * 1e6:8.1f} us {(t1 - k1) * 1e6:8.1f} us"
            f"                     |  {t2 * 1e6:8.1f} us {(t2 - k2) * 1e6:8.1f} us"
        )


def under_load(seconds: float) -> None:
    rng = np.random.default_rng(1)
    z = rng.standard_normal((20, 1000), dtype=np.float32)
    y = rng.integers(0, 1000, 20)
    out = np.empty_like(z)

    def call():
        fastsce.cross_entropy_with_grad(z, y, out=out)

    saved = _threads.SERIAL_LOGITS
    for limit in (saved, -1):  # warm both paths
        _threads.SERIAL_LOGITS = limit
        call()
    idle = {}
    for label, limit in (("serial", saved), ("thread pool", -1)):
        _threads.SERIAL_LOGITS = limit
        idle[label] = per_call(call, 700, clock=time.perf_counter)
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)
    ]  # two busy processes, one per core
    times = {"serial": [], "thread pool": []}
    try:
        end = time.monotonic() + seconds
        time.sleep(1)
        while time.monotonic() < end:
            for label, limit in (("serial", saved), ("thread pool", -1)):
                _threads.SERIAL_LOGITS = limit
                t = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - t)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        _threads.SERIAL_LOGITS = saved
    print(f"\n20 x 1000 loss+grad, alternating calls, {len(times['serial'])} each, two busy processes running:")
    for label, ts in times.items():
        ts = np.array(ts)
        print(
            f"  {label:<12} median {np.median(ts) * 1e3:7.3f} ms, p90 {np.quantile(ts, 0.9) * 1e3:7.3f} ms"
            f"   (without the busy processes: {idle[label] * 1e3:.3f} ms)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load-seconds", type=float, default=30)
    args = parser.parse_args()
    overhead()
    under_load(args.load_seconds)


if __name__ == "__main__":
    main()
