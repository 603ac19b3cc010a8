"""The options of large-model training: z_loss, logit_scale, softcap, return_lse, axis,
sample_weight / where, all_ignored, and float16 / bfloat16 logits.

Fast against the reference on a grid; the reference against central differences and
closed forms; the class axis and the half-precision dtypes through the block-copy path.
"""

import math

import numpy as np
import pytest

from _cases import FD_STEP, FD_TOL, IMPLS, assert_close, assert_unchanged, make_labels, make_probs, seed_of, snapshot
from fastsce import api, primitives, reference

fast, ref = IMPLS["fast"], IMPLS["ref"]

# Option sets, each alone and all together (with class weights and smoothing).
OPTIONS = {
    "z": lambda rng, lead: dict(z_loss=1e-2),
    "scale": lambda rng, lead: dict(logit_scale=0.6),
    "cap": lambda rng, lead: dict(softcap=3.0),
    "scale-cap": lambda rng, lead: dict(logit_scale=-1.7, softcap=5.0),
    "sample-weight": lambda rng, lead: dict(sample_weight=rng.uniform(0, 2, lead) * (rng.random(lead) > 0.2)),
    "where": lambda rng, lead: dict(where=rng.random(lead) > 0.3),
    "all": lambda rng, lead: dict(
        z_loss=1e-3, logit_scale=1.3, softcap=4.0, sample_weight=rng.uniform(0.5, 2, lead), where=rng.random(lead) > 0.2
    ),
}
SHAPES = {"10": (300, 10), "1000": (64, 1000), "long": (3, 40000)}


def make(n, k, dtype, soft, seed_parts, scale=4.0):
    rng = np.random.default_rng(seed_of(*seed_parts))
    x = (scale * rng.standard_normal((n, k))).astype(dtype)
    target = make_probs(rng, n, k, np.float64).astype(dtype) if soft else make_labels(rng, n, k)
    return rng, x, target


def results(impl, fn, x, target, **kwargs):
    """Every output of one call, as a tuple: loss, [grad], z-term, lse."""
    return getattr(impl, fn)(x, target, return_z_loss=True, return_lse=True, **kwargs)


def assert_all_close(got, want, dtype):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        extra = {}
        if a.dtype.itemsize == 2:  # compared in float32, with the half dtype's tolerance
            a, b = a.astype(np.float32), b.astype(np.float32)
        unit = float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0))
        if np.dtype(dtype).itemsize == 2 and unit:  # and two float16 subnormal spacings
            extra["atol"] = reference.TOLERANCE[np.dtype(dtype)]["atol"] + 1.2e-7 / unit
        assert_close(a, b, dtype, unit=unit, **extra)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("f32", "f64"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_fast_matches_reference(option, shape, dtype, soft, reduction):
    n, k = SHAPES[shape]
    rng, x, target = make(n, k, dtype, soft, (option, shape, soft))
    kwargs = dict(OPTIONS[option](rng, (n,)), reduction=reduction)
    if option == "all":
        kwargs.update(weight=rng.uniform(0.2, 2, k), label_smoothing=0.1)
    before = snapshot(x, target, *kwargs.values())
    for fn in ("cross_entropy", "cross_entropy_with_grad"):
        assert_all_close(results(fast, fn, x, target, **kwargs), results(ref, fn, x, target, **kwargs), dtype)
    assert_unchanged(before)


@pytest.mark.parametrize("option", OPTIONS)
def test_long_rows_path_with_options(option, monkeypatch):
    """Rows read once with a running max (forced here at K = 5000) under every option."""
    monkeypatch.setattr(api, "LONG_ROW_BYTES", 1024)
    rng, x, target = make(5, 5000, np.float32, False, (option, "forced-long"))
    kwargs = OPTIONS[option](rng, (5,))
    got = results(fast, "cross_entropy_with_grad", x, target, **kwargs)
    assert_all_close(got, results(ref, "cross_entropy_with_grad", x, target, **kwargs), np.float32)


@pytest.mark.parametrize("in_place", (False, True), ids=("out", "in-place"))
@pytest.mark.parametrize("option", ("cap", "all"))
def test_out_and_in_place(option, in_place):
    rng, x, target = make(50, 700, np.float64, False, (option, "out"))
    kwargs = OPTIONS[option](rng, (50,))
    want = results(ref, "cross_entropy_with_grad", x, target, **kwargs)
    buf = x.copy() if in_place else np.empty_like(x)
    logits = buf if in_place else x
    got = fast.cross_entropy_with_grad(logits, target, out=buf, return_z_loss=True, return_lse=True, **kwargs)
    assert got[1] is buf
    assert_all_close(got, want, np.float64)


# --- the reference against the maths ----------------------------------------------------


def total(x, target, kwargs):
    return float(np.sum(ref.cross_entropy(x, target, **kwargs)))


FD_OPTIONS = {
    **{name: OPTIONS[name] for name in ("z", "scale", "cap", "scale-cap", "sample-weight", "all")},
    "z-weighted-smoothed": lambda rng, lead: dict(z_loss=0.1, weight=rng.uniform(0.2, 2, 5), label_smoothing=0.2),
}


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))
@pytest.mark.parametrize("option", FD_OPTIONS)
def test_reference_gradient_matches_central_differences(option, soft, reduction):
    rng, x, target = make(6, 5, np.float64, soft, (option, "fd"), scale=2.0)
    kwargs = dict(FD_OPTIONS[option](rng, (6,)), reduction=reduction)
    _, grad = ref.cross_entropy_with_grad(x, target, **kwargs)
    numeric = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += FD_STEP
        down[idx] -= FD_STEP
        numeric[idx] = (total(up, target, kwargs) - total(down, target, kwargs)) / (2 * FD_STEP)
    assert np.any(grad != 0)
    np.testing.assert_allclose(grad, numeric, **FD_TOL)


