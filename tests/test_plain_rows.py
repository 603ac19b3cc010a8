"""The plain row kernels (fastsce._kernels.rows.plain_loss, plain_loss_grad): the general
row kernels' results for calls with no option (within 4 ulp: _within_ulps); the calls
that take them; and what a plain call compiles (none of the options' loops: the point
of them)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastsce
from _cases import assert_close
from fastsce import _threads, api, reference
from fastsce._kernels import blocks, rows

NO_ROWS = np.empty(0)


def _rows_case(dtype, k, n=37, weighted=False, sample_weighted=False, special=False, seed=0):
    rng = np.random.default_rng(seed)
    z = (4 * rng.standard_normal((n, k))).astype(dtype)
    y = rng.integers(0, k, n)
    y[5::7] = -100  # ignored
    if special:
        z[0, :] = -np.inf  # a row of -inf but its target
        z[0, y[0]] = 0.0
        z[1, 3] = np.nan
        z[3, : k - 1] = -np.inf
        y[3] = k - 1
        z[4, 2] = np.inf
        z[6, :] *= 1e30  # p_y underflows to 0 and the loss is huge
    w = (rng.random(k) + 0.5).astype(dtype) if weighted else np.ones(k, dtype)
    w_sum = float(w.astype(np.float64).sum())
    v = rng.random(n) if sample_weighted else NO_ROWS
    if sample_weighted:
        v[8] = 0.0  # a row weighted 0 is skipped like an ignored one
    return z, y, w, w_sum, v


def _outs(dtype, n, chunk_rows, per_row):
    n_chunks = -(-n // chunk_rows)
    row_loss = np.full(n, 7.0, dtype) if per_row else np.empty(0, dtype)
    return (row_loss, np.empty(0, dtype), np.empty(0, dtype), np.full(n_chunks, 7.0), np.full(n_chunks, 7.0))


def _within_ulps(a, b, ulps, mode, dtype):
    """a and b NaN in the same places and elsewhere at most ``ulps`` units in the last
    place of b, in the logits' dtype, apart (the float64 chunk sums of float32 rows add
    losses computed from float32 exps: a float32 ulp of those is their unit). The plain and general kernels inline the same helpers, but LLVM
    compiles each kernel apart (FMA contraction, the lanes of the exp-sums): seen the
    same bits in most processes, 1-3 ulp apart in some (an empty kernel cache shared by
    two test workers)."""
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=mode)
    finite = ~np.isnan(b)
    gap = np.abs(a[finite] - b[finite])
    assert np.all(gap <= ulps * np.spacing(np.abs(b[finite]).astype(dtype)).astype(np.float64)), (mode, gap.max())


CHUNK = 5  # several chunks over 37 rows


@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("weights", ["none", "class", "class+row"])
@pytest.mark.parametrize(
    "k, special", [(k, special) for k in (1, 2, 177, 1000, 1024, 1025, 3000) for special in (False, True) if k >= 8 or not special]
)  # (the special rows need 8 classes)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_plain_kernels_give_the_general_kernels_bits(dtype, k, special, weights, threaded):
    n = 37
    z, y, w, w_sum, v = _rows_case(dtype, k, n, weights != "none", weights == "class+row", special)
    params = (0.0, 0.0, 1 / 29, 1 / 29, 1.0, 0.0)
    pick = (lambda kernel: kernel) if threaded else _threads._serial
    shared = (z, y, -100, w, w_sum, v, params, CHUNK)
    for mode in ("loss only", "gradient", "in place"):
        loss_only, in_place = mode == "loss only", mode == "in place"
        results = []
        for plain in (True, False):
            outs = _outs(dtype, n, CHUNK, per_row=True)
            g = z.copy() if in_place else np.full((n, k), 7.0, dtype)
            args = (g, *shared[1:]) if in_place else shared
            options = (None,) * 5  # no label smoothing, z-loss, logit scale, softcap; no copied rows
            if loss_only:
                pick(rows.plain_loss)(*args, outs) if plain else pick(rows.hard_loss)(*args, outs, *options)
            elif plain:
                pick(rows.plain_loss_grad)(*args, outs, g, True if in_place else None)
            else:
                pick(rows.hard_loss_grad)(*args, outs, g, True if in_place else None, None, *options)
            results.append((outs, g))
        (plain_outs, plain_g), (general_outs, general_g) = results
        for a, b in zip(plain_outs, general_outs):
            _within_ulps(a, b, 4, mode, dtype)
        if not loss_only:
            _within_ulps(plain_g, general_g, 4, mode, dtype)
            if not in_place:
                assert not np.any(plain_g == 7.0)  # every row written, ignored ones with zeros
    assert np.isfinite(plain_outs[3]).any()


def _spy_row_kernels(monkeypatch):
    seen = []
    for name in ("plain_loss", "plain_loss_grad", "hard_loss", "hard_loss_grad"):
        real = getattr(rows, name)
        monkeypatch.setattr(rows, name, lambda *a, real=real, name=name: seen.append(name) or real(*a))
    return seen


@pytest.mark.parametrize("general_path", [False, True], ids=["fast-path", "general-path"])
def test_the_calls_the_plain_kernels_take(monkeypatch, general_path):
    seen = _spy_row_kernels(monkeypatch)
    rng = np.random.default_rng(1)
    k = 400  # above the blocks and the tiles (api.SMALL_K) for float32 and float64
    z = rng.standard_normal((40, k)).astype(np.float32)
    y = rng.integers(0, k, 40)
    labels = y.tolist() if general_path else y  # a list: not the fast path's call

    def both(logits, **kwargs):
        fastsce.cross_entropy_with_grad(logits, labels, **kwargs)
        fastsce.cross_entropy(logits, labels, **kwargs)
        names = list(seen)
        seen.clear()
        return names

    plain, general = ["plain_loss_grad", "plain_loss"], ["hard_loss_grad", "hard_loss"]
    assert both(z) == plain
    assert both(z.astype(np.float64)) == plain
    assert both(z, weight=rng.random(k), sample_weight=rng.random(40), reduction="none") == plain
    assert both(z, logit_scale=1.0, label_smoothing=0.0, z_loss=0.0) == plain  # options that change nothing
    for option in (dict(label_smoothing=0.1), dict(z_loss=1e-4), dict(logit_scale=2.0), dict(softcap=30.0)):
        assert both(z, **option) == general, option
    assert both(z.astype(np.float16)) == general
    fastsce.cross_entropy(z, labels, return_lse=True)
    buffer = z.copy()
    fastsce.cross_entropy_with_grad(buffer, labels, out=buffer)  # in place: a plain kernel of its own
    fastsce.cross_entropy_with_grad(buffer, labels, out=buffer, label_smoothing=0.1)
    assert seen == ["hard_loss", "plain_loss_grad", "hard_loss_grad"]
    seen.clear()
    monkeypatch.setattr(api, "LONG_ROW_BYTES", 0)  # long rows: the loss reads them once either way
    assert both(z) == ["hard_loss_grad", "plain_loss"]


def test_a_plain_call_compiles_no_option_loops(tmp_path):
    """In a process with an empty kernel cache, a plain call at K = 1000 compiles none of
    the loops of the options, in-place rows, long rows or half rows."""
    script = textwrap.dedent(
        """
        import numpy as np
        import fastsce
        from fastsce._kernels import rows
        z = np.random.default_rng(0).standard_normal((65, 1000)).astype(np.float32)
        y = np.arange(65) % 1000
        fastsce.cross_entropy_with_grad(z, y)
        fastsce.cross_entropy(z, y)
        x = z.copy()
        fastsce.cross_entropy_with_grad(x, y, out=x)  # in place: _exp_in_place_block, in a kernel of its own
        names = ("hard_loss", "hard_loss_grad", "_hard_row_grad", "_softcap_row_f32", "_weighted_shift_block",
                 "_store_exp_shift_block", "_rescale_blocks", "_scale_minus_weight")
        def compiled(d):  # a kernel's threaded and serial twins, or a helper
            return len(d.signatures) + (len(d.serial.signatures) if hasattr(d, "serial") else 0)
        print({n: compiled(getattr(rows, n)) for n in names})
        print(len(rows.plain_loss_grad.serial.signatures), len(rows.plain_loss.serial.signatures),
              len(rows._exp_in_place_block.signatures), len(rows._store_exp_block.signatures))
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    compiled, plain = out.strip().splitlines()
    assert set(eval(compiled).values()) == {0}, compiled
    assert plain == "2 1 2 2"  # plain_loss_grad out of place and in place; each block loop with and without the target


