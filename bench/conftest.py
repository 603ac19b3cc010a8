"""Benchmark configuration, and a summary of ratios measured in this same run."""

import numba
import numpy as np
import pytest

# (N, K): small K is dominated by per-row overhead, large K by memory bandwidth.
SHAPES = [(65536, 10), (16384, 100), (8192, 1000), (1024, 32000), (256, 128256)]


def make_batch(n, k, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (3 * rng.standard_normal((n, k))).astype(dtype), rng.integers(0, k, n)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats:
            groups.setdefault(bench.group, {})[bench.param.split("-", 1)[-1] if bench.param else bench.name] = (
                bench.stats.median
            )
    tr = terminalreporter
    tr.section(f"ratios of medians, this run ({numba.get_num_threads()} threads)")
    for group, medians in groups.items():
        base, ref = medians.get("memcpy"), medians.get("reference")
        tr.write_line(f"{group}:")
        for name, median in sorted(medians.items(), key=lambda kv: kv[1]):
            line = f"  {name:<14} {median * 1e3:10.3f} ms"
            if base:
                line += f"   {median / base:7.2f}x memcpy"
            if ref:
                line += f"   reference / this = {ref / median:7.2f}"
            tr.write_line(line)
