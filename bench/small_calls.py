"""Small calls: what a call costs over its kernel, and what it takes while other processes
keep every core busy (float32, integer targets, mean).

    PYTHONPATH=. python bench/small_calls.py [--load-seconds 60]

Every call timed is first checked against the NumPy reference (with the real kernels).
Overhead: the calling thread's CPU time per call with the kernels replaced by no-ops
(Numba's dispatch of the kernel counts as kernel time), for the plain call and for each
common option (the fast path of fastsce.api) and for the general path (the same call with
weight= and the fast path turned off: what other layouts and options take); beside it,
the plain call's whole time and the part inside the kernel (the kernels wrapped by a
timer for that run only). Dispatch: what Numba's dispatcher takes to unbox the
kernel's arguments, timed as a no-op jitted function of the same arguments, against the
kernel call itself. Under load: two busy-loop
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
from fastsce import _threads, reference
from fastsce._kernels import blocks, rows, tiles
from option_ratios import check  # (bench/ is the script's directory)

SHAPES = [(1, 10), (64, 10), (20, 1000), (64, 1000), (16, 4000)]
CALLS = 2000
# where the API finds its kernels (each with a .serial twin), and their names
KERNEL_HOLDERS = (rows, tiles, *(blocks.kernels(cols) for cols in blocks.WIDTHS))
KERNEL_NAMES = ("hard_loss", "hard_loss_grad", "plain_loss", "plain_loss_grad", "soft_loss", "soft_loss_grad", "class_major_loss")


def all_kernels():
    return [getattr(module, name) for module in KERNEL_HOLDERS for name in KERNEL_NAMES if hasattr(module, name)]


def timed_kernels(spent: list[float]):
    """Wrap every serial twin the API may pick so that its time is added to spent[0]."""
    saved = []
    for kernel in all_kernels():
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


def call_and_kernel(fn) -> tuple[float, float]:
    """(CPU time per call, of it inside the kernel)."""
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
    return total, kernel


def outside_kernel(fn) -> float:
    """CPU time per call with the kernels replaced by no-ops (their dispatch included):
    steadier on a busy machine than the call's time minus the kernel's."""
    fn()
    saved = []
    for kernel in all_kernels():
        saved.append((kernel, kernel.serial))
        kernel.serial = lambda *args: None
    try:
        return per_call(fn)
    finally:
        for kern, inner in saved:
            kern.serial = inner


def problem(n, k):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, k), dtype=np.float32)
    return z, rng.integers(0, k, n), np.empty_like(z)


def option_kwargs(z) -> dict[str, dict]:
    """name -> the keyword arguments of each common option timed."""
    n, k = z.shape
    rng = np.random.default_rng(2)
    return {
        "weight=": {"weight": np.ones(k, z.dtype)},
        "sample_weight=": {"sample_weight": rng.uniform(0.5, 1.5, n)},
        "where=": {"where": rng.random(n) > 0.1},
        "z_loss+lse": {"z_loss": 1e-4, "return_lse": True},
    }


def option_calls(z, y, out):
    """name -> call: loss+grad with out= (the plain call, loss alone, each common option),
    then the general path (the fast path of fastsce.api turned off) with weight=."""
    api = fastsce.api
    fn = api.cross_entropy_with_grad
    options = option_kwargs(z)
    calls = {"loss+grad": lambda: fn(z, y, out=out), "loss only": lambda: api.cross_entropy(z, y)}
    calls.update({name: lambda kwargs=kwargs: fn(z, y, out=out, **kwargs) for name, kwargs in options.items()})
    calls["general (weight=)"] = lambda: without_fast_path(api, lambda: fn(z, y, out=out, **options["weight="]))
    return calls


def check_calls(z, y) -> None:
    """Every timed call's result (the real kernels) against the NumPy reference."""
    api = fastsce.api
    for kwargs in ({}, *option_kwargs(z).values()):
        check(z, y, kwargs, api.cross_entropy_with_grad(z, y, **kwargs))
    weight = option_kwargs(z)["weight="]
    check(z, y, weight, without_fast_path(api, lambda: api.cross_entropy_with_grad(z, y, **weight)))
    want = reference.cross_entropy(z, y)
    np.testing.assert_allclose(api.cross_entropy(z, y), want, **reference.TOLERANCE[np.dtype(z.dtype)])


def without_fast_path(api, call):
    fast = api._fast
    api._fast = lambda *args: None
    try:
        return call()
    finally:
        api._fast = fast


def overhead() -> None:
    print("CPU time per call outside the kernel (float32, integer labels, mean; loss+grad with out= unless said):")
    z, y, out = problem(1, 10)
    names = list(option_calls(z, y, out))
    print(f"{'N x K':<13}{'plain call':>11}{'kernel':>9}  " + "".join(f"{name:>19}" for name in names))
    for n, k in SHAPES:
        z, y, out = problem(n, k)
        check_calls(z, y)
        calls = option_calls(z, y, out)
        total, kernel = call_and_kernel(calls["loss+grad"])
        print(
            f"{n:>5} x {k:<6}{total * 1e6:8.1f} us {kernel * 1e6:6.1f} us  "
            + "".join(f"{outside_kernel(fn) * 1e6:16.1f} us" for fn in calls.values())
        )


def dispatch() -> None:
    """The kernel call of a loss+grad call, against a no-op jitted function given the same
    arguments (Numba's unboxing and type dispatch of them) and given none."""
    import numba

    print("\nNumba dispatch (loss+grad, out=): kernel call  |  no-op of the same arguments  |  no-op of none")
    for n, k in SHAPES[:3]:
        z, y, out = problem(n, k)
        fastsce.cross_entropy_with_grad(z, y, out=out)
        captured = []
        saved = []
        for kernel in all_kernels():
            inner = kernel.serial

            def capture(*args, _inner=inner):
                captured.append((_inner, args))
                return _inner(*args)

            saved.append((kernel, inner))
            kernel.serial = capture
        try:
            fastsce.cross_entropy_with_grad(z, y, out=out)
        finally:
            for kern, inner in saved:
                kern.serial = inner
        kernel, args = captured[0]
        names = ", ".join(f"a{i}" for i in range(len(args)))
        scope: dict = {}
        exec(f"def noop({names}):\n    return 0", scope)
        noop = numba.njit(nogil=True)(scope["noop"])
        noop_none = numba.njit(nogil=True)(lambda: 0)
        noop(*args), noop_none()
        times = [per_call(lambda: f(*a), calls=14000) for f, a in ((kernel, args), (noop, args), (noop_none, ()))]
        print(f"{n:>5} x {k:<6} {len(args)} arguments: " + "  |  ".join(f"{t * 1e6:6.2f} us" for t in times))


def under_load(seconds: float) -> None:
    rng = np.random.default_rng(1)
    z = rng.standard_normal((20, 1000), dtype=np.float32)
    y = rng.integers(0, 1000, 20)
    out = np.empty_like(z)
    check(z, y, {}, fastsce.cross_entropy_with_grad(z, y))

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
    dispatch()
    under_load(args.load_seconds)


if __name__ == "__main__":
    main()
