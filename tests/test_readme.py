"""Every code block of README.md runs as written: each ```python block on its own, in a
fresh interpreter in an empty directory, as a user pastes it (its own imports and data).
Shell sessions and output are marked as such (```bash, ```text) and not run."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastsce

ROOT = Path(fastsce.__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN = {"bash", "text"}  # shell commands and output / signatures
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
OPTIONAL = ("torch", "dask", "distributed", "ml_dtypes", "scipy", "jax")


def _blocks():
    text = README.read_text()
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        heading = re.findall(r"^#+ (.*)$", FENCE.sub("", text[: m.start()]), re.M)[-1:] or ["top"]
        yield pytest.param(m.group(1), m.group(2), id=f"line{line}-{heading[0].replace(' ', '_')}")


BLOCKS = list(_blocks())


def test_readme_has_python_blocks_and_every_block_says_what_it_is():
    languages = [p.values[0] for p in BLOCKS]
    assert languages.count("python") >= 5
    unmarked = [p.id for p in BLOCKS if p.values[0] not in NOT_RUN | {"python"}]
    assert not unmarked, f"README blocks without ```python / ```bash / ```text: {unmarked}"


@pytest.mark.parametrize("language, code", [p for p in BLOCKS if p.values[0] == "python"])
def test_readme_python_block_runs(language, code, tmp_path):
    imported = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", code, re.M))
    missing = [name for name in OPTIONAL if name in imported and importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"this README block needs {', '.join(missing)}, which is not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "error"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"the README block failed:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"
