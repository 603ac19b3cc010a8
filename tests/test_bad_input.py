"""Bad arguments: the right exception, a message naming the culprit, the same from the fast
API and the reference, and no input array touched (for successful calls too)."""

import numpy as np
import pytest

from _cases import IMPLS, assert_close, assert_unchanged, make_logits, make_probs, snapshot

N, K = 4, 3
FUNCTIONS = ("cross_entropy", "cross_entropy_with_grad")


def logits(dtype=np.float64, shape=(N, K)):
    return make_logits(np.random.default_rng(0), *shape, dtype=dtype)


def labels(*values, dtype=np.int64):
    return np.array(values or (0, 2, 1, 0), dtype)


def probs(dtype=np.float64):
    return make_probs(np.random.default_rng(1), N, K, dtype)


def read_only(a):
    a.flags.writeable = False
    return a


def out_overlapping_target():
    """An (N, K) float64 out whose last N elements are the int64 class-index target."""
    buf = np.zeros(N * K * 8, np.uint8)
    out = buf.view(np.float64).reshape(N, K)
    target = buf[(N * K - N) * 8 :].view(np.int64)
    target[:] = labels()
    return logits(), target, dict(out=out)


def out_overlapping_int32_target():
    """As above with an int32 target, which the API converts: the user's array is what counts."""
    buf = np.zeros(N * K * 8, np.uint8)
    out = buf.view(np.float64).reshape(N, K)
    target = buf[N * K * 8 - N * 4 :].view(np.int32)
    target[:] = labels()
    return logits(), target, dict(out=out)


def out_overlapping_logits():
    buf = logits(shape=(N + 1, K))
    return buf[:N], labels(), dict(out=buf[1:])


def out_is_soft_target():
    t = probs()
    return logits(), t, dict(out=t)


def out_is_weight_row():
    out = np.ones((N, K))
    return logits(), labels(), dict(weight=out[0], out=out)


def masked(name):
    """A builder: the argument ``name`` as a numpy.ma masked array with one entry masked."""

    def build():
        z, t = logits(), labels()
        given = dict(
            logits=z, target=t, weight=np.ones(K), sample_weight=np.ones(N), where=np.ones(N, bool), out=np.empty((N, K))
        )
        mask = np.zeros(given[name].shape, bool)
        mask.flat[0] = True
        given[name] = np.ma.array(given[name], mask=mask)
        return given.pop("logits"), given.pop("target"), {key: given[key] for key in (name,) if key in given}

    return build


def out_overlapping_itself():
    """A writeable out whose rows share memory (strides (0, 8)): writing row 0 writes every row."""
    buf = np.zeros(K)
    return logits(), labels(), dict(out=np.lib.stride_tricks.as_strided(buf, (N, K), (0, 8), writeable=True))


def logits_overlapping_themselves_in_place():
    """The issue's case: self-overlapping writeable logits with out=logits."""
    buf = np.arange(N + K, dtype=np.float64)
    z = np.lib.stride_tricks.as_strided(buf, (N, K), (8, 8), writeable=True)
    return z, labels(), dict(out=z)


def bad(exc, fragments, build, id):
    """One bad call: build() -> (logits, target, kwargs); fragments must all be in the message."""
    return pytest.param(exc, fragments, build, id=id)


def options(**kwargs):
    """A builder: good logits and class indices, the given keyword arguments."""
    return lambda: (logits(), labels(), dict(kwargs))


def targets(target):
    """A builder: good logits, the given target."""
    return lambda: (logits(), target, {})