def lse_float64(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))
def test_z_loss_adds_s_times_mean_lse_squared(impl, soft):
    rng, x, target = make(40, 30, np.float64, soft, ("z", impl))
    base, g0 = IMPLS[impl].cross_entropy_with_grad(x, target)
    loss, grad, z_term, lse = results(IMPLS[impl], "cross_entropy_with_grad", x, target, z_loss=0.05)
    counted = np.ones(40, bool) if soft else target != -100
    exact_lse = lse_float64(x)
    np.testing.assert_allclose(lse, exact_lse, rtol=1e-14)
    np.testing.assert_allclose(z_term, 0.05 * np.mean(exact_lse[counted] ** 2), rtol=1e-13)
    np.testing.assert_allclose(loss, base + z_term, rtol=1e-13)
    # its gradient: 2 s lse_n p_nj / D_z on counted rows
    p = np.exp(x - exact_lse[:, None])
    extra = np.where(counted[:, None], 2 * 0.05 * exact_lse[:, None] * p / counted.sum(), 0)
    np.testing.assert_allclose(grad, g0 + extra, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
def test_z_loss_mean_uses_row_count_not_class_weights(impl):
    """As Liger-Kernel: the z-term is not weighted by the class weight, and its mean
    divides by the number of counted rows (times their sample weights)."""
    rng, x, target = make(20, 6, np.float64, False, ("z-weights", impl))
    w, v = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 2, 20)
    counted = target != -100
    _, z_term = IMPLS[impl].cross_entropy(x, target, weight=w, sample_weight=v, z_loss=0.1, return_z_loss=True)
    lse2 = lse_float64(x) ** 2
    np.testing.assert_allclose(z_term, 0.1 * np.sum((v * lse2)[counted]) / np.sum(v[counted]), rtol=1e-13)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("f32", "f64"))
def test_logit_scale_and_softcap_are_the_loss_of_the_transformed_logits(impl, soft, dtype):
    rng, x, target = make(30, 50, dtype, soft, ("transform", impl, soft))
    a, c = 1.7, 6.0
    z = (c * np.tanh(a * x.astype(np.float64) / c)).astype(dtype)
    loss, grad = IMPLS[impl].cross_entropy_with_grad(x, target, logit_scale=a, softcap=c, reduction="none")
    loss_z, grad_z = IMPLS[impl].cross_entropy_with_grad(z, target, reduction="none")
    assert_close(loss, loss_z, dtype, unit=1.0)
    dz_dx = a * (1 - (z.astype(np.float64) / c) ** 2)  # the chain rule
    assert_close(grad, grad_z * dz_dx, dtype, unit=1.0)


