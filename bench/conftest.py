"""Benchmark configuration, and at the end of the run the same report as
``python -m fastsce bench`` (ratios of the medians measured in this run)."""

from fastsce._tools import impls as _impls, report as _report

# (N, K): small K is dominated by per-row overhead, large K by memory bandwidth.
SHAPES = list(_impls.DEFAULT_SHAPES)

# Reports of one benchmark group's medians over its baseline's: (the extra_info key that
# names a benchmark's variant, the baseline variant, the section title).
RATIO_REPORTS = (
    ("option", "plain", "fastsce options: median time / plain call's median (this run)"),
    ("step", "fastsce.torch", "a training step's loss, forward and backward: median / fastsce.torch's (this run)"),
    ("dask_run", "in-memory", "fastsce.dask: median / the in-memory call's (this run)"),
    ("path", "unsharded", "classes split across shards: median / the unsharded call's (this run)"),
    ("linear", "products", "a linear head's loss and gradients: median / the three matrix products' (this run)"),
    ("metrics", "loss only", "fastsce.evaluate and the same metrics elsewhere: median / loss only's (this run)"),
)

# fastsce.evaluate's targets (issue: every metric in one read of the logits): at most these
# multiples of the loss-only call's time, and this many times faster than the NumPy reference.
EVALUATE_TARGETS = {"evaluate": 1.3, "evaluate per_row": 1.5}
EVALUATE_VS_REFERENCE = 5.0


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record CPU, thread counts and versions, for ``python -m fastsce bench --from-json``."""
    machine_info["fastsce"] = _report.environment()


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    for key, baseline, title in RATIO_REPORTS:
        _ratio_report(terminalreporter, session, key, baseline, title)
    evaluate = _evaluate_speedups(session.benchmarks)
    if evaluate:
        title = "fastsce.evaluate: the targets (set at 65536x10 and 8192x1000), x faster than the others (this run)"
        terminalreporter.section(title)
        terminalreporter.write(evaluate)
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


def _evaluate_speedups(benchmarks) -> str:
    """bench/test_evaluate.py's medians: evaluate's (and per_row's) over the loss-only call's
    against their targets, and how many times faster evaluate is than the NumPy reference
    and scikit-learn."""
    medians = {}
    for bench in benchmarks:
        info = bench.extra_info
        if "metrics" in info and not bench.has_error and info.get("checked"):
            medians[bench.group, info["metrics"]] = bench.stats.median
    lines = []
    for group in dict.fromkeys(g for g, _ in medians):
        fast, loss = medians.get((group, "evaluate")), medians.get((group, "loss only"))
        parts = [
            f"{variant} {medians[group, variant] / loss:.2f}x loss only (target <= {target})"
            for variant, target in EVALUATE_TARGETS.items()
            if loss and (group, variant) in medians
        ]
        for other, target in (("reference", EVALUATE_VS_REFERENCE), ("scikit-learn", None)):
            if fast and (group, other) in medians:
                wanted = f" (target >= {target})" if target else ""
                parts.append(f"{medians[group, other] / fast:.1f}x faster than {other}{wanted}")
        if parts:
            lines.append(f"{group}: " + "; ".join(parts))
    return "\n".join(lines) + "\n" if lines else ""


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


def _ratio_report(terminalreporter, session, key, baseline, title):
    """Per benchmark group, each variant's median over the baseline variant's."""
    medians = {}
    for bench in session.benchmarks:
        if key in bench.extra_info and not bench.has_error:
            medians[bench.group, bench.extra_info[key]] = bench.stats.median
    variants = {g: [v for h, v in medians if h == g and v != baseline] for g, _ in medians}
    groups = [g for g, others in variants.items() if others and (g, baseline) in medians]
    if not groups:
        return
    terminalreporter.section(title)
    for group in groups:
        base = medians[group, baseline]
        ratios = ", ".join(f"{v} {t / base:.2f}" for (g, v), t in medians.items() if g == group and v != baseline)
        terminalreporter.write_line(f"{group} ({baseline} {base * 1e3:.2f} ms): {ratios}")