BAD = [
    # class indices outside [0, K) that are not ignore_index: IndexError naming the first
    bad(IndexError, ["target[1] = 3", "K=3"], targets(labels(0, 3, 1, 5)), "label-eq-K"),
    bad(IndexError, ["target[2] = -1"], targets(labels(0, 1, -1, 2)), "label-negative"),
    bad(IndexError, ["target[3] = 7"], targets(labels(0, 1, 2, 7, dtype=np.int32)), "label-int32"),
    bad(
        IndexError,
        ["target[1] = -100", "ignore_index=1"],
        lambda: (logits(), labels(0, -100, 1, 2), dict(ignore_index=1)),
        "label-minus100-not-ignored",
    ),
    bad(
        IndexError,
        ["target[1] = 18446744073709551615"],
        targets(labels(0, 2**64 - 1, 1, 0, dtype=np.uint64)),
        "label-uint64-max",
    ),
    # shape mismatches: ValueError naming both shapes
    bad(ValueError, ["(5,)", "(4, 3)"], targets(labels(0, 1, 2, 0, 1)), "target-too-long"),
    bad(ValueError, ["(4, 1)", "(4, 3)"], targets(labels()[:, None]), "target-column"),
    bad(ValueError, ["(4, 4)", "(4, 3)"], targets(np.full((N, 4), 0.25)), "soft-target-wrong-K"),
    bad(ValueError, ["()", "(4, 3)"], targets(np.int64(0)), "target-scalar"),
    bad(ValueError, ["(2,)", "(4, 3)"], options(weight=np.ones(2)), "weight-short"),
    bad(ValueError, ["(1, 3)", "(4, 3)"], options(weight=np.ones((1, K))), "weight-2d"),
    bad(ValueError, ["(3, 3)", "(4, 3)"], options(out=np.empty((3, K))), "out-shape"),
    # logits of a non-float32/64 dtype: TypeError naming the dtype
    *[
        bad(TypeError, ["logits", dtype], lambda dtype=dtype: (logits().astype(dtype), labels(), {}), f"logits-{dtype}")
        for dtype in ("int32", "int64", "bool", "complex64", "complex128", "uint16")
    ],
    # target dtypes
    bad(TypeError, ["int64", "float"], targets(np.ones((N, K), np.int64)), "soft-target-int"),
    bad(TypeError, ["bool"], targets(np.ones((N, K), bool)), "soft-target-bool"),
    bad(TypeError, ["float64", "integer"], targets(labels().astype(np.float64)), "index-target-float"),
    bad(TypeError, ["bool", "integer"], targets(labels().astype(bool)), "index-target-bool"),
    # weights
    bad(ValueError, ["weight[1]", "-0.5"], options(weight=[1.0, -0.5, 1.0]), "weight-negative"),
    bad(ValueError, ["weight[2]", "nan"], options(weight=[1.0, 1.0, np.nan]), "weight-nan"),
    bad(ValueError, ["weight[0]", "inf"], options(weight=[np.inf, 1.0, 1.0]), "weight-inf"),
    bad(ValueError, ["weight[1]", "-inf"], options(weight=[1.0, -np.inf, 1.0]), "weight-minus-inf"),
    bad(TypeError, ["weight", "complex"], options(weight=np.ones(K, complex)), "weight-complex"),
    # out
    bad(ValueError, ["float32", "float64"], options(out=np.empty((N, K), np.float32)), "out-dtype"),
    bad(ValueError, ["read-only"], options(out=read_only(np.empty((N, K)))), "out-read-only"),
    bad(ValueError, ["numpy.ndarray", "list"], options(out=[[0.0] * K] * N), "out-list"),
    bad(ValueError, ["overlaps target"], out_overlapping_target, "out-overlaps-index-target"),
    bad(ValueError, ["overlaps target"], out_overlapping_int32_target, "out-overlaps-int32-target"),
    bad(ValueError, ["overlaps target"], out_is_soft_target, "out-is-soft-target"),
    bad(ValueError, ["overlaps weight"], out_is_weight_row, "out-overlaps-weight"),
    bad(ValueError, ["overlaps logits"], out_overlapping_logits, "out-partially-overlaps-logits"),
    bad(ValueError, ["out", "overlapping elements", "(0, 8)"], out_overlapping_itself, "out-overlaps-itself"),
    bad(ValueError, ["out", "overlapping elements"], logits_overlapping_themselves_in_place, "out-logits-overlap-themselves"),
    # numpy.ma masked arrays: refused (their mask would be ignored), naming the argument and a fix
    bad(TypeError, ["logits", "masked", "filled(-np.inf)"], masked("logits"), "masked-logits"),
    bad(TypeError, ["target", "masked", "where="], masked("target"), "masked-target"),
    bad(TypeError, ["weight", "masked", "filled(0)"], masked("weight"), "masked-weight"),
    bad(TypeError, ["sample_weight", "masked"], masked("sample_weight"), "masked-sample-weight"),
    bad(TypeError, ["where", "masked", "filled(False)"], masked("where"), "masked-where"),
    bad(TypeError, ["out", "masked"], masked("out"), "masked-out"),
    # reduction, label_smoothing, ignore_index
    *[
        bad(ValueError, ["reduction", repr(r)], options(reduction=r), f"reduction-{r}")
        for r in ("avg", "MEAN", None, 1)
    ],
    *[
        bad(ValueError, ["label_smoothing", repr(eps)], options(label_smoothing=eps), f"smoothing-{eps}")
        for eps in (-0.1, 1.0000001, 2.0, np.nan, np.inf)
    ],
    *[
        bad(TypeError, ["label_smoothing", repr(eps)], options(label_smoothing=eps), f"smoothing-{eps!r}")
        for eps in ("0.1", None, [0.1], True)
    ],
    *[
        bad(TypeError, ["ignore_index", repr(ii)], options(ignore_index=ii), f"ignore-index-{ii!r}")
        for ii in ("1", 1.0, None, True)
    ],
    # logits rank, class axis and K = 0: ValueError with the shapes
    bad(ValueError, ["(1,)", "(3,)"], lambda: (logits(shape=(1, K))[0], labels(0), {}), "logits-1d-target-1d"),
    bad(ValueError, ["(2,)", "(2, 3, 4)"], lambda: (np.zeros((2, 3, 4)), labels(0, 1), {}), "logits-3d-target-1d"),
    bad(ValueError, ["class axis", "0-d"], lambda: (np.float64(1.0), labels(0), {}), "logits-0d"),
    bad(ValueError, ["(4, 0)"], lambda: (np.zeros((N, 0)), labels(), {}), "K-0"),
    bad(ValueError, ["axis=1"], lambda: (np.zeros((2, 3, 5)), np.zeros((2, 5), int), {}), "torch-layout-hint"),
    bad(ValueError, ["axis=2", "(4, 3)"], options(axis=2), "axis-out-of-range"),
    bad(ValueError, ["axis=-3"], options(axis=-3), "axis-negative-out-of-range"),
    bad(TypeError, ["axis", "1.0"], options(axis=1.0), "axis-float"),
    # the options of large-model training
    *[
        bad(ValueError, ["z_loss", repr(float(s))], options(z_loss=s), f"z-loss-{s}")
        for s in (-1e-4, np.nan, np.inf)
    ],
    bad(TypeError, ["z_loss"], options(z_loss="1e-4"), "z-loss-str"),
    *[bad(ValueError, ["softcap", repr(float(c))], options(softcap=c), f"softcap-{c}") for c in (0.0, -30.0, np.inf)],
    *[bad(ValueError, ["logit_scale"], options(logit_scale=a), f"logit-scale-{a}") for a in (np.nan, -np.inf)],
    bad(TypeError, ["logit_scale"], options(logit_scale=True), "logit-scale-bool"),
    bad(ValueError, ["sample_weight[2]", "-1.0"], options(sample_weight=[1.0, 1.0, -1.0, 1.0]), "sample-weight-neg"),
    bad(ValueError, ["sample_weight[0]", "nan"], options(sample_weight=[np.nan, 1.0, 1.0, 1.0]), "sample-weight-nan"),
    bad(ValueError, ["sample_weight", "(3,)", "(4,)"], options(sample_weight=np.ones(3)), "sample-weight-short"),
    bad(TypeError, ["sample_weight", "complex"], options(sample_weight=np.ones(N, complex)), "sample-weight-complex"),
    bad(TypeError, ["where", "boolean", "int64"], options(where=np.ones(N, np.int64)), "where-int"),
    bad(ValueError, ["where", "(4, 1)", "(4,)"], options(where=np.ones((N, 1), bool)), "where-shape"),
    bad(ValueError, ["all_ignored", "'none'"], options(all_ignored="none"), "all-ignored-bad"),
    bad(TypeError, ["return_lse", "1"], options(return_lse=1), "return-lse-int"),
    bad(TypeError, ["return_z_loss", "'yes'"], options(return_z_loss="yes"), "return-z-loss-str"),
    bad(ValueError, ["dtype=float32", "float64"], options(dtype=np.float32), "dtype-narrower"),
    bad(TypeError, ["dtype"], options(dtype="not a dtype"), "dtype-garbage"),
    # probability targets have no class to ignore
    *[
        bad(ValueError, [f"ignore_index={ii}"], lambda i=ii: (logits(), probs(), dict(ignore_index=i)), f"soft-ii{ii}")
        for ii in (1, -1, 0)
    ],
]


