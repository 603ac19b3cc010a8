"""fastsce._kernels.blocks: float32 rows of K <= 176, 16 rows at a time (K <= 32 in
registers, transposed; beyond, row by row).

Its vector exp, log and loss against exact values and against fastsce._kernels.simd's
scalar versions, lane by lane; the kernels through the public API against the NumPy
reference for every K it takes, at block edges, with every option it takes; the dispatch
to it and away from it.
"""

import itertools

import numba
import numpy as np
import pytest
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from _cases import Case, assert_close, make_case
import fastsce
from fastsce import api, reference
from fastsce._kernels import blocks as block_kernels, simd, tiles as tile_kernels
from fastsce._kernels.jit import jit

DISPATCH = api.FLOAT_SMALL_K  # the bounds float32 calls have outside this module


@pytest.fixture(autouse=True)
def plain_calls_in_the_blocks(monkeypatch):
    """float32 calls take the blocks as half rows do: plain ones up to K = MAX_K, those
    with options up to api.SMALL_K (outside, the row kernels take some options from K =
    129 or 145: api.FLOAT_SMALL_K), so every width is tested through the public API, and
    half rows against their float32 copy in the same blocks."""
    bounds = {dtype: {"other": small} for dtype, small in api.SMALL_K.items()}
    bounds[np.dtype(np.float32)]["plain"] = (block_kernels.MAX_K, block_kernels.MAX_K)
    monkeypatch.setattr(api, "FLOAT_SMALL_K", bounds)

# --- the vector math, lane by lane ---------------------------------------------------------------

_OPS = ("exp_shifted_f32", "exp_f64", "log_normal", "lse_minus_target")


