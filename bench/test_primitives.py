"""softmax, log_softmax and logsumexp against a memcpy of x, the fused loss (+ gradient),
SciPy and PyTorch.

    python -m pytest bench/test_primitives.py --benchmark-group-by=group

Every benchmark checks its output against fastsce.reference (within TOLERANCE) after
timing; the first (compiling) call is made before timing starts. ``extra_info`` carries
the shape, the function and the implementation; bench/conftest.py prints the ratios of
the medians at the end of the run.
"""

import importlib.util

import numpy as np
import pytest

import fastsce
from fastsce import reference
from fastsce._tools import impls as _impls

SHAPES = ((8192, 1000), (1024, 32000))
DTYPE = np.dtype(np.float32)

# (function, implementation) -> builder (x, labels) -> zero-argument callable; its result
# is checked by CHECKS[function]. "memcpy", "ce+grad" and "ce" are the yardsticks: the
# floor for reading x and writing an array of its size, and the fused loss kernels.
def _fastsce(name):
    def build(x, labels):
        f = getattr(fastsce, name)
        if name == "logsumexp":
            return lambda: f(x)
        out = np.empty_like(x)
        return lambda: f(x, out=out)

    return build


def _scipy(name):
    def build(x, labels):
        import scipy.special

        f = getattr(scipy.special, name)
        return lambda: f(x, axis=-1)

    return build


def _torch(name):
    def build(x, labels):
        import torch

        f, t = getattr(torch, name), torch.from_numpy(x)
        return lambda: f(t, -1).numpy()

    return build


def _memcpy(x, labels):
    dst = np.empty_like(x)

    def run():
        np.copyto(dst, x)
        return dst

    return run


def _cross_entropy(with_grad):
    def build(x, labels):
        if with_grad:
            out = np.empty_like(x)
            return lambda: fastsce.cross_entropy_with_grad(x, labels, out=out)
        return lambda: fastsce.cross_entropy(x, labels)

    return build


IMPLS = {
    ("memcpy", "numpy"): (_memcpy, None),
    ("cross_entropy_with_grad", "fastsce"): (_cross_entropy(True), None),
    ("cross_entropy", "fastsce"): (_cross_entropy(False), None),
}
for _name in ("softmax", "log_softmax", "logsumexp"):
    IMPLS[(_name, "fastsce")] = (_fastsce(_name), None)
    IMPLS[(_name, "scipy")] = (_scipy(_name), "scipy")
    IMPLS[(_name, "torch")] = (_torch(_name), "torch")

_expected = {}


def _check(function, result, x, labels):
    tol = reference.TOLERANCE[DTYPE]
    if function == "memcpy":
        np.testing.assert_array_equal(result, x)
        return
    key = (function, x.shape)
    if key not in _expected:
        _expected.clear()  # one large reference result at a time
        if function.startswith("cross_entropy"):
            _expected[key] = _impls.reference_result(x, labels)
        else:
            _expected[key] = getattr(reference, function)(x)
    want = _expected[key]
    if function == "cross_entropy":
        np.testing.assert_allclose(result, want[0], **tol)
    elif function == "cross_entropy_with_grad":
        np.testing.assert_allclose(result[0], want[0], **tol)
        np.testing.assert_allclose(result[1], want[1], rtol=tol["rtol"], atol=tol["atol"] / x.shape[0])
    else:
        np.testing.assert_allclose(np.asarray(result), want, **tol)


@pytest.mark.parametrize("function, impl", list(IMPLS), ids=[f"{f}-{i}" for f, i in IMPLS])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_primitive(benchmark, shape, function, impl):
    build, requires = IMPLS[(function, impl)]
    if requires is not None and importlib.util.find_spec(requires) is None:
        pytest.skip(f"{requires} is not installed")
    x, labels = _impls.make_batch(*shape, DTYPE)
    run = build(x, labels)
    run()  # warm-up: compile outside the timing
    benchmark.group = f"primitives {shape[0]}x{shape[1]} {DTYPE}"
    benchmark.extra_info.update(shape=f"{shape[0]}x{shape[1]}", dtype=str(DTYPE), function=function, variant=impl)
    result = benchmark(run)
    _check(function, result, x, labels)
    benchmark.extra_info["checked"] = True