def calls(kwargs):
    """(implementation, function name) pairs that accept kwargs (out only with the gradient)."""
    return [(impl, fn) for impl in IMPLS for fn in FUNCTIONS if fn == "cross_entropy_with_grad" or "out" not in kwargs]


@pytest.mark.parametrize("exc, fragments, build", BAD)
def test_bad_input_raises_the_same_error_everywhere(exc, fragments, build):
    messages = {}
    for impl, fn in calls(build()[2]):
        z, t, kwargs = build()
        before = snapshot(z, t, *kwargs.values())
        with pytest.raises(Exception) as info:
            getattr(IMPLS[impl], fn)(z, t, **kwargs)
        assert type(info.value) is exc, f"{impl}.{fn} raised {info.value!r}"
        for fragment in fragments:
            assert fragment in str(info.value), f"{impl}.{fn}: {fragment!r} not in {str(info.value)!r}"
        assert_unchanged(before)
        messages[impl, fn] = str(info.value)
    assert len(set(messages.values())) == 1, messages


@pytest.mark.parametrize("ignore_index", (2**63, 2**64, -(2**63) - 1), ids=("2^63", "2^64", "-2^63-1"))
def test_ignore_index_outside_int64_is_handled_alike(ignore_index):
    """No int64 class index equals such an ignore_index (PyTorch rejects it with ValueError).

    Either every implementation rejects it with the same TypeError/ValueError naming
    ignore_index, or every one accepts it and ignores no row (= the default -100 here).
    """
    outcomes = {}
    for impl, fn in calls({}):
        call = getattr(IMPLS[impl], fn)
        try:
            result = call(logits(), labels(), ignore_index=ignore_index)
        except Exception as e:  # whatever happens is compared below
            outcomes[impl, fn] = f"{type(e).__name__}: {str(e)[:200]}"
        else:
            outcomes[impl, fn] = "returned"
            expected = call(logits(), labels())
            if fn == "cross_entropy":
                result, expected = (result,), (expected,)
            for got, want in zip(result, expected, strict=True):
                assert_close(got, want)
    kinds = {outcome.split(":")[0] for outcome in outcomes.values()}
    assert len(kinds) == 1, outcomes
    assert kinds <= {"returned", "TypeError", "ValueError"}, outcomes
    assert all(o == "returned" or "ignore_index" in o for o in outcomes.values()), outcomes