@intrinsic
def _lanes(typingctx, op, x, y, z, out):
    """out[:n] = op(x, y, z) lane by lane, n = 16 (float32) or 8 (float64) lanes."""
    if not isinstance(op, types.StringLiteral):
        return None
    name = op.literal_value
    n = 16 if out.dtype == types.float32 else 8

    def codegen(context, builder, sig, args):
        vec = block_kernels._Vectors(builder)
        vt = ir.VectorType(context.get_value_type(out.dtype), n)

        def load(i):
            ptr = context.make_array(sig.args[i])(context, builder, args[i]).data
            return builder.load(builder.bitcast(ptr, vt.as_pointer()), align=4)

        a, b, c = load(1), load(2), load(3)
        if name == "exp_shifted_f32":
            r = vec.exp_shifted_f32(a, b)
        elif name == "exp_f64":
            r = vec.exp_f64(a)
        elif name == "log_normal":
            r = vec.log_normal(a)
        else:  # lse_minus_target(s_other, e_y, zy)
            r = vec.lse_minus_target(a, b, c, vec.div(1.0, vec.add(a, b)))
        builder.store(r, builder.bitcast(context.make_array(sig.args[4])(context, builder, args[4]).data, vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(op, x, y, z, out), codegen


def _vector_of(op):
    @numba.njit
    def run(x, y, z, out):
        n = 64 // out.itemsize  # one 512-bit vector
        for i in range(0, x.size, n):
            _lanes(op, x[i : i + n], y[i : i + n], z[i : i + n], out[i : i + n])  # op: a literal

    return run


_VECTOR = {op: _vector_of(op) for op in _OPS}


@jit
def _scalar(op, x, y, z, out):
    for i in range(x.size):
        if op == 0:
            out[i] = simd.exp_shifted(x[i], y[i])
        elif op == 1:
            out[i] = simd.exp_nonpositive(x[i])
        elif op == 2:
            out[i] = simd.log_normal(x[i])
        else:
            out[i] = simd.lse_minus_target(x[i], y[i], z[i])


@intrinsic
def _lookup(typingctx, table, index, out, tables, permute):
    """out[:16] = table[index & (16 tables - 1)] lane by lane, by blocks._looked_up."""
    if not (isinstance(tables, types.IntegerLiteral) and isinstance(permute, types.BooleanLiteral)):
        return None
    n_tables, with_permute = tables.literal_value, permute.literal_value

    def codegen(context, builder, sig, args):
        def load(i, element, first=0):
            vt = ir.VectorType(element, 16)
            ptr = builder.gep(context.make_array(sig.args[i])(context, builder, args[i]).data, [ir.Constant(ir.IntType(64), first)])
            return builder.load(builder.bitcast(ptr, vt.as_pointer()), align=4)

        f32, i32 = ir.FloatType(), ir.IntType(32)
        found = block_kernels._looked_up(builder, [load(0, f32, 16 * t) for t in range(n_tables)], load(1, i32), with_permute)
        builder.store(found, builder.bitcast(context.make_array(sig.args[2])(context, builder, args[2]).data, found.type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(table, index, out, tables, permute), codegen


@pytest.mark.parametrize("tables", [1, 2])
@pytest.mark.parametrize("permute", [False, True] if simd._HAS_AVX512 else [False])
def test_lookup_takes_each_lanes_entry_of_the_class_weights(tables, permute):
    """blocks._looked_up (w_y of the transposed blocks): the entry at each lane's index,
    wrapped into the table (an ignored row's -100 too), by vpermps / vpermt2ps and by
    the selects of targets without AVX-512."""
    rng = np.random.default_rng(7)
    table = rng.uniform(0.5, 2.0, 32).astype(np.float32)
    index = np.concatenate([rng.integers(0, 16 * tables, 14), [-100, 16 * tables - 1]]).astype(np.int32)
    out = np.zeros(16, np.float32)

    @numba.njit
    def run(table, index, out):
        _lookup(table, index, out, tables, permute)

    run(table, index, out)
    assert out.tobytes() == table[index & (16 * tables - 1)].tobytes()


def _ulps(actual, exact, dtype):
    exact = np.asarray(exact, np.longdouble)
    return np.abs((actual - exact) / np.spacing(np.abs(exact.astype(dtype))).astype(np.longdouble))


def _both(op, x, y=None, z=None):
    y = np.zeros_like(x) if y is None else y
    z = np.zeros_like(x) if z is None else z
    vec, sca = np.empty_like(x), np.empty_like(x)
    _VECTOR[op](x, y, z, vec)
    _scalar(_OPS.index(op), x, y, z, sca)
    return vec, sca


def test_vector_exp_float32_is_the_scalar_exp_within_an_ulp_of_exact():
    rng = np.random.default_rng(0)
    n = 1 << 16
    z = (rng.standard_normal(n) * rng.choice([1, 10, 60], n)).astype(np.float32)
    m = np.maximum(z, (z + np.abs(rng.standard_normal(n) * 20)).astype(np.float32))  # z <= m
    vec, sca = _both("exp_shifted_f32", z, m)
    exact = np.exp(z.astype(np.longdouble) - m.astype(np.longdouble))
    normal = exact > np.finfo(np.float32).tiny
    assert float(_ulps(vec[normal], exact[normal], np.float32).max()) < 1.0
    assert np.abs(vec.astype(np.float64) - sca).max() <= np.spacing(np.float32(1))  # the same to an ulp of 1
    special = np.array([-np.inf, np.nan, -200, 0, 5, -np.inf] + [0] * 10, np.float32)
    shift = np.array([0, 0, 0, 0, 5, np.inf] + [0] * 10, np.float32)
    vec, _ = _both("exp_shifted_f32", special, shift)
    assert vec[0] == 0 and np.isnan(vec[1]) and vec[2] == 0 and vec[3] == 1 and vec[4] == 1 and vec[5] == 0


def test_vector_exp_float64_and_log_are_the_scalar_ones():
    rng = np.random.default_rng(1)
    x = -np.abs(rng.standard_normal(1 << 14) * 30)
    vec, sca = _both("exp_f64", x)
    assert float(_ulps(vec, np.exp(x.astype(np.longdouble)), np.float64).max()) < 1.0
    assert np.array_equal(vec, sca)
    s = np.exp(rng.uniform(0, np.log(2.0**20), 1 << 14))
    vec, sca = _both("log_normal", s)
    assert float(_ulps(vec, np.log(s.astype(np.longdouble)), np.float64).max()) < 1.0
    assert np.array_equal(vec, sca)
    special = np.array([np.inf, np.nan, 1.0, 2.0, np.sqrt(2.0), np.finfo(np.float64).max, 3.0, 4.0])
    vec, sca = _both("log_normal", special)
    assert vec[0] == np.inf and np.isnan(vec[1]) and vec[2] == 0
    np.testing.assert_array_equal(vec[2:], sca[2:])


def test_vector_loss_keeps_a_tiny_loss_relative_digits():
    """log1p(s_other / e_y) as simd.lse_minus_target: tiny for a confident row, exact
    -inf target handling (e_y = 0: the loss is log(s_other) - z_y)."""
    rng = np.random.default_rng(2)
    zy = -np.abs(rng.standard_normal(1 << 12) * 3)
    zy[::5] = 0.0
    s_other = np.exp(rng.uniform(-60, 3, zy.size))
    e_y = np.exp(zy)
    vec, sca = _both("lse_minus_target", s_other, e_y, zy)
    exact = np.log1p(s_other.astype(np.longdouble) / np.exp(zy.astype(np.longdouble)))
    assert float((np.abs(vec - exact) / exact).max()) < 4 * np.finfo(np.float64).eps
    np.testing.assert_allclose(vec, sca, rtol=2 * np.finfo(np.float64).eps)
    vec, _ = _both("lse_minus_target", np.full(8, 2.0), np.zeros(8), np.full(8, -np.inf))
    assert (vec == np.inf).all()


# --- the kernels through the API -----------------------------------------------------------------


def _check(case: Case, in_place: bool = False):
    loss_unit, grad_unit = case.units()
    ref_loss, ref_grad = case.loss_grad(reference)
    if in_place:
        z = case.logits.copy()
        loss, grad = fastsce.cross_entropy_with_grad(z, case.target, **case.kwargs, out=z)
        assert grad is z
    else:
        loss, grad = case.loss_grad(fastsce)
    assert_close(loss, ref_loss, np.float32, unit=loss_unit)
    assert_close(grad, ref_grad, np.float32, unit=grad_unit)
    loss_only = case.loss(fastsce)
    # the same block code with and without the gradient: the same bits
    assert np.asarray(loss_only).tobytes() == np.asarray(loss).tobytes()


def test_the_calls_the_blocks_take(monkeypatch):
    monkeypatch.setattr(api, "FLOAT_SMALL_K", DISPATCH)
    seen = []
    holders = [("tiles", tile_kernels), ("tiles-plain", tile_kernels.PLAIN)] + [(f"blocks{cols}", block_kernels.kernels(cols)) for cols in block_kernels.WIDTHS]
    options = {"smooth": block_kernels.SMOOTH, "lse": block_kernels.LSE, "cap": block_kernels.CAP}  # the sets of options called below
    holders += [
        (f"blocks{cols}+{name}", block_kernels.kernels(cols, bits)) for cols in block_kernels.OPTION_WIDTHS for name, bits in options.items()
        if bits != block_kernels.CAP or cols <= block_kernels.TRANSPOSED_MAX
    ]
    for tag, holder in holders:
        for name in ("hard_loss", "hard_loss_grad"):
            real = getattr(holder, name)
            wrapped = lambda *a, real=real, tag=f"{tag}.{name}": seen.append(tag) or real(*a)
            monkeypatch.setattr(holder, name, wrapped)
    z = np.random.default_rng(0).standard_normal((100, 10)).astype(np.float32)
    y = np.arange(100) % 10
    fastsce.cross_entropy_with_grad(z, y, weight=np.ones(10), sample_weight=np.ones(100))
    fastsce.cross_entropy(z, y, reduction="none")
    fastsce.cross_entropy(z[:, :3], y % 3)
    fastsce.cross_entropy(z[:, :8], y % 8)
    fastsce.cross_entropy(np.zeros((100, 16), np.float32), y)
    fastsce.cross_entropy(np.zeros((100, 32), np.float32), y)
    fastsce.cross_entropy(np.zeros((100, 33), np.float32), y)  # row-wise from here
    fastsce.cross_entropy_with_grad(np.zeros((100, 100), np.float32), y)
    fastsce.cross_entropy(np.zeros((100, block_kernels.MAX_K), np.float32), y)
    fastsce.cross_entropy_with_grad(np.zeros((100, 129), np.float32), y)  # plain: the blocks up to MAX_K
    fastsce.cross_entropy_with_grad(np.zeros((100, 300), np.float32), y)
    fastsce.cross_entropy_with_grad(np.zeros((100, block_kernels.MAX_K + 1), np.float32), y)  # the row kernel
    fastsce.cross_entropy_with_grad(np.zeros((100, 129), np.float32), y, label_smoothing=0.1)
    fastsce.cross_entropy_with_grad(np.zeros((100, 145), np.float32), y, label_smoothing=0.1)  # the row kernel
    fastsce.cross_entropy(np.zeros((100, 177), np.float32), y, z_loss=1e-4)  # the row kernel
    fastsce.cross_entropy_with_grad(np.zeros((100, 129), np.float16), y)
    fastsce.cross_entropy_with_grad(np.zeros((100, 300), np.float16), y)
    expected = ["blocks12.hard_loss_grad", "blocks12.hard_loss", "blocks4.hard_loss", "blocks8.hard_loss", "blocks16.hard_loss"]
    expected += ["blocks32.hard_loss", "blocks48.hard_loss", "blocks112.hard_loss_grad", f"blocks{block_kernels.MAX_K}.hard_loss"]
    expected += ["blocks176.hard_loss_grad", "blocks320.hard_loss_grad", "blocks176+smooth.hard_loss_grad"]
    assert seen == expected + ["blocks176.hard_loss_grad", "blocks320.hard_loss_grad"]
    seen.clear()
    fastsce.cross_entropy_with_grad(z, y, label_smoothing=0.1)  # options: kernels of their own
    fastsce.cross_entropy(np.zeros((100, 40), np.float32), y, return_lse=True)
    fastsce.cross_entropy(z, y, softcap=5.0)  # transposed blocks with a softcap
    fastsce.cross_entropy(np.zeros((100, 33), np.float32), y, softcap=5.0)  # row-wise: the tiles
    fastsce.cross_entropy(z.astype(np.float64), y)
    fastsce.cross_entropy(np.zeros((100, block_kernels.max_k(block_kernels.LSE) + 1), np.float16), y, z_loss=1e-4)  # half rows beyond the blocks' options
    fastsce.cross_entropy(np.zeros((100, block_kernels.MAX_K + 1), np.float16), y)  # plain half rows beyond the blocks: the tiles
    # classes not last, with an option: the tiles, read in place (class_major_loss) or copied
    fastsce.cross_entropy(np.zeros((4, 10, 40), np.float32), y[:4, None].repeat(40, 1), axis=1, z_loss=1e-4)
    fastsce.cross_entropy(np.zeros((4, 10, 8), np.float32), y[:4, None].repeat(8, 1), axis=1, z_loss=1e-4)
    expected = ["blocks12+smooth.hard_loss_grad", "blocks64+lse.hard_loss", "blocks12+cap.hard_loss", "tiles.hard_loss", "tiles-plain.hard_loss"]
    assert seen == expected + ["tiles.hard_loss", "tiles-plain.hard_loss", "tiles.hard_loss"]


def _edges():
    """Every K of the transposed blocks; beyond, each row-wise width's first two and last
    two K (the zmm that K leaves empty or fills), and K = 100."""
    ks = set(range(1, block_kernels.TRANSPOSED_MAX + 1)) | {100}
    widths = block_kernels.WIDTHS
    for low, cols in zip(widths, widths[1:]):
        if cols > block_kernels.TRANSPOSED_MAX:
            ks |= {low + 1, low + 2, cols - 1, cols}
    return sorted(ks)


@pytest.mark.parametrize("k", _edges())
@pytest.mark.parametrize("n", (1, 15, 16, 17, 2048 + 21))
def test_every_k_at_the_block_edges(k, n):
    for reduction, weighted in (("mean", False), ("none", True)):
        _check(make_case(n, k, np.float32, weighted=weighted, reduction=reduction))


@pytest.mark.parametrize("k", (3, 10, 16, 29, 40, 100, 176))
@pytest.mark.parametrize(
    "weighted, ignore_inside, rows, reduction, in_place",
    list(itertools.product((False, True), (False, True), (None, "sample_weight", "where"), ("mean", "sum", "none"), (False, True))),
)
def test_options(k, weighted, ignore_inside, rows, reduction, in_place):
    n = 203
    case = make_case(n, k, np.float32, weighted=weighted, ignore_index=k // 2 if ignore_inside else -100, reduction=reduction)
    rng = np.random.default_rng(k)
    if rows == "sample_weight":
        v = rng.uniform(0, 2, n)
        v[::9] = 0  # weight 0: not counted
        case.kwargs["sample_weight"] = v
    elif rows == "where":
        case.kwargs["where"] = rng.random(n) < 0.7
    _check(case, in_place)


@pytest.mark.parametrize("k", (1, 2, 8, 9, 10, 13, 29, 32, 33, 40, 64, 65, 100, 128, 129, 176))
@pytest.mark.parametrize(
    "extra",
    [
        dict(label_smoothing=0.1),
        dict(z_loss=1e-3, return_z_loss=True, return_lse=True),
        dict(logit_scale=0.7),
        dict(return_lse=True, logit_scale=0.5),
        dict(logit_scale=-1.5, label_smoothing=0.3, z_loss=1e-2, return_lse=True),
        dict(softcap=5.0),
        dict(softcap=1.5, logit_scale=-1.3, label_smoothing=0.2, z_loss=1e-2, return_lse=True),
    ],
    ids=["smoothing", "z_loss-lse", "scale", "lse-scale", "all", "softcap", "softcap-all"],
)
@pytest.mark.parametrize("weighted, reduction, rows", [(False, "mean", None), (True, "none", "sample_weight"), (True, "sum", "where")])
def test_the_options_blocks_take(k, extra, weighted, reduction, rows):
    """Label smoothing, z-loss, lse, a logit scale and a softcap, in the blocks' kernels
    with options (a kernel per set of them; transposed and row-wise, each OPTION_WIDTHS
    entry's edges; lse without a z-loss in "lse-scale"; a softcap in the transposed
    blocks, beyond K = 32 in the tiles; softcap 5 leaves most blocks to the tanh's
    polynomial alone, 1.5 most to its exp form): every output against
    the reference, the loss alone the same bits, in place the same bits."""
    n = 203
    case = make_case(n, k, np.float32, weighted=weighted, ignore_index=k // 2, reduction=reduction)
    case.kwargs.update(extra)
    rng = np.random.default_rng(k)
    if rows == "sample_weight":
        v = rng.uniform(0, 2, n)
        v[::9] = 0
        case.kwargs["sample_weight"] = v
    elif rows == "where":
        case.kwargs["where"] = rng.random(n) < 0.7
    loss_unit, grad_unit = case.units()
    ref = case.loss_grad(reference)
    got = case.loss_grad(fastsce)
    assert_close(got[0], ref[0], np.float32, unit=loss_unit)
    assert_close(got[1], ref[1], np.float32, unit=grad_unit)
    for mine, theirs in zip(got[2:], ref[2:]):  # z-term, lse
        assert_close(mine, theirs, np.float32, unit=loss_unit)
    loss_only = case.loss(fastsce)
    loss_only = loss_only if isinstance(loss_only, tuple) else (loss_only,)
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(loss_only, (got[0], *got[2:])))
    z = case.logits.copy()
    in_place = fastsce.cross_entropy_with_grad(z, case.target, out=z, **case.kwargs)
    assert in_place[1] is z and z.tobytes() == got[1].tobytes()


def test_the_blocks_softcap_is_within_a_few_ulp_of_tanh():
    """A row of one class has lse = z = c tanh(a x / c): the blocks' softcap, read
    through return_lse, against float64 tanh within 2.5 ulp, as the rows' (test_options).
    Blocks of |u| < 1 take the polynomial alone (the first rows), the others the form
    that any |u| takes, up to saturation; infinities give +-c, NaN stays NaN."""
    small = np.linspace(-0.99, 0.99, 16 * 4001)
    big = np.concatenate([np.linspace(-20, 20, 400_001), np.logspace(-40, 1.5, 20_000), -np.logspace(-40, 1.5, 20_000)])
    x = np.concatenate([small, big, [0.0, -0.0, np.inf, -np.inf, np.nan]]).astype(np.float32)
    y = np.zeros(x.size, np.int64)
    for c, a in ((1.0, 1.0), (4.0, -4.0)):
        *_, lse = fastsce.cross_entropy(x[:, None], y, softcap=c, logit_scale=a, return_lse=True, reduction="none")
        exact = c * np.tanh(a * x.astype(np.float64) / c)
        finite = np.isfinite(x)
        ulp = np.spacing(np.abs(exact[finite]).astype(np.float32)).astype(np.float64)
        assert np.max(np.abs(lse[finite] - exact[finite]) / ulp) <= 2.5
        np.testing.assert_array_equal(lse[-5:], np.float32([0.0, -0.0, a * np.inf, -a * np.inf, np.nan]).clip(-c, c))


@pytest.mark.parametrize("k", (1, 2, 17, 40))
def test_the_lse_of_a_row_with_nan_is_nan(k):
    """The blocks' max (vmaxps) may pass a NaN by: a row of NaN and -inf logits got m =
    -inf and lse = -inf. Its lse is NaN (the reference's), a row of -inf alone -inf."""
    x = np.zeros((3, k), np.float32)
    x[0], x[1, ::2], x[2] = np.nan, np.nan, -np.inf
    x[1, 1::2] = -np.inf
    y = np.zeros(3, np.int64)
    for options in (dict(), dict(z_loss=1e-3, return_z_loss=True), dict(label_smoothing=0.1)):
        got = fastsce.cross_entropy(x, y, return_lse=True, reduction="none", **options)
        want = reference.cross_entropy(x, y, return_lse=True, reduction="none", **options)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b.astype(np.float32))


@pytest.mark.parametrize("k", (3, 10, 16, 32))
def test_the_blocks_softcap_bounds_huge_and_masked_logits(k):
    """tanh(+-inf) = +-1 (and huge |x|): z = +-c exactly, and dz/dx = 0 there, so those
    gradient entries are exactly 0; a masked (-inf) class becomes -c and takes part in the
    softmax; NaN stays NaN (as test_options' float64 case, in the blocks)."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((40, k)).astype(np.float32)
    x[0, 0], x[1, 1 % k], x[2, 2 % k], x[3, 0] = np.inf, -np.inf, 1e30, np.nan
    y = np.arange(40) % k
    loss, grad = fastsce.cross_entropy_with_grad(x, y, softcap=2.0, reduction="none")
    z = 2.0 * np.tanh(x.astype(np.float64) / 2.0)
    want_loss, want_grad = reference.cross_entropy_with_grad(z, y, reduction="none")
    rows = np.arange(40) != 3
    assert_close(loss[rows], want_loss[rows], np.float32, unit=1.0)
    assert_close(grad[rows], (want_grad * (1 - (z / 2) ** 2))[rows], np.float32, unit=1.0)
    assert grad[0, 0] == 0 and grad[1, 1 % k] == 0 and grad[2, 2 % k] == 0
    assert np.isnan(loss[3]) and np.isnan(grad[3]).all()


@pytest.mark.parametrize("k", (1, 2, 9, 16, 17, 32, 33, 64, 100, 176))
def test_special_values(k):
    """-inf (masked) classes, a NaN row, a NaN row that is ignored, huge logits, and a
    confident row; K = 1 gives loss 0 and a zero gradient."""
    rng = np.random.default_rng(k)
    n = 40
    z = (4 * rng.standard_normal((n, k))).astype(np.float32)
    y = rng.integers(0, k, n)
    if k > 1:
        rows = np.arange(0, n, 3)
        z[rows, (y[rows] + 1) % k] = -np.inf  # one class of the row
        z[1::7] *= np.float32(1e4)
        z[2, y[2]] = 40
    z[5, 0] = np.nan
    z[6, :] = np.nan
    y[6] = -100
    case = Case(z, y, dict(reduction="none"))
    _check(case)
    loss, grad = case.loss_grad(fastsce)
    assert np.isnan(loss[5]) and np.isnan(grad[5]).all()
    assert loss[6] == 0 and (grad[6] == 0).all()
    others = np.ones(n, bool)
    others[[5, 6]] = False
    assert np.isfinite(loss[others]).all() and np.isfinite(grad[others]).all()
    if k == 1:
        assert (loss[others] == 0).all() and (grad[others] == 0).all()


@pytest.mark.parametrize("k", (10, 100))
def test_thread_count_and_bits(k):
    case = make_case(50_000, k, np.float32, weighted=True, reduction="none")
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = case.loss_grad(fastsce)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = case.loss_grad(fastsce)
    finally:
        numba.set_num_threads(threads)
    assert one[0].tobytes() == many[0].tobytes()
    assert one[1].tobytes() == many[1].tobytes()


@pytest.mark.parametrize("k, grad, dtype", [(10, True, np.float32), (10, False, np.float32), (29, True, np.float32), (100, False, np.float32), (100, True, np.float32), (10, True, np.float16)])
def test_calls_that_prefetch_give_the_bits_of_calls_that_do_not(k, grad, dtype):
    """Past PREFETCH_ABOVE bytes of logits _chunk prefetches rows ahead (transposed blocks;
    row-wise, the loss alone): a hint that must change no result. A call on such logits,
    whose last rows are prefetched up to the array's end, against the same rows in calls
    below the size, which prefetch nothing: per-row losses and the gradient, the same bits
    (rows are independent with reduction="none" and "sum"); in place the same bits too."""
    size = np.dtype(dtype).itemsize
    n = block_kernels.PREFETCH_ABOVE // (size * k) + 37
    case = make_case(n, k, np.float32, weighted=True, ignore_index=k // 2, reduction="none")
    case.logits = case.logits.astype(dtype)
    pieces = np.array_split(np.arange(n), 3)
    assert all(len(p) * k * size < block_kernels.PREFETCH_ABOVE for p in pieces) and n * k * size > block_kernels.PREFETCH_ABOVE
    kw = case.kwargs
    if grad:
        whole = fastsce.cross_entropy_with_grad(case.logits, case.target, **kw)
        parts = [fastsce.cross_entropy_with_grad(case.logits[p], case.target[p], **kw) for p in pieces]
        assert np.concatenate([g for _, g in parts]).tobytes() == whole[1].tobytes()
        z = case.logits.copy()
        fastsce.cross_entropy_with_grad(z, case.target, out=z, **kw)
        assert z.tobytes() == whole[1].tobytes()
        loss = whole[0]
        parts = [loss for loss, _ in parts]
    else:
        loss = fastsce.cross_entropy(case.logits, case.target, **kw)
        parts = [fastsce.cross_entropy(case.logits[p], case.target[p], **kw) for p in pieces]
    assert np.concatenate(parts).tobytes() == loss.tobytes()
    assert_close(loss, reference.cross_entropy(case.logits.astype(np.float32), case.target, **kw), dtype, unit=case.units()[0])


# --- float16 / bfloat16 logits -------------------------------------------------------------------

HALF = {"float16": np.float16}
try:
    import ml_dtypes

    HALF["bfloat16"] = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    pass


@intrinsic
def _held_lanes(typingctx, x, out, n):
    """Lanes 0 .. n - 1 (the rest masked) of 16 through blocks._Stored: half bits x
    widened into float32 out (masked-off lanes -inf), or float32 x rounded into half bits
    out (masked-off lanes not written)."""
    if not (isinstance(x, types.Array) and isinstance(out, types.Array) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        lane = ir.Constant(ir.VectorType(ir.IntType(64), 16), list(range(16)))
        n64 = context.cast(builder, args[2], sig.args[2], types.int64)
        splat = builder.insert_element(ir.Constant(lane.type, ir.Undefined), n64, ir.Constant(ir.IntType(32), 0))
        mask = builder.icmp_signed("<", lane, builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)))
        src, dst = (context.make_array(t)(context, builder, a).data for t, a in zip(sig.args[:2], args[:2]))
        f32 = block_kernels._Stored(builder, types.float32)
        if x.dtype == types.float32:
            block_kernels._Stored(builder, out.dtype).store(f32.load(src, None, 0.0), dst, mask)
        else:
            f32.store(block_kernels._Stored(builder, x.dtype).load(src, mask, -np.inf), dst, None)
        return context.get_dummy_value()

    return types.none(x, out, n), codegen


@numba.njit
def _through_held(x, out, n):
    for i in range(0, x.size, 16):
        _held_lanes(x[i : i + 16], out[i : i + 16], n)


@pytest.mark.half
@pytest.mark.parametrize("half", HALF)
def test_held_conversions_are_numpys(half):
    """The blocks' half conversions (_Stored): every bit pattern widened exactly; float32
    values (random bits, half subnormals, overflow, ties) rounded to nearest even, a NaN
    kept a NaN; masked lanes neither read nor written."""
    dtype = HALF[half]
    view = np.int16 if half == "bfloat16" else np.uint16
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(view)
    widened = np.empty(bits.size, np.float32)
    _through_held(bits, widened, 16)
    want = bits.view(dtype).astype(np.float32)
    assert np.all((widened.view(np.uint32) == want.view(np.uint32)) | (np.isnan(want) & np.isnan(widened)))
    _through_held(bits, widened, 5)
    on = np.arange(bits.size) % 16 < 5
    assert np.all((widened[on].view(np.uint32) == want[on].view(np.uint32)) | (np.isnan(want[on]) & np.isnan(widened[on])))
    assert np.all(widened[~on] == -np.inf)

    rng = np.random.default_rng(3)
    with np.errstate(invalid="ignore", over="ignore"):
        ties = want[np.isfinite(want)] * np.float32(1 + 2**-9 if half == "bfloat16" else 1 + 2**-12)
    x = np.concatenate(
        [
            rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
            (rng.standard_normal(50_000) * 1e-5).astype(np.float32),
            np.array([0, -0.0, 65504, 65519.99, 65520, 2.98e-8, 2.99e-8, 3.4e38, np.inf, -np.inf, np.nan], np.float32),
            want[np.isfinite(want)],
            ties,
        ]
    )
    x = x[: x.size // 16 * 16]
    narrowed = np.full(x.size, 7, view)
    _through_held(x, narrowed, 16)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = x.astype(dtype).view(view)
    finite = ~np.isnan(x)
    assert np.array_equal(narrowed[finite], expected[finite])
    assert np.all(np.isnan(narrowed[~finite].view(dtype).astype(np.float32)))
    narrowed[:] = 7
    _through_held(x, narrowed, 3)
    lanes = np.arange(x.size) % 16
    assert np.array_equal(narrowed[(lanes < 3) & finite], expected[(lanes < 3) & finite])
    assert np.all(narrowed[lanes >= 3] == 7)


def _half_edges():
    """The transposed widths' edges and each row-wise width's last K, and K = 100."""
    return sorted({1, 2, 3, 4, 5, 10, 16, 17, 31, 32, 33, 100} | set(block_kernels.WIDTHS))


@pytest.mark.half
@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("k", _half_edges())
@pytest.mark.parametrize("n", (17, 4096 + 21))
def test_half_logits_are_their_float32_copy_rounded_once(half, k, n):
    """float16 / bfloat16 logits are computed as their float32 copy and rounded once:
    with dtype=float32 the same bits as that copy's call; in their own dtype its results
    rounded to nearest even; in place the same; the loss alone the same bits; special
    values (NaN rows, -inf classes, an ignored NaN row) as in float32; with options too."""
    dtype = HALF[half]
    rng = np.random.default_rng(k * 7 + n)
    z = (4 * rng.standard_normal((n, k))).astype(dtype)
    y = rng.integers(0, k, n)
    y[2::9] = -100
    if k > 1:
        z[0::5, 0] = -np.inf
    z[3, k // 2] = np.nan
    z[4, :] = np.nan
    y[4] = -100
    z32 = z.astype(np.float32)
    weight = rng.uniform(0.5, 2, k)
    options = dict(label_smoothing=0.1, z_loss=1e-3, logit_scale=0.7, reduction="none")
    for kwargs in (dict(reduction="none"), dict(weight=weight), dict(sample_weight=rng.uniform(0, 2, n), reduction="sum"), options):
        want_loss, want_grad = fastsce.cross_entropy_with_grad(z32, y, **kwargs)
        loss, grad = fastsce.cross_entropy_with_grad(z, y, dtype=np.float32, **kwargs)
        assert np.asarray(loss).tobytes() == np.asarray(want_loss).tobytes()
        assert grad.tobytes() == want_grad.tobytes()
        loss, grad = fastsce.cross_entropy_with_grad(z, y, **kwargs)
        assert grad.dtype == dtype and grad.tobytes() == want_grad.astype(dtype).tobytes()
        if kwargs.get("reduction") == "none":
            assert loss.tobytes() == want_loss.astype(dtype).tobytes()
        assert np.asarray(fastsce.cross_entropy(z, y, **kwargs)).tobytes() == np.asarray(loss).tobytes()
        x = z.copy()
        in_place = fastsce.cross_entropy_with_grad(x, y, out=x, **kwargs)
        assert in_place[1] is x and x.tobytes() == grad.tobytes()
        assert np.asarray(in_place[0]).tobytes() == np.asarray(loss).tobytes()
    # and against the reference, in float32 (the half rounding of a float64 result can
    # differ by an ulp of the half dtype from the rounding of a float32 one)
    ref_loss, ref_grad = reference.cross_entropy_with_grad(z32.astype(np.float64), y, reduction="none")
    loss, grad = fastsce.cross_entropy_with_grad(z, y, dtype=np.float32, reduction="none")
    assert_close(loss, ref_loss, np.float32)
    assert_close(grad, ref_grad, np.float32)


@pytest.mark.half
@pytest.mark.parametrize("half", HALF)
def test_half_logits_go_to_the_blocks(half, monkeypatch):
    seen = []
    for cols in (12, 112):
        holder = block_kernels.kernels(cols)
        for name in ("hard_loss", "hard_loss_grad"):
            real = getattr(holder, name)
            monkeypatch.setattr(holder, name, lambda *a, real=real, tag=f"blocks{cols}.{name}": seen.append(tag) or real(*a))
    z = np.zeros((50, 100), HALF[half])
    y = np.arange(50) % 10
    fastsce.cross_entropy_with_grad(z[:, :10], y)
    fastsce.cross_entropy(z, y)
    fastsce.cross_entropy_with_grad(z, y, dtype=np.float32)
    assert seen == ["blocks12.hard_loss_grad", "blocks112.hard_loss", "blocks112.hard_loss_grad"]
