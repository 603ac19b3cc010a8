"""Every option drawn together: the fast path against the reference.

One Hypothesis test draws shapes (N 0..50, K 1..300, 3-D inputs with the classes on any
axis), both dtypes, logits with +-inf / NaN / huge entries, class and row weights (also
extreme ones), where, label smoothing, z-loss, logit_scale, softcap, every reduction and
all_ignored, out= (fresh, Fortran-ordered, or the logits themselves) and, now and then,
one bad argument. Both implementations must return the same values (within
reference.TOLERANCE, NaN in the same places) or raise the same exception type.

The example count is bounded for the default run; set FASTSCE_PROPERTY_EXAMPLES for more.
"""

import os

import numpy as np
import pytest
from _cases import IMPLS, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FASTSCE_PROPERTY_EXAMPLES", "60"))

# Logit entries beyond the normal ones: masked classes, NaN, and values that overflow exp.
# (Not near the float32 maximum: there the z-loss gradient's row factor 2 z_loss lse
# overflows float32 in the kernels, giving NaN where the reference's float64 gives 0.)
SPECIAL = {np.float32: (np.inf, -np.inf, np.nan, 1e30, -1e30), np.float64: (np.inf, -np.inf, np.nan, 1e300, -1e300)}
# Scales of the class / row weights: ordinary and extreme (beyond float32, subnormal in float64).
WEIGHT_SCALES = {np.float32: (1.0, 1e-30, 1e30, 1e300, 1e-300), np.float64: (1.0, 1e-300, 1e300, 1e-320)}


@st.composite
def problems(draw, dtype):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    k = draw(st.sampled_from((1, 2, 3, 7, 16, 100, 129, 300)), label="K")
    if draw(st.booleans(), label="3-D"):
        a, d = draw(st.integers(0, 4), label="A"), draw(st.sampled_from((1, 3, 33)), label="d")
        axis = draw(st.sampled_from((0, 1, 2, -1)), label="axis")
        shape = [a, d]
        shape.insert(axis % 3, k)
    else:
        n = draw(st.integers(0, 50), label="N")
        axis = draw(st.sampled_from((-1, 0)), label="axis")
        shape = [n, k] if axis == -1 else [k, n]
    shape = tuple(shape)
    lead = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    x = (draw(st.sampled_from((1.0, 30.0)), label="logit scale") * rng.standard_normal(shape)).astype(dtype)
    special = draw(st.floats(0, 0.3), label="special fraction")
    if special and x.size:
        hit = rng.random(shape) < special
        x[hit] = rng.choice(np.array(SPECIAL[dtype], dtype), size=int(hit.sum()))

    soft = draw(st.booleans(), label="probabilities")
    options = {}
    if soft:
        t = rng.dirichlet(np.ones(k), size=lead)
        t = np.moveaxis(t.reshape(lead + (k,)), -1, axis % len(shape)).astype(draw(st.sampled_from((dtype, np.float64))))
    else:
        t = rng.integers(0, k, lead)
        if draw(st.booleans(), label="ignored rows") and t.size:
            t[rng.random(lead) < 0.3] = -100
    reduction = draw(st.sampled_from(("mean", "sum", "none")), label="reduction")
    options["reduction"] = reduction
    # extreme weights only where the exact result fits the dtype: "mean" is unchanged by a
    # common factor; "sum" / "none" scale with it (see the README's Semantics)
    scales = WEIGHT_SCALES[dtype] if reduction == "mean" and not soft else (1.0,)
    if draw(st.booleans(), label="weight"):
        options["weight"] = rng.uniform(0, 2, k) * draw(st.sampled_from(scales), label="weight scale")
    if draw(st.booleans(), label="sample_weight"):
        v = rng.uniform(0, 2, lead) * (rng.random(lead) > 0.2)
        options["sample_weight"] = v * draw(st.sampled_from(scales if reduction == "mean" else (1.0,)), label="v scale")
    if draw(st.booleans(), label="where"):
        options["where"] = rng.random(lead) > 0.3
    if draw(st.booleans(), label="smoothing"):
        options["label_smoothing"] = draw(st.floats(0, 1), label="label_smoothing")
    if draw(st.booleans(), label="z-loss"):
        options["z_loss"] = draw(st.floats(0, 1), label="z_loss")
    if draw(st.booleans(), label="logit_scale"):
        options["logit_scale"] = draw(st.floats(-3, 3), label="logit_scale")
    if draw(st.booleans(), label="softcap"):
        options["softcap"] = draw(st.floats(0.5, 60), label="softcap")
    options["all_ignored"] = draw(st.sampled_from(("nan", "zero")), label="all_ignored")
    options["axis"] = axis
    options["return_lse"] = draw(st.booleans(), label="return_lse")
    options["return_z_loss"] = draw(st.booleans(), label="return_z_loss")

    bad = draw(st.sampled_from((None,) * 6 + ("label", "weight", "smoothing", "out dtype")), label="bad")
    if bad == "label" and not soft and t.size:
        t.flat[rng.integers(t.size)] = k
    elif bad == "weight":
        options["weight"] = -np.ones(k)
    elif bad == "smoothing":
        options["label_smoothing"] = 1.5
    out = draw(st.sampled_from((None, "C", "F", "logits") + (("wrong dtype",) if bad == "out dtype" else ())), label="out")
    grad = out is not None or draw(st.booleans(), label="gradient")
    return x, t, options, grad, out


def run(impl, x, t, options, grad, out):
    """The call's results (or its exception type), on its own copies of the arrays."""
    x = x.copy()
    if out == "logits":
        options = dict(options, out=x)
    elif out == "wrong dtype":
        options = dict(options, out=np.empty(x.shape, np.float16))
    elif out is not None:
        options = dict(options, out=np.full(x.shape, np.nan, x.dtype, order=out))
    with np.errstate(all="ignore"):  # the reference's NumPy temporaries meet inf - inf
        try:
            result = getattr(IMPLS[impl], "cross_entropy_with_grad" if grad else "cross_entropy")(x, t, **options)
        except Exception as e:  # the type is compared
            return type(e)
    result = result if isinstance(result, tuple) else (result,)
    if out is not None and grad:
        assert result[1] is options["out"]
    return tuple(np.asarray(r) for r in result)


@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.f64)], ids=["f32", "f64"])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_fast_matches_reference_with_every_option(dtype, data):
    problem = data.draw(problems(dtype), label="problem")
    x, t, options, grad, out = problem
    got, want = run("fast", *problem), run("ref", *problem)
    if isinstance(want, type) or isinstance(got, type):
        assert got is want, (got, want)
        return
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        assert_close(a, b, x.dtype, unit=1.0)
