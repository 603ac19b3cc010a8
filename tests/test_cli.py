"""``python -m fastsce loss``: chunked results on real .npy files equal the in-memory
call; bad files are one-line errors with exit status 2; an interrupted run leaves no
output and no temporary file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastsce
from fastsce.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
N, K = 1000, 37  # several chunks of 64 rows, the last one partial (1000 = 15 * 64 + 40)


def _tol(dtype):
    return fastsce.reference.TOLERANCE[np.dtype(dtype)]


@pytest.fixture
def files(tmp_path):
    def make(dtype="float32", soft=False, n=N, k=K, ignore=None):
        rng = np.random.default_rng(0)
        logits = (3 * rng.standard_normal((n, k))).astype(dtype)
        if soft:
            target = rng.random((n, k))
            target /= target.sum(1, keepdims=True)
        else:
            target = rng.integers(0, k, n)
            if ignore is not None:
                target[::7] = ignore
        weight = rng.uniform(0.5, 2.0, k)
        paths = {}
        for name, arr in [("logits", logits), ("target", target), ("weight", weight)]:
            paths[name] = str(tmp_path / f"{name}.npy")
            np.save(paths[name], arr)
        return logits, target, weight, paths

    return make


def _run(argv, capsys):
    status = main(["loss", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=True),
    dict(weight=True, reduction="sum"),
    dict(ignore_index=3, ignore=3),
    dict(ignore_index=-1, ignore=-1, weight=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, weight=True, ignore_index=-1, ignore=-1, reduction="none"),
    dict(soft=True),
    dict(soft=True, weight=True, label_smoothing=0.1, reduction="sum"),
    dict(dtype="float64", weight=True),
    dict(dtype="float64", soft=True, reduction="none"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_chunked_equals_in_memory(files, tmp_path, capsys, case):
    case = dict(case)
    dtype = case.pop("dtype", "float32")
    soft = case.pop("soft", False)
    logits, target, weight, paths = files(dtype, soft, ignore=case.pop("ignore", None))
    use_weight = case.pop("weight", False)
    reduction = case.get("reduction", "mean")
    kwargs = dict(case, weight=weight if use_weight else None)
    loss, grad = fastsce.cross_entropy_with_grad(logits, target, **kwargs)
    rows = fastsce.cross_entropy(logits, target, **dict(kwargs, reduction="none"))

    argv = [paths["logits"], paths["target"], "--chunk-rows", "64", "--json"]
    argv += ["--grad-out", str(tmp_path / "g.npy"), "--per-row-out", str(tmp_path / "l.npy")]
    if use_weight:
        argv += ["--weight", paths["weight"]]
    for option in ("reduction", "ignore_index", "label_smoothing"):
        if option in case:
            argv += ["--" + option.replace("_", "-"), str(case[option])]
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    summary = json.loads(out)
    tol = _tol(dtype)
    expected = float(np.sum(loss, dtype=np.float64)) if reduction == "none" else float(loss)
    key = "loss_sum" if reduction == "none" else "loss"  # "none" reports the sum of the rows, by that name
    assert set(summary) & {"loss", "loss_sum"} == {key}
    assert summary[key] == pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"])
    assert summary["rows"] == N and summary["classes"] == K and summary["dtype"] == dtype
    assert summary["chunks"] == 16 and summary["rows_per_s"] > 0 and summary["logits_gb_per_s"] > 0
    ignored = 0 if soft else int(np.count_nonzero(target == case.get("ignore_index", -100)))
    assert summary["ignored_rows"] == ignored

    g = np.load(tmp_path / "g.npy")
    assert g.dtype == logits.dtype and g.shape == logits.shape
    np.testing.assert_allclose(g, grad, rtol=tol["rtol"], atol=tol["atol"] / 100)
    per_row = np.load(tmp_path / "l.npy")
    assert per_row.dtype == logits.dtype
    # Row losses do not depend on chunking, up to the last bit: with a cold compile cache
    # float64 probability targets differed in 1 ulp on 36 of 1000 rows (cause not found).
    np.testing.assert_allclose(per_row, rows, rtol=4 * np.finfo(logits.dtype).eps, atol=0)
    if not soft and ignored:
        assert not g[target == case["ignore_index"]].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy", "l.npy", "logits.npy", "target.npy", "weight.npy"]


def test_loss_only_default_chunks_and_text_summary(files, capsys):
    logits, target, _, paths = files()
    status, out, err = _run([paths["logits"], paths["target"]], capsys)
    assert status == 0, err
    assert f"mean loss: {float(fastsce.cross_entropy(logits, target)):.9g}" in out
    assert "1,000 rows (0 ignored) x 37 classes (1,000 x 37, axis 1), float32" in out and "1 chunk(s)" in out
    # a single chunk: no progress line (only the compile notice, on a cold cache)
    assert all(line.startswith("loss: compil") for line in err.splitlines())


def test_every_row_ignored_mean_is_nan_with_zero_gradient(files, tmp_path, capsys):
    logits, target, _, paths = files(n=100)
    np.save(paths["target"], np.full(100, -100))
    status, out, err = _run([paths["logits"], paths["target"], "--chunk-rows", "8", "--grad-out",
                             str(tmp_path / "g.npy"), "--json"], capsys)  # fmt: skip
    assert status == 0, err
    assert np.isnan(json.loads(out)["loss"])
    assert not np.load(tmp_path / "g.npy").any()


def test_subprocess_with_progress_and_json(files, tmp_path):
    logits, target, _, paths = files()
    grad_path = tmp_path / "grad.npy"
    done = subprocess.run(
        [sys.executable, "-m", "fastsce", "loss", paths["logits"], paths["target"], "--chunk-rows", "100",
         "--grad-out", str(grad_path), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loss, grad = fastsce.cross_entropy_with_grad(logits, target)
    assert json.loads(done.stdout)["loss"] == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(np.load(grad_path), grad, **_tol("float32"))
    assert "chunk 10/10" in done.stderr  # progress on stderr, stdout is only the JSON


def _bad(capsys, argv, *needles):
    status, out, err = _run(argv, capsys)
    assert status == 2
    assert out == ""
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("error:")
    for needle in needles:
        assert needle in line
    return line


def test_bad_files(files, tmp_path, capsys):
    logits, target, _, paths = files()
    grad = str(tmp_path / "g.npy")
    lg, tg = paths["logits"], paths["target"]

    _bad(capsys, [str(tmp_path / "missing.npy"), tg], "no such file", "missing.npy")
    text = tmp_path / "text.npy"
    text.write_text("hello, not numpy\n")
    assert "pickle" not in _bad(capsys, [str(text), tg], "not a .npy file", "text.npy", "magic")
    npz = tmp_path / "arrays.npz"
    np.savez(npz, logits=logits)
    _bad(capsys, [str(npz), tg], "not a .npy file")

    for name, arr, needle in [
        ("int.npy", np.zeros((N, K), np.int32), "float32 or float64"),
        ("bool.npy", np.zeros((N, K), bool), "float32 or float64"),
        ("flat.npy", np.zeros(N * K, np.float32), "target has shape"),
        ("short.npy", np.zeros((N - 1, K), np.float32), "shape"),
    ]:
        np.save(tmp_path / name, arr)
        _bad(capsys, [str(tmp_path / name), tg, "--grad-out", grad], needle)
    np.save(tmp_path / "t2.npy", target[:-5])
    _bad(capsys, [lg, str(tmp_path / "t2.npy")], "target has shape (995,)", f"({N}, {K})")
    np.save(tmp_path / "w.npy", np.ones(K + 1))
    _bad(capsys, [lg, tg, "--weight", str(tmp_path / "w.npy")], "weight")

    bad = target.copy()
    bad[777] = K + 5
    np.save(tmp_path / "bad.npy", bad)
    _bad(capsys, [lg, str(tmp_path / "bad.npy"), "--grad-out", grad, "--chunk-rows", "64"], f"target[777] = {K + 5}")
    _bad(capsys, [lg, tg, "--label-smoothing", "1.5"], "label_smoothing")
    assert sorted(p.name for p in tmp_path.iterdir() if "g.npy" in p.name) == []  # nothing written


def test_usage_errors(files, capsys):
    _, _, _, paths = files()
    for argv in (
        ["loss", paths["logits"], paths["target"], "--chunk-rows", "0"],
        ["loss", paths["logits"], paths["target"], "--grad-out", paths["logits"]],
        ["loss", paths["logits"]],
        ["--rows", "10", "loss", paths["logits"], paths["target"]],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("exception", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_no_output(files, tmp_path, capsys, monkeypatch, exception):
    logits, target, _, paths = files()
    grad_path, rows_path = tmp_path / "g.npy", tmp_path / "l.npy"
    grad_path.write_bytes(b"previous gradient")  # an earlier output of the same name
    real = fastsce.cross_entropy_with_grad
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise exception("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(fastsce, "cross_entropy_with_grad", flaky)
    argv = [paths["logits"], paths["target"], "--chunk-rows", "64", "--grad-out", str(grad_path)]
    status, out, err = _run([*argv, "--per-row-out", str(rows_path)], capsys)
    assert status == (130 if exception is KeyboardInterrupt else 1)
    assert len(calls) == 3 and out == ""
    assert "no output written" in err.splitlines()[-1]
    assert grad_path.read_bytes() == b"previous gradient"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy", "logits.npy", "target.npy", "weight.npy"]


def test_output_file_mode_follows_umask(files, tmp_path, capsys):
    import os

    _, _, _, paths = files(n=10)
    status, _, err = _run([paths["logits"], paths["target"], "--per-row-out", str(tmp_path / "l.npy")], capsys)
    assert status == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "l.npy").stat().st_mode & 0o777 == 0o666 & ~umask


# --- every option of cross_entropy, N-D logits, half precision ------------------------------

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

OPTION_CASES = {
    # class weights with the z-loss: D != D_z, the z-loss folded in and the rows put back
    "z_loss,weight": dict(z_loss=1e-3, weight=True),
    "z_loss,sample_weight": dict(z_loss=1e-2, sample_weight=True),
    "softcap,logit_scale,where": dict(softcap=5.0, logit_scale=0.7, where=True),
    "none,sample_weight,where,z_loss": dict(reduction="none", sample_weight=True, where=True, z_loss=1e-2),
    "sum,smoothing,softcap": dict(reduction="sum", label_smoothing=0.1, softcap=8.0),
    "soft,sample_weight,z_loss": dict(soft=True, sample_weight=True, z_loss=1e-3),
    "all_ignored=zero": dict(all_ignored="zero", ignore_all=True),
    # D = 0 but D_z > 0: the "mean" of the z-loss alone ("zero") or NaN on every counted row ("nan")
    "zero class weights,z_loss,zero": dict(zero_weight=True, z_loss=1e-2, all_ignored="zero"),
    "zero class weights,z_loss,nan": dict(zero_weight=True, z_loss=1e-2),
    "int32 labels": dict(labels="int32"),
    "float16": dict(dtype="float16"),
    "float16,none,z_loss": dict(dtype="float16", reduction="none", z_loss=1e-3),
    "float16,soft": dict(dtype="float16", soft=True),
    "bfloat16": dict(dtype="bfloat16", weight=True),
    "3-D axis=1 (read in place)": dict(shape=(25, K, 40), axis=1),
    "3-D axis=1 (copied), z_loss, none": dict(shape=(250, K, 4), axis=1, z_loss=1e-3, reduction="none"),
    "3-D axis=-1, soft": dict(shape=(20, 50, K), soft=True),
    "axis=0": dict(shape=(K, N), axis=0, weight=True),
    "1-D": dict(shape=(K,)),
    "Fortran-ordered file": dict(fortran=True, weight=True),
    # files written on a big-endian machine: every array in the other byte order
    "big-endian": dict(big_endian=True, weight=True, sample_weight=True),
    "big-endian float16, soft": dict(big_endian=True, dtype="float16", soft=True),
}


def _option_files(tmp_path, case):
    dtype = case.get("dtype", "float32")
    shape = case.get("shape", (N, K))
    axis = case.get("axis", -1)
    k = shape[axis]
    lead = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal(shape)).astype(np.float32)
    if dtype == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("ml_dtypes is not installed")
        logits = logits.astype(ml_dtypes.bfloat16)
    else:
        logits = logits.astype(dtype)
    if case.get("soft"):
        target = rng.random(shape)
        target /= target.sum(axis, keepdims=True)
    else:
        target = rng.integers(0, k, lead).astype(case.get("labels", "int64"))
        if lead:
            target.reshape(-1)[::7] = -100
        if case.get("ignore_all"):
            target[...] = -100
    arrays = {"logits": logits, "target": target}
    if case.get("weight"):
        arrays["weight"] = rng.uniform(0.5, 2.0, k)
    if case.get("zero_weight"):
        arrays["weight"] = np.zeros(k)
    if case.get("sample_weight"):
        arrays["sample_weight"] = rng.uniform(0.0, 2.0, lead) * (rng.random(lead) > 0.2)
    if case.get("where"):
        arrays["where"] = rng.random(lead) > 0.3
    paths = {}
    if case.get("fortran"):
        arrays["logits"] = logits = np.asfortranarray(logits)
    for name, arr in arrays.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        if case.get("big_endian"):
            arr = arr.astype(arr.dtype.newbyteorder(">"))
        np.save(paths[name], arr)  # bfloat16: as ml_dtypes saves it, 2-byte void data
    return arrays, paths


@pytest.mark.parametrize("name", OPTION_CASES)
def test_options_and_layouts_equal_in_memory(tmp_path, capsys, name):
    case = OPTION_CASES[name]
    arrays, paths = _option_files(tmp_path, case)
    logits, target = arrays["logits"], arrays["target"]
    kwargs = {key: arrays.get(key) for key in ("weight", "sample_weight", "where")}
    for key in ("reduction", "label_smoothing", "z_loss", "logit_scale", "softcap", "all_ignored", "axis"):
        if key in case:
            kwargs[key] = case[key]
    loss, grad = fastsce.cross_entropy_with_grad(logits, target, **kwargs)
    rows = fastsce.cross_entropy(logits, target, **dict(kwargs, reduction="none"))

    argv = [paths["logits"], paths["target"], "--chunk-rows", "3" if logits.ndim == 3 else "64", "--json"]
    argv += ["--grad-out", str(tmp_path / "g.npy"), "--per-row-out", str(tmp_path / "l.npy")]
    for key, value in kwargs.items():
        if value is not None:
            flag = "--" + key.replace("_", "-")
            argv += [flag, paths[key] if key in paths else str(value)]
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    summary = json.loads(out)
    tol = _tol(logits.dtype)
    reduction = kwargs.get("reduction", "mean")
    expected = float(np.sum(loss, dtype=np.float64)) if reduction == "none" else float(loss)
    reported = summary["loss_sum" if reduction == "none" else "loss"]
    assert reported == pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"], nan_ok=True)
    assert summary["shape"] == list(logits.shape) and summary["dtype"] == str(logits.dtype)
    if logits.ndim > 1:
        assert summary["chunks"] > 1

    g = np.load(tmp_path / "g.npy")
    per_row = np.load(tmp_path / "l.npy")
    if logits.dtype.itemsize == 2 and logits.dtype != np.float16:  # bfloat16 comes back as np.save stores it
        g, per_row = g.view(logits.dtype), per_row.view(logits.dtype)
    assert g.dtype == logits.dtype and g.shape == logits.shape
    assert per_row.dtype == logits.dtype and per_row.shape == np.shape(rows)
    as64 = {"equal_nan": True, "rtol": tol["rtol"], "atol": tol["atol"]}
    np.testing.assert_allclose(g.astype(np.float64), grad.astype(np.float64), **as64)
    np.testing.assert_allclose(per_row.astype(np.float64), np.asarray(rows, np.float64), **as64)
    if "nan" in name:
        assert np.isnan(reported) and np.isnan(g).any() and not np.isnan(g).all()


def test_reduction_none_reports_loss_sum_by_name(files, capsys):
    _, _, _, paths = files(n=50)
    status, out, err = _run([paths["logits"], paths["target"], "--reduction", "none", "--json"], capsys)
    assert status == 0, err
    summary = json.loads(out)
    assert "loss" not in summary and summary["reduction"] == "none" and summary["loss_sum"] > 0
    status, out, err = _run([paths["logits"], paths["target"], "--reduction", "none"], capsys)
    assert "sum of per-row losses:" in out


def _kernel_signatures() -> set:
    """Every (kernel, signature) compiled or loaded from the disk cache in this process."""
    import numba

    from fastsce._kernels import rows, shards, softmax, tiles

    return {
        (module.__name__, name, str(sig))
        for module in (rows, tiles, softmax, shards)
        for name, f in vars(module).items()
        if isinstance(f, numba.core.registry.CPUDispatcher)
        for sig in f.signatures
    }


def test_int32_labels_need_no_kernels_of_their_own(files, tmp_path, capsys):
    logits, target, _, paths = files()
    status, _, err = _run([paths["logits"], paths["target"], "--grad-out", str(tmp_path / "g.npy")], capsys)
    assert status == 0, err
    before = _kernel_signatures()
    np.save(tmp_path / "t32.npy", target.astype(np.int32))
    status, _, err = _run([paths["logits"], str(tmp_path / "t32.npy"), "--grad-out", str(tmp_path / "g.npy")], capsys)
    assert status == 0, err
    assert _kernel_signatures() == before and "compil" not in err  # nothing compiled, nothing loaded


def test_compile_time_kept_out_of_the_throughput(files, capsys, monkeypatch):
    """The first call (the warm-up of one row, where a compile happens) is timed apart."""
    import time

    _, _, _, paths = files()
    real = fastsce.cross_entropy
    calls = []

    def first_call_slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastsce, "cross_entropy", first_call_slow)
    status, out, err = _run([paths["logits"], paths["target"], "--chunk-rows", "500", "--json"], capsys)
    assert status == 0, err
    summary = json.loads(out)
    assert len(calls) == 3 and summary["seconds"] < 1.0 and "compile_seconds" in summary


def test_compile_notice_on_stderr(capsys):
    import numba

    from fastsce._tools.score import _CompileNotice

    @numba.njit
    def f(x):
        return x + 1

    with _CompileNotice() as notice:
        f(1)
        notice.report()
    err = capsys.readouterr().err
    assert "loss: compiling" in err and "loss: compiled in" in err and notice.seconds > 0
    with _CompileNotice() as notice:
        f(2)  # compiled already: nothing said
        notice.report()
    assert capsys.readouterr().err == "" and notice.seconds == 0


# --- --help, --version ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["loss", "--help"], ["bench", "--help"]])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "python -m fastsce" in out and "``" not in out and ":func:" not in out


def test_version():
    done = subprocess.run([sys.executable, "-m", "fastsce", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"fastsce {fastsce.__version__}"


# --- hostile files -------------------------------------------------------------------------


def _npy_bytes(header: bytes, version=1, data=b"") -> bytes:
    import struct

    size = struct.pack("<H" if version == 1 else "<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hostile_npy_files(files, tmp_path, capsys):
    import pickle

    _, _, _, paths = files()
    tg = paths["target"]
    cases = {
        "negative.npy": (_npy_bytes(b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 37), }\n"),
                         ["negative dimension", "(-1, 37)"]),
        "huge_header.npy": (_npy_bytes(b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
                                       + b" " * 200_000 + b"\n", version=2), ["header", "200,06"]),
        "huge_shape.npy": (_npy_bytes(b"{'descr': '<f4', 'fortran_order': False, 'shape': (10000000000000000000000000000000, 37), }\n"),
                           ["truncated"]),
        "truncated.npy": (_npy_bytes(b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000, 37), }\n",
                                     data=b"\0" * 100), ["truncated", "(1000, 37)"]),
        "code.npy": (_npy_bytes(b"__import__('os').system('touch pwned')\n"), ["not a Python literal"]),
        "empty.npy": (b"", ["magic"]),
    }  # fmt: skip
    marker = tmp_path / "unpickled"
    _Marker.path = str(marker)
    cases["pickle.npy"] = (pickle.dumps(_Marker()), ["magic"])
    obj = np.empty(N, object)
    obj[0] = _Marker()
    np.save(tmp_path / "objects.npy", obj, allow_pickle=True)
    cases["objects.npy"] = (None, ["Python objects", "never unpickled"])
    for name, (content, needles) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        for argv in ([str(tmp_path / name), tg], [paths["logits"], str(tmp_path / name)]):
            line = _bad(capsys, argv, name, *needles)
            assert "allow_pickle" not in line
    assert not marker.exists() and not (ROOT / "pwned").exists()


def test_output_into_a_missing_directory(files, tmp_path, capsys):
    _, _, _, paths = files(n=10)
    missing = tmp_path / "no" / "such"
    for option in ("--grad-out", "--per-row-out"):
        line = _bad(capsys, [paths["logits"], paths["target"], option, str(missing / "g.npy")], option,
                    f"the directory {missing} does not exist")  # fmt: skip
        assert ".tmp" not in line
    (tmp_path / "file").write_text("")
    _bad(capsys, [paths["logits"], paths["target"], "--grad-out", str(tmp_path / "file" / "g.npy")], "not a directory")
    _bad(capsys, [paths["logits"], paths["target"], "--grad-out", str(tmp_path)], "is a directory")
    # renamed onto, /dev/null would become a regular file
    _bad(capsys, [paths["logits"], paths["target"], "--grad-out", "/dev/null"], "not a regular file")
    assert Path("/dev/null").is_char_device()


def test_no_rows(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((0, K), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(0, np.int64))
    argv = [str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--json"]
    status, out, err = _run([*argv, "--grad-out", str(tmp_path / "g.npy"), "--per-row-out", str(tmp_path / "l.npy")],
                            capsys)  # fmt: skip
    assert status == 0, err
    assert np.isnan(json.loads(out)["loss"]) and json.loads(out)["chunks"] == 0  # the mean of nothing, as the API
    assert np.load(tmp_path / "g.npy").shape == (0, K) and np.load(tmp_path / "l.npy").shape == (0,)
    status, out, err = _run([*argv, "--all-ignored", "zero"], capsys)
    assert status == 0 and json.loads(out)["loss"] == 0.0


def test_outputs_compared_by_file_not_name(files, tmp_path, capsys):
    import os

    _, _, _, paths = files(n=10)
    logits = Path(paths["logits"])
    before = logits.read_bytes()
    (tmp_path / "link_to_logits.npy").symlink_to(logits)
    os.link(logits, tmp_path / "hard_logits.npy")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(tmp_path)
    for given, out in [
        (str(tmp_path / "link_to_logits.npy"), str(logits)),  # an input reached through a symlink
        (str(logits), str(tmp_path / "link_to_logits.npy")),  # an output that is a symlink to an input
        (str(tmp_path / "hard_logits.npy"), str(logits)),  # a hard link
        (str(logits), str(tmp_path / "sub" / "up" / "logits.npy")),  # a symlinked directory
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["loss", given, paths["target"], "--grad-out", out])
        assert exc.value.code == 2
        assert "would replace the input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["loss", str(logits), paths["target"], "--grad-out", str(tmp_path / "g.npy"),
              "--per-row-out", str(tmp_path / "sub" / "up" / "g.npy")])  # fmt: skip
    assert "the same file" in capsys.readouterr().err
    assert logits.read_bytes() == before

    # an output symlink elsewhere is written through: the link stays, its target is the result
    (tmp_path / "g_link.npy").symlink_to(tmp_path / "sub" / "g.npy")
    status, _, err = _run([str(logits), paths["target"], "--grad-out", str(tmp_path / "g_link.npy")], capsys)
    assert status == 0, err
    assert (tmp_path / "g_link.npy").is_symlink() and np.load(tmp_path / "sub" / "g.npy").shape == (10, K)


# --- full disks, signals, temporary files ---------------------------------------------------


def _only_inputs(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in ("logits.npy", "target.npy", "weight.npy"))


def test_disk_full_monkeypatched(files, tmp_path, capsys, monkeypatch):
    import errno
    import os

    _, _, _, paths = files()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    status, out, err = _run([paths["logits"], paths["target"], "--grad-out", str(tmp_path / "g.npy")], capsys)
    assert status == 1 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: --grad-out") and "No space left on device" in line and "no output written" in line
    assert _only_inputs(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_on_a_small_tmpfs(files, small_tmpfs, tmp_path, capsys):
    logits, target, _, paths = files(n=8000)  # 8000 x 37 float32: 1.2 MB of gradient, 1 MiB of room
    status, out, err = _run([paths["logits"], paths["target"], "--grad-out", str(small_tmpfs / "g.npy")], capsys)
    assert status == 1 and out == ""
    assert "No space left on device" in err and "needs 1.18 MB" in err and "no output written" in err
    assert list(small_tmpfs.iterdir()) == []
    # room for the per-row losses (32 kB) alone: written
    status, _, err = _run([paths["logits"], paths["target"], "--per-row-out", str(small_tmpfs / "l.npy")], capsys)
    assert status == 0, err
    np.testing.assert_allclose(np.load(small_tmpfs / "l.npy"), fastsce.cross_entropy(logits, target, reduction="none"))


def test_named_temporary_file_where_there_is_no_o_tmpfile(files, tmp_path, capsys, monkeypatch):
    import errno
    import os

    logits, target, _, paths = files()
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    seen = []
    real = fastsce.cross_entropy_with_grad

    def look(*args, **kwargs):
        seen.append(_only_inputs(tmp_path))
        if len(seen) == 3:
            raise RuntimeError("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(fastsce, "cross_entropy_with_grad", look)
    argv = [paths["logits"], paths["target"], "--chunk-rows", "64", "--grad-out", str(tmp_path / "g.npy")]
    status, _, err = _run(argv, capsys)
    assert status == 1 and "no output written" in err
    assert len(seen[-1]) == 1 and seen[-1][0].startswith(".g.npy.") and seen[-1][0].endswith(".tmp")
    assert _only_inputs(tmp_path) == []
    monkeypatch.setattr(fastsce, "cross_entropy_with_grad", real)
    status, _, err = _run(argv, capsys)
    assert status == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), real(logits, target)[1], **_tol("float32"))
    assert _only_inputs(tmp_path) == ["g.npy"]


def _has_o_tmpfile(directory) -> bool:
    import os

    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600))
        return True
    except (AttributeError, OSError):
        return False


SLOW_RUN = """
import signal, sys, time
# as from a terminal: a test run started in the background (nohup, or `&` without job
# control) hands its children SIGHUP / SIGINT ignored, and the CLI keeps ignored signals so
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
import fastsce
real = fastsce.cross_entropy_with_grad
def slow(*args, **kwargs):
    time.sleep(0.3)
    return real(*args, **kwargs)
