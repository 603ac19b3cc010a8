"""fastsce.warmup / python -m fastsce warmup: compile paths ahead of time, in worker
processes, into the cache that later processes load from without compiling."""

import os
import subprocess
import sys

import pytest

import fastsce
from fastsce import _warmup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastsce.__file__)))

# Calls of the kinds warmed up below, on other shapes and with the warmed-up option (label
# smoothing; other sets of options compile a general row kernel of their own on first
# use) and weights: they must compile nothing once "large-K loss" and "logsumexp" are
# warm for float64.
PROBE = """
import numpy as np, fastsce
from fastsce._kernels import jit
x = np.random.default_rng(0).standard_normal((500, 3000))
y = np.random.default_rng(1).integers(0, 3000, 500)
fastsce.logsumexp(x[:, ::2], axis=0)
fastsce.cross_entropy(x, y, label_smoothing=0.1, weight=np.ones(3000, np.float32),
                      sample_weight=np.ones(500), where=np.ones(500, bool), reduction="sum")
fastsce.cross_entropy(x, y, reduction="none")
print(jit.compile_count())
"""


def _env(cache):
    return {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": ROOT}


@pytest.mark.full  # compiles two float64 paths into an empty cache
def test_warmup_compiles_in_workers_and_later_processes_compile_nothing(tmp_path):
    cmd = [sys.executable, "-m", "fastsce", "warmup", "--dtype", "float64", "--path", "large-K loss"]
    cmd += ["--path", "logsumexp", "--processes", "2"]
    done = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "2 paths, 2 processes" in lines[0]
    assert sorted(line.split("] ")[1].split(":")[0] for line in lines[1:3]) == [
        "float64 large-K loss",
        "float64 logsumexp",
    ]
    assert all("compiled" in line and line.endswith(" s CPU)") for line in lines[1:3])
    assert lines[-1].startswith("fastsce warmup: done in")

    probe = subprocess.run(
        [sys.executable, "-c", PROBE], env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["0"], "a warmed-up path compiled again"

    again = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sum("loaded from the cache" in line for line in again.stderr.splitlines()) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtypes="int8"), "unknown dtype 'int8'"),
        (dict(paths="everything"), "unknown path 'everything'"),
        (dict(processes=0), "processes must be a positive int, got 0"),
    ],
)
def test_warmup_refuses_bad_arguments_before_compiling(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastsce.warmup(progress=False, **kwargs)


def test_every_path_and_dtype_is_a_job():
    assert set(_warmup.DTYPES) == {"float32", "float64", "float16", "bfloat16"}
    assert _warmup._names(None, _warmup.DTYPES, "dtypes", ("float32",)) == ["float32"]
    assert _warmup._names("all", _warmup.DTYPES, "dtypes", ()) == list(_warmup.DTYPES)
    import numpy as np

    assert _warmup._names([np.float64, "float64"], _warmup.DTYPES, "dtypes", ()) == ["float64"]


def test_cli_warmup_rejects_a_bad_dtype():
    done = subprocess.run(
        [sys.executable, "-m", "fastsce", "warmup", "--dtype", "int8"],
        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "invalid choice: 'int8'" in done.stderr
