"""Numba's threading layers side by side: float32 loss + gradient (out= preallocated).

    PYTHONPATH=. python bench/threading_layers.py [--rounds 15] [--layers omp,workqueue]

One worker process per layer (the layer is chosen once per process, through
NUMBA_THREADING_LAYER); the parent asks them in turn, shape by shape and round by round,
so drift on a busy machine hits every layer alike. Prints each layer's median time and
its ratio to the first layer's. Each sample is the median of several calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(65536, 10), (16384, 100), (8192, 1000), (1024, 32000)]
CALLS = 5


def worker() -> None:
    """Answer "N K" lines with the median time of CALLS calls (after a warm-up)."""
    import time

    import numba
    import numpy as np

    import fastsce

    made = {}
    for line in sys.stdin:
        n, k = map(int, line.split())
        if (n, k) not in made:
            rng = np.random.default_rng(0)
            z = rng.standard_normal((n, k), dtype=np.float32)
            y = rng.integers(0, k, n)
            made[n, k] = z, y, np.empty_like(z)
            fastsce.cross_entropy_with_grad(z, y, out=made[n, k][2])
        z, y, out = made[n, k]
        times = []
        for _ in range(CALLS):
            t = time.perf_counter()
            fastsce.cross_entropy_with_grad(z, y, out=out)
            times.append(time.perf_counter() - t)
        print(json.dumps([statistics.median(times), numba.threading_layer()]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", default="omp,workqueue")
    args = parser.parse_args()
    layers = args.layers.split(",")
    procs = {}
    for layer in layers:
        env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
        procs[layer] = subprocess.Popen(
            [sys.executable, __file__, "--worker"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    times = {(layer, shape): [] for layer in layers for shape in SHAPES}
    loaded = {}
    for _ in range(args.rounds):
        for shape in SHAPES:
            for layer in layers:
                p = procs[layer]
                p.stdin.write(f"{shape[0]} {shape[1]}\n")
                p.stdin.flush()
                t, loaded[layer] = json.loads(p.stdout.readline())
                times[layer, shape].append(t)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print(f"layers loaded: {loaded}; {args.rounds} interleaved rounds, median of {CALLS} calls per sample")
    print("shape          " + "".join(f"{layer:>14}" for layer in layers) + "   ratio(s) to " + layers[0])
    for shape in SHAPES:
        med = [statistics.median(times[layer, shape]) for layer in layers]
        ratios = " ".join(f"{m / med[0]:.2f}" for m in med[1:])
        print(f"{shape[0]}x{shape[1]:<8}" + "".join(f"{m * 1e3:11.3f} ms" for m in med) + "   " + ratios)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
