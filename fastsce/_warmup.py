"""Compile every kernel path ahead of time, in worker processes (fastsce.warmup(),
python -m fastsce warmup).

Numba compiles a kernel the first time it is called with new argument types, and holds
a process-wide lock while it does: a process compiles one path at a time, on one core.
Worker processes compile several paths at once and save them in the on-disk cache
(fastsce/_kernels/jit.py), which every later process loads from.

Each path is a small call of the public API that the dispatch in fastsce/api.py sends
to one kernel (its shapes come from the same thresholds), so what is compiled here is
what a real call of that kind uses.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence

import numpy as np

__all__ = ["warmup", "PATHS", "DTYPES"]

DTYPES = ("float32", "float64", "float16", "bfloat16")
_SHARDED_DTYPES = ("float32", "float64")  # fastsce.partial_stats & co. take these only
_BLOCK_DTYPES = ("float32", "float16", "bfloat16")  # fastsce._kernels.blocks' logits


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError("warmup: dtype 'bfloat16' needs the ml_dtypes package: pip install ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _shapes(dtype: np.dtype) -> tuple[int, int]:
    """(small K, large K) on either side of fastsce.api.SMALL_K for this compute dtype."""
    from fastsce import api

    compute = np.dtype(np.float32) if dtype.itemsize == 2 else dtype
    return 8, max(api.SMALL_K[compute]) + 1


def _data(dtype: np.dtype, shape: tuple[int, ...], axis: int = -1):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(shape).astype(dtype)
    k = shape[axis]
    labels = rng.integers(0, k, np.delete(np.array(shape), axis % len(shape)))
    return logits, labels


def _weights(logits: np.ndarray) -> dict:
    """Class and row weights: their sums are compiled helpers of their own."""
    return dict(weight=np.ones(logits.shape[-1]), sample_weight=np.ones(logits.shape[0]))


def _hard(k_of: Callable[[np.dtype], int], grad: bool):
    def run(dtype: np.dtype) -> None:
        import fastsce

        logits, labels = _data(dtype, (130, k_of(dtype)))
        fn = fastsce.cross_entropy_with_grad if grad else fastsce.cross_entropy
        fn(logits, labels)
        fn(logits, labels, **_weights(logits))
        if k_of is _small_k:  # float32 and half rows go to the blocks (below), and with a
            # softcap beyond K = 32 to the tiles (up to 32 the blocks' softcap set, compiled
            # on first use as the other sets of options)
            fn(*_data(dtype, (130, 40)), softcap=30.0)
        else:  # the calls above take the plain row kernels (float rows); label smoothing the
            # general kernel, compiled for it alone (each set of options compiles its own on
            # first use: fastsce._kernels.rows.hard_loss)
            fn(logits, labels, label_smoothing=0.1)
            if grad:  # in place (fastsce.torch's inplace_backward): a plain kernel of its own
                fn(logits, labels, out=logits)

    return run


def _blocks(grad: bool, transposed: bool):
    """fastsce._kernels.blocks: a kernel per block width, transposed (K <= 32) or
    row-wise (K > 32), and with label smoothing & co. one per OPTION_WIDTHS entry;
    float32 and half rows with integer targets."""

    def run(dtype: np.dtype) -> None:
        import fastsce
        from fastsce._kernels import blocks as block_kernels

        fn = fastsce.cross_entropy_with_grad if grad else fastsce.cross_entropy
        for k in block_kernels.WIDTHS:
            if (k <= block_kernels.TRANSPOSED_MAX) == transposed:
                fn(*_data(dtype, (130, k)))
        for k in block_kernels.OPTION_WIDTHS:  # with options: kernels of their own
            if (k <= block_kernels.TRANSPOSED_MAX) == transposed:
                fn(*_data(dtype, (130, k)), label_smoothing=0.1)

    return run


def _soft(grad: bool):
    def run(dtype: np.dtype) -> None:
        import fastsce

        logits, _ = _data(dtype, (130, 20))
        p = np.full(logits.shape, 1 / 20, logits.dtype)
        fn = fastsce.cross_entropy_with_grad if grad else fastsce.cross_entropy
        fn(logits, p)
        fn(logits, p, **_weights(logits))

    return run


def _class_axis(dtype: np.dtype) -> None:
    import fastsce
    from fastsce import api

    logits, labels = _data(dtype, (2, 8, api.CLASS_MAJOR_MIN_D), axis=1)
    fastsce.cross_entropy_with_grad(logits, labels, axis=1)
    fastsce.cross_entropy(logits, labels, axis=1)


def _primitive(name: str):
    def run(dtype: np.dtype) -> None:
        import fastsce

        getattr(fastsce, name)(_data(dtype, (130, 20))[0])

    return run


def _shards(dtype: np.dtype) -> None:
    import fastsce

    logits, labels = _data(dtype, (130, 20))
    stats = fastsce.combine(
        fastsce.partial_stats(logits[:, :8], labels, 0), fastsce.partial_stats(logits[:, 8:], labels, 8)
    )
    fastsce.finish(stats)
    fastsce.finish_grad(logits[:, :8], labels, stats, 0)


def _evaluate(large: bool):
    def run(dtype: np.dtype) -> None:
        import fastsce
        from fastsce import metrics

        small_k = metrics.SMALL_K[np.dtype(np.float32) if dtype.itemsize == 2 else dtype]
        logits, labels = _data(dtype, (130, small_k + 1 if large else 8))
        fastsce.evaluate(logits, labels)
        fastsce.evaluate(logits, labels, per_row=True, **_weights(logits))

    return run


def _small_k(dtype):
    return _shapes(dtype)[0]


def _large_k(dtype):
    return _shapes(dtype)[1]


# name -> (function of the dtype, the dtypes it applies to or None for all). Listed
# from the slowest to compile (measured) so that two workers finish together.
PATHS: dict[str, tuple[Callable[[np.dtype], None], tuple[str, ...] | None]] = {
    "small-K loss+grad": (_hard(_small_k, True), None),
    "small-K loss": (_hard(_small_k, False), None),
    "blocks loss+grad": (_blocks(True, transposed=True), _BLOCK_DTYPES),
    "row blocks loss+grad": (_blocks(True, transposed=False), _BLOCK_DTYPES),
    "blocks loss": (_blocks(False, transposed=True), _BLOCK_DTYPES),
    "row blocks loss": (_blocks(False, transposed=False), _BLOCK_DTYPES),
    "large-K loss+grad": (_hard(_large_k, True), None),
    "large-K loss": (_hard(_large_k, False), None),
    "small-K evaluate": (_evaluate(large=False), None),
    "large-K evaluate": (_evaluate(large=True), None),
    "class axis": (_class_axis, None),
    "probabilities loss+grad": (_soft(True), None),
    "probabilities loss": (_soft(False), None),
    "shards": (_shards, _SHARDED_DTYPES),
    "softmax": (_primitive("softmax"), None),
    "log_softmax": (_primitive("log_softmax"), None),
    "logsumexp": (_primitive("logsumexp"), None),
}


def _run_path(dtype_name: str, path: str) -> tuple[float, int, float]:
    """In a worker: (seconds, functions compiled, CPU seconds) of one path. The CPU
    time is what the path costs on an idle core (Numba compiles on one thread)."""
    from fastsce import _threads
    from fastsce._kernels import jit

    before = jit.compile_count()
    t0, c0 = time.perf_counter(), time.process_time()
    run, dtype = PATHS[path][0], _dtype(dtype_name)
    run(dtype)  # small shapes: the serial twins (fastsce._threads)
    serial_logits = _threads.SERIAL_LOGITS
    _threads.SERIAL_LOGITS = -1  # the same calls on the threaded kernels (this process only)
    try:
        run(dtype)
    finally:
        _threads.SERIAL_LOGITS = serial_logits
    return time.perf_counter() - t0, jit.compile_count() - before, time.process_time() - c0


def _names(given, allowed: Sequence[str], what: str, all_of: Sequence[str]) -> list[str]:
    if given is None:
        return list(all_of)
    if isinstance(given, str) or not isinstance(given, Iterable):
        given = [given]
    names = []
    for g in given:
        name = g
        if what == "dtypes" and g != "all":
            try:
                name = np.dtype(g).name
            except TypeError:  # "bfloat16" before ml_dtypes is imported
                pass
        if name == "all":
            return list(allowed)
        if name not in allowed:
            raise ValueError(f"warmup: unknown {what[:-1]} {g!r}; choose from {', '.join(allowed)} (or 'all')")
        names.append(name)
    return list(dict.fromkeys(names))


def warmup(
    dtypes: str | np.dtype | Iterable[str | np.dtype] | None = ("float32",),
    paths: str | Iterable[str] | None = None,
    *,
    progress: bool = True,
    processes: int | None = None,
) -> dict[tuple[str, str], tuple[float, int]]:
    """Compile the kernels of every path for ``dtypes`` now, into the on-disk cache.

    Parameters
    ----------
    dtypes : "float32", "float64", "float16", "bfloat16", a list of them, or "all"
        The logits' dtypes to compile for (default float32).
    paths : a name or list of names of ``fastsce._warmup.PATHS``, or None for all
        Class-index targets with small K (up to 100-200 classes, vectorised across rows)
        and larger K, loss and loss+grad; probability targets;
        the class axis not last; softmax, log_softmax, logsumexp; classes split across
        shards.
    progress : bool
        Print a line per path on stderr: what was compiled and how long it took.
    processes : int, optional
        Worker processes compiling at once (default: the number of CPUs, at most 2
        when that is unknown); 1 compiles in this process.

    Returns
    -------
    {(dtype, path): (seconds, functions compiled)}; 0 functions means it was loaded
    from the cache.

    Later calls, in this or any other process, load the compiled kernels from the cache
    instead of compiling them (a fraction of a second per path). Rows beyond the
    few-class kernels with options (label smoothing, z-loss, logit scale, softcap, lse)
    run in a kernel compiled for each set of options; the warmup compiles the label
    smoothing one, and any other set compiles on its first call (5-12 s).
    """
    dtype_names = _names(dtypes, DTYPES, "dtypes", ("float32",))
    path_names = _names(paths, tuple(PATHS), "paths", tuple(PATHS))
    jobs = [
        (d, p) for p in path_names for d in dtype_names if PATHS[p][1] is None or d in PATHS[p][1]
    ]  # fmt: skip
    for d in dtype_names:
        _dtype(d)  # bfloat16 without ml_dtypes: the error now, not in a worker
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"warmup: processes must be a positive int, got {processes!r}")

    from fastsce._kernels import jit

    def report(i: int, job, seconds: float, compiled: int, cpu: float) -> None:
        if progress:
            what = f"compiled {compiled} functions" if compiled else "loaded from the cache"
            print(
                f"fastsce warmup [{i}/{len(jobs)}] {job[0]} {job[1]}: {what} in {seconds:.1f} s ({cpu:.1f} s CPU)",
                file=sys.stderr,
            )

    if progress:
        print(
            f"fastsce warmup: {len(jobs)} paths, {min(processes, len(jobs))} processes, cache {jit.cache_dir()}",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    results: dict[tuple[str, str], tuple[float, int, float]] = {}
    if processes == 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs, 1):
            results[job] = _run_path(*job)
            report(i, job, *results[job])
    else:
        for i, (job, result) in enumerate(_in_workers(jobs, min(processes, len(jobs))), 1):
            results[job] = result
            report(i, job, *result)
    if progress:
        compiled = sum(r[1] for r in results.values())
        cpu = sum(r[2] for r in results.values())
        print(
            f"fastsce warmup: done in {time.perf_counter() - t0:.1f} s ({compiled} functions compiled, "
            f"{cpu:.1f} s CPU)",
            file=sys.stderr,
        )
    return {job: results[job][:2] for job in jobs}


# Workers are fresh interpreters fed one job per line on stdin, answering one JSON line
# each: not multiprocessing, whose "spawn" re-runs the caller's script in every worker
# (a script calling fastsce.warmup() without an ``if __name__ == "__main__"`` guard
# would fail) and whose "fork" would copy Numba's state and threads.
_WORKER = "from fastsce._warmup import _serve; _serve()"


def _serve() -> None:
    for line in sys.stdin:
        dtype_name, path = json.loads(line)
        try:
            answer = {"result": _run_path(dtype_name, path)}
        except Exception:
            answer = {"error": traceback.format_exc()}
        print(json.dumps(answer), flush=True)


def _in_workers(jobs, processes: int):
    """(job, (seconds, compiled)) as each job finishes, ``processes`` at a time."""
    import fastsce

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastsce.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    done: queue.Queue = queue.Queue()

    def work() -> None:
        worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            while True:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                worker.stdin.write(json.dumps(job) + "\n")
                worker.stdin.flush()
                line = worker.stdout.readline()
                answer = json.loads(line) if line else {"error": f"the worker exited ({worker.wait()})"}
                done.put((job, answer))
                if "error" in answer:
                    return
        finally:
            worker.stdin.close()
            worker.wait()
            worker.stdout.close()  # (left open, a ResourceWarning when collected)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(processes)]
    for t in threads:
        t.start()
    for _ in jobs:
        job, answer = done.get()
        if "error" in answer:
            with todo.mutex:
                todo.queue.clear()  # the other workers stop after their current job
            for t in threads:
                t.join()
            raise RuntimeError(f"warmup of {job[0]} {job[1]} failed in a worker:\n{answer['error']}")
        yield job, tuple(answer["result"])  # type: ignore[misc]
    for t in threads:
        t.join()