# --- accepted inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("logits_dtype", (np.float32, np.float64), ids=("f32", "f64"))
@pytest.mark.parametrize("target_dtype", (np.float16, np.float32, np.float64), ids=("t16", "t32", "t64"))
def test_soft_targets_of_another_float_dtype_are_converted(impl, logits_dtype, target_dtype):
    z, t = logits(logits_dtype), probs(target_dtype)
    before = snapshot(z, t)
    for fn in FUNCTIONS:
        got = getattr(IMPLS[impl], fn)(z, t, label_smoothing=0.1)
        want = getattr(IMPLS[impl], fn)(z, t.astype(logits_dtype), label_smoothing=0.1)
        if fn == "cross_entropy":
            got, want = (got,), (want,)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b, strict=True)
    assert_unchanged(before)


def fortran(a):
    return np.asfortranarray(a)


VALID = {  # float32 logits unless the dtype is the point (the default run compiles float32 kernels only)
    "int64": lambda: (logits(np.float32), labels(), {}),
    "int32-strided": lambda: (logits(np.float32), labels(0, 9, 2, 9, 1, 9, 0, 9, dtype=np.int32)[::2], {}),
    "uint8": lambda: (logits(np.float32), labels(dtype=np.uint8), {}),
    "ignore-in": lambda: (logits(np.float32), labels(0, 1, 1, 2), dict(ignore_index=1, reduction="none")),
    "weight-int": lambda: (logits(np.float32), labels(), dict(weight=np.array([1, 0, 3]))),
    "weight-smoothing": lambda: (logits(np.float32), labels(), dict(weight=np.ones(K), label_smoothing=0.2)),
    "soft": lambda: (logits(np.float32), probs(np.float32), dict(reduction="sum")),
    "soft-f32-for-f64": lambda: (logits(), probs(np.float32), {}),
    "soft-fortran": lambda: (fortran(logits(np.float32)), fortran(probs(np.float32)), dict(weight=[1.0, 2.0, 3.0])),
    "transposed-logits": lambda: (logits(np.float32, shape=(K, N)).T, labels(), dict(reduction="none")),
    "float16": lambda: (logits(np.float16), labels(), dict(label_smoothing=0.1)),
    "axis-1": lambda: (
        np.random.default_rng(0).standard_normal((2, K, 2), dtype=np.float32),
        labels().reshape(2, 2),
        dict(axis=1, reduction="none"),
    ),
    "every-option": lambda: (
        logits(np.float32),
        labels(),
        dict(z_loss=1e-3, softcap=5.0, logit_scale=0.5, sample_weight=np.arange(N), where=labels() > 0),
    ),
}