fastsce.cross_entropy_with_grad = slow
from fastsce.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL", "SIGINT", "SIGHUP"])
def test_signals_leave_nothing_behind(files, tmp_path, signum):
    import os
    import signal

    _, _, _, paths = files()
    unnamed = _has_o_tmpfile(tmp_path)
    if signum == "SIGKILL" and not unnamed:
        pytest.skip("no O_TMPFILE on this filesystem: a SIGKILLed run leaves its named temporary file")
    grad_path = tmp_path / "g.npy"
    grad_path.write_bytes(b"previous gradient")
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, "loss", paths["logits"], paths["target"], "--chunk-rows", "64",
         "--grad-out", str(grad_path), "--per-row-out", str(tmp_path / "l.npy")],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        lines = []
        for line in process.stderr:  # mid-run: after the second of 16 chunks
            lines.append(line)
            if "chunk 2/16" in line:
                break
        else:
            pytest.fail("no progress: " + "".join(lines))
        hidden = _only_inputs(tmp_path)
        process.send_signal(getattr(signal, signum))
        rest = process.stderr.read()
        status = process.wait(timeout=120)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    # written through unnamed files (O_TMPFILE): nothing to see while running, nothing left after
    assert hidden == ["g.npy"] or not unnamed
    assert status == {"SIGTERM": 143, "SIGKILL": -9, "SIGINT": 130, "SIGHUP": 129}[signum]
    if signum != "SIGKILL":
        assert rest.strip().splitlines()[-1] in ("terminated: no output written", "interrupted: no output written")
    assert grad_path.read_bytes() == b"previous gradient"
    assert _only_inputs(tmp_path) == ["g.npy"]
