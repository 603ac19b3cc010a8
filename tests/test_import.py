"""``import fastsce`` imports nothing optional: ml_dtypes (about 1 s to import), torch,
dask and scipy are imported by the adapters or by the user, never by fastsce itself."""

import json
import subprocess
import sys

import numpy as np
import pytest

OPTIONAL = ("ml_dtypes", "torch", "dask", "distributed", "scipy", "jax", "matplotlib")

SCRIPT = """
import json, sys
import numpy, numba  # what fastsce needs; numba itself imports scipy when installed
before = set(sys.modules)
import fastsce
print(json.dumps(sorted({name.split(".")[0] for name in set(sys.modules) - before})))
"""


def test_import_fastsce_imports_no_optional_package():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    new = json.loads(done.stdout)
    assert not set(OPTIONAL) & set(new), f"import fastsce imported {sorted(set(OPTIONAL) & set(new))}"


def test_bfloat16_tolerance_without_importing_ml_dtypes_up_front():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from fastsce import reference

    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert bf16 in reference.TOLERANCE
    assert reference.TOLERANCE[bf16] == dict(rtol=8e-3, atol=1e-5)
    assert reference.TOLERANCE["float32"] is reference.TOLERANCE[np.dtype(np.float32)]
    assert np.dtype(np.int8) not in reference.TOLERANCE