@pytest.mark.parametrize(
    "fn, use_out",
    [(fn, False) for fn in FUNCTIONS] + [("cross_entropy_with_grad", True)],
    ids=(*FUNCTIONS, "cross_entropy_with_grad-out"),
)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", VALID)
def test_successful_calls_leave_inputs_untouched(name, impl, fn, use_out):
    z, t, kwargs = VALID[name]()
    before = snapshot(z, t, *kwargs.values())
    if use_out:
        kwargs["out"] = np.full(z.shape, np.nan, z.dtype)
    getattr(IMPLS[impl], fn)(z, t, **kwargs)
    assert_unchanged(before)


# --- byte order ---------------------------------------------------------------------------

ml_dtypes = pytest.importorskip("ml_dtypes")
HALF_AND_FLOAT = ("float16", "bfloat16", "float32", "float64")


def swapped(a):
    """a with the other byte order (same values): '>f4' on a little-endian machine."""
    return a.astype(a.dtype.newbyteorder("S"))


def as_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# (logits shape, axis, probabilities?): class-last small K (vectorised across rows),
# class-last long rows, PyTorch's (N, K, d) read in place, and probability targets
BYTE_ORDER_CASES = {
    "small-K": ((6, 3), -1, False),
    "K-300": ((5, 300), -1, False),
    "axis-1-d-40": ((2, 7, 40), 1, False),
    "soft": ((6, 9), -1, True),
}


