"""python -m fastsce bench: time fastsce (and fastsce.evaluate) against a memcpy of the
logits, the NumPy reference and the peers installed (PyTorch eager, torch.compile, optax
under jax.jit, TensorFlow's fused op) on a grid of shapes, and print a report.

For every shape, every implementation is built and called once (compilation, JIT
tracing and first-touch page faults stay out of the timing; the time of that first call
is shown), its output is checked against the reference, and then the implementations
are timed interleaved, round-robin, so that drift on a noisy machine hits all of them
alike. Medians are reported, with each median's ratio to memcpy's. Every peer runs on
fastsce's thread count where its library allows (the report says which).

--sweep-k times K = 2 ... 1000 at about 1M logits each and draws the curve.
The same report can be rendered from the JSON file of the pytest-benchmark suite in
bench/ (--from-json).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

from fastsce._tools import impls as _impls

FORMAT = "fastsce-bench/1"
MIN_SAMPLE_S = 0.005  # calls shorter than this are repeated within one timed sample
MAX_CALLS_PER_SAMPLE = 10_000


# --- command line -----------------------------------------------------------------------


SWEEP_K = (2, 3, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 200, 256, 300, 500, 1000)
SWEEP_LOGITS = 2**20  # about 1M logits per shape: N = SWEEP_LOGITS // K
QUICK_SWEEP_LOGITS = 2**14
SWEEP_PLOT = "fastsce-sweep-k.png"  # where --sweep-k draws its plot when --plot is not given


def sweep_shapes(logits=SWEEP_LOGITS, ks=SWEEP_K):
    """The --sweep-k grid: (N, K) with N = logits // K."""
    return tuple((max(1, logits // k), k) for k in ks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    impls = _impls.IMPLEMENTATIONS
    default_shapes = ",".join(f"{n}x{k}" for n, k in _impls.DEFAULT_SHAPES)
    parser.add_argument(
        "--shapes", type=_parse_shapes, metavar="NxK,...", help=f"comma-separated NxK shapes (default {default_shapes})"
    )
    parser.add_argument(
        "--sweep-k",
        action="store_true",
        help=f"K = {', '.join(map(str, SWEEP_K))} at about 1M logits each (N = 2^20 // K; 2^14 with --quick): "
        f"a table of ratios to memcpy, and a plot (--plot, default ./{SWEEP_PLOT}, needs matplotlib). "
        "Takes fastsce (loss+grad, loss only) and the peers installed unless --impls says otherwise",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], help="default float32")
    parser.add_argument(
        "--repeat", type=int, metavar="R", help="timed rounds per implementation (default 15; 3 with --quick)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="threads of fastsce (Numba) and of every peer whose library allows it (default: Numba's setting)",
    )
    parser.add_argument(
        "--impls",
        type=_parse_impls,
        metavar="NAME,...",
        help="comma-separated subset of "
        + ", ".join(f"{name} ({impl.label})" for name, impl in impls.items())
        + " (default: all installed)",
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the report as GitHub Markdown")
    parser.add_argument("--json", metavar="FILE", help="also write every median, ratio and the environment as JSON")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="plot the ratio to memcpy against K, log-log (needs matplotlib)"
    )
    parser.add_argument(
        "--from-json",
        metavar="FILE",
        help="render the report from pytest-benchmark JSON (python -m pytest bench/ --benchmark-json=FILE) "
        "instead of measuring",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and 3 rounds: a smoke run in seconds")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The bench subcommand. Returns the exit status: 0, or 1 when an output disagrees
    with the reference (or, with --from-json, a benchmark is not marked as checked)."""
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if args.plot and not has_matplotlib:
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    if args.sweep_k and args.shapes:
        parser.error("--sweep-k chooses the shapes: it cannot be combined with --shapes")
    if args.from_json:
        measuring = [
            opt
            for opt, given in [
                ("--shapes", args.shapes),
                ("--sweep-k", args.sweep_k),
                ("--repeat", args.repeat),
                ("--threads", args.threads),
                ("--impls", args.impls),
                ("--dtype", args.dtype),
                ("--quick", args.quick),
            ]
            if given
        ]
        if measuring:
            parser.error(f"{', '.join(measuring)} cannot be combined with --from-json (nothing is measured)")
        try:
            with open(args.from_json) as f:
                data = json.load(f)
            report = from_pytest_benchmark(data, source=args.from_json)
        except (OSError, ValueError) as e:
            parser.error(f"--from-json {args.from_json}: {e}")
    else:
        repeat = args.repeat if args.repeat is not None else (3 if args.quick else 15)
        if repeat < 1:
            parser.error("--repeat must be positive")
        if args.sweep_k:
            shapes = sweep_shapes(QUICK_SWEEP_LOGITS if args.quick else SWEEP_LOGITS)
        else:
            shapes = args.shapes or (_impls.QUICK_SHAPES if args.quick else _impls.DEFAULT_SHAPES)
        names = args.impls or [
            name
            for name, impl in _impls.IMPLEMENTATIONS.items()
            if impl.available() and (impl.sweep or not args.sweep_k)
        ]
        missing = [name for name in names if not _impls.IMPLEMENTATIONS[name].available()]
        if missing:
            needs = ", ".join(f"{n} needs {' and '.join(_impls.IMPLEMENTATIONS[n].requires)}" for n in missing)
            parser.error(f"--impls: not installed: {needs}")
        if args.threads is not None:
            import numba

            limit = numba.config.NUMBA_NUM_THREADS
            if not 1 <= args.threads <= limit:
                parser.error(f"--threads must be in [1, {limit}] (NUMBA_NUM_THREADS), got {args.threads}")
        dtype = np.dtype(args.dtype or "float32")
        report = measure(shapes, dtype, repeat, names, threads=args.threads, progress=Progress())
        report["sweep_k"] = bool(args.sweep_k)

    written = []
    sys.stdout.write(format_text(report))
    if args.markdown:
        _write(args.markdown, format_markdown(report))
        written.append(("Markdown", args.markdown))
    if args.json:
        _write(args.json, json.dumps(report, indent=2) + "\n")
        written.append(("JSON", args.json))
    plot = args.plot or (SWEEP_PLOT if report.get("sweep_k") else None)
    if plot and has_matplotlib:
        write_plot(report, plot)
        written.append(("plot", plot))
    elif plot:
        print("no plot: matplotlib is not installed (pip install matplotlib); the table above has the sweep")
    for what, path in written:
        print(f"wrote {what}: {os.path.abspath(path)}")
    for problem in report["problems"]:
        print(f"MISMATCH: {problem}", file=sys.stderr)
    if report["problems"]:
        print(
            f"FAILED: {len(report['problems'])} output(s) disagree with the reference or were not checked",
            file=sys.stderr,
        )
        return 1
    return 0


def _parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().replace("×", "x").replace("*", "x").split("x")
        try:
            n, k = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not NxK, e.g. 8192x1000") from None
        if n < 1 or k < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: N and K must be positive")
        shapes.append((n, k))
    return tuple(shapes)


def _parse_impls(text: str):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _impls.IMPLEMENTATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(_impls.IMPLEMENTATIONS)}")
    return list(dict.fromkeys(names))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


class Progress:
    """One self-updating status line on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = 0

    def update(self, message: str, milestone: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + message.ljust(self.width))
            self.width = len(message)
            self.stream.flush()
        elif milestone:
            self.stream.write(message + "\n")
            self.stream.flush()

    def note(self, message: str) -> None:
        """A line that stays (what was compiled and how long it took), above the status line."""
        self.done()
        self.stream.write(message + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class _Silent(Progress):
    def __init__(self):
        self.tty = False
        self.width = 0

    def update(self, message, milestone=False):
        pass

    def note(self, message):
        pass

    def done(self):
        pass


# --- measurement ------------------------------------------------------------------------


def measure(shapes, dtype, repeat: int, names, threads=None, progress: Progress | None = None) -> dict:
    """Build, warm up, check and time ``names`` (keys of ``_impls.IMPLEMENTATIONS``) on each
    shape; return the report as a JSON-ready dict (see :func:`format_text`).

    fastsce runs on ``threads`` Numba threads (default: Numba's setting), and every peer is
    pinned to the same count where its library allows; all are restored afterwards."""
    import numba

    progress = progress or _Silent()
    dtype = np.dtype(dtype)
    names = list(names)
    whole_run = _OtherCpu()
    saved_threads = numba.get_num_threads()
    restore = []
    try:
        if threads is not None:
            numba.set_num_threads(threads)
        count = numba.get_num_threads()
        peer_threads = {}
        for name in names:
            impl = _impls.IMPLEMENTATIONS[name]
            if impl.pin_threads is not None:
                progress.update(f"{impl.label}: setting its threads (imports the library)...", milestone=True)
                peer_threads[impl.label], undo = impl.pin_threads(count)
                if undo is not None:
                    restore.append(undo)
        entries = []
        first_call = {}
        problems = []
        skipped = {}
        for index, (n, k) in enumerate(shapes):
            label = f"[{index + 1}/{len(shapes)}] {n}x{k} {dtype}"
            entry = _measure_shape(n, k, dtype, repeat, names, label, progress, first_call, problems, skipped)
            entries.append(entry)
        progress.done()
        env = environment()
        env["peer_threads"] = peer_threads
        report = {
            "format": FORMAT,
            "source": "python -m fastsce bench",
            "dtype": str(dtype),
            "repeat": repeat,
            "interleaved": True,
            "implementations": names,
            "labels": {name: _impls.IMPLEMENTATIONS[name].label for name in names},
            "descriptions": {name: _impls.IMPLEMENTATIONS[name].description for name in names},
            "first_call_s": first_call,
            "skipped": skipped,
            "environment": env,
            "other_cpu_percent": whole_run.percent(),
            "shapes": entries,
            "problems": problems,
        }
    finally:
        progress.done()
        numba.set_num_threads(saved_threads)
        for undo in reversed(restore):
            undo()
    return report


def _measure_shape(n, k, dtype, repeat, names, label, progress, first_call, problems, skipped) -> dict:
    progress.update(f"{label}: reference result", milestone=True)
    logits, labels = _impls.make_batch(n, k, dtype)
    expected = _impls.reference_result(logits, labels)
    results = {}
    runs = {}
    for name in names:
        if name in skipped:  # could not run here (noted once, in the report)
            continue
        impl = _impls.IMPLEMENTATIONS[name]
        progress.update(f"{label}: {impl.label}: {impl.warmup}...", milestone=True)
        result = results[name] = {"checked": False, "error": None}
        try:
            t0 = time.perf_counter()
            fn = impl.build(logits, labels)  # peers compile here
            out = fn()
            result["first_call_s"] = time.perf_counter() - t0
            first_call.setdefault(name, result["first_call_s"])
            if result["first_call_s"] >= NOTE_FIRST_CALL_S:
                progress.note(
                    f"{label}: {impl.label}: {impl.warmup.split(' (')[0]} took {result['first_call_s']:.1f} s"
                )
            impl.check(out, logits, expected, labels)
            result["checked"] = True
        except _impls.Skip as e:
            skipped[name] = str(e)
            del results[name]
            progress.note(f"{label}: {impl.label}: skipped: {e}")
            continue
        except Exception as e:  # a mismatch, or an implementation that raises: reported, not fatal
            result["error"] = str(e) if isinstance(e, _impls.Mismatch) else f"{name}: raised {type(e).__name__}: {e}"
            problems.append(f"{n}x{k} {dtype}: {result['error']}")
            progress.update(f"{label}: MISMATCH in {name}", milestone=True)
            if "first_call_s" not in result:
                continue  # nothing to time
        out = None
        # calibration: enough calls per timed sample for the timer to be accurate
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        result["calls_per_sample"] = int(min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(MIN_SAMPLE_S / max(once, 1e-9)))))
        runs[name] = fn
    memory = extra_memory(runs["fastsce"]) if "fastsce" in runs else None

    timed = list(runs)
    samples = {name: [] for name in timed}
    gc.collect()
    others = _OtherCpu()
    for r in range(repeat):
        progress.update(f"{label}: timing round {r + 1}/{repeat}")
        order = timed[r % len(timed) :] + timed[: r % len(timed)]  # rotate: no fixed neighbours
        for name in order:
            fn, calls = runs[name], results[name]["calls_per_sample"]
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - t0) / calls)
            finally:
                if gc_was_enabled:
                    gc.enable()
    other_cpu = others.percent()
    for name in timed:
        results[name].update(median_s=float(np.median(samples[name])), min_s=min(samples[name]), rounds=repeat)
    del runs, expected, logits
    gc.collect()
    entry = {"n": n, "k": k, "dtype": str(dtype), "results": results, "fastsce_extra_memory": memory}
    entry["other_cpu_percent"] = other_cpu
    return _derive(entry)


NOTE_FIRST_CALL_S = 1.0  # a first call (compile, import, warm-up) this long gets a line of its own


def extra_memory(fn) -> dict:
    """Peak memory allocated during one call of ``fn`` beyond what existed before it, as
    seen by tracemalloc (Python objects and NumPy arrays, which NumPy reports to
    tracemalloc), plus the number of allocations Numba's runtime made inside compiled code,
    which tracemalloc does not see (None when that counter is unavailable)."""
    nrt = _nrt_counter()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        nrt_before = nrt() if nrt else None
        fn()
        nrt_after = nrt() if nrt else None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not was_tracing:
            tracemalloc.stop()
        if nrt:
            nrt.close()
    return {
        "bytes": int(peak - before),
        "nrt_allocations": None if nrt_before is None else int(nrt_after - nrt_before),
    }


def _nrt_counter():
    """A callable returning Numba's runtime allocation count (with .close() to restore the
    stats setting), or None if this Numba does not expose it."""
    try:
        from numba.core.runtime import _nrt_python, rtsys

        enabled = _nrt_python.memsys_stats_enabled()
        if not enabled:
            _nrt_python.memsys_enable_stats()
    except Exception:  # private API: absent or changed in this Numba
        return None

    class Counter:
        def __call__(self):
            return rtsys.get_allocation_stats().alloc

        def close(self):
            if not enabled:
                _nrt_python.memsys_disable_stats()

    return Counter()


def _derive(entry: dict) -> dict:
    """Fill in the quantities computed from the medians: logits bytes, GB/s, rows/s,
    x memcpy and fastsce's speedup over each implementation, and memory %."""
    n, k = entry["n"], entry["k"]
    nbytes = n * k * np.dtype(entry["dtype"]).itemsize
    entry["logits_bytes"] = nbytes
    results = entry["results"]
    base = results.get("memcpy", {}).get("median_s")
    fast = results.get("fastsce", {}).get("median_s")
    for result in results.values():
        median = result.get("median_s")
        if not median:
            continue
        result["gb_per_s"] = nbytes / median / 1e9
        result["rows_per_s"] = n / median
        result["x_memcpy"] = median / base if base else None
        result["fastsce_speedup"] = median / fast if fast else None
    memory = entry.get("fastsce_extra_memory")
    if memory is not None:
        memory["percent_of_logits"] = 100.0 * memory["bytes"] / nbytes
    evaluate, loss = (results.get(name, {}).get("median_s") for name in ("fastsce-evaluate", "fastsce-loss"))
    if evaluate and loss:
        entry["evaluate_over_loss"] = evaluate / loss
    return entry


# --- environment ------------------------------------------------------------------------


class _OtherCpu:
    """How busy the machine was with other work while we measured: the share of all CPUs'
    time, from creation to :meth:`percent`, spent by other processes (and stolen by the
    hypervisor), from /proc/stat minus this process's own CPU time. None without /proc."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, AttributeError):
            return None
        busy = sum(ticks) - ticks[3] - ticks[4]
        own = os.times()
        return busy / hz, sum(ticks) / hz, own.user + own.system

    def percent(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, total, own = (e - s for e, s in zip(end, self.start))
        return round(100 * max(0.0, busy - own) / total, 1) if total > 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# the version of each peer library in the report: its key -> the distributions providing it
PEER_DISTRIBUTIONS = {
    "torch": ("torch",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "optax": ("optax",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
}


def environment() -> dict:
    """CPU, thread counts and versions, for the report header and JSON."""
    import numba

    import fastsce

    env = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "numba_threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "fastsce": fastsce.__version__,
    }
    try:
        env["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        pass
    for key, dists in PEER_DISTRIBUTIONS.items():
        for dist in dists:
            try:
                env[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env


# --- pytest-benchmark JSON --------------------------------------------------------------


def from_pytest_benchmark(data: dict, source: str = "pytest-benchmark JSON") -> dict:
    """The report for a pytest-benchmark JSON document written by bench/ (whose
    benchmarks carry n, k, dtype, impl and checked in ``extra_info``)."""
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError("not a pytest-benchmark JSON file (no 'benchmarks')")
    entries = {}
    first_call = {}
    peer_threads = {}
    process_first_call = {}
    names = []
    problems = []
    dtypes = set()
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "first_call_in_new_process" in info:
            process_first_call[info["first_call_in_new_process"]] = bench["stats"]["median"]
            continue
        if not {"n", "k", "dtype", "impl"} <= info.keys():
            continue
        n, k, dtype, name = int(info["n"]), int(info["k"]), str(info["dtype"]), str(info["impl"])
        dtypes.add(dtype)
        if name not in names:
            names.append(name)
        entry = entries.setdefault((n, k, dtype), {"n": n, "k": k, "dtype": dtype, "results": {}})
        stats = bench["stats"]
        checked = bool(info.get("checked"))
        entry["results"][name] = {
            "median_s": stats["median"],
            "min_s": stats["min"],
            "rounds": stats["rounds"],
            "calls_per_sample": stats.get("iterations", 1),
            "first_call_s": info.get("first_call_s"),
            "checked": checked,
            "unchecked": not checked,
            "error": None if checked else "not marked as checked against the reference (check failed or did not run)",
        }
        if not checked:
            problems.append(f"{n}x{k} {dtype}: {name}: {entry['results'][name]['error']}")
        if "first_call_s" in info:
            first_call.setdefault(name, info["first_call_s"])
        if "threads" in info:
            peer_threads[_label({}, name)] = str(info["threads"])
        if "extra_memory" in info:
            entry["fastsce_extra_memory"] = dict(info["extra_memory"])
    if not entries:
        raise ValueError("no bench/ loss-and-gradient benchmarks in it (benchmarks need extra_info n, k, dtype, impl)")
    order = list(_impls.IMPLEMENTATIONS) + sorted(set(names) - set(_impls.IMPLEMENTATIONS))
    names = [name for name in order if name in names]
    machine = data.get("machine_info") or {}
    env = dict(machine.get("fastsce") or {})
    if not env:
        env = {"cpu": (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "unknown CPU"}
        env["python"] = machine.get("python_version", "?")
    if peer_threads:
        env["peer_threads"] = peer_threads
    report = {
        "format": FORMAT,
        "source": " ".join(
            filter(None, ["pytest-benchmark", data.get("version"), f"({source})", data.get("datetime")])
        ),
        "dtype": ", ".join(sorted(dtypes)),
        "repeat": None,
        "interleaved": False,
        "implementations": names,
        "labels": {name: _impls.IMPLEMENTATIONS[name].label for name in names if name in _impls.IMPLEMENTATIONS},
        "descriptions": {
            name: _impls.IMPLEMENTATIONS[name].description for name in names if name in _impls.IMPLEMENTATIONS
        },
        "first_call_s": first_call,
        "environment": env,
        "shapes": [_derive(entry) for entry in entries.values()],
        "problems": problems,
    }
    if process_first_call:
        report["first_call_in_new_process_s"] = process_first_call
    return report


# --- rendering --------------------------------------------------------------------------

COLUMNS = ["shape", "implementation", "median ms", "x memcpy", "GB/s", "fastsce speedup", "check"]
# memcpy, loss only and evaluate are not alternatives to loss+grad
NO_SPEEDUP_KINDS = ("copy", "loss", "evaluate")


def _label(report, name):
    """The table and legend name of an implementation key."""
    labels = report.get("labels") or {}
    if name in labels:
        return labels[name]
    impl = _impls.IMPLEMENTATIONS.get(name)
    return impl.label if impl else name


def _rows(report):
    """Table rows (lists of strings), grouped by shape; the shape only on a group's first row."""
    groups = []
    for entry in report["shapes"]:
        rows = []
        for name in report["implementations"]:
            result = entry["results"].get(name)
            if result is None:
                continue
            shape = f"{entry['n']} x {entry['k']}" if not rows else ""
            impl = _impls.IMPLEMENTATIONS.get(name)
            if name == "fastsce" or (impl is not None and impl.kind in NO_SPEEDUP_KINDS):
                speedup = "—"
            else:
                speedup = _ratio(result.get("fastsce_speedup"))
            if result["checked"]:
                check = "ok"
            elif result.get("unchecked"):
                check = "UNCHECKED"
            else:
                check = "MISMATCH" if "median_s" in result else "ERROR"
            median = f"{result['median_s'] * 1e3:.3f}" if "median_s" in result else "—"
            gbs = f"{result['gb_per_s']:.2f}" if "gb_per_s" in result else "—"
            rows.append([shape, _label(report, name), median, _ratio(result.get("x_memcpy")), gbs, speedup, check])
        groups.append(rows)
    return groups


def _wide(report):
    """One row per shape, one column per implementation but memcpy: x memcpy (the shape of
    the README's table and of --sweep-k's). Returns (header, rows)."""
    names = [name for name in report["implementations"] if name != "memcpy"]
    names = [name for name in names if any(name in e["results"] for e in report["shapes"])]
    header = ["N x K", *(_label(report, name) for name in names)]
    rows = []
    for entry in report["shapes"]:
        cells = [f"{entry['n']} x {entry['k']}"]
        for name in names:
            result = entry["results"].get(name, {})
            cell = _ratio(result.get("x_memcpy"))
            if result and not result.get("checked"):
                cell += " (not checked)" if result.get("unchecked") else " (MISMATCH)"
            cells.append(cell)
        rows.append(cells)
    return header, rows


def _ratio(value):
    return "—" if value is None else f"{value:.2f}"


def reliability_warning(report):
    """The warning of a run during which other processes took over BUSY_PERCENT of the CPU
    while a shape was timed, or None."""
    busy = [e for e in report["shapes"] if (e.get("other_cpu_percent") or 0) > BUSY_PERCENT]
    if not busy:
        return None
    worst = max(busy, key=lambda e: e["other_cpu_percent"])
    shapes = ", ".join(f"{e['n']} x {e['k']}" for e in busy)
    return (
        f"WARNING: other processes took over {BUSY_PERCENT}% of the CPU while timing {shapes} "
        f"(up to {worst['other_cpu_percent']:.0f}%): those times are unreliable"
    )


def _header_lines(report):
    env = report["environment"]
    threads = f"{env['numba_threads']} Numba threads" if "numba_threads" in env else "threads: ?"
    if "numba_threading_layer" in env:
        threads += f" ({env['numba_threading_layer']})"
    cpu = env.get("cpu", "unknown CPU")
    if env.get("cpu_count"):
        cpu += f" ({env['cpu_count']} logical CPUs)"
    versions = ", ".join(
        f"{label} {env[key]}"
        for key, label in [
            ("python", "Python"),
            ("numpy", "NumPy"),
            ("numba", "Numba"),
            ("fastsce", "fastsce"),
            ("torch", "PyTorch"),
            ("jax", "JAX"),
            ("optax", "optax"),
            ("tensorflow", "TensorFlow"),
        ]
        if key in env
    )
    if report["interleaved"]:
        how = f"median of {report['repeat']} rounds, implementations interleaved round-robin"
    else:
        how = f"medians from {report['source']}, not interleaved"
    lines = [f"CPU: {cpu}, {threads}"]
    peers = env.get("peer_threads") or {}
    if peers:
        lines.append("peers' threads: " + "; ".join(f"{label} {text}" for label, text in peers.items()))
    elif "torch_threads" in env:  # a report of bench/ (pytest-benchmark)
        lines.append(f"peers' threads: PyTorch {env['torch_threads']}")
    lines += [versions, f"{report['dtype']} logits, integer labels, mean reduction; {how}"]
    other = report.get("other_cpu_percent")
    if other is not None:
        text = f"other processes used {other:.0f}% of the CPU time during the run"
        warning = reliability_warning(report)
        if warning:
            text += "; " + warning
        lines.append(text)
    first = report.get("first_call_s", {})
    if "fastsce" in first:
        text = f"fastsce first call of the run (compiles, or loads the on-disk cache): {first['fastsce']:.3f} s"
        if "fastsce-loss" in first:
            text += f"; loss only: {first['fastsce-loss']:.3f} s"
        lines.append(text)
    cold_warm = report.get("first_call_in_new_process_s")
    if cold_warm:
        lines.append(
            "first call in a new process, both dtypes: "
            + ", ".join(f"{key} cache {value:.2f} s" for key, value in sorted(cold_warm.items()))
        )
    for name, reason in (report.get("skipped") or {}).items():
        lines.append(f"{_label(report, name)} skipped: {reason}")
    return lines


BUSY_PERCENT = 10  # other processes' share of the CPU above which the header warns

LEGEND = [
    "x memcpy = median / median of memcpy (np.copyto of the logits, a floor for reading logits and writing a gradient)",
    "GB/s = logits bytes (N * K * itemsize) / median",
    "fastsce speedup = median of this row / median of fastsce loss+grad (out=) (above 1: fastsce is faster)",
]
WIDE_LEGEND = "x memcpy: median / median of np.copyto of the logits (lower is faster)"


def _memory_lines(report):
    lines = []
    for entry in report["shapes"]:
        memory = entry.get("fastsce_extra_memory")
        if memory is None:
            continue
        text = f"{entry['n']} x {entry['k']}: {memory['bytes']:,} B ({memory['percent_of_logits']:.2f}% of the logits)"
        if memory.get("nrt_allocations") is not None:
            text += f", {memory['nrt_allocations']} Numba runtime allocations"
        lines.append(text)
    return lines


def _evaluate_lines(report):
    return [
        f"{entry['n']} x {entry['k']}: {entry['evaluate_over_loss']:.2f}"
        for entry in report["shapes"]
        if entry.get("evaluate_over_loss") is not None
    ]


EVALUATE_TITLE = "fastsce evaluate (every metric, one read of the logits), median / fastsce loss only's median:"

MEMORY_TITLE = (
    "fastsce loss+grad with out= preallocated, memory allocated beyond the inputs and the output "
    "(tracemalloc peak during one call):"
)


def _aligned(header, rows, left=1):
    """Plain-text table: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(header)]

    def fmt(row):
        return "  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(row) for row in rows)]


def format_text(report) -> str:
    lines = ["fastsce benchmark", *(f"  {line}" for line in _header_lines(report)), ""]
    if report.get("sweep_k"):
        header, rows = _wide(report)
        lines.append(f"K sweep at about {report['shapes'][0]['n'] * report['shapes'][0]['k']:,} logits per shape")
        lines.extend(_aligned(header, rows))
        lines.append("")
        lines.append(WIDE_LEGEND)
    else:
        groups = _rows(report)
        table = _aligned(COLUMNS, [row for rows in groups for row in rows], left=2)
        lines.extend(table[:2])
        body = iter(table[2:])
        for i, rows in enumerate(groups):
            if i:
                lines.append("")
            lines.extend(next(body) for _ in rows)
        lines.append("")
        lines.extend(LEGEND)
    memory = _memory_lines(report)
    if memory and not report.get("sweep_k"):
        lines.append("")
        lines.append(MEMORY_TITLE)
        lines.extend(f"  {line}" for line in memory)
    evaluate = _evaluate_lines(report)
    if evaluate and not report.get("sweep_k"):
        lines.append("")
        lines.append(EVALUATE_TITLE)
        lines.extend(f"  {line}" for line in evaluate)
    if report["problems"]:
        lines.append("")
        lines.append(f"MISMATCH: {len(report['problems'])} output(s) disagree with the reference or were not checked")
    return "\n".join(lines).rstrip() + "\n"


def _markdown_table(header, rows, align):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def format_markdown(report) -> str:
    header = _header_lines(report)
    lines = ["**fastsce benchmark** — " + " · ".join(header), ""]
    wide_header, wide_rows = _wide(report)
    wide_rows = [[f"**{row[0]}**", *row[1:]] for row in wide_rows]
    wide = _markdown_table(wide_header, wide_rows, ["---"] + ["---:"] * (len(wide_header) - 1))
    if report.get("sweep_k"):
        lines.extend(wide)
        lines.append("")
        lines.append(WIDE_LEGEND + ".")
        return "\n".join(lines) + "\n"
    rows = []
    for group in _rows(report):
        for row in group:
            cells = [f"**{c}**" if i == 0 and c else c for i, c in enumerate(row)]
            if row[-1] != "ok" and row[-1] != "—":
                cells[-1] = f"**{row[-1]}**"
            rows.append(cells)
    lines.extend(_markdown_table(COLUMNS, rows, ["---", "---", "---:", "---:", "---:", "---:", ":---:"]))
    lines.append("")
    lines.append("; ".join(LEGEND) + ".")
    memory = _memory_lines(report)
    if memory:
        lines.append("")
        lines.append(MEMORY_TITLE + " " + "; ".join(memory) + ".")
    evaluate = _evaluate_lines(report)
    if evaluate:
        lines.append("")
        lines.append(EVALUATE_TITLE + " " + "; ".join(evaluate) + ".")
    lines.append("")
    lines.append("x memcpy at a glance:")
    lines.append("")
    lines.extend(wide)
    return "\n".join(lines) + "\n"


def write_plot(report, path):
    """Time over memcpy's against K, log-log, one line per implementation; the legend
    beside the axes, and the reliability warning of a loaded machine under them. Returns
    the matplotlib Figure."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    entries = sorted(report["shapes"], key=lambda e: (e["k"], e["n"]))
    for name in report["implementations"]:
        points = [
            (e["k"], e["results"][name]["x_memcpy"]) for e in entries if e["results"].get(name, {}).get("x_memcpy")
        ]
        if points:
            ks, ratios = zip(*points)
            style = {"linestyle": "--", "color": "black"} if name == "memcpy" else {"linestyle": "-"}
            ax.plot(ks, ratios, marker="o", markersize=4, label=_label(report, name), **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if report.get("sweep_k"):
        ax.set_xticks([e["k"] for e in entries], [str(e["k"]) for e in entries], fontsize=8, rotation=60)
        logits = entries[0]["n"] * entries[0]["k"]
        ax.set_xlabel(f"K (classes), N = {logits:,} // K rows")
    else:
        ax.set_xticks([e["k"] for e in entries], [f"{e['k']}\nN={e['n']}" for e in entries])
        ax.set_xlabel("K (classes)")
    ax.minorticks_off()
    ax.set_ylabel("time / time of memcpy of the logits (lower is faster)")
    env = report["environment"]
    threads = f", {env['numba_threads']} threads" if "numba_threads" in env else ""
    ax.set_title(f"softmax cross-entropy, {report['dtype']} — {env.get('cpu', '')}{threads}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    warning = reliability_warning(report)
    if warning:
        fig.supxlabel(warning, color="firebrick", fontsize=8, wrap=True)
    fig.savefig(path, dpi=120)
    return fig
