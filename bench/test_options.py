"""What each option of large-model training costs, next to the plain loss.

    python -m pytest bench/test_options.py --benchmark-group-by=group

Every benchmark runs fastsce with one option (or dtype, or layout) on the same batch
and checks its output against the NumPy reference; the terminal summary lists each
median over the plain call's median of the same shape and kind (measured in this run).
"""

import numpy as np
import pytest

import fastsce
from fastsce import reference

SHAPES = ((16384, 100), (8192, 1000), (1024, 32000))


def _batch(n, k):
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((n, k))).astype(np.float32)
    return rng, x, rng.integers(0, k, n)


def _options(rng, n, k, x, y):
    """name -> (logits, target, keyword arguments) for one call."""
    def pytorch_layout(d):  # the same rows as (N / d, K, d), target (N / d, d)
        d = d if n % d == 0 else 1
        return np.ascontiguousarray(x.reshape(n // d, d, k).transpose(0, 2, 1)), y.reshape(n // d, d), dict(axis=1)

    return {
        "plain": (x, y, {}),
        "z_loss": (x, y, dict(z_loss=1e-4)),
        "return_lse": (x, y, dict(return_lse=True)),
        "sample_weight": (x, y, dict(sample_weight=rng.uniform(0.5, 1.5, n))),
        "where": (x, y, dict(where=rng.random(n) > 0.1)),
        "logit_scale": (x, y, dict(logit_scale=0.5)),
        "softcap": (x, y, dict(softcap=30.0)),
        "label_smoothing": (x, y, dict(label_smoothing=0.1)),
        "float16": (x.astype(np.float16), y, {}),
        "axis=1 (N, K, 64)": pytorch_layout(64),  # read in place, 64 rows a tile
        "axis=1 (N, K, 8)": pytorch_layout(8),  # copied a block at a time
    }


OPTION_NAMES = list(_options(np.random.default_rng(0), 8, 4, np.zeros((8, 4), np.float32), np.zeros(8, int)))


@pytest.mark.parametrize("kind", ("loss+grad", "loss"))
@pytest.mark.parametrize("option", OPTION_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_option(benchmark, shape, option, kind):
    n, k = shape
    rng, x, y = _batch(n, k)
    logits, target, kwargs = _options(rng, n, k, x, y)[option]
    if kind == "loss+grad":
        out = np.empty_like(logits)

        def run():
            return fastsce.cross_entropy_with_grad(logits, target, out=out, **kwargs)
    else:

        def run():
            return fastsce.cross_entropy(logits, target, **kwargs)

    run()  # compile outside the timing
    benchmark.group = f"{n}x{k} {kind} float32"
    benchmark.extra_info.update(n=n, k=k, option=option, kind=kind)
    result = benchmark(run)

    expected = getattr(reference, "cross_entropy_with_grad" if kind == "loss+grad" else "cross_entropy")(
        logits, target, **kwargs
    )
    result, expected = (result, expected) if isinstance(expected, tuple) else ((result,), (expected,))
    for got, want in zip(result, expected, strict=True):
        want = np.asarray(want)
        tol = reference.TOLERANCE[want.dtype]
        # atol relative to the largest entry, and at least a half subnormal's spacing
        atol = tol["atol"] * float(np.max(np.abs(want))) + (6e-8 if want.dtype.itemsize == 2 else 0.0)
        np.testing.assert_allclose(np.asarray(got, np.float64), want.astype(np.float64), rtol=tol["rtol"], atol=atol)
    benchmark.extra_info["checked"] = True