@pytest.mark.parametrize("options", ("plain", "smoothed"))
@pytest.mark.parametrize("path", ("rows", "long-rows", "in-place"))
@pytest.mark.parametrize("a", (0.6, -1.7, 0.0))
@pytest.mark.parametrize("dtype", (np.float32, np.float64, np.float16), ids=("f32", "f64", "f16"))
def test_logit_scale_is_the_loss_of_the_rounded_scaled_logits_bit_for_bit(dtype, a, path, options, monkeypatch):
    """The row kernels apply a logit scale as they read each logit, with no scaled copy
    of the row: every pass must see exactly the rounded a x such a copy held (never a
    x - m fused into one FMA), so loss, z-term and lse are those of the scaled logits,
    bit for bit, and the gradient is a times theirs. Rows with infinities and NaN (0 x
    inf = NaN at a = 0), ignored rows (their lse), class weights and smoothing."""
    if path == "long-rows":
        monkeypatch.setattr(api, "LONG_ROW_BYTES", 1024)
    if path == "in-place" and dtype == np.float16:
        pytest.skip("half logits are not read in place")
    rng = np.random.default_rng(seed_of("scale-bits", a, path, options))
    k = 1500  # above every SMALL_K: the row kernels
    x = (4 * rng.standard_normal((9, k))).astype(dtype)
    x[0, 3], x[1, :], x[2, 7], x[3, 11] = -np.inf, -np.inf, np.inf, np.nan
    target = rng.integers(0, k, 9)
    target[4] = -100
    kwargs = dict(reduction="none", return_z_loss=True, return_lse=True, z_loss=1e-3)
    if options == "smoothed":
        kwargs.update(label_smoothing=0.1, weight=rng.uniform(0.2, 2, k))
    compute = np.float32 if dtype == np.float16 else dtype
    if dtype == np.float16:
        kwargs["dtype"] = np.float32
    with np.errstate(invalid="ignore"):  # 0 x inf
        scaled_x = np.asarray(a, compute) * x.astype(compute)  # rounded to the compute dtype
    want = fast.cross_entropy_with_grad(scaled_x, target, **kwargs)
    logits = x.copy()
    got = fast.cross_entropy_with_grad(
        logits, target, logit_scale=a, out=logits if path == "in-place" else None, **kwargs
    )
    for i in (0, 2, 3):  # loss, z-term, lse
        np.testing.assert_array_equal(got[i], want[i])
    assert_close(got[1], a * want[1], compute)
    loss_only = fast.cross_entropy(x, target, logit_scale=a, **kwargs)
    for got_i, want_i in zip(loss_only, fast.cross_entropy(scaled_x, target, **kwargs), strict=True):
        np.testing.assert_array_equal(got_i, want_i)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_bounds_huge_and_masked_logits(impl):
    """tanh(+-inf) = +-1: a -inf (masked) logit becomes -c, a huge one +c; NaN stays NaN."""
    x = np.array([[np.inf, 0.0, -np.inf], [1e30, -1e30, 0.0], [np.nan, 0.0, 0.0]])
    z = np.array([[2.0, 0.0, -2.0], [2.0, -2.0, 0.0], [np.nan, 0.0, 0.0]])
    target = np.array([0, 1, 2])
    loss, grad = IMPLS[impl].cross_entropy_with_grad(x, target, softcap=2.0, reduction="none")
    want_loss, want_grad = ref.cross_entropy_with_grad(z, target, reduction="none")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-14)
    assert np.isnan(loss[2]) and np.all(np.isnan(grad[2]))
    # d tanh / dx is 0 at +-inf: those gradient entries vanish
    np.testing.assert_allclose(grad[:2], want_grad[:2] * (1 - (z[:2] / 2) ** 2), atol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))