# The loops each option compiles (helpers of fastsce._kernels.rows), and what a call with
# only that option must not compile of the others'.
OPTION_LOOPS = {
    "label_smoothing": ("_weighted_shift_block", "_store_exp_shift_block", "_scale_minus_weight"),
    "softcap": ("_softcap_row_f32", "_scale_capped"),
    "logit_scale": (),
    "z_loss": (),
}


@pytest.mark.parametrize("option, value", [("label_smoothing", 0.1), ("z_loss", 1e-4), ("softcap", 30.0), ("logit_scale", 0.5)])
def test_a_call_with_one_option_compiles_no_other_options_loops(option, value, tmp_path):
    """In a process with an empty kernel cache, a call at K = 1000 with one option
    compiles the general kernel for that option: none of the other options' loops, nor
    those of long rows (_rescale_blocks) or in-place rows (_exp_in_place_block)."""
    others = sorted({loop for name, loops in OPTION_LOOPS.items() if name != option for loop in loops} - set(OPTION_LOOPS[option]))
    script = textwrap.dedent(
        f"""
        import numpy as np
        import fastsce
        from fastsce._kernels import rows
        z = np.random.default_rng(0).standard_normal((65, 1000)).astype(np.float32)
        y = np.arange(65) % 1000
        fastsce.cross_entropy_with_grad(z, y, {option}={value!r})
        fastsce.cross_entropy(z, y, {option}={value!r})
        names = {tuple(others) + ("_rescale_blocks", "_exp_in_place_block")!r}
        print({{n: len(getattr(rows, n).signatures) for n in names}})
        print(len(rows.hard_loss_grad.serial.signatures), len(rows.hard_loss.serial.signatures))
        print({{n: len(getattr(rows, n).signatures) for n in {OPTION_LOOPS[option]!r}}})
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    others_compiled, general, own = out.strip().splitlines()
    assert set(eval(others_compiled).values()) == {0}, others_compiled
    assert general == "1 1"  # the general kernels took the call
    assert all(n > 0 for n in eval(own).values()), own  # (and its own loops were compiled)


SPECIAL_ROWS = ("NaN at the target", "NaN elsewhere", "NaN and -inf", "+inf and NaN", "+inf", "-inf", "NaN last")


def _special_rows(dtype, k):
    """A row of each of SPECIAL_ROWS among finite ones: the row kernels' max passes a NaN
    by unless the max is infinite (rows._row_max); every such row's results must still
    be the reference's."""
    rng = np.random.default_rng(k)
    z = (3 * rng.standard_normal((len(SPECIAL_ROWS) + 3, k))).astype(dtype)
    y = rng.integers(0, k, z.shape[0])
    z[0, y[0]] = np.nan
    z[1, (y[1] + 1) % k] = np.nan
    z[2], z[2, 1::3] = -np.inf, np.nan
    z[3, 0], z[3, 2] = np.inf, np.nan
    z[4, k // 2] = np.inf
    z[5] = -np.inf
    z[6, k - 1] = np.nan
    y[6] = 0
    return z, y


@pytest.mark.parametrize(
    "options",
    [{}, {"return_lse": True}, {"label_smoothing": 0.1, "z_loss": 1e-3, "return_lse": True}, {"softcap": 5.0, "return_lse": True}],
    ids=["plain", "lse", "eps+z+lse", "softcap+lse"],
)
@pytest.mark.parametrize("k", (400, 1024, 1500))  # the plain rows (one block, two) and the general kernels'
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"], ids=["f32", "f64", "f16", "bf16"])
def test_rows_with_nan_and_infinities_are_the_references(dtype, k, options):
    """Also with options and for half rows (whose max is taken as they are converted:
    half.load_row_max), and with a softcap (its rows' max: rows._softcap_row)."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    dtype = np.dtype(dtype)
    z, y = _special_rows(dtype, k)
    assert k > blocks.MAX_K  # the row kernels
    for with_grad in (False, True):
        fn = "cross_entropy_with_grad" if with_grad else "cross_entropy"
        got = getattr(fastsce, fn)(z, y, reduction="none", **options)
        want = getattr(reference, fn)(z, y, reduction="none", **options)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for name, a, b in zip(("loss", "grad" if with_grad else "lse", "lse"), got, want):
            assert_close(a, b, dtype)
            if a.ndim == 1:  # each special row NaN / infinite where the reference's is
                a, b = a[: len(SPECIAL_ROWS)], b[: len(SPECIAL_ROWS)].astype(a.dtype)
                special = ~np.isfinite(b)
                assert special.sum() >= (3 if "softcap" in options else 5)
                np.testing.assert_array_equal(np.isfinite(a), ~special, err_msg=name)
                np.testing.assert_array_equal(a[special], b[special], err_msg=name)
