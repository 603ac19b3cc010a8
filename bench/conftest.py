"""Benchmark configuration, and at the end of the run the same report as
``python -m fastsce bench`` (ratios of the medians measured in this run)."""

from fastsce import _impls, _report

# (N, K): small K is dominated by per-row overhead, large K by memory bandwidth.
SHAPES = list(_impls.DEFAULT_SHAPES)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record CPU, thread counts and versions, for ``python -m fastsce bench --from-json``."""
    machine_info["fastsce"] = _report.environment()


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    data = {
        "benchmarks": [bench.as_dict(include_data=False) for bench in session.benchmarks if not bench.has_error],
        "machine_info": {"fastsce": _report.environment()},
    }
    try:
        report = _report.from_pytest_benchmark(data, source="this run")
    except ValueError:  # no loss-and-gradient benchmark ran (e.g. -k first_call)
        return
    terminalreporter.section("fastsce report: ratios of the medians of this run")
    terminalreporter.write(_report.format_text(report))