def test_where_is_the_loss_of_the_selected_rows(impl, soft):
    rng, x, target = make(50, 8, np.float64, soft, ("where", impl, soft))
    keep = rng.random(50) > 0.4
    x[~keep] = np.nan  # excluded rows are never read into the result
    for reduction in ("mean", "sum"):
        got, grad = IMPLS[impl].cross_entropy_with_grad(x, target, where=keep, reduction=reduction)
        want, want_grad = IMPLS[impl].cross_entropy_with_grad(x[keep], target[keep], reduction=reduction)
        np.testing.assert_allclose(got, want, rtol=1e-13)
        np.testing.assert_allclose(grad[keep], want_grad, rtol=1e-12, atol=1e-16)
        assert np.all(grad[~keep] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_weights_scale_rows_and_the_mean_denominator(impl):
    rng, x, target = make(40, 9, np.float64, False, ("sample-weight", impl))
    v = rng.uniform(0, 3, 40)
    w = rng.uniform(0.5, 2, 9)
    rows = ref.cross_entropy(x, target, weight=w, reduction="none")
    got_none = IMPLS[impl].cross_entropy(x, target, weight=w, sample_weight=v, reduction="none")
    assert_close(got_none, v * rows, unit=1.0)
    counted = target != -100
    d = np.sum((v * w[np.where(counted, target, 0)])[counted])
    got_mean = IMPLS[impl].cross_entropy(x, target, weight=w, sample_weight=v)
    assert_close(got_mean, np.sum(v * rows) / d, unit=1.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("how", ("ignore_index", "where", "sample_weight"))
def test_all_ignored(impl, how):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    target = np.full(5, -100) if how == "ignore_index" else np.arange(5) % 4
    extra = {"ignore_index": {}, "where": dict(where=np.zeros(5, bool)), "sample_weight": dict(sample_weight=np.zeros(5))}[how]
    for all_ignored, expected in (("nan", np.nan), ("zero", 0.0)):
        loss, grad, z_term = IMPLS[impl].cross_entropy_with_grad(
            x, target, z_loss=1e-3, all_ignored=all_ignored, return_z_loss=True, **extra
        )
        np.testing.assert_array_equal([loss, z_term], [expected, expected])
        assert loss.dtype == np.float32 and np.all(grad == 0)
    # "zero" only changes an empty mean
    assert IMPLS[impl].cross_entropy(x, np.arange(5) % 4, all_ignored="zero") == IMPLS[impl].cross_entropy(
        x, np.arange(5) % 4
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_lse_for_every_row_including_ignored(impl):
    rng, x, target = make(30, 12, np.float32, False, ("lse", impl))
    target[:5] = -100
    keep = np.arange(30) % 3 > 0
    for fn in ("cross_entropy", "cross_entropy_with_grad"):
        *_, lse = getattr(IMPLS[impl], fn)(x, target, where=keep, return_lse=True)
        assert lse.dtype == np.float32 and lse.shape == (30,)
        np.testing.assert_allclose(lse, lse_float64(x), rtol=2e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_return_order(impl):
    x = np.zeros((3, 4))
    y = np.array([0, 1, 2])
    f = IMPLS[impl]
    assert np.ndim(f.cross_entropy(x, y)) == 0
    assert len(f.cross_entropy(x, y, return_lse=True)) == 2
    loss, z_term, lse = f.cross_entropy(x, y, z_loss=1.0, return_z_loss=True, return_lse=True)
    np.testing.assert_allclose([z_term, *lse], [np.log(4) ** 2, *[np.log(4)] * 3], rtol=1e-15)
    loss, grad, z_term = f.cross_entropy_with_grad(x, y, return_z_loss=True)
    assert grad.shape == (3, 4) and z_term == 0


# --- the class axis and other layouts -----------------------------------------------------

LAYOUTS = {
    "NKd": ((6, 11, 7), 1),
    "NKd1d2": ((3, 9, 4, 5), 1),
    "dK-last": ((4, 5, 13), -1),
    "K-first": ((13, 20), 0),
    "single-row": ((17,), 0),
}


@pytest.mark.parametrize("blocks", ("one", "many"))
@pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("f32", "f64"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_class_axis_equals_moving_it_last(layout, dtype, soft, blocks, monkeypatch):
    if blocks == "many":  # a handful of rows per copied block, blocks splitting inner axes
        monkeypatch.setattr(api, "COPY_BLOCK_LOGITS", 40)
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed_of(layout, soft))
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    k = shape[axis]
    moved = np.moveaxis(x, axis, -1)
    if soft:
        p = make_probs(rng, moved[..., 0].size, k, dtype).reshape(moved.shape)
        target, flat_target = np.moveaxis(p, -1, axis), p.reshape(-1, k)
    else:
        target = rng.integers(0, k, moved.shape[:-1])
        flat_target = target.reshape(-1)
    kwargs = dict(axis=axis, reduction="none", z_loss=1e-3, label_smoothing=0.05)
    for impl in IMPLS.values():
        loss, grad, z_term, lse = results(impl, "cross_entropy_with_grad", x, target, **kwargs)
        assert loss.shape == lse.shape == moved.shape[:-1] and grad.shape == x.shape
        flat = results(ref, "cross_entropy_with_grad", moved.reshape(-1, k), flat_target, **{**kwargs, "axis": -1})
        assert_all_close(
            (loss.reshape(-1), np.moveaxis(grad, axis, -1).reshape(-1, k), z_term.reshape(-1), lse.reshape(-1)),
            flat,
            dtype,
        )
        mean = impl.cross_entropy(x, target, axis=axis)
        assert_close(mean, ref.cross_entropy(moved.reshape(-1, k), flat_target), dtype, unit=1.0)


@pytest.mark.parametrize("out_layout", ("C", "F", "strided"))
def test_out_of_any_layout(out_layout, monkeypatch):
    monkeypatch.setattr(api, "COPY_BLOCK_LOGITS", 64)
    rng, x, target = make(37, 9, np.float32, False, ("out-layout",))
    want_loss, want_grad = fast.cross_entropy_with_grad(x, target)
    out = {
        "C": np.empty((37, 9), np.float32),
        "F": np.empty((37, 9), np.float32, order="F"),
        "strided": np.empty((37, 18), np.float32)[:, ::2],
    }[out_layout]
    loss, grad = fast.cross_entropy_with_grad(x, target, out=out)
    assert grad is out
    assert_close(loss, want_loss, unit=1.0)
    np.testing.assert_array_equal(grad, want_grad)  # row results do not depend on the layout


def test_pytorch_layout_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 7, 5, 3))
    y = rng.integers(0, 7, (4, 5, 3))
    y[0, 0, 0] = -100
    w = rng.uniform(0.5, 2, 7)
    for reduction in ("mean", "sum", "none"):
        xt = torch.tensor(x, requires_grad=True)
        want = torch.nn.functional.cross_entropy(
            xt, torch.tensor(y), weight=torch.tensor(w), reduction=reduction, label_smoothing=0.1
        )
        want.sum().backward()
        for impl in IMPLS.values():
            loss, grad = impl.cross_entropy_with_grad(x, y, axis=1, weight=w, reduction=reduction, label_smoothing=0.1)
            np.testing.assert_allclose(loss, want.detach().numpy(), rtol=1e-12)
            np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-16)


# --- float16 and bfloat16 logits ----------------------------------------------------------

HALF = {"f16": np.float16}
try:
    import ml_dtypes

    HALF["bf16"] = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    pass


@pytest.mark.parametrize("result", ("half", "float32"))
@pytest.mark.parametrize("soft", (False, True), ids=("int", "soft"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("half", HALF)
def test_half_logits_are_computed_in_float32(half, reduction, soft, result):
    dtype = np.dtype(HALF[half])
    rng, x32, target = make(200, 50, np.float32, soft, ("half", half, soft))
    x = x32.astype(dtype)
    kwargs = dict(reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
    if result == "float32":
        kwargs["dtype"] = np.float32
    want_dtype = np.dtype(np.float32) if result == "float32" else dtype
    before = snapshot(x, target)
    got = results(fast, "cross_entropy_with_grad", x, target, **kwargs)
    want = results(ref, "cross_entropy_with_grad", x, target, **kwargs)
    assert got[0].dtype == got[1].dtype == got[2].dtype == want_dtype and got[3].dtype == np.float32
    assert_all_close(got, want, want_dtype)
    # the same as the float32 call on the same values, rounded once at the end
    exact = results(fast, "cross_entropy_with_grad", x.astype(np.float32), target.astype(np.float32) if soft else target, **{**kwargs, "dtype": None})
    assert_all_close(got, tuple(np.asarray(e).astype(want_dtype) for e in exact[:3]) + exact[3:], want_dtype)
    loss_only = results(fast, "cross_entropy", x, target, **kwargs)
    assert_all_close(loss_only, want[:1] + want[2:], want_dtype)
    assert_unchanged(before)


@pytest.mark.parametrize("half", HALF)
def test_half_confident_row_keeps_the_target_gradient(half):
    """p_y - 1 for p_y ~ 1 is formed as -sum_{j != y} p_j in float32 and rounded once: a
    half-precision 1 - p_y would be 0 or a whole ulp of 1 (2^-11 / 2^-8) off."""
    dtype = np.dtype(HALF[half])
    x = np.zeros((1, 4), dtype)
    x[0, 0] = 9
    _, grad = fast.cross_entropy_with_grad(x, np.array([0]))
    exact = -3 * np.exp(-9.0) / (1 + 3 * np.exp(-9.0))  # ~ -3.7e-4
    np.testing.assert_allclose(float(grad[0, 0]), exact, rtol=reference.TOLERANCE[dtype]["rtol"])


@pytest.mark.half
def test_half_logits_in_place():
    rng, x32, target = make(64, 33, np.float32, False, ("half-in-place",))
    x = x32.astype(np.float16)
    want_loss, want_grad = fast.cross_entropy_with_grad(x, target)
    loss, grad = fast.cross_entropy_with_grad(x, target, out=x)
    assert grad is x and loss == want_loss
    np.testing.assert_array_equal(x, want_grad)


@pytest.mark.parametrize("option", ("softcap", "logit_scale"))
def test_none_turns_transforms_off(option):
    x = np.random.default_rng(1).standard_normal((5, 6))
    y = np.arange(5)
    assert fast.cross_entropy(x, y, **{option: None}) == fast.cross_entropy(x, y)


def test_half_conversions_round_like_numpy():
    """Every float16 / bfloat16 bit pattern to float32 exactly, and float32 values
    (random bits, subnormal results, overflow, ties) back to nearest even."""
    from fastsce._kernels import half as _half

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(0)
    with np.errstate(invalid="ignore"):
        neighbours = bits.view(np.float16).astype(np.float32) * np.float32(1 + 2**-11)  # ties and next to them
    x = np.concatenate(
        [
            rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
            (rng.standard_normal(100_000) * 1e-5).astype(np.float32),  # float16 subnormals
            np.array([0, -0.0, 65504, 65519.99, 65520, 2.98e-8, 2.99e-8, np.inf, -np.inf, np.nan], np.float32),
            neighbours,
        ]
    )
    finite = ~np.isnan(x)
    for half, view, load, store in (
        (np.float16, np.uint16, _half._load_float16, _half._store_float16),
        *([(HALF["bf16"], np.int16, _half._load_bfloat16, _half._store_bfloat16)] if "bf16" in HALF else []),
    ):
        widened = np.empty(bits.size, np.float32)
        load(bits.view(view), widened)
        want = bits.view(half).astype(np.float32)
        same = widened.view(np.uint32) == want.view(np.uint32)
        assert np.all(same | (np.isnan(want) & np.isnan(widened)))
        narrowed = np.empty(x.size, view)
        store(x, narrowed)
        with np.errstate(over="ignore", invalid="ignore"):
            want = x.astype(half).view(view)
        assert np.array_equal(narrowed[finite], want[finite])
        assert np.all(np.isnan(narrowed[~finite].view(half).astype(np.float32)))


@pytest.mark.parametrize("half", HALF)
def test_half_row_loops_fuse_the_conversions_bit_for_bit(half):
    """The half row kernels' fused passes (fastsce._kernels.half) against the passes they
    replace: load_row_max is the conversion, a rounded float32 product and the max;
    store_scaled(_minus) the scaling (rows._scale, rows._scale_minus_weight) then the
    rounding (store_row), bit for bit."""
    from fastsce._kernels import half as _half, rows as _rows

    dtype = HALF[half]
    store_row = _half._store_bfloat16 if half == "bf16" else _half._store_float16
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(1000) * 4).astype(np.float32)
    x[[3, 500]] = [-np.inf, np.inf]
    bits = _half.bits_view(x.astype(dtype))
    widened = x.astype(dtype).astype(np.float32)
    for a in (1.0, 0.7, -2.5):
        out = np.empty(x.size, np.float32)
        m = _half.load_row_max(bits, out, np.float32(a))
        want = np.float32(a) * widened
        np.testing.assert_array_equal(out, want)
        assert m == want.max()
    with_nan = bits.copy()
    with_nan[7] = _half.bits_view(np.array([np.nan], dtype))[0]
    assert np.isnan(_half.load_row_max(with_nan, np.empty(x.size, np.float32), np.float32(1)))

    g = (rng.standard_normal(1000) * 1e-3).astype(np.float32)
    w = rng.uniform(0, 2, 1000).astype(np.float32)
    f, b = np.float32(0.37), np.float32(1e-4)
    for fused, unfused in (
        (lambda h: _half.store_scaled(g, f, h), lambda t: _rows._scale(t, f)),
        (lambda h: _half.store_scaled_minus(g, f, b, w, h), lambda t: _rows._scale_minus_weight(t, f, b, w)),
    ):
        got = np.empty(g.size, bits.dtype)
        fused(got)
        scaled_row = g.copy()
        unfused(scaled_row)
        want = np.empty(g.size, bits.dtype)
        store_row(scaled_row, want)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("half", HALF)
def test_half_logits_match_torch(half):
    """Against PyTorch's half-precision cross_entropy on the CPU. (Not with label
    smoothing: PyTorch then sums the row's K log-probabilities in float16, which
    overflows to inf here; fastsce accumulates in float32/float64.)"""
    torch = pytest.importorskip("torch")
    dtype = np.dtype(HALF[half])
    rng, x32, y = make(64, 300, np.float32, False, ("half-torch", half))
    x = x32.astype(dtype)
    tx = torch.tensor(x.astype(np.float32)).to(torch.float16 if half == "f16" else torch.bfloat16)
    tx.requires_grad_(True)
    for reduction in ("mean", "none"):
        want = torch.nn.functional.cross_entropy(tx, torch.tensor(y), reduction=reduction)
        tx.grad = None
        want.sum().backward()
        loss, grad = fast.cross_entropy_with_grad(x, y, reduction=reduction)
        assert loss.dtype == grad.dtype == dtype
        got_loss, got_grad = np.asarray(loss, np.float32), grad.astype(np.float32)
        want_loss, want_grad = want.detach().float().numpy(), tx.grad.float().numpy()
        assert_close(got_loss, want_loss, dtype, unit=1.0)
        # PyTorch rounds p - [j = y] to the half dtype before dividing by N (fastsce
        # rounds once): entries may differ by an ulp or two of the largest one.
        ulp = float(np.abs(want_grad).max()) * {np.dtype(np.float16): 2**-10}.get(dtype, 2**-7)
        np.testing.assert_allclose(got_grad, want_grad, rtol=2 * reference.TOLERANCE[dtype]["rtol"], atol=2 * ulp)


def test_lse_matches_torch_logsumexp():
    torch = pytest.importorskip("torch")
    rng, x, y = make(50, 77, np.float64, False, ("lse-torch",))
    *_, lse = fast.cross_entropy(x, y, softcap=2.0, return_lse=True)
    want = torch.logsumexp(2.0 * torch.tanh(torch.tensor(x) / 2.0), dim=-1).numpy()
    np.testing.assert_allclose(lse, want, rtol=1e-14)


@pytest.mark.parametrize("in_place", (False, True), ids=("out", "in-place"))
@pytest.mark.parametrize("dtype", (np.float32, np.float64, np.float16), ids=("f32", "f64", "f16"))
@pytest.mark.parametrize("shape", ((2, 9, 64), (3, 5, 7, 11), (2, 300, 100), (1, 4, 1000)))
def test_classes_on_another_axis_read_in_place(shape, dtype, in_place, monkeypatch):
    """The tile kernel for C-contiguous (A, K, D) logits (every d here, also d < 64 and
    d not a multiple of the 64-row tile) against the reference, with every option it takes."""
    monkeypatch.setattr(api, "CLASS_MAJOR_MIN_D", 1)
    calls = []
    real = api.tile_kernels.class_major_loss
    monkeypatch.setattr(api.tile_kernels, "class_major_loss", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(seed_of(shape, in_place))
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    y = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    y.flat[::5] = -100
    kwargs = dict(
        axis=1, z_loss=1e-3, label_smoothing=0.1, weight=rng.uniform(0.5, 2, shape[1]), sample_weight=rng.random(y.shape)
    )
    if in_place:  # (and the logit transform, on one of the two passes)
        kwargs.update(logit_scale=1.3, softcap=4.0)
    for reduction in ("mean", "none"):
        want = results(ref, "cross_entropy_with_grad", x, y, reduction=reduction, **kwargs)
        buf = x.copy()
        got = fast.cross_entropy_with_grad(
            buf if in_place else x, y, out=buf if in_place else None, reduction=reduction,
            return_z_loss=True, return_lse=True, **kwargs,
        )  # fmt: skip
        assert_all_close(got, want, dtype)
        assert_all_close(results(fast, "cross_entropy", x, y, reduction=reduction, **kwargs), want[:1] + want[2:], dtype)
    assert len(calls) == 4


def test_float32_softcap_is_within_a_few_ulp_of_tanh():
    """The float32 rows' tanh (a polynomial below |u| = 0.55, the exp form above)
    against float64 tanh, over every scale from subnormal to saturated."""
    import numba

    from fastsce._kernels import rows as _kernels

    @numba.njit
    def softcap(x, out, a, c):
        _kernels._softcap_row(x, out, a, c)

    x = np.concatenate(
        [np.linspace(-20, 20, 400_001), np.logspace(-40, 1.5, 20_000), -np.logspace(-40, 1.5, 20_000)]
    ).astype(np.float32)
    out = np.empty_like(x)
    softcap(x, out, 1.0, 1.0)
    exact = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(out - exact) / ulp) <= 2.5
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)
    out = np.empty_like(special)
    softcap(special, out, 1.0, 1.0)
    np.testing.assert_array_equal(out, [0.0, -0.0, 1.0, -1.0, np.nan])


# --- extreme weights ---------------------------------------------------------------------

# Weight scales c that pass validation but leave the compute dtype's range when applied
# naively (float32 cannot hold 1e300; 1 / D overflows for D ~ 1e-320).
EXTREME = {np.float32: (1e300, 1e39, 1e-40, 1e-300), np.float64: (1e300, 1e-300, 1e-320, 8e307)}


@pytest.mark.parametrize(
    "soft, which", ((False, "weight"), (False, "sample_weight"), (True, "sample_weight")), ids=("int-w", "int-v", "soft-v")
)
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("f32", "f64"))
@pytest.mark.parametrize("impl", IMPLS)
def test_mean_is_unchanged_by_scaling_extreme_weights(impl, dtype, soft, which):
    """"mean" divides by the summed weight: c w gives the loss and gradient of w, for any c
    that passes validation (float32 with weight 1e300 gave NaN; float64 with 1e-320 a NaN
    gradient). (Probability targets divide by the summed row weights only.)"""
    rng, x, target = make(40, 10, dtype, soft, ("extreme", which))
    w = dict(weight=rng.uniform(0.5, 2, 10), sample_weight=rng.uniform(0.5, 2, 40))
    options = dict(label_smoothing=0.1, z_loss=1e-3, return_z_loss=True)
    for c in EXTREME[dtype]:
        given = w[which] * c  # (a subnormal c w carries fewer digits than w: compare with it
        # brought back exactly, by a power of two, into the normal range)
        got = IMPLS[impl].cross_entropy_with_grad(x, target, **dict(w, **{which: given}), **options)
        normal = dict(w, **{which: np.ldexp(given, -math.frexp(c)[1])})
        want = IMPLS[impl].cross_entropy_with_grad(x, target, **normal, **options)
        for a, b in zip(got, want, strict=True):
            assert np.all(np.isfinite(a)), (c, a)
            assert_close(a, b, dtype)


LINEAR_IN_W = [("int", "sum"), ("int", "none"), ("soft", "mean"), ("soft", "sum"), ("soft", "none")]


@pytest.mark.parametrize("target, reduction", LINEAR_IN_W, ids=[f"{t}-{r}" for t, r in LINEAR_IN_W])
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("f32", "f64"))
@pytest.mark.parametrize("impl", IMPLS)
def test_scaling_extreme_class_weights_scales_the_loss(impl, dtype, target, reduction):
    """Where the cross-entropy is linear in the class weights, c w gives c times the result
    of w when that fits the dtype; the z-loss, which class weights do not touch, stays."""
    rng, x, t = make(30, 12, dtype, target == "soft", ("extreme-linear", reduction))
    w = rng.uniform(0.5, 2, 12)
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, return_z_loss=True)
    fn = IMPLS[impl].cross_entropy_with_grad
    ce, ce_grad, _ = fn(x, t, weight=w, **dict(options, z_loss=0.0))
    _, z_grad, z_term = fn(x, t, weight=0 * w, **options)  # the z-loss alone
    for c in {np.float32: (1e30, 1e-30), np.float64: (1e300, 1e-290)}[dtype]:
        got_loss, got_grad, got_z = fn(x, t, weight=w * c, **options)
        assert_close(got_loss, (c * np.float64(ce) + z_term).astype(dtype), dtype)
        assert_close(got_z, z_term, dtype)
        assert_close(got_grad, (c * ce_grad.astype(np.float64) + z_grad).astype(dtype), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_weights_of_the_issue(impl):
    rng, x, target = make(8, 10, np.float32, False, ("issue-3",))
    want = IMPLS[impl].cross_entropy_with_grad(x, target)
    got = IMPLS[impl].cross_entropy_with_grad(x, target, weight=np.full(10, 1e300))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    x64 = x.astype(np.float64)
    got = IMPLS[impl].cross_entropy_with_grad(x64, target, weight=np.full(10, 1e-320))
    for a, b in zip(got, IMPLS[impl].cross_entropy_with_grad(x64, target), strict=True):
        assert_close(a, b)


# --- one answer for infinite rows, infinite targets, saturated softcaps ------------------

# (shape, axis): rows vectorised across (small K), along (K = 300), read in place (axis 1)
PATHS = {"K3": ((4, 3), -1), "K300": ((4, 300), -1), "axis1": ((2, 3, 40), 1)}


def _row_target(shape, axis):
    lead = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    return np.zeros(lead, np.int64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("f32", "f64"))
def test_lse_of_infinite_rows_is_that_of_logsumexp(dtype, path):
    """return_lse of a row of -inf only is -inf, of a row holding +inf +inf, of a NaN row
    NaN, whether the row counts or is skipped, as fastsce.logsumexp (it was NaN, or -inf
    when skipped, depending on the path)."""
    shape, axis = PATHS[path]
    x = np.moveaxis(np.random.default_rng(5).standard_normal(shape).astype(dtype), axis, -1).copy()
    flat = x.reshape(-1, x.shape[-1])
    flat[0] = -np.inf
    flat[1, 1] = np.inf
    flat[2, 0] = np.nan
    x = np.moveaxis(x, -1, axis)
    t = _row_target(shape, axis)
    want = fastsce_logsumexp = primitives.logsumexp(x, axis)
    assert np.isneginf(want.reshape(-1)[0]) and np.isposinf(want.reshape(-1)[1]) and np.isnan(want.reshape(-1)[2])
    for where in (None, np.zeros(t.shape, bool), np.ones(t.shape, bool)):
        for impl in IMPLS.values():
            for fn in ("cross_entropy", "cross_entropy_with_grad"):
                lse = getattr(impl, fn)(x, t, axis=axis, where=where, return_lse=True)[-1]
                assert_close(lse, fastsce_logsumexp, dtype)
    # with a logit_scale of -1 a row of -inf is a row of +inf
    lse = IMPLS["fast"].cross_entropy(x, t, axis=axis, logit_scale=-1.0, return_lse=True)[-1]
    assert np.isposinf(lse.reshape(-1)[0])
    assert_close(lse, IMPLS["ref"].cross_entropy(x, t, axis=axis, logit_scale=-1.0, return_lse=True)[-1], dtype)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("k", (3, 40))
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("f32", "f64"))
def test_infinite_probabilities_as_the_reference_and_torch(dtype, k, reduction):
    """A target probability of +-inf makes the loss +-inf (as PyTorch and the reference);
    the kernels' a log s - b form gave inf - inf = NaN."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, k)).astype(dtype)
    x[0, 0] = x[0].max() + 1  # the max itself (z - m = 0 there)
    t = make_probs(rng, 4, k, np.float64).astype(dtype)
    t[0, 0], t[1, 1], t[2, 2] = np.inf, -np.inf, np.inf
    for eps in (0.0, 0.1):
        options = dict(reduction=reduction, label_smoothing=eps)
        xt = torch.tensor(x, requires_grad=True)
        loss_t = torch.nn.functional.cross_entropy(xt, torch.tensor(t), **options)
        loss_t.sum().backward()
        for impl in IMPLS.values():
            assert_close(impl.cross_entropy(x, t, **options), loss_t.detach().numpy(), dtype)
            loss, grad = impl.cross_entropy_with_grad(x, t, **options)
            assert_close(loss, loss_t.detach().numpy(), dtype)
            np.testing.assert_array_equal(np.isnan(grad), np.isnan(xt.grad.numpy()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("f32", "f64"))
def test_saturated_softcap_has_a_zero_gradient(dtype, path):
    """z = c tanh(x / c) = +-c exactly: dz/dx is exactly 0 (a rounded 1 / c left 1.4e-6
    in float32 with a z-loss)."""
    shape, axis = PATHS[path]
    x = np.where(np.random.default_rng(7).random(shape) < 0.5, -1e30, 1e30).astype(dtype)
    t = _row_target(shape, axis)
    for impl in IMPLS.values():
        _, grad = impl.cross_entropy_with_grad(x, t, axis=axis, softcap=53.55, z_loss=0.9)
        np.testing.assert_array_equal(grad, 0)
