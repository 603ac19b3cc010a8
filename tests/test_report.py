"""``python -m fastsce bench``: the report files, --from-json on real pytest-benchmark
output of bench/, loud failure when an implementation's output is wrong, the peers
(each checked against the reference when installed; mocked otherwise), --sweep-k and
the plot."""

import dataclasses
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import fastsce
from fastsce import reference
from fastsce._tools import impls as _impls, report as _report
from fastsce.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
# fastsce's own entries and the NumPy reference; the peers (other libraries) are slow to
# import and compile, so each has a test of its own on a tiny batch
CORE = ["memcpy", "fastsce", "fastsce-fresh", "fastsce-loss", "fastsce-evaluate", "reference"]
PEERS = [name for name in _impls.IMPLEMENTATIONS if name not in CORE]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _python(*args, timeout=300):
    # (a pytest run in the subprocess is a session of its own, not a worker of this one's
    # pytest-xdist, which pytest-benchmark reads from PYTEST_XDIST_* and then stays silent)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST_")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _check_report(report, shapes, names):
    """Every shape and implementation present, checked, with ratios that follow from the medians."""
    assert [(e["n"], e["k"]) for e in report["shapes"]] == [tuple(s) for s in shapes]
    assert report["implementations"] == names
    assert report["problems"] == []
    assert report["environment"]["numba_threads"] >= 1
    for entry in report["shapes"]:
        assert entry.get("other_cpu_percent") is None or 0 <= entry["other_cpu_percent"] <= 100
        results = entry["results"]
        assert list(results) == names
        nbytes = entry["n"] * entry["k"] * np.dtype(entry["dtype"]).itemsize
        assert entry["logits_bytes"] == nbytes
        for name, r in results.items():
            assert r["checked"] is True and r["error"] is None, name
            assert r["median_s"] > 0 and r["min_s"] <= r["median_s"]
            assert math.isclose(r["x_memcpy"], r["median_s"] / results["memcpy"]["median_s"])
            assert math.isclose(r["fastsce_speedup"], r["median_s"] / results["fastsce"]["median_s"])
            assert math.isclose(r["gb_per_s"], nbytes / r["median_s"] / 1e9)
            assert r["x_memcpy"] > 0 and r["fastsce_speedup"] > 0
        memory = entry["fastsce_extra_memory"]
        assert memory["bytes"] >= 0
        assert math.isclose(memory["percent_of_logits"], 100 * memory["bytes"] / nbytes)


