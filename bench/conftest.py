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
    _option_overheads(terminalreporter, session)
    _training_steps(terminalreporter, session)
    primitives = _primitive_ratios(session.benchmarks)
    if primitives:
        terminalreporter.section("softmax, log_softmax, logsumexp: ratios of the medians of this run")
        terminalreporter.write(primitives)
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


def _option_overheads(terminalreporter, session):
    """bench/test_options.py: each option's median over the plain call's (same shape, kind)."""
    medians = {}
    for bench in session.benchmarks:
        info = bench.extra_info
        if "option" in info and not bench.has_error:
            medians[(info["n"], info["k"], info["kind"]), info["option"]] = bench.stats.median
    if not medians:
        return
    terminalreporter.section("fastsce options: median time / plain call's median (this run)")
    for group in sorted({g for g, _ in medians}):
        plain = medians.get((group, "plain"))
        if plain:
            ratios = ", ".join(f"{o} {t / plain:.2f}" for (g, o), t in medians.items() if g == group and o != "plain")
            terminalreporter.write_line(f"{group[0]}x{group[1]} {group[2]} ({plain * 1e3:.2f} ms): {ratios}")

def _primitive_ratios(benchmarks) -> str:
    """bench/test_primitives.py's medians as multiples of memcpy, and SciPy's and
    PyTorch's times as multiples of fastsce's ("x slower")."""
    medians = {}
    for bench in benchmarks:
        info = bench.extra_info
        if "function" in info and not bench.has_error and info.get("checked"):
            medians[(info["shape"], info["function"], info["variant"])] = bench.stats.median
    lines = []
    for shape in dict.fromkeys(s for s, _, _ in medians):
        memcpy = medians.get((shape, "memcpy", "numpy"))
        if memcpy is None:
            continue
        lines.append(f"{shape} {'':<24} {'x memcpy':>9} {'scipy':>16} {'torch':>16}")
        for (s, function, variant), t in medians.items():
            if s != shape or variant != "fastsce":
                continue
            others = [medians.get((shape, function, lib)) for lib in ("scipy", "torch")]
            slower = [f"{o / memcpy:6.2f} ({o / t:4.1f}x)" if o else f"{'-':>16}" for o in others]
            lines.append(f"  {function:<32} {t / memcpy:9.2f} {slower[0]:>16} {slower[1]:>16}")
    return "\n".join(lines) + "\n" if lines else ""


def _training_steps(terminalreporter, session):
    """bench/test_torch.py: PyTorch's training-step median over fastsce.torch's."""
    medians = {}
    for bench in session.benchmarks:
        if (bench.group or "").startswith("training step") and not bench.has_error:
            medians[bench.group, bench.extra_info["impl"]] = bench.stats.median
    lines = [
        f"{group}: fastsce.torch {medians[group, 'fastsce.torch'] * 1e3:.2f} ms, torch "
        f"{medians[group, 'torch'] * 1e3:.2f} ms: {medians[group, 'torch'] / medians[group, 'fastsce.torch']:.2f}x faster"
        for group in sorted({g for g, _ in medians})
        if (group, "torch") in medians and (group, "fastsce.torch") in medians
    ]
    if lines:
        terminalreporter.section("fastsce.torch: a training step's loss, forward and backward (this run)")
        for line in lines:
            terminalreporter.write_line(line)
