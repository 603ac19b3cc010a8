"""fastsce.linear_cross_entropy(_with_grad): the loss of logits = h Wᵀ + b computed a tile of
rows at a time, against the NumPy reference (full logits), finite differences and PyTorch;
denominator= on the cross-entropy functions; bad input; the torch adapter."""

import json
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import fastsce
from fastsce import linear, reference
from _cases import FD_STEP, FD_TOL, assert_close, assert_unchanged, seed_of, snapshot

N, H, V = 23, 6, 40  # V <= 128: the small-K tile kernels
V_WIDE = 300  # the row kernels


def make(n=N, h=H, v=V, dtype=np.float64, *, seed=None, bias=False, ignore=True):
    rng = np.random.default_rng(seed_of(n, h, v, np.dtype(dtype).name, bias) if seed is None else seed)
    x = rng.standard_normal((n, h)).astype(dtype)
    w = (rng.standard_normal((v, h)) * 1.5).astype(dtype)
    y = rng.integers(0, v, n)
    if ignore:
        y[2::5] = -100
    kwargs = {"linear_bias": rng.standard_normal(v).astype(dtype)} if bias else {}
    return x, w, y, kwargs, rng


def options(name, rng, n, v):
    """One option set of the matrix, by name."""
    return {
        "plain": {},
        "weight": {"weight": rng.uniform(0.25, 2.0, v)},
        "ignore_index": {"ignore_index": 3},
        "sum": {"reduction": "sum"},
        "none": {"reduction": "none"},
        "label_smoothing": {"label_smoothing": 0.1},
        "z_loss": {"z_loss": 1e-2, "return_z_loss": True},
        "logit_scale": {"logit_scale": 0.5},
        "softcap": {"softcap": 3.0},
        "sample_weight": {"sample_weight": rng.uniform(0, 2, n)},
        "where": {"where": rng.random(n) < 0.7},
        "return_lse": {"return_lse": True},
        "everything": {
            "weight": rng.uniform(0.25, 2.0, v), "label_smoothing": 0.05, "z_loss": 1e-3, "logit_scale": 1.3,
            "softcap": 4.0, "sample_weight": rng.uniform(0, 2, n), "where": rng.random(n) < 0.8,
            "return_z_loss": True, "return_lse": True,
        },  # fmt: skip
        "everything-none": {"reduction": "none", "z_loss": 1e-3, "softcap": 4.0, "return_z_loss": True, "return_lse": True},
    }[name]


OPTION_SETS = (
    "plain", "weight", "ignore_index", "sum", "none", "label_smoothing", "z_loss", "logit_scale", "softcap",
    "sample_weight", "where", "return_lse", "everything", "everything-none",
)  # fmt: skip