def test_quick_report_writes_markdown_json_and_plot(tmp_path):
    md, js, png = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.png"
    args = ["-m", "fastsce", "bench", "--quick", "--repeat", "2", "--markdown", str(md), "--json", str(js)]
    args += ["--impls", ",".join(CORE)]
    if HAS_MATPLOTLIB:
        args += ["--plot", str(png)]
    done = _python(*args)
    assert done.returncode == 0, done.stderr

    report = json.loads(js.read_text())
    assert report["source"] == "python -m fastsce bench" and report["repeat"] == 2
    _check_report(report, _impls.QUICK_SHAPES, CORE)
    assert report["first_call_s"]["fastsce"] > 0

    text, markdown = done.stdout, md.read_text()
    assert "MISMATCH" not in text + markdown + done.stderr
    for n, k in _impls.QUICK_SHAPES:
        assert f"{n} x {k}" in text and f"**{n} x {k}**" in markdown
    assert "| shape | implementation | median ms | x memcpy |" in markdown
    assert markdown.count("| ok |") == len(_impls.QUICK_SHAPES) * len(CORE)
    labels = [
        "fastsce loss+grad (out=)",
        "fastsce loss+grad (fresh gradient)",
        "fastsce loss only",
        "fastsce evaluate (every metric)",
        "NumPy reference",
    ]
    for label in labels:
        assert f"| {label} |" in markdown and f"  {label}  " in text
    # the markdown's ratio cells are the JSON's, rounded
    first = report["shapes"][0]["results"]["reference"]
    assert f"| NumPy reference | {first['median_s'] * 1e3:.3f} | {first['x_memcpy']:.2f} |" in markdown
    assert report["environment"]["cpu"] in markdown and f"NumPy {np.__version__}" in markdown
    # no speed-up figure on the memcpy and loss-only rows, nor on fastsce's own
    for label in ("memcpy (np.copyto)", "fastsce loss+grad (out=)", "fastsce loss only", labels[3]):
        rows = [line for line in markdown.splitlines() if f"| {label} |" in line and "| ok |" in line]
        assert len(rows) == len(_impls.QUICK_SHAPES) and all(row.endswith("| — | ok |") for row in rows), rows
    # evaluate over the loss only, per shape, from the medians
    for entry in report["shapes"]:
        results = entry["results"]
        ratio = results["fastsce-evaluate"]["median_s"] / results["fastsce-loss"]["median_s"]
        assert math.isclose(entry["evaluate_over_loss"], ratio)
        line = f"{entry['n']} x {entry['k']}: {ratio:.2f}"
        assert f"\n  {line}\n" in text and f"{line}" in markdown
    assert _report.EVALUATE_TITLE in text and _report.EVALUATE_TITLE in markdown
    # the x memcpy summary table (the README's layout): one column per implementation but memcpy
    assert "| N x K | " + " | ".join(labels) + " |" in markdown
    # the status lines say what the first calls do, and the files written are named at the end
    assert "fastsce loss+grad (out=): first call (Numba compiles, or loads its on-disk cache)..." in done.stderr
    written = [f"wrote Markdown: {md}", f"wrote JSON: {js}"] + ([f"wrote plot: {png}"] if HAS_MATPLOTLIB else [])
    assert done.stdout.rstrip().splitlines()[-len(written) :] == written
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_from_json_renders_real_pytest_benchmark_output(tmp_path):
    """bench/ on its smallest shape, then the same report from its JSON file."""
    js = tmp_path / "bench.json"
    not_peers = " and ".join(f"not {name}" for name in PEERS)
    done = _python(
        "-m", "pytest", "bench/", "-q", "-k", f"65536x10 and {not_peers}", "-p", "no:cacheprovider",
        f"--benchmark-json={js}", "--benchmark-max-time=0.02", "--benchmark-min-rounds=3",
        "--benchmark-warmup=off",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fastsce report: ratios of the medians of this run" in done.stdout  # bench/'s own summary

    md, out = tmp_path / "r.md", tmp_path / "r.json"
    assert main(["bench", "--from-json", str(js), "--markdown", str(md), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["source"].startswith("pytest-benchmark") and not report["interleaved"]
    _check_report(report, [(65536, 10)], CORE)
    assert report["environment"]["numba"] == numba.__version__  # recorded by bench/conftest.py
    assert "**65536 x 10**" in md.read_text()


def _bench_json(checked):
    def bench(impl, median, **extra):
        info = dict(n=100, k=7, dtype="float32", impl=impl, **extra)
        return {
            "group": "100x7 float32",
            "name": f"test_loss_and_grad[100x7-{impl}]",
            "param": f"100x7-{impl}",
            "extra_info": info,
            "stats": {"median": median, "min": median / 2, "rounds": 5, "iterations": 1},
        }

    return {
        "machine_info": {"cpu": {"brand_raw": "Test CPU"}, "python_version": "3.x"},
        "benchmarks": [
            bench("memcpy", 1e-6, checked=True),
            bench("fastsce", 4e-6, checked=True, extra_memory={"bytes": 800, "nrt_allocations": 0}),
            bench("reference", 2e-5, checked=checked, threads="2 (some setting)"),
            {"group": "other", "name": "test_first_call_latency[cold]", "extra_info": {}, "stats": {"median": 1}},
        ],
        "datetime": "2026-01-01T00:00:00",
        "version": "5.3.1",
    }


def test_from_json_ratios_and_unchecked_entries(tmp_path, capsys):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_bench_json(checked=True)))
    assert main(["bench", "--from-json", str(path), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    results = report["shapes"][0]["results"]
    assert results["reference"]["x_memcpy"] == pytest.approx(20)
    assert results["reference"]["fastsce_speedup"] == pytest.approx(5)
    assert report["shapes"][0]["fastsce_extra_memory"]["percent_of_logits"] == pytest.approx(800 / 2800 * 100)
    assert "Test CPU" in capsys.readouterr().out

    # a benchmark whose check did not pass (bench/ sets checked only after it) fails the report
    path.write_text(json.dumps(_bench_json(checked=False)))
    assert main(["bench", "--from-json", str(path)]) == 1
    captured = capsys.readouterr()
    assert "UNCHECKED" in captured.out and "reference" in captured.err and "MISMATCH" in captured.err


def _wrong(impl, how):
    def build(logits, labels):
        run = impl.build(logits, labels)

        def wrong():
            if how == "raise":
                raise RuntimeError("broken build")
            loss, grad = run()
            if how == "loss":
                return loss * 1.001, grad
            grad = grad.copy()
            grad[-1, -1] += 1e-3 if how == "grad" else 1
            return loss, grad

        return wrong

    return dataclasses.replace(impl, build=build)


@pytest.mark.parametrize(
    ("name", "how"), [("fastsce", "grad"), ("fastsce", "loss"), ("memcpy", "copy"), ("reference", "raise")]
)
def test_wrong_output_is_reported_and_fails(tmp_path, monkeypatch, capsys, name, how):
    monkeypatch.setitem(_impls.IMPLEMENTATIONS, name, _wrong(_impls.IMPLEMENTATIONS[name], how))
    js = tmp_path / "r.json"
    argv = ["bench", "--shapes", "64x10,8x300", "--repeat", "1", "--impls", "memcpy,fastsce,reference"]
    assert main([*argv, "--json", str(js)]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.err and name in captured.err
    assert "MISMATCH" in captured.out
    for entry in json.loads(js.read_text())["shapes"]:
        results = entry["results"]
        assert results[name]["checked"] is False and name in results[name]["error"]
        assert all(r["checked"] for other, r in results.items() if other != name)
        assert ("median_s" in results[name]) == (how != "raise")  # what raises is not timed


def test_check_rejects_wrong_outputs_directly():
    logits, labels = _impls.make_batch(50, 9)
    expected = _impls.reference_result(logits, labels)
    impl = _impls.IMPLEMENTATIONS["fastsce"]
    impl.check(impl.build(logits, labels)(), logits, expected)
    loss, grad = expected
    with pytest.raises(_impls.Mismatch, match="gradient"):
        impl.check((loss, grad[:, :-1]), logits, expected)
    with pytest.raises(_impls.Mismatch, match="no gradient"):
        impl.check((loss, None), logits, expected)
    with pytest.raises(_impls.Mismatch, match="pair"):
        impl.check(loss, logits, expected)
    with pytest.raises(_impls.Mismatch, match="copy"):
        _impls.IMPLEMENTATIONS["memcpy"].check((None, logits + 1), logits, expected)


def test_evaluate_entry_is_checked_against_the_reference_metrics():
    logits, labels = _impls.make_batch(200, 30)
    expected = _impls.reference_result(logits, labels)
    impl = _impls.IMPLEMENTATIONS["fastsce-evaluate"]
    result = impl.build(logits, labels)()
    impl.check(result, logits, expected, labels)
    evaluation = result[0]
    wrong = {
        "loss": evaluation.loss * 1.001,
        "accuracy": evaluation.accuracy + 1 / 200,
        "topk_accuracy": {1: evaluation.accuracy, 5: evaluation.topk_accuracy[5] - 1 / 200},
        "ece": evaluation.ece + 1e-3,
        "bin_counts": evaluation.bin_counts + np.eye(15)[3] - np.eye(15)[4],
    }
    for name, value in wrong.items():
        with pytest.raises(_impls.Mismatch, match="fastsce-evaluate: "):
            impl.check((dataclasses.replace(evaluation, **{name: value}), None), logits, expected, labels)
    with pytest.raises(_impls.Mismatch, match="not an Evaluation"):
        impl.check((evaluation.loss, None), logits, expected, labels)
    with pytest.raises(TypeError, match="needs the labels"):
        impl.check(result, logits, expected)
    # the per-row arrays too, where both have them
    want = reference.evaluate(logits, labels, per_row=True)
    rows = fastsce.evaluate(logits, labels, per_row=True)
    _impls.check_evaluation("per_row", rows, want, want.confidence, logits.dtype)
    rank = rows.target_rank.copy()
    rank[7] += 1
    with pytest.raises(_impls.Mismatch, match="per_row: target_rank differs"):
        wrong_rows = dataclasses.replace(rows, target_rank=rank)
        _impls.check_evaluation("per_row", wrong_rows, want, want.confidence, logits.dtype)


def test_threads_option_is_used_and_restored(tmp_path):
    before = numba.get_num_threads()
    js = tmp_path / "r.json"
    argv = ["bench", "--shapes", "64x10", "--repeat", "1", "--threads", "1", "--impls", "memcpy,fastsce"]
    assert main([*argv, "--json", str(js)]) == 0
    assert json.loads(js.read_text())["environment"]["numba_threads"] == 1
    assert numba.get_num_threads() == before


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--impls", "fastsce,nope"],
        ["bench", "--shapes", "10x"],
        ["bench", "--shapes", "0x10"],
        ["bench", "--from-json", "x.json", "--quick"],
        ["bench", "--threads", "0"],
        ["--rows", "10", "bench"],
    ],
)
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_no_subcommand_is_still_the_check_job(capsys):
    assert main(["--rows", "64", "--classes", "5", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "64 x 5 float32 logits" in out and "OK: fastsce agrees with the reference" in out


def test_text_report_lists_every_row():
    report = _report.from_pytest_benchmark(_bench_json(checked=True))
    text = _report.format_text(report)
    assert text.count("\n100 x 7") == 1  # the shape names its group once
    assert "fastsce speedup" in text and "800 B" in text
    assert "peers' threads: NumPy reference 2 (some setting)" in text  # what bench/ recorded


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--plot", "x.png"])
    assert exc.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_progress_line_updates_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = _report.Progress(stream)
    progress.update("round 1/15 of a long line")
    progress.update("round 2/15")
    progress.done()
    text = stream.getvalue()
    assert text.startswith("\rround 1/15") and "\rround 2/15" in text and "\n" not in text
    assert text.endswith("\r")  # the line is cleared, the table starts on a clean line


@pytest.mark.full  # bench/test_options.py in a subprocess: 40 s (the other bench/ run here covers bench/conftest.py)
def test_option_benchmarks_run_and_check_their_output():
    """bench/test_options.py on its smallest shape: every option's result checked, and
    the overhead summary printed."""
    done = _python(
        "-m", "pytest", "bench/test_options.py", "-q", "-k", "16384x100", "-p", "no:cacheprovider",
        "--benchmark-max-time=0.02", "--benchmark-min-rounds=3", "--benchmark-warmup=off",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "22 passed" in done.stdout, done.stdout
    assert "fastsce options: median time / plain call's median" in done.stdout
    assert "16384x100 loss+grad" in done.stdout and "softcap" in done.stdout


# --- the peers ----------------------------------------------------------------------------


def test_floors_script_checks_its_loops_and_prints_a_row_per_shape():
    """bench/floors.py on two small shapes: the floor loops' exps checked against NumPy's
    (inside the script) and one row of ratios per shape."""
    done = _python("bench/floors.py", "--threads", "1", "--rounds", "1", "--shapes", "256x10,64x1000")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "exps + store" in lines[1] and "exps, summed" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [row[:3] for row in rows] == [["256", "x", "10"], ["64", "x", "1000"]]
    assert all(float(x) > 0 for row in rows for x in row[3:])


@pytest.mark.parametrize("name", PEERS)
def test_peer_agrees_with_the_reference(name):
    """Each peer's adapter (when its library is installed) computes the mean loss and its
    gradient, checked as the report checks them, on a tiny batch."""
    impl = _impls.IMPLEMENTATIONS[name]
    if not impl.available():
        pytest.skip(f"{name}: {' and '.join(impl.requires)} not installed (pip install '.[peers]')")
    logits, labels = _impls.make_batch(33, 7)
    try:
        run = impl.build(logits, labels)
    except _impls.Skip as e:  # torch.compile with no working C++ compiler
        pytest.skip(str(e))
    for _ in range(2):  # the second call runs what the first compiled
        impl.check(run(), logits, _impls.reference_result(logits, labels))
    assert impl.label and impl.kind == "loss+grad" and impl.pin_threads is not None


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torch_compile_without_a_compiler_is_skipped_with_the_reason(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # no compiled kernel from an earlier run
    logits, labels = _impls.make_batch(5, 3)
    with pytest.raises(_impls.Skip, match="torch.compile failed .*needs a working C\\+\\+ compiler"):
        _impls.IMPLEMENTATIONS["torch-compile"].build(logits, labels)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torch_threads_are_pinned_and_restored():
    import torch

    before = torch.get_num_threads()
    text, undo = _impls.IMPLEMENTATIONS["torch-compile"].pin_threads(1)
    try:
        assert torch.get_num_threads() == 1 and text.startswith("1 ")
    finally:
        undo()
    assert torch.get_num_threads() == before


def _fake_peer(name, *, skip=None, calls=None):
    """A peer that is the NumPy reference under another name: pins (and records) threads,
    and raises Skip at build time when ``skip`` is given."""
    reference = _impls.IMPLEMENTATIONS["reference"]

    def build(logits, labels):
        if skip:
            raise _impls.Skip(skip)
        return reference.build(logits, labels)

    def pin_threads(threads):
        calls.append(("pin", threads))
        return f"{threads} (fake setting)", lambda: calls.append(("restore", threads))

    return _impls.Implementation(name, f"Fake {name}", "the reference", build, "loss+grad", (), pin_threads)


def test_peers_threads_and_skips_are_in_the_report(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(_impls.IMPLEMENTATIONS, "fake", _fake_peer("fake", calls=calls))
    reason = "fake-compile failed; its backend needs a working C++ compiler"
    monkeypatch.setitem(_impls.IMPLEMENTATIONS, "broken", _fake_peer("broken", skip=reason, calls=calls))
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["bench", "--shapes", "64x10,8x300", "--repeat", "1", "--threads", "1"]
    assert main([*argv, "--impls", "memcpy,fastsce,fake,broken", "--json", str(js), "--markdown", str(md)]) == 0
    captured = capsys.readouterr()
    report = json.loads(js.read_text())
    # every peer pinned to fastsce's thread count for the run, and restored after it
    assert report["environment"]["numba_threads"] == 1
    assert report["environment"]["peer_threads"] == {"Fake fake": "1 (fake setting)", "Fake broken": "1 (fake setting)"}
    assert calls == [("pin", 1), ("pin", 1), ("restore", 1), ("restore", 1)]
    assert "peers' threads: Fake fake 1 (fake setting)" in captured.out
    # a peer that cannot run here is a note, not a failure, and is not tried again
    assert report["skipped"] == {"broken": reason} and report["problems"] == []
    assert all("broken" not in e["results"] and e["results"]["fake"]["checked"] for e in report["shapes"])
    assert f"Fake broken skipped: {reason}" in captured.out and f"Fake broken skipped: {reason}" in md.read_text()
    assert captured.err.count("Fake broken: skipped") == 1


def test_status_line_says_what_compiles_and_how_long_it_took(monkeypatch, capsys):
    monkeypatch.setattr(_report, "NOTE_FIRST_CALL_S", 0.0)  # a note for every first call
    assert main(["bench", "--shapes", "64x10", "--repeat", "1", "--impls", "memcpy,fastsce,reference"]) == 0
    err = capsys.readouterr().err
    assert "fastsce loss+grad (out=): first call (Numba compiles, or loads its on-disk cache)..." in err
    assert "[1/1] 64x10 float32: fastsce loss+grad (out=): first call took " in err
    assert "NumPy reference: warming up..." in err and "NumPy reference: warming up took " in err


# --- --sweep-k, the plot, --help ---------------------------------------------------------------


@pytest.mark.full  # 17 shapes timed (the quick report's tests cover the timing itself)
def test_sweep_k_table_and_default_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the plot goes by default
    js, md = tmp_path / "s.json", tmp_path / "s.md"
    argv = ["bench", "--sweep-k", "--quick", "--repeat", "1", "--impls", "memcpy,fastsce,fastsce-loss"]
    assert main([*argv, "--json", str(js), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    report = json.loads(js.read_text())
    assert report["sweep_k"] is True
    shapes = [(e["n"], e["k"]) for e in report["shapes"]]
    assert [k for _, k in shapes] == list(_report.SWEEP_K)
    assert all(n == 2**14 // k for n, k in shapes)
    assert _report.sweep_shapes()[-1] == (2**20 // 1000, 1000)  # about 1M logits without --quick
    # one row per K, one column per implementation but memcpy: the ratios to memcpy
    header = "| N x K | fastsce loss+grad (out=) | fastsce loss only |"
    assert header in md.read_text()
    for entry in report["shapes"]:
        ratios = [entry["results"][name]["x_memcpy"] for name in ("fastsce", "fastsce-loss")]
        row = f"| **{entry['n']} x {entry['k']}** | {ratios[0]:.2f} | {ratios[1]:.2f} |"
        assert row in md.read_text()
        assert f"{entry['n']} x {entry['k']}" in out
    if HAS_MATPLOTLIB:
        png = tmp_path / _report.SWEEP_PLOT
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote plot: {png}" in out
    else:
        assert "no plot: matplotlib is not installed" in out


def test_sweep_k_takes_the_installed_peers_but_not_the_reference(monkeypatch):
    seen = {}

    def fake_measure(shapes, dtype, repeat, names, threads=None, progress=None):
        seen["names"] = names
        raise SystemExit(0)

    monkeypatch.setattr(_report, "measure", fake_measure)
    with pytest.raises(SystemExit):
        main(["bench", "--sweep-k"])
    installed = [name for name, impl in _impls.IMPLEMENTATIONS.items() if impl.available()]
    assert seen["names"] == [name for name in installed if name not in ("reference", "fastsce-fresh", "fastsce-evaluate")]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_plot_names_the_lines_keeps_the_legend_off_the_data_and_shows_the_warning(tmp_path):
    report = _report.from_pytest_benchmark(_bench_json(checked=True))
    report["shapes"][0]["other_cpu_percent"] = 60.0
    fig = _report.write_plot(report, tmp_path / "p.png")
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "memcpy (np.copyto)",
        "fastsce loss+grad (out=)",
        "NumPy reference",
    ]
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # beside the axes, not over the lines
    texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    assert any("unreliable" in t and "60%" in t for t in texts)


@pytest.mark.parametrize("argv", [["bench", "--help"], ["--help"]])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--sweep-k" in text if argv[0] == "bench" else "bench" in text
    if argv[0] == "bench":
        assert "torch-compile (torch.compile)" in text
    for markup in ("``", ":func:", ":meth:", ":class:"):
        assert markup not in text


def test_progress_note_stays_above_the_status_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = _report.Progress(stream)
    progress.update("compiling")
    progress.note("compiling took 3.0 s")
    progress.update("timing")
    assert stream.getvalue() == "\rcompiling" + "\r" + " " * 9 + "\r" + "compiling took 3.0 s\n" + "\rtiming"
