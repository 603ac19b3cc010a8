"""Benchmark configuration, and a summary of ratios measured in this same run."""

import numba

from fastsce import _impls

# (N, K): small K is dominated by per-row overhead, large K by memory bandwidth.
SHAPES = list(_impls.DEFAULT_SHAPES)


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