def compare(got, want, dtype, grads=(1, 2, 3)):
    """Every output of one call to the reference's tolerance, each gradient (the outputs
    at ``grads``: sums over rows, with cancellations) on the scale of its largest entry."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, i
            continue
        assert np.asarray(a).dtype == np.asarray(b).dtype, (i, np.asarray(a).dtype, np.asarray(b).dtype)
        assert np.shape(a) == np.shape(b), i
        unit = float(np.max(np.abs(b), initial=0.0)) if i in grads else 0.0
        assert_close(a, b, dtype, unit=unit)


@pytest.mark.parametrize("chunk_rows", (1, 4, None))
@pytest.mark.parametrize("bias", (False, True), ids=("no-bias", "bias"))
@pytest.mark.parametrize("dtype", (np.float64, np.float32), ids=("f64", "f32"))
@pytest.mark.parametrize("name", OPTION_SETS)
def test_matches_reference(name, dtype, bias, chunk_rows):
    x, w, y, kwargs, rng = make(dtype=dtype, bias=bias)
    kwargs.update(options(name, rng, N, V))
    if "ignore_index" in kwargs:
        y[y == -100] = kwargs["ignore_index"]
    snap = snapshot(x, w, y, *kwargs.values())
    got = fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=chunk_rows, **kwargs)
    want = reference.linear_cross_entropy_with_grad(x, w, y, **kwargs)
    compare(got, want, dtype)
    loss_only = fastsce.linear_cross_entropy(x, w, y, chunk_rows=chunk_rows, **kwargs)
    want_loss = reference.linear_cross_entropy(x, w, y, **kwargs)
    extras = kwargs.get("return_z_loss", False) or kwargs.get("return_lse", False)
    compare(loss_only if extras else (loss_only,), want_loss if extras else (want_loss,), dtype, grads=())
    assert_unchanged(snap)
    assert got[3] is None if not bias else got[3].shape == (V,)


# (chunk_rows, chunk_classes) that split the V = 40 classes: uneven blocks, a block of
# one class, a block per class, the rows in one tile or several
SPLITS = ((None, 7), (4, 16), (1, 39), (23, 1))


# every option set with the first two, a subset with the extreme blocks
SPLIT_CASES = [
    pytest.param(name, split, id=f"{name}-{split[0]}x{split[1]}")
    for split in SPLITS
    for name in OPTION_SETS
    if split[1] not in (1, 39) or name in ("plain", "everything", "everything-none", "weight")
]


@pytest.mark.parametrize("bias", (False, True), ids=("no-bias", "bias"))
@pytest.mark.parametrize("dtype", (np.float64, np.float32), ids=("f64", "f32"))
@pytest.mark.parametrize("name, split", SPLIT_CASES)
def test_class_split_matches_reference(name, split, dtype, bias):
    """Tiles of a block of classes (chunk_classes < V): the per-row statistics folded
    block by block, then the gradient block by block, as the whole-row tiles."""
    chunk_rows, chunk_classes = split
    x, w, y, kwargs, rng = make(dtype=dtype, bias=bias)
    kwargs.update(options(name, rng, N, V))
    if "ignore_index" in kwargs:
        y[y == -100] = kwargs["ignore_index"]
    snap = snapshot(x, w, y, *kwargs.values())
    tile = {"chunk_rows": chunk_rows, "chunk_classes": chunk_classes}
    got = fastsce.linear_cross_entropy_with_grad(x, w, y, **tile, **kwargs)
    compare(got, reference.linear_cross_entropy_with_grad(x, w, y, **kwargs), dtype)
    loss_only = fastsce.linear_cross_entropy(x, w, y, **tile, **kwargs)
    want_loss = reference.linear_cross_entropy(x, w, y, **kwargs)
    extras = kwargs.get("return_z_loss", False) or kwargs.get("return_lse", False)
    compare(loss_only if extras else (loss_only,), want_loss if extras else (want_loss,), dtype, grads=())
    assert_unchanged(snap)


def test_extreme_logits_with_split_classes():
    """-inf logits (a masked class through the bias), a block of -inf only, huge logits
    and a row whose max lies in a late block: the folded statistics as the reference."""
    x, w, y, kwargs, _ = make(bias=True, ignore=False)
    b = kwargs["linear_bias"]
    b[:8] = -np.inf  # the first block (chunk_classes=8) all -inf
    b[20] = -np.inf
    y[(y < 8) | (y == 20)] = 30
    b[35:] += 400.0  # the rows' max in the last block
    for options_ in ({}, {"label_smoothing": 0.1, "weight": np.linspace(1, 2, V)}, {"z_loss": 1e-3}):
        got = fastsce.linear_cross_entropy_with_grad(x, w, y, linear_bias=b, chunk_rows=5, chunk_classes=8, **options_)
        want = reference.linear_cross_entropy_with_grad(x, w, y, linear_bias=b, **options_)
        compare(got, want, np.float64)


def test_default_tile():
    """Whole rows when min(N, MIN_WHOLE_ROWS) of them fit in the budget (TILE_BYTES, or
    an eighth of the weight when more), else min(N, MIN_TILE_ROWS) rows by equal blocks
    of classes; chunk_rows alone keeps whole rows."""
    budget, few, most = linear.TILE_BYTES, linear.MIN_WHOLE_ROWS, linear.MIN_TILE_ROWS
    assert linear._tile(4096, 1000, 1024, 4, None, None) == (budget // 4000, 1000)
    assert linear._tile(4096, 32000, 1024, 4, None, None) == (budget // 128000, 32000)  # 393 rows
    assert linear._tile(10, 10**6, 4, 4, None, None) == (budget // (4 * 10**6), 10**6)  # 12 rows fit: 10 asked
    # a weight of 1 GB: its eighth holds H / 8 = 256 whole rows
    assert linear._tile(2048, 128256, 2048, 4, None, None) == (few, 128256)
    for n, v, h, itemsize in ((4096, 128256, 1024, 4), (5000, 10**6, 4, 8), (300, 10**6, 4, 4), (100, 10**6, 64, 4)):
        rows, cols = linear._tile(n, v, h, itemsize, None, None)
        room = max(budget, v * h * itemsize // 8)
        assert room // (v * itemsize) < min(n, few)  # too few whole rows fit
        assert rows == min(n, most) and cols < v and rows * cols * itemsize <= room, (n, v)
        blocks = -(-v // cols)
        assert blocks == -(-v // (room // (rows * itemsize)))  # as few blocks as fit
        assert v - (blocks - 1) * cols >= cols - 16 * blocks  # of (nearly) equal size
    assert linear._tile(4096, 32000, 1024, 4, 100, None) == (100, 32000)
    assert linear._tile(4096, 32000, 1024, 4, 100, 5000) == (100, 5000)
    assert linear._tile(4096, 32000, 1024, 4, None, 4000) == (budget // 16000, 4000)
    assert linear._tile(4096, 32000, 1024, 4, None, 10**6) == (budget // 128000, 32000)
    assert linear._tile(4096, 128256, 2048, 4, None, 4000) == (128256 * 2048 // 8 // 4000, 4000)


def test_default_split_of_a_wide_vocabulary(monkeypatch):
    """V wider than a tile of rows: the default splits the classes (here with a budget
    of 2 KiB: tiles of 16 rows x 32 classes) and matches the reference."""
    monkeypatch.setattr(linear, "TILE_BYTES", 2048)
    monkeypatch.setattr(linear, "MIN_WHOLE_ROWS", 16)
    monkeypatch.setattr(linear, "MIN_TILE_ROWS", 16)
    x, w, y, kwargs, _ = make(50, H, V_WIDE, np.float32, bias=True)
    kwargs.update(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, return_lse=True)
    assert linear._linear_setup(x, w, y, kwargs).tile == (16, 32)
    got = fastsce.linear_cross_entropy_with_grad(x, w, y, **kwargs)
    compare(got, reference.linear_cross_entropy_with_grad(x, w, y, **kwargs), np.float32)


def test_vocabulary_of_a_million():
    """V = 10^6 (4 MB a float32 row): the default tile splits the classes."""
    rng = np.random.default_rng(5)
    v, n = 10**6, 20
    x = rng.standard_normal((n, 4), dtype=np.float32)
    w = rng.standard_normal((v, 4), dtype=np.float32)
    y = rng.integers(0, v, n)
    assert linear._linear_setup(x, w, y, {}).tile[1] < v
    got = fastsce.linear_cross_entropy_with_grad(x, w, y, label_smoothing=0.1)
    compare(got, reference.linear_cross_entropy_with_grad(x, w, y, label_smoothing=0.1), np.float32)


@pytest.mark.parametrize("dtype", (np.float64, np.float32), ids=("f64", "f32"))
def test_wide_rows_and_nd_input(dtype):
    """V beyond the small-K kernels, input (2, 3, 5, H) with a target (2, 3, 5)."""
    x, w, y, kwargs, rng = make(30, H, V_WIDE, dtype, bias=True)
    x, y = x.reshape(2, 3, 5, H), y.reshape(2, 3, 5)
    kwargs.update(label_smoothing=0.1, z_loss=1e-3, return_lse=True)
    for chunk_rows, chunk_classes in ((1, None), (7, None), (None, None), (7, 64), (None, 100)):
        got = fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=chunk_rows, chunk_classes=chunk_classes, **kwargs)
        compare(got, reference.linear_cross_entropy_with_grad(x, w, y, **kwargs), dtype)
    assert got[1].shape == x.shape and got[-1].shape == y.shape


def test_all_ignored_and_no_rows():
    x, w, y, _, _ = make()
    y[:] = -100
    loss, gx, gw, _ = fastsce.linear_cross_entropy_with_grad(x, w, y)
    assert np.isnan(loss) and not gx.any() and not gw.any()
    assert fastsce.linear_cross_entropy_with_grad(x, w, y, all_ignored="zero")[0] == 0.0
    loss, gx, gw, gb = fastsce.linear_cross_entropy_with_grad(x[:0], w, y[:0], linear_bias=np.zeros(V))
    assert np.isnan(loss) and gx.shape == (0, H) and not gw.any() and not gb.any()
    assert fastsce.linear_cross_entropy(x[:0], w, y[:0], reduction="none").shape == (0,)


def test_layouts_of_input_and_weight():
    """A transposed (Fortran-order) weight and a strided input give the same results."""
    x, w, y, kwargs, _ = make(bias=True)
    want = fastsce.linear_cross_entropy_with_grad(x, w, y, **kwargs)
    wf = np.asfortranarray(w)
    xs = np.repeat(x, 2, axis=1)[:, ::2]
    got = fastsce.linear_cross_entropy_with_grad(xs, wf, y, **kwargs)
    compare(got, want, np.float64)
    w_strided = np.repeat(w, 2, axis=0)[::2]
    compare(fastsce.linear_cross_entropy_with_grad(x, w_strided, y, **kwargs), want, np.float64)
    for weight in (wf, w_strided):  # blocks of classes of a weight SciPy's gemm would copy
        compare(fastsce.linear_cross_entropy_with_grad(xs, weight, y, chunk_classes=9, **kwargs), want, np.float64)


def test_same_results_for_any_thread_count():
    x, w, y, kwargs, rng = make(64, H, V_WIDE, np.float32, bias=True)
    kwargs.update(label_smoothing=0.1, sample_weight=rng.random(64))
    # class-split tiles of 512 x 200 logits: beyond SERIAL_LOGITS, so the threaded kernels
    xs, ws, ys, split_kwargs, rng = make(512, H, V_WIDE, np.float32, bias=True)
    split_kwargs.update(label_smoothing=0.1, z_loss=1e-3, sample_weight=rng.random(512))
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            runs.append(fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=16, **kwargs))
            runs.append(fastsce.linear_cross_entropy_with_grad(xs, ws, ys, chunk_classes=200, **split_kwargs))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(runs[0], runs[-2]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(runs[1], runs[-1]):
        np.testing.assert_array_equal(a, b)


def test_gemm_and_numpy_accumulation_agree(monkeypatch):
    x, w, y, kwargs, _ = make(dtype=np.float32, bias=True)
    want = fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=5, **kwargs)
    split = fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=5, chunk_classes=12, **kwargs)
    monkeypatch.setattr(linear, "_GEMM", False)
    got = fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=5, **kwargs)
    compare(got, want, np.float32)
    compare(fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=5, chunk_classes=12, **kwargs), split, np.float32)


def test_float32_weight_gradient_error_like_unfused():
    """The float32 weight gradient accumulated tile by tile is as close to a float64 one
    as the unfused float32 Gᵀ h (the reason fastsce.linear accumulates in float32)."""
    x, w, y, _, _ = make(512, 32, 500, np.float32, ignore=False)
    exact = reference.linear_cross_entropy_with_grad(x.astype(np.float64), w.astype(np.float64), y)[2]
    unfused = reference.linear_cross_entropy_with_grad(x, w, y)[2]
    scale = np.abs(exact).max()
    unfused_error = np.abs(unfused - exact).max() / scale
    for tile in ((1, None), (16, None), (128, None), (128, 100), (512, 64)):
        fused = fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=tile[0], chunk_classes=tile[1])[2]
        assert np.abs(fused - exact).max() / scale <= max(4 * unfused_error, 1e-6), tile


# --- the reference against finite differences --------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"reduction": "sum", "label_smoothing": 0.2, "weight": np.linspace(0.5, 2, 7)},
        {"z_loss": 0.05, "softcap": 2.0, "logit_scale": 0.7, "sample_weight": np.array([0.5, 1, 2, 0, 1.5])},
        {"reduction": "none"},
    ],
    ids=("plain", "sum-smoothing-weight", "zloss-softcap-scale-rows", "none"),
)
def test_reference_matches_finite_differences(kwargs):
    x, w, y, extra, _ = make(5, 3, 7, seed=1, bias=True, ignore=False)
    kwargs = dict(kwargs, **extra)
    _, gx, gw, gb = reference.linear_cross_entropy_with_grad(x, w, y, **kwargs)

    def loss(x, w, b):
        return float(np.sum(reference.linear_cross_entropy(x, w, y, **dict(kwargs, linear_bias=b))))

    args = [x, w, kwargs["linear_bias"]]
    for which, grad in enumerate((gx, gw, gb)):
        fd = np.empty_like(grad)
        for i in np.ndindex(grad.shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[which][i] += FD_STEP
            minus[which][i] -= FD_STEP
            fd[i] = (loss(*plus) - loss(*minus)) / (2 * FD_STEP)
        np.testing.assert_allclose(grad, fd, **FD_TOL)


# --- denominator= ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", (fastsce, reference), ids=("fast", "ref"))
def test_micro_batches_add_up_to_the_full_batch(impl):
    """With the full batch's D (and D_z), micro-batch losses and gradients sum to the full
    batch's: cross_entropy_with_grad and linear_cross_entropy_with_grad."""
    x, w, y, kwargs, rng = make(24, H, V, bias=True)
    cw = rng.uniform(0.5, 2, V)
    kwargs.update(weight=cw, z_loss=1e-2, label_smoothing=0.1)
    counted = y != -100
    d, d_z = float(cw[y[counted]].sum()), float(counted.sum())
    full = impl.linear_cross_entropy_with_grad(x, w, y, **kwargs)
    parts = [
        impl.linear_cross_entropy_with_grad(x[i : i + 8], w, y[i : i + 8], denominator=(d, d_z), **kwargs)
        for i in range(0, 24, 8)
    ]
    np.testing.assert_allclose(sum(p[0] for p in parts), full[0], rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full[1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sum(p[2] for p in parts), full[2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sum(p[3] for p in parts), full[3], rtol=1e-12, atol=1e-15)

    z = x @ w.T
    ce = dict(weight=cw, z_loss=1e-2)
    full = impl.cross_entropy_with_grad(z, y, **ce)
    parts = [impl.cross_entropy_with_grad(z[i : i + 8], y[i : i + 8], denominator=(d, d_z), **ce) for i in (0, 8, 16)]
    np.testing.assert_allclose(sum(p[0] for p in parts), full[0], rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full[1], rtol=1e-12, atol=1e-15)
    # one number sets both denominators; 0 follows all_ignored
    one = impl.cross_entropy(z, y, denominator=5.0)
    np.testing.assert_allclose(one, impl.cross_entropy(z, y, reduction="sum") / 5.0, rtol=1e-12)
    assert np.isnan(impl.cross_entropy(z, y, denominator=0))
    assert impl.cross_entropy(z, y, denominator=0, all_ignored="zero") == 0


@pytest.mark.parametrize(
    "denominator, reduction, match",
    [
        (4.0, "sum", "only applies to reduction='mean'"),
        (-1.0, "mean", "denominator must be a finite number >= 0"),
        (float("nan"), "mean", "denominator must be a finite number"),
        ((1.0, 2.0, 3.0), "mean", "a number or a pair"),
    ],
)
@pytest.mark.parametrize("impl", (fastsce, reference), ids=("fast", "ref"))
def test_bad_denominator(impl, denominator, reduction, match):
    x, w, y, _, _ = make()
    with pytest.raises(ValueError, match=match):
        impl.cross_entropy_with_grad(x @ w.T, y, reduction=reduction, denominator=denominator)
    with pytest.raises(ValueError, match=match):
        impl.linear_cross_entropy_with_grad(x, w, y, reduction=reduction, denominator=denominator)


# --- bad input ---------------------------------------------------------------------------


def bad_cases():
    x, w, y, _, _ = make()
    return {
        "H mismatch": ((x, w[:, :-1], y), {}, ValueError, r"linear_weight has shape \(40, 5\) but input has H=6"),
        "weight not 2-D": ((x, w[None], y), {}, ValueError, "linear_weight must be 2-D"),
        "weight 1-D": ((x, w[0], y), {}, ValueError, "linear_weight must be 2-D"),
        "bias length": ((x, w, y), {"linear_bias": np.zeros(V + 1)}, ValueError, r"linear_bias has shape \(41,\)"),
        "class weights length": ((x, w, y), {"weight": np.ones(V - 1)}, ValueError, r"weight has shape \(39,\) but linear_weight has V=40"),
        "label >= V": ((x, w, np.where(y == -100, V, y)), {}, IndexError, r"target\[2\] = 40 is not a class index"),
        "negative label": ((x, w, np.where(y == -100, -3, y)), {}, IndexError, r"target\[2\] = -3"),
        "dtype mix": ((x.astype(np.float32), w, y), {}, TypeError, "linear_weight has dtype float64 but input has dtype float32"),
        "bias dtype": ((x, w, y), {"linear_bias": np.zeros(V, np.float32)}, TypeError, "linear_bias has dtype float32"),
        "half input": ((x.astype(np.float16), w.astype(np.float16), y), {}, TypeError, "input must be float32 or float64"),
        "int weight": ((x, w.astype(int), y), {}, TypeError, "linear_weight must be float32 or float64"),
        "H = 0": ((x[:, :0], w[:, :0], y), {}, ValueError, "H >= 1"),
        "V = 0": ((x, w[:0], y), {}, ValueError, "at least one row"),
        "0-d input": ((x[0, 0], w, y), {}, ValueError, "H >= 1"),
        "target shape": ((x, w, y[:-1]), {}, ValueError, r"target has shape \(22,\) but input has shape \(23, 6\)"),
        "probability target": ((x, w, np.ones((N, V))), {}, ValueError, "probability targets are not supported"),
        "float target": ((x, w, y.astype(float)), {}, TypeError, "target must be an integer array"),
        "chunk_rows 0": ((x, w, y), {"chunk_rows": 0}, ValueError, "chunk_rows must be an integer >= 1"),
        "chunk_rows float": ((x, w, y), {"chunk_rows": 2.0}, ValueError, "chunk_rows must be an integer"),
        "chunk_classes 0": ((x, w, y), {"chunk_classes": 0}, ValueError, r"chunk_classes must be an integer >= 1 \(classes"),
        "chunk_classes bool": ((x, w, y), {"chunk_classes": True}, ValueError, "chunk_classes must be an integer"),
        "sample_weight shape": ((x, w, y), {"sample_weight": np.ones(N + 1)}, ValueError, "sample_weight has shape"),
        "reduction": ((x, w, y), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        "softcap": ((x, w, y), {"softcap": 0.0}, ValueError, "softcap must be > 0"),
    }  # fmt: skip


@pytest.mark.parametrize("impl", (fastsce, reference), ids=("fast", "ref"))
@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_input(case, impl):
    args, kwargs, error, match = bad_cases()[case]
    snap = snapshot(*args, *kwargs.values())
    with pytest.raises(error, match=match):
        impl.linear_cross_entropy_with_grad(*args, **kwargs)
    with pytest.raises(error, match=match):
        impl.linear_cross_entropy(*args, **kwargs)
    assert_unchanged(snap)


# --- PyTorch -----------------------------------------------------------------------------

torch = pytest.importorskip("torch")
F = torch.nn.functional
fastsce_torch = pytest.importorskip("fastsce.torch")

TORCH_OPTIONS = {
    "plain": {},
    "weight": {"weight": np.linspace(0.5, 2, V)},
    "ignore_index": {"ignore_index": 3},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "smoothing": {"label_smoothing": 0.1, "weight": np.linspace(0.5, 2, V)},
}


@pytest.mark.parametrize("bias", (False, True), ids=("no-bias", "bias"))
@pytest.mark.parametrize("name", TORCH_OPTIONS)
def test_matches_pytorch_float64(name, bias):
    """fastsce.linear_cross_entropy_with_grad against F.linear_cross_entropy (chunked and
    not) and F.cross_entropy(F.linear(...)), autograd's gradients, float64."""
    x, w, y, kwargs, _ = make(bias=bias)
    kwargs.update(TORCH_OPTIONS[name])
    if "ignore_index" in kwargs:
        y[y == -100] = kwargs["ignore_index"]
    loss, gx, gw, gb = fastsce.linear_cross_entropy_with_grad(x, w, y, chunk_rows=5, **kwargs)
    t = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    b = t.pop("linear_bias", None)
    weight = t.pop("weight", None)
    runs = {
        "eager": lambda xt, wt, bt: F.cross_entropy(F.linear(xt, wt, bt), torch.from_numpy(y), weight=weight, **t),
        "linear_cross_entropy": lambda xt, wt, bt: F.linear_cross_entropy(
            xt, wt, torch.from_numpy(y), linear_bias=bt, weight=weight, **t
        ),
    }
    if name in ("plain", "sum", "weight", "ignore_index"):  # the options its chunked path covers
        runs["chunked"] = lambda xt, wt, bt: F.linear_cross_entropy(
            xt, wt, torch.from_numpy(y), linear_bias=bt, weight=weight,
            options=torch.nn.LinearCrossEntropyOptions(), **t,
        )  # fmt: skip
    for label, fn in runs.items():
        xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
        bt = None if b is None else b.clone().requires_grad_()
        out = fn(xt, wt, bt)
        out.sum().backward()
        np.testing.assert_allclose(loss, out.detach().numpy(), rtol=1e-11, atol=1e-13, err_msg=label)
        for mine, theirs in ((gx, xt.grad), (gw, wt.grad), (gb, None if bt is None else bt.grad)):
            if mine is not None:
                np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-10, atol=1e-13, err_msg=label)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_torch_adapter_gradcheck(reduction):
    x, w, y, kwargs, rng = make(9, 4, 11, seed=2, bias=True)
    xt, wt, bt = (torch.from_numpy(a).requires_grad_() for a in (x, w, kwargs["linear_bias"]))
    yt = torch.from_numpy(y)
    extras = dict(z_loss=1e-2, softcap=3.0, sample_weight=torch.from_numpy(rng.uniform(0, 2, 9)))

    def fn(xt, wt, bt):
        return fastsce_torch.linear_cross_entropy(
            xt, wt, yt, linear_bias=bt, reduction=reduction, label_smoothing=0.1, chunk_rows=4, **extras
        )

    def split(xt, wt, bt):
        return fastsce_torch.linear_cross_entropy(
            xt, wt, yt, linear_bias=bt, reduction=reduction, label_smoothing=0.1, chunk_classes=4, **extras
        )

    assert torch.autograd.gradcheck(fn, (xt, wt, bt))
    assert torch.autograd.gradcheck(split, (xt, wt, bt))
    # only the gradients asked for; loss only under no_grad
    xt2 = torch.from_numpy(x)
    out = fastsce_torch.linear_cross_entropy(xt2, wt, yt, reduction=reduction)
    out.sum().backward()
    assert xt2.grad is None and wt.grad is not None
    with torch.no_grad():
        plain = fastsce_torch.linear_cross_entropy(xt, wt, yt, linear_bias=bt, reduction=reduction)
    expected = F.cross_entropy(F.linear(xt, wt, bt), yt, reduction=reduction)
    np.testing.assert_allclose(plain.numpy(), expected.detach().numpy(), rtol=1e-12)


def test_torch_adapter_falls_back_and_rejects():
    x, w, y, _, _ = make()
    xt = torch.from_numpy(x).to(torch.bfloat16)
    wt = torch.from_numpy(w).to(torch.bfloat16)
    got = fastsce_torch.linear_cross_entropy(xt, wt, torch.from_numpy(y))
    assert got.dtype == torch.bfloat16  # PyTorch's own
    with pytest.raises(ValueError, match="fastsce options"):
        fastsce_torch.linear_cross_entropy(xt, wt, torch.from_numpy(y), z_loss=1e-3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fastsce_torch.linear_cross_entropy(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(y), zloss=1)


def test_torch_adapter_trains_like_pytorch():
    """200 steps of SGD on a small two-layer classifier: the loss curve of
    fastsce.torch.linear_cross_entropy follows F.cross_entropy(F.linear(...))'s."""
    rng = np.random.default_rng(7)
    data = torch.from_numpy(rng.standard_normal((64, 10)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 50, 64))
    labels[::9] = -100
    curves = {}
    for name in ("fastsce", "torch"):
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh())
        head = torch.nn.Linear(16, 50)
        params = list(body.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.5)
        curve = []
        for _ in range(200):
            opt.zero_grad()
            hidden = body(data)
            if name == "fastsce":
                loss = fastsce_torch.linear_cross_entropy(
                    hidden, head.weight, labels, linear_bias=head.bias, label_smoothing=0.05, chunk_rows=16
                )
            else:
                loss = F.cross_entropy(head(hidden), labels, label_smoothing=0.05)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[name] = np.array(curve)
    assert curves["torch"][-1] < 0.5 * curves["torch"][0]  # it learns
    np.testing.assert_allclose(curves["fastsce"], curves["torch"], rtol=2e-4, atol=1e-5)


# --- memory ------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, tracemalloc
    import numpy as np
    import fastsce

    def peak_bytes(fn):
        fn()  # compile and warm up outside the trace
        tracemalloc.start()
        try:
            out = fn()
            return tracemalloc.get_traced_memory()[1], out
        finally:
            tracemalloc.stop()

    peaks = {}
    for name, (n, h, v, chunk_rows, chunk_classes, grad) in json.loads(sys.argv[1]).items():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, h), dtype=np.float32)
        w = rng.standard_normal((v, h), dtype=np.float32)
        b = rng.standard_normal(v, dtype=np.float32)
        y = rng.integers(0, v, n)
        fn = fastsce.linear_cross_entropy_with_grad if grad else fastsce.linear_cross_entropy
        tile = dict(chunk_rows=chunk_rows, chunk_classes=chunk_classes)
        peak, out = peak_bytes(lambda: fn(x, w, y, linear_bias=b, label_smoothing=0.1, **tile))
        returned = sum(a.nbytes for a in (out if grad else (out,)) if isinstance(a, np.ndarray))
        peaks[name] = peak - returned
    print(json.dumps(peaks))
    """
)

# name -> (N, H, V, chunk_rows, chunk_classes, with gradients)
MEMORY_CASES = {
    "grad-N2048": (2048, 16, 3000, 128, None, True),
    "grad-N16384": (16384, 16, 3000, 128, None, True),
    "loss-N16384": (16384, 16, 3000, 128, None, False),
    "default-tile-N32768": (32768, 8, 2000, None, None, True),
    "split-N2048-V20000": (2048, 8, 20000, 256, 1000, True),
    "split-N8192-V20000": (8192, 8, 20000, 256, 1000, True),
    "split-N2048-V80000": (2048, 8, 80000, 256, 1000, True),
    "split-loss-N8192-V80000": (8192, 8, 80000, 256, 1000, False),
}


@pytest.fixture(scope="module")
def extra_memory():
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, json.dumps(MEMORY_CASES)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_extra_memory_bounded_independent_of_n(extra_memory):
    """Beyond the inputs and the returned gradients: the tile of logits, the kernels'
    per-thread scratch and O(V) vectors, whatever N; the default tile within 64 MiB."""
    for name, (n, h, v, chunk_rows, chunk_classes, grad) in MEMORY_CASES.items():
        rows, cols = linear._tile(n, v, h, 4, chunk_rows, chunk_classes)
        tile = rows * cols * 4
        scratch = numba.get_num_threads() * (2 * cols * 4 + 16 * 1024) + 16 * rows * 8  # + per-row statistics
        assert extra_memory[name] <= tile + scratch + 8 * v * 8 + (256 << 10), (name, extra_memory[name], tile)
    assert extra_memory["grad-N16384"] <= extra_memory["grad-N2048"] + (64 << 10)
    assert extra_memory["default-tile-N32768"] <= 64 << 20
    # split classes: independent of N, and of V but for O(V) vectors (the float64 bias gradient)
    assert extra_memory["split-N8192-V20000"] <= extra_memory["split-N2048-V20000"] + (64 << 10)
    assert extra_memory["split-N2048-V80000"] <= extra_memory["split-N2048-V20000"] + 60000 * 12 + (64 << 10)
