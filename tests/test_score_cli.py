"""``python -m fastsce score``: the metrics of .npy files read in chunks equal one
in-memory fastsce.evaluate; per-row arrays and the reliability diagram are written as
loss writes its outputs (all or none); bad files are loss's one-line errors, exit 2."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastsce
from fastsce.__main__ import main

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
from fastsce._tools import evaluate_cli

ROOT = Path(__file__).resolve().parent.parent
N, K = 1000, 37  # 16 chunks of 64 rows, the last one partial
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PER_ROW = ["argmax.npy", "confidence.npy", "entropy.npy", "target_logprob.npy", "target_rank.npy"]


def _run(argv, capsys):
    status = main(["score", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _files(tmp_path, shape=(N, K), axis=-1, dtype="float32", weight=False, sample_weight=False, where=False,
           ignore_index=None, ties=False, **_):  # fmt: skip
    """Logits of an overconfident model (the target's logit raised, then scaled up) and
    labels, saved; (arrays, paths)."""
    rng = np.random.default_rng(3)
    k = shape[axis]
    lead = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    target = rng.integers(0, k, lead)
    logits = rng.standard_normal(shape)
    at = np.expand_dims(target, axis)
    np.put_along_axis(logits, at, 2.0 + np.take_along_axis(logits, at, axis), axis)
    logits = 2.5 * logits
    if ties:
        logits = np.round(logits)  # many ties with the target's logit
    logits = logits.astype(dtype)
    if ignore_index is not None:
        target.reshape(-1)[::7] = ignore_index
    arrays = {"logits": logits, "target": target}
    if weight:
        arrays["weight"] = rng.uniform(0.5, 2.0, k)
    if sample_weight:
        arrays["sample_weight"] = rng.uniform(0.0, 2.0, lead) * (rng.random(lead) > 0.2)
    if where:
        arrays["where"] = rng.random(lead) > 0.3
    paths = {}
    for name, a in arrays.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], a)
    return arrays, paths


CASES = {
    "default": {},
    "topk 1,3,50 bins 7": dict(topk=(1, 3, 50), bins=7),  # a k above K: accuracy 1
    "weight,ignore_index": dict(weight=True, ignore_index=-1),
    "sample_weight,where": dict(sample_weight=True, where=True),
    "ties": dict(ties=True, topk=(1, 2)),
    "3-D axis=1": dict(shape=(25, K, 40), axis=1),
    "axis=0": dict(shape=(K, N), axis=0, weight=True),
    "large K (row kernel)": dict(shape=(300, 1000)),
    "float64": dict(dtype="float64", weight=True, sample_weight=True),
    "float16 (memory-mapped half logits)": dict(dtype="float16"),
}


@pytest.mark.parametrize("name", CASES)
def test_chunked_equals_in_memory(tmp_path, capsys, name):
    case = CASES[name]
    arrays, paths = _files(tmp_path, **case)
    logits, target = arrays["logits"], arrays["target"]
    kwargs = {key: arrays.get(key) for key in ("weight", "sample_weight", "where")}
    kwargs.update({key: case[key] for key in ("topk", "bins", "axis", "ignore_index") if key in case})
    expected = fastsce.evaluate(logits, target, per_row=True, **kwargs)

    chunk = "3" if logits.ndim == 3 else "64"
    argv = [paths["logits"], paths["target"], "--chunk-rows", chunk, "--json", "--per-row-out", str(tmp_path / "rows")]
    for key, value in kwargs.items():
        if value is not None:
            flag = "--" + key.replace("_", "-")
            argv += [flag, paths[key] if key in paths else ",".join(map(str, value)) if key == "topk" else str(value)]
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    got = json.loads(out)
    assert got["chunks"] > 1 and got["shape"] == list(logits.shape) and got["dtype"] == str(logits.dtype)

    want = expected.as_dict()
    tol = fastsce.reference.TOLERANCE[np.dtype(logits.dtype)]
    for key in ("loss", "perplexity", "accuracy", "mean_entropy", "mean_target_probability", "mean_confidence", "ece"):
        assert got[key] == pytest.approx(want[key], rel=tol["rtol"], abs=tol["atol"]), key
    assert {int(k): v for k, v in got["topk_accuracy"].items()} == pytest.approx(want["topk_accuracy"], rel=1e-12)
    assert (got["rows"], got["ignored_rows"]) == (want["rows"], want["ignored_rows"])
    assert got["rows"] + got["ignored_rows"] == target.size
    # the bins: counts (sums of row weights) to float64 rounding, exactly without row weights
    rel = 0 if kwargs.get("sample_weight") is None else 1e-12
    np.testing.assert_allclose(got["bins"]["counts"], want["bins"]["counts"], rtol=rel, atol=0)
    for key in ("confidence", "accuracy"):
        np.testing.assert_allclose(np.array(got["bins"][key], float), np.array(want["bins"][key], float), rtol=1e-12)

    assert sorted(os.listdir(tmp_path / "rows")) == PER_ROW
    for name in evaluate_cli.PER_ROW:
        row = np.load(tmp_path / "rows" / f"{name}.npy")
        ref = getattr(expected, name)
        assert row.dtype == ref.dtype and row.shape == ref.shape == target.shape, name
        if row.dtype.kind == "i":
            np.testing.assert_array_equal(row, ref, err_msg=name)
        else:  # a row's values do not depend on the chunks (to an ulp or so)
            np.testing.assert_allclose(row, ref, rtol=4 * np.finfo(row.dtype).eps, atol=0, equal_nan=True, err_msg=name)


def test_text_table_names_every_metric(tmp_path, capsys):
    arrays, paths = _files(tmp_path, ignore_index=-100)
    e = fastsce.evaluate(arrays["logits"], arrays["target"], topk=(1, 5))
    status, out, err = _run([paths["logits"], paths["target"], "--chunk-rows", "100"], capsys)
    assert status == 0, err
    for label in ("loss", "perplexity", "accuracy", "top-5 accuracy", "mean entropy", "mean target probability",
                  "mean confidence", "ECE (15 bins)"):  # fmt: skip
        assert label in out
    assert f"{e.ece:.6g}" in out and f"{e.accuracy:.6g}" in out
    assert f"{e.rows:,} counted, {e.ignored_rows:,} ignored" in out and "10 chunk(s) of 100" in out
    assert out.count("\n  (") == 15  # one line per bin
    assert "score: chunk 10/10" not in out


def test_no_rows(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((0, K), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(0, np.int64))
    status, out, err = _run([str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--json", "--per-row-out",
                             str(tmp_path / "rows")], capsys)  # fmt: skip
    assert status == 0, err
    got = json.loads(out)
    assert np.isnan(got["loss"]) and np.isnan(got["ece"]) and got["rows"] == 0 and got["chunks"] == 0
    assert np.load(tmp_path / "rows" / "entropy.npy").shape == (0,)


def test_subprocess_progress_on_stderr_json_on_stdout(tmp_path):
    arrays, paths = _files(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "fastsce", "score", paths["logits"], paths["target"], "--chunk-rows", "100",
         "--topk", "1,2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    e = fastsce.evaluate(arrays["logits"], arrays["target"], topk=(1, 2))
    assert got["loss"] == pytest.approx(e.loss, rel=1e-6) and set(got["topk_accuracy"]) == {"1", "2"}
    assert "score: chunk 10/10" in done.stderr


# --- bad input: loss's contract -------------------------------------------------------------


def _bad(capsys, argv, *needles):
    status, out, err = _run(argv, capsys)
    assert status == 2
    assert out == ""
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("error:"), line
    for needle in needles:
        assert needle in line
    return line


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    arrays, paths = _files(tmp_path)
    lg, tg = paths["logits"], paths["target"]
    rows = str(tmp_path / "rows")
    _bad(capsys, [str(tmp_path / "missing.npy"), tg], "no such file", "missing.npy")
    (tmp_path / "text.npy").write_text("hello, not numpy\n")
    _bad(capsys, [str(tmp_path / "text.npy"), tg], "not a .npy file", "magic")
    np.savez(tmp_path / "a.npz", logits=arrays["logits"])
    _bad(capsys, [str(tmp_path / "a.npz"), tg], "not a .npy file")
    np.save(tmp_path / "int.npy", np.zeros((N, K), np.int32))
    _bad(capsys, [str(tmp_path / "int.npy"), tg, "--per-row-out", rows], "float32 or float64")
    np.save(tmp_path / "t2.npy", arrays["target"][:-5])
    _bad(capsys, [lg, str(tmp_path / "t2.npy")], "target has shape (995,)", f"({N}, {K})")
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "int.npy").read_bytes()[:500])
    _bad(capsys, [str(tmp_path / "truncated.npy"), tg], "truncated")
    # probabilities: evaluate takes class indices
    np.save(tmp_path / "soft.npy", np.full((N, K), 1.0 / K))
    _bad(capsys, [lg, str(tmp_path / "soft.npy")], "class indices", "argmax")
    # a bad label fails before anything is written (the directory is not even made)
    bad = arrays["target"].copy()
    bad[N - 3] = K
    np.save(tmp_path / "bad.npy", bad)
    _bad(capsys, [lg, str(tmp_path / "bad.npy"), "--per-row-out", rows], f"target[{N - 3}] = {K}", "[0, 36]")
    # options
    _bad(capsys, [lg, tg, "--topk", "0,5"], "topk", "positive")
    _bad(capsys, [lg, tg, "--bins", "0"], "bins")
    np.save(tmp_path / "w.npy", np.ones(K + 1))
    _bad(capsys, [lg, tg, "--weight", str(tmp_path / "w.npy")], "weight")
    # outputs
    _bad(capsys, [lg, tg, "--per-row-out", str(tmp_path / "no" / "such")], "--per-row-out", "does not exist")
    (tmp_path / "file").write_text("")
    _bad(capsys, [lg, tg, "--per-row-out", str(tmp_path / "file")], "--per-row-out", "not a directory")
    if HAVE_MATPLOTLIB:  # (without it --plot is refused first: test_plot_without_matplotlib_...)
        _bad(capsys, [lg, tg, "--plot", str(tmp_path / "no" / "r.png")], "--plot", "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["logits.npy", "target.npy", "text.npy", "a.npz", "int.npy", "t2.npy", "truncated.npy", "soft.npy", "bad.npy",
         "w.npy", "file"])  # fmt: skip


def test_outputs_never_replace_inputs(tmp_path, capsys):
    _, paths = _files(tmp_path, shape=(10, K))
    os.mkdir(tmp_path / "rows")
    os.symlink(paths["logits"], tmp_path / "rows" / "entropy.npy")
    os.symlink(paths["target"], tmp_path / "r.png")
    outputs = [["--per-row-out", str(tmp_path / "rows")]] + [["--plot", str(tmp_path / "r.png")]] * HAVE_MATPLOTLIB
    for argv in outputs:
        with pytest.raises(SystemExit) as exc:
            main(["score", paths["logits"], paths["target"], *argv])
        assert exc.value.code == 2 and "would replace the input" in capsys.readouterr().err


@pytest.mark.parametrize("error", ["RuntimeError", "KeyboardInterrupt"])
def test_a_failure_leaves_no_output(tmp_path, capsys, monkeypatch, error):
    """An error or Ctrl-C half-way: no per-row file, no plot, and the directory made for them removed."""
    from fastsce import metrics

    _, paths = _files(tmp_path)
    real, calls = metrics.metric_sums, []

    def fail_on_the_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the warm-up, then chunks
            raise RuntimeError("disk on fire") if error == "RuntimeError" else KeyboardInterrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "metric_sums", fail_on_the_third_chunk)
    argv = [paths["logits"], paths["target"], "--chunk-rows", "64", "--per-row-out", str(tmp_path / "rows")]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(tmp_path / "r.png")]
    status, out, err = _run(argv, capsys)
    assert (status, out) == ((1, "") if error == "RuntimeError" else (130, ""))
    last = {"RuntimeError": "error: RuntimeError: disk on fire; no output written",
            "KeyboardInterrupt": "interrupted: no output written"}[error]  # fmt: skip
    assert err.strip().splitlines()[-1] == last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.npy", "target.npy"]


# --- the reliability diagram -----------------------------------------------------------------


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed: --plot is a clear error without it")
def test_plot_writes_a_png(tmp_path, capsys):
    arrays, paths = _files(tmp_path)
    status, out, err = _run([paths["logits"], paths["target"], "--chunk-rows", "64", "--bins", "10", "--plot",
                             str(tmp_path / "r.png")], capsys)  # fmt: skip
    assert status == 0, err
    assert f"reliability diagram written to {tmp_path / 'r.png'}" in out
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    e = fastsce.evaluate(arrays["logits"], arrays["target"], bins=10)
    fig = evaluate_cli.plot_reliability(e)
    top, bottom = fig.axes
    assert f"ECE = {e.ece:.4f} (10 bins)" in top.get_title()
    filled = int(np.count_nonzero(e.bin_counts))
    assert len(top.patches) == 2 * filled and len(bottom.patches) == 10  # accuracy and gap bars; every bin's count
    heights = sorted(p.get_height() for p in bottom.patches)
    assert heights == sorted(e.bin_counts)
    assert [t.get_text() for t in bottom.texts] == [f"{c:,.0f}" for c in e.bin_counts[e.bin_counts > 0]]


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    _, paths = _files(tmp_path, shape=(10, K))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["score", paths["logits"], paths["target"], "--plot", str(tmp_path / "r.png")])
    assert exc.value.code == 2
    assert "--plot needs matplotlib, which is not installed (pip install matplotlib)" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_of_an_unknown_file_type(tmp_path, capsys):
    _, paths = _files(tmp_path, shape=(10, K))
    with pytest.raises(SystemExit) as exc:
        main(["score", paths["logits"], paths["target"], "--plot", str(tmp_path / "r.xyz")])
    assert exc.value.code == 2 and ".png" in capsys.readouterr().err


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["score", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--topk", "--bins", "--per-row-out DIR", "--plot FILE.png", "--chunk-rows", "--json", "Exit status"):
        assert option in text
    assert "``" not in text and ":func:" not in text


def test_memory_is_bounded_by_the_chunk(tmp_path, capsys):
    """40 MB of logits in chunks of 1 MB: the memory allocated (NumPy's, traced) stays a
    few chunks, whatever the file's size — the logits are read through the memory map."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n, k = 20000, 500
    np.save(tmp_path / "x.npy", rng.standard_normal((n, k), dtype=np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, k, n))
    argv = [str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--chunk-rows", "500", "--json"]
    status, _, err = _run(argv, capsys)  # compiled, and the modules imported, before measuring
    assert status == 0, err
    tracemalloc.start()
    try:
        status, out, err = _run([*argv, "--per-row-out", str(tmp_path / "rows")], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 0, err
    assert json.loads(out)["chunks"] == 40
    # the labels (int64, 160 kB) and their checks are O(N); a chunk of logits is 1 MB
    assert peak < 4e6, f"{peak / 1e6:.1f} MB allocated for 40 MB of logits"