@pytest.mark.parametrize("case", BYTE_ORDER_CASES)
@pytest.mark.parametrize("dtype", HALF_AND_FLOAT)
@pytest.mark.parametrize("impl", IMPLS)
def test_logits_of_either_byte_order_give_the_same_results(impl, dtype, case):
    """Non-native logits (e.g. '>f2', big-endian bfloat16) are their values, on every path:
    they used to be read as native bits (bfloat16), or crash in the compiler ('>f2').
    (Within tolerance: they take the copying path, whose vector loops may round differently.)"""
    shape, axis, soft = BYTE_ORDER_CASES[case]
    rng = np.random.default_rng(3)
    z = (4 * rng.standard_normal(shape)).astype(as_dtype(dtype))
    axis_n = axis % len(shape)
    if soft:
        t = make_probs(rng, shape[0], shape[1], np.float32)
    else:
        t = rng.integers(0, shape[axis_n], shape[:axis_n] + shape[axis_n + 1 :])
    options = dict(axis=axis, label_smoothing=0.1, weight=np.linspace(0.5, 2, shape[axis_n]))
    fn = IMPLS[impl].cross_entropy_with_grad
    want_loss, want_grad = fn(z, t, **options)
    z_swapped = swapped(z)
    before = snapshot(z_swapped)
    for t_given in (t, swapped(t)):
        loss, grad = fn(z_swapped, t_given, **options)
        assert grad.dtype == z.dtype and grad.dtype.isnative
        assert_close(loss, want_loss)
        assert_close(grad, want_grad)
        assert_close(IMPLS[impl].cross_entropy(z_swapped, t_given, **options), want_loss)
    out = swapped(np.zeros_like(z))  # an out of the other byte order is written through
    assert fn(z_swapped, t, out=out, **options)[1] is out
    assert_close(out.astype(z.dtype), want_grad)
    assert_unchanged(before)
    in_place = z_swapped.copy()
    assert fn(in_place, t, out=in_place, **options)[1] is in_place
    assert_close(in_place.astype(z.dtype), want_grad)


@pytest.mark.half
@pytest.mark.parametrize("impl", IMPLS)
def test_big_endian_bfloat16_loss_of_the_issue(impl):
    z = np.array([[1, 2, 3]], np.dtype(ml_dtypes.bfloat16).newbyteorder(">"))
    loss = IMPLS[impl].cross_entropy(z, np.array([2]))
    assert abs(float(loss) - 0.4076) < 2e-3, loss


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_of_either_byte_order(impl):
    z, t = logits(np.float32), labels()
    weight, sample_weight = np.array([0.5, 1.0, 2.0]), np.arange(1.0, N + 1)
    want = IMPLS[impl].cross_entropy(z, t, weight=weight, sample_weight=sample_weight)
    got = IMPLS[impl].cross_entropy(z, t, weight=swapped(weight), sample_weight=swapped(sample_weight))
    assert_close(got, want)


# --- empty batches ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", (None, np.empty(0, bool)), ids=("plain", "where"))
@pytest.mark.parametrize("reduction, expected", (("mean", np.nan), ("sum", 0.0)))
def test_empty_batch_with_probabilities_of_another_dtype(impl, where, reduction, expected):
    """N = 0 with float64 probabilities for float32 logits: the documented NaN / 0 (it used
    to raise "need at least one array to concatenate")."""
    z, t = np.empty((0, 5), np.float32), np.empty((0, 5))
    loss = IMPLS[impl].cross_entropy(z, t, where=where, reduction=reduction)
    np.testing.assert_array_equal(loss, np.float32(expected))
    loss, grad = IMPLS[impl].cross_entropy_with_grad(z, t, where=where, reduction=reduction)
    np.testing.assert_array_equal(loss, np.float32(expected))
    assert grad.shape == (0, 5) and grad.dtype == np.float32
    assert IMPLS[impl].cross_entropy(z, t, reduction="none").shape == (0,)
