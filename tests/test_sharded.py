"""fastsce.sharded: classes split across shards must give the unsharded loss and gradient.

The oracle is the unsharded function: for splits of K into 1..5 shards (a 1-class shard
among them) and any merge order or tree, finish's loss and the concatenated finish_grad
outputs equal fastsce.reference.cross_entropy_with_grad (and fastsce.cross_entropy_with_grad)
within reference.TOLERANCE. The newer options (z_loss, logit_scale, softcap,
sample_weight, where, all_ignored, return_*) are checked against the reference and
against `closed_form`, written in NumPy straight from the formulas, and by finite
differences.
"""

from __future__ import annotations

import numpy as np
import pytest
from _cases import DTYPES, REDUCTIONS, Case, assert_close, assert_unchanged, make_case, seed_of, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsce
from fastsce import reference

# --- running a case through the shards ----------------------------------------------------------

SHARD_OPTIONS = ("weight", "ignore_index", "label_smoothing", "logit_scale", "softcap")
FINISH_OPTIONS = ("reduction", "z_loss", "sample_weight", "where", "all_ignored")


def shard_args(case: Case, lo, hi):
    """(logits, target, kwargs for partial_stats) of the shard holding classes [lo, hi)."""
    kwargs = {key: value for key, value in case.kwargs.items() if key in SHARD_OPTIONS}
    if kwargs.get("weight") is not None:
        kwargs["weight"] = np.asarray(kwargs["weight"])[lo:hi]
    target = case.target[:, lo:hi] if case.soft else case.target
    return case.logits[:, lo:hi], target, kwargs


def sharded(case: Case, cuts, merge=None, **extra):
    """(loss, grad) through the shards [cuts[i], cuts[i+1]); ``merge`` orders the combine
    (a callable taking and returning the list of ShardStats; default: left to right)."""
    bounds = list(zip(cuts[:-1], cuts[1:]))
    stats = [
        fastsce.partial_stats(*shard_args(case, lo, hi)[:2], lo, **shard_args(case, lo, hi)[2]) for lo, hi in bounds
    ]
    total = merge(stats) if merge else (fastsce.combine(*stats) if len(stats) > 1 else stats[0])
    finish_kwargs = {key: value for key, value in {**case.kwargs, **extra}.items() if key in FINISH_OPTIONS}
    returns = {key: value for key, value in extra.items() if key.startswith("return_")}
    loss = fastsce.finish(total, **finish_kwargs, **returns)
    grads = []
    for lo, hi in bounds:
        logits, target, kwargs = shard_args(case, lo, hi)
        grads.append(fastsce.finish_grad(logits, target, total, lo, **kwargs, **finish_kwargs))
    return loss, np.concatenate(grads, axis=1), total


def random_cuts(rng, k, shards):
    """Cut points 0 < ... < k splitting k classes into ``shards`` non-empty shards."""
    inner = np.sort(rng.choice(np.arange(1, k), size=shards - 1, replace=False)) if shards > 1 else []
    return [0, *map(int, inner), k]


def tree_merge(rng):
    """A merge that combines two random members of the list until one is left: a random tree."""

    def merge(stats):
        stats = list(stats)
        while len(stats) > 1:
            i, j = rng.choice(len(stats), size=2, replace=False)
            merged = fastsce.combine(stats[i], stats[j])
            stats = [s for idx, s in enumerate(stats) if idx not in (i, j)] + [merged]
        return stats[0]

    return merge


def assert_matches(case: Case, loss, grad, expected_loss, expected_grad):
    loss_unit, grad_unit = case.units()
    assert_close(loss, expected_loss, case.dtype, unit=loss_unit)
    assert_close(grad, expected_grad, case.dtype, unit=grad_unit)
    assert np.asarray(loss).dtype == case.logits.dtype
    assert grad.dtype == case.logits.dtype and grad.shape == case.logits.shape


# --- against the unsharded functions ------------------------------------------------------------

SPLITS = {  # K: splits (cut points), each with a 1-class shard somewhere, plus one block-crossing
    1: [[0, 1]],
    7: [[0, 7], [0, 1, 7], [0, 3, 4, 7], [0, 1, 2, 5, 6, 7]],
    2500: [[0, 2500], [0, 1, 1100, 2500], [0, 1030, 1031, 2048, 2499, 2500]],
}


def _cases():
    for dtype in DTYPES:
        for target in ("labels", "labels_ignore_inside", "soft"):
            for weighted in (False, True):
                for eps in (0.0, 0.1):
                    for reduction in REDUCTIONS:
                        yield dtype, target, weighted, eps, reduction


@pytest.mark.parametrize("k", sorted(SPLITS))
@pytest.mark.parametrize(
    "dtype,target,weighted,eps,reduction",
    list(_cases()),
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_matches_unsharded(k, dtype, target, weighted, eps, reduction):
    ignore_index = 3 if target == "labels_ignore_inside" and k > 3 else -100
    case = make_case(
        13, k, dtype, soft=target == "soft", weighted=weighted, ignore_index=ignore_index,
        label_smoothing=eps, reduction=reduction, zeros=True,
    )  # fmt: skip
    expected = case.loss_grad(reference)
    fast = case.loss_grad(fastsce)
    for cuts in SPLITS[k]:
        loss, grad, _ = sharded(case, cuts)
        assert_matches(case, loss, grad, *expected)
        assert_matches(case, loss, grad, *fast)


@settings(max_examples=60)
@given(
    dtype=st.sampled_from(DTYPES),
    soft=st.booleans(),
    weighted=st.booleans(),
    eps=st.sampled_from([0.0, 0.05, 0.3]),
    reduction=st.sampled_from(REDUCTIONS),
    n=st.integers(0, 9),
    k=st.integers(1, 40),
    shards=st.integers(1, 5),
    masked=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_split_any_merge_tree(dtype, soft, weighted, eps, reduction, n, k, shards, masked, seed):
    rng = np.random.default_rng(seed)
    shards = min(shards, k)
    case = make_case(n, k, dtype, soft=soft, weighted=weighted, label_smoothing=eps, reduction=reduction, seed=seed)
    if masked and k > 1 and n:  # -inf logits on classes that are not the row's label
        mask = rng.random((n, k)) < 0.3
        if not soft:
            mask[np.arange(n), np.clip(case.target, 0, k - 1)] = False
        mask[:, 0] = False  # every row keeps a finite logit
        case.logits[mask] = -np.inf
        if soft:  # no probability on a masked class, so the loss stays finite without smoothing
            t = np.where(mask, 0, case.target)
            case.target[...] = t / t.sum(axis=1, keepdims=True)
    loss, grad, _ = sharded(case, random_cuts(rng, k, shards), merge=tree_merge(rng))
    expected_loss, expected_grad = case.loss_grad(reference)
    assert_matches(case, loss, grad, expected_loss, expected_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True])
def test_masked_classes(dtype, soft):
    """-inf logits: whole shards of them, a 1-class shard of one, and 0 * -inf = 0 in B and C."""
    case = make_case(8, 12, dtype, soft=soft, weighted=True, label_smoothing=0.0, zeros=True)
    case.logits[:, 4:8] = -np.inf  # the middle shard is masked in every row
    case.logits[1, 0] = -np.inf  # the 1-class shard, in one row
    if soft:
        case.target[:, 4:8] = 0
        case.target[1, 0] = 0
        case.target[...] /= case.target.sum(axis=1, keepdims=True)
    else:
        case.target[:] = np.where((case.target >= 4) & (case.target < 8), 9, case.target)
        case.target[1] = 2
    weight = case.kwargs["weight"]
    weight[5] = 0  # a zero weight on a masked class with smoothing: adds nothing
    for eps in (0.0, 0.2):
        case.kwargs["label_smoothing"] = eps
        expected = case.loss_grad(reference)
        for cuts in ([0, 1, 4, 8, 12], [0, 4, 8, 12], [0, 6, 12]):
            loss, grad, _ = sharded(case, cuts)
            assert_matches(case, loss, grad, *expected)
    case.kwargs["label_smoothing"] = 0.0
    loss, grad, _ = sharded(case, [0, 1, 4, 8, 12])
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert np.all(grad[:, 4:8] == 0)


def test_large_logits_keep_their_digits():
    """Logits around 1e4 in float32: the statistics are relative to the row max."""
    case = make_case(16, 3000, np.float32, weighted=True, label_smoothing=0.1)
    case.logits[...] += np.float32(1e4)
    expected = case.loss_grad(reference)
    loss, grad, _ = sharded(case, [0, 1000, 1001, 3000])
    assert_matches(case, loss, grad, *expected)


# --- combine -------------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True])
def test_combine_commutes_bitwise_and_associates(soft):
    case = make_case(20, 30, np.float32, soft=soft, weighted=True, label_smoothing=0.1)
    stats = [
        fastsce.partial_stats(*shard_args(case, lo, hi)[:2], lo, **shard_args(case, lo, hi)[2])
        for lo, hi in ((0, 9), (9, 10), (10, 30))
    ]
    ab, ba = fastsce.combine(stats[0], stats[1]), fastsce.combine(stats[1], stats[0])
    for name in ("m", "s", "a", "b", "c"):
        assert getattr(ab, name).tobytes() == getattr(ba, name).tobytes(), name
    left = fastsce.combine(fastsce.combine(stats[0], stats[1]), stats[2])
    right = fastsce.combine(stats[0], fastsce.combine(stats[1], stats[2]))
    for name in ("m", "s", "a", "b", "c"):
        np.testing.assert_allclose(getattr(left, name), getattr(right, name), rtol=1e-14, atol=1e-13)
    assert left.classes == 30 and left.shards == ((0, 9), (9, 1), (10, 20))
    assert fastsce.finish(left) == fastsce.finish(fastsce.combine(*stats))


def test_stats_are_read_only_and_inputs_unchanged():
    case = make_case(10, 12, np.float64, weighted=True, label_smoothing=0.1)
    snap = snapshot(case.logits, case.target, case.kwargs["weight"])
    _, _, total = sharded(case, [0, 5, 12])
    assert_unchanged(snap)
    with pytest.raises(ValueError):
        total.m[0] = 1.0
    with pytest.raises(AttributeError):
        total.classes = 3
    assert "N=10" in repr(total) and "classes=12" in repr(total)


# --- the newer options, against closed forms -----------------------------------------------------


def closed_form(
    logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
    sample_weight=None, where=None, all_ignored="nan", logit_scale=None, softcap=None,
):  # fmt: skip
    """(loss, grad, z-term, lse) in float64, from the semantics of fastsce's options."""
    x = logits.astype(np.float64)
    n, k = x.shape
    a = 1.0 if logit_scale is None else logit_scale
    z, dz = a * x, np.full_like(x, a)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
        dz = a * (1 - (z / softcap) ** 2)
    w = np.ones(k) if weight is None else np.asarray(weight, np.float64)
    eps = label_smoothing
    soft = target.ndim == 2
    if soft:
        t = target.astype(np.float64)
        counted = np.ones(n, bool)
    else:
        counted = target != ignore_index
        t = np.zeros((n, k))
        t[np.flatnonzero(counted), target[counted]] = 1
    v = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if where is not None:
        v = v * where
    counted &= v != 0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = z.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        p = np.exp(z - lse[:, None])
        times = lambda u, zz: np.where((u == 0) & np.isinf(zz), 0, u * zz)
        big_a, big_w = (w * t).sum(axis=1), w.sum()
        big_b, big_c = times(w * t, z).sum(axis=1), times(np.broadcast_to(w, z.shape), z).sum(axis=1)
        row = (1 - eps) * (big_a * lse - big_b) + eps / k * (big_w * lse - big_c)
        row = np.where(counted, v * row, 0)
        row_z = np.where(counted, v * z_loss * lse**2, 0)
        d = (v * counted).sum() if soft else (v * counted * big_a).sum()
        d_z = (v * counted).sum()
        fill = np.nan if all_ignored == "nan" else 0.0
        if reduction == "mean":
            sc, sc_z = (1 / d if d else fill), (1 / d_z if d_z else fill)
            z_term = row_z.sum() * sc_z if d_z else fill
            loss = (row.sum() * sc if d else fill) + z_term
        else:
            sc = sc_z = 1.0
            loss = row + row_z if reduction == "none" else row.sum() + row_z.sum()
            z_term = row_z if reduction == "none" else row_z.sum()
        g = sc * (((1 - eps) * big_a + eps * big_w / k)[:, None] * p - (1 - eps) * w * t - eps * w / k)
        g = g + sc_z * 2 * z_loss * lse[:, None] * p
        g = np.where(counted[:, None], v[:, None] * g * dz, 0)
    return loss, g, z_term, lse


NEW_OPTIONS = {
    "z_loss": dict(z_loss=1e-3),
    "logit_scale": dict(logit_scale=0.7),
    "softcap": dict(softcap=5.0),
    "scale_and_softcap": dict(logit_scale=2.5, softcap=3.0),
    "sample_weight": dict(sample_weight="random"),
    "where": dict(where="random"),
    "everything": dict(z_loss=0.01, logit_scale=1.5, softcap=8.0, sample_weight="random", where="random"),
}


def _with_options(case: Case, options: dict, seed) -> Case:
    rng = np.random.default_rng(seed)
    n = case.logits.shape[0]
    kwargs = dict(case.kwargs)
    for key, value in options.items():
        if value == "random" and key == "sample_weight":
            value = rng.uniform(0, 2, n)
            value[::5] = 0
        elif value == "random" and key == "where":
            value = rng.random(n) < 0.7
        kwargs[key] = value
    return Case(case.logits, case.target, kwargs)


@pytest.mark.parametrize("options", list(NEW_OPTIONS), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_new_options_match_closed_form(options, reduction, soft, dtype):
    base = make_case(17, 2100, dtype, soft=soft, weighted=True, label_smoothing=0.1, reduction=reduction, zeros=True)
    case = _with_options(base, NEW_OPTIONS[options], seed_of(options, reduction, soft))
    case.logits[0, :7] = -np.inf
    if soft:
        case.target[0, :7] = 0
    else:
        case.target[0] = 8
    loss, grad, z_term, lse = closed_form(case.logits, case.target, **case.kwargs)
    ref_loss, ref_grad, ref_z, ref_lse = case.loss_grad(reference, return_z_loss=True, return_lse=True)
    for cuts in ([0, 2100], [0, 1, 1030, 2100], [0, 500, 1400, 2099, 2100]):
        got = sharded(case, cuts, return_z_loss=True, return_lse=True)
        (got_loss, got_z, got_lse), got_grad = got[0], got[1]
        unit_loss, unit_grad = case.units()
        unit_loss, unit_grad = max(unit_loss, 1.0), max(unit_grad, 1e-3)
        assert_close(got_loss, np.asarray(loss).astype(dtype), dtype, unit=unit_loss)
        assert_close(got_z, np.asarray(z_term).astype(dtype), dtype, unit=unit_loss)
        assert_close(got_lse, lse.astype(dtype), dtype, unit=1.0)
        assert_close(got_grad, grad.astype(dtype), dtype, unit=unit_grad)
        # and against the unsharded reference, which takes these options too
        assert_close(got_loss, ref_loss, dtype, unit=unit_loss)
        assert_close(got_z, ref_z, dtype, unit=unit_loss)
        assert_close(got_lse, ref_lse, dtype, unit=1.0)
        assert_close(got_grad, ref_grad, dtype, unit=unit_grad)
        assert got_lse.dtype == dtype and got_lse.shape == (17,)


def test_new_options_gradient_by_finite_differences():
    """float64, sum reduction: finish_grad is the derivative of finish's loss, softcap and all."""
    case = make_case(5, 9, np.float64, soft=False, weighted=True, label_smoothing=0.1, reduction="sum")
    case = _with_options(case, NEW_OPTIONS["everything"], 1)
    cuts = [0, 1, 4, 9]
    _, grad, _ = sharded(case, cuts)
    numeric = np.zeros_like(grad)
    h = 1e-6
    for i in range(5):
        for j in range(9):
            up, down = case.logits.copy(), case.logits.copy()
            up[i, j] += h
            down[i, j] -= h
            plus = sharded(Case(up, case.target, case.kwargs), cuts)[0]
            minus = sharded(Case(down, case.target, case.kwargs), cuts)[0]
            numeric[i, j] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("all_ignored", ["nan", "zero"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored(all_ignored, dtype):
    case = make_case(6, 10, dtype, weighted=True)
    case.target[:] = -100
    case.kwargs.update(all_ignored=all_ignored, z_loss=0.1)
    loss, grad, _ = sharded(case, [0, 4, 10])
    (loss, z_term), _, _ = sharded(case, [0, 4, 10], return_z_loss=True)
    if all_ignored == "nan":
        assert np.isnan(loss) and np.isnan(z_term)
    else:
        assert loss == 0 and z_term == 0
    assert np.all(grad == 0)
    # where=False everywhere is the same as every row ignored
    case = make_case(6, 10, dtype)
    case.kwargs.update(all_ignored=all_ignored, where=np.zeros(6, bool))
    loss, grad, _ = sharded(case, [0, 4, 10])
    assert (np.isnan(loss) if all_ignored == "nan" else loss == 0) and np.all(grad == 0)


def test_excluded_rows_do_not_leak():
    """A row with sample weight 0 (or where False) may hold NaN: loss 0, gradient 0, but lse for it."""
    case = make_case(6, 10, np.float64, reduction="none")
    case.logits[2] = np.nan
    case.kwargs.update(sample_weight=np.array([1, 1, 0, 1, 1, 1.0]))
    (loss, lse), grad, _ = sharded(case, [0, 3, 10], return_lse=True)
    assert loss[2] == 0 and np.all(grad[2] == 0) and np.isnan(lse[2])
    assert np.all(np.isfinite(np.delete(loss, 2))) and np.all(np.isfinite(np.delete(grad, 2, axis=0)))


def test_out_and_in_place():
    case = make_case(9, 20, np.float32, weighted=True, label_smoothing=0.1)
    expected = case.loss_grad(reference)
    logits, target, kwargs = shard_args(case, 0, 8)
    logits2, _, kwargs2 = shard_args(case, 8, 20)
    total = fastsce.combine(
        fastsce.partial_stats(logits, target, 0, **kwargs), fastsce.partial_stats(logits2, target, 8, **kwargs2)
    )
    buf = np.empty((9, 8), np.float32)
    assert fastsce.finish_grad(logits, target, total, 0, **kwargs, out=buf) is buf
    own = np.ascontiguousarray(logits2)
    assert fastsce.finish_grad(own, target, total, 8, **kwargs2, out=own) is own  # in place
    assert_close(np.concatenate([buf, own], axis=1), expected[1], np.float32, unit=case.units()[1])


# --- bad input -----------------------------------------------------------------------------------


def _two_shards(soft=False, **kwargs):
    case = make_case(6, 10, np.float64, soft=soft)
    a = fastsce.partial_stats(case.logits[:, :4], case.target[:, :4] if soft else case.target, 0, **kwargs)
    b = fastsce.partial_stats(case.logits[:, 4:], case.target[:, 4:] if soft else case.target, 4, **kwargs)
    return case, a, b


def test_bad_label_held_by_no_shard():
    case = make_case(6, 10, np.float64)
    case.target[3] = 10
    a = fastsce.partial_stats(case.logits[:, :4], case.target, 0)
    b = fastsce.partial_stats(case.logits[:, 4:], case.target, 4)
    with pytest.raises(IndexError, match=r"target\[3\] = 10 is a class of no shard"):
        fastsce.finish(fastsce.combine(a, b))
    with pytest.raises(IndexError, match=r"target\[3\] = 10"):
        fastsce.finish_grad(case.logits[:, :4], case.target, fastsce.combine(a, b), 0)
    case.target[3] = -1
    a = fastsce.partial_stats(case.logits[:, :4], case.target, 0)
    with pytest.raises(IndexError, match=r"target\[3\] = -1"):
        fastsce.finish(fastsce.combine(a, fastsce.partial_stats(case.logits[:, 4:], case.target, 4)))


def test_bad_missing_and_overlapping_shards():
    case, a, b = _two_shards()
    labels_in_a = case.target.copy()
    labels_in_a[labels_in_a >= 0] = 1
    with pytest.raises(IndexError, match="no shard"):  # b's labels are missing
        fastsce.finish(a)
    only_a = fastsce.partial_stats(case.logits[:, :4], labels_in_a, 0)
    with pytest.raises(ValueError, match=r"no shard holds classes \[4, 10\)"):
        fastsce.finish(fastsce.combine(only_a, fastsce.partial_stats(case.logits[:, 4:], labels_in_a, 10)))
    overlap = fastsce.partial_stats(case.logits[:, 2:], case.target, 2)  # classes 2..9 again
    with pytest.raises(IndexError, match="shards .* overlap"):
        fastsce.finish(fastsce.combine(a, b, overlap))
    _, sa, sb = _two_shards(soft=True)
    with pytest.raises(ValueError, match="shards overlap"):
        fastsce.finish(fastsce.combine(sa, sb, sb))


def test_bad_combine():
    case, a, _ = _two_shards()
    other_n = fastsce.partial_stats(case.logits[:5, 4:], case.target[:5], 4)
    with pytest.raises(ValueError, match="N=6 rows with statistics of N=5"):
        fastsce.combine(a, other_n)
    for kwargs, name in (
        (dict(label_smoothing=0.1), "label_smoothing"),
        (dict(ignore_index=3), "ignore_index"),
        (dict(softcap=2.0), "softcap"),
        (dict(logit_scale=2.0), "logit_scale"),
    ):
        with pytest.raises(ValueError, match=f"{name}="):
            fastsce.combine(a, fastsce.partial_stats(case.logits[:, 4:], case.target, 4, **kwargs))
    with pytest.raises(ValueError, match="dtype"):
        fastsce.combine(a, fastsce.partial_stats(case.logits[:, 4:].astype(np.float32), case.target, 4))
    _, sa, _ = _two_shards(soft=True)
    with pytest.raises(ValueError, match="soft"):
        fastsce.combine(a, sa)
    other_target = case.target.copy()
    other_target[1] = 9 if other_target[1] != 9 else 8
    with pytest.raises(ValueError, match=r"different targets: target\[1\]"):
        fastsce.combine(a, fastsce.partial_stats(case.logits[:, 4:], other_target, 4))
    with pytest.raises(TypeError, match="ShardStats"):
        fastsce.combine(a, {"m": 1})


def test_bad_shapes_and_values():
    case, a, b = _two_shards()
    z, y = case.logits[:, :4], case.target
    with pytest.raises(ValueError, match="target has shape"):
        fastsce.partial_stats(z, y[:5], 0)
    with pytest.raises(ValueError, match="logits_shard must be 2-D"):
        fastsce.partial_stats(z[0], y, 0)
    with pytest.raises(ValueError, match="at least one class"):
        fastsce.partial_stats(z[:, :0], y, 0)
    with pytest.raises(TypeError, match="logits_shard must be float32 or float64"):
        fastsce.partial_stats(z.astype(np.int64), y, 0)
    with pytest.raises(ValueError, match="weight has shape"):
        fastsce.partial_stats(z, y, 0, weight=np.ones(10))
    with pytest.raises(ValueError, match="class_offset must be >= 0"):
        fastsce.partial_stats(z, y, -1)
    with pytest.raises(TypeError, match="class_offset must be an integer"):
        fastsce.partial_stats(z, y, 1.0)
    for name, value, error in (
        ("softcap", 0.0, ValueError),
        ("logit_scale", np.inf, ValueError),
        ("softcap", "3", TypeError),
    ):
        with pytest.raises(error, match=name):
            fastsce.partial_stats(z, y, 0, **{name: value})
    total = fastsce.combine(a, b)
    with pytest.raises(ValueError, match="sample_weight has shape"):
        fastsce.finish(total, sample_weight=np.ones(5))
    with pytest.raises(ValueError, match=r"sample_weight\[2\] = -1.0"):
        fastsce.finish(total, sample_weight=np.array([1, 1, -1, 1, 1, 1.0]))
    with pytest.raises(TypeError, match="where must be a boolean array"):
        fastsce.finish(total, where=np.ones(6))
    with pytest.raises(ValueError, match="where has shape"):
        fastsce.finish(total, where=np.ones(5, bool))
    with pytest.raises(ValueError, match="all_ignored"):
        fastsce.finish(total, all_ignored="ignore")
    with pytest.raises(ValueError, match="z_loss"):
        fastsce.finish(total, z_loss=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        fastsce.finish(total, reduction="avg")
    with pytest.raises(TypeError, match="stats must be a ShardStats"):
        fastsce.finish(np.zeros(6))
    # finish_grad: the shard must be one of those in the stats, with the same target and options
    with pytest.raises(ValueError, match="no shard with class_offset=1"):
        fastsce.finish_grad(z, y, total, 1)
    with pytest.raises(ValueError, match="N=5 rows"):
        fastsce.finish_grad(z[:5], y[:5], total, 0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fastsce.finish_grad(z, y, total, 0, label_smoothing=0.1)
    other = y.copy()
    other[0] = 9 if other[0] != 9 else 8
    with pytest.raises(ValueError, match=r"target\[0\]"):
        fastsce.finish_grad(z, other, total, 0)
    with pytest.raises(ValueError, match="out has shape"):
        fastsce.finish_grad(z, y, total, 0, out=np.empty((6, 5)))
    big = np.empty(z.size + 1)
    logits_view, out = big[:-1].reshape(z.shape), big[1:].reshape(z.shape)
    logits_view[...] = z
    with pytest.raises(ValueError, match="out overlaps logits_shard"):
        fastsce.finish_grad(logits_view, y, total, 0, out=out)
    shared = np.zeros(z.size, np.int64)  # a target whose memory is also out's
    shared[: y.size] = y
    with pytest.raises(ValueError, match="out overlaps target"):
        fastsce.finish_grad(z, shared[: y.size], total, 0, out=shared.view(np.float64).reshape(z.shape))


# --- byte order, masked arrays, weights the dtype cannot hold ------------------------------


def test_shards_of_either_byte_order():
    case = make_case(6, 10, np.float32, weighted=True)
    w = case.kwargs["weight"]
    want = fastsce.finish(
        fastsce.combine(*(fastsce.partial_stats(case.logits[:, lo:hi], case.target, lo, weight=w[lo:hi]) for lo, hi in ((0, 4), (4, 10))))
    )
    swap = case.logits.astype(case.logits.dtype.newbyteorder("S"))
    stats = [
        fastsce.partial_stats(swap[:, lo:hi], case.target.astype(">i8"), lo, weight=w[lo:hi].astype(">f8"))
        for lo, hi in ((0, 4), (4, 10))
    ]
    assert fastsce.finish(fastsce.combine(*stats)) == want
    g = fastsce.finish_grad(swap[:, :4], case.target, fastsce.combine(*stats), 0)
    assert g.dtype == np.float32 and g.dtype.isnative


@pytest.mark.parametrize("name", ("logits_shard", "target", "weight", "out"))
def test_masked_arrays_are_refused(name):
    case = make_case(6, 10, np.float64)
    args = dict(logits_shard=case.logits, target=case.target, weight=np.ones(10), out=np.empty((6, 10)))
    args[name] = np.ma.array(args[name])
    with pytest.raises(TypeError, match=f"{name} is a numpy.ma masked array"):
        if name == "out":
            stats = fastsce.partial_stats(case.logits, case.target, 0)
            fastsce.finish_grad(case.logits, case.target, stats, 0, out=args["out"])
        else:
            fastsce.partial_stats(args["logits_shard"], args["target"], 0, weight=args["weight"])


@pytest.mark.parametrize("dtype, value", ((np.float32, 1e300), (np.float32, 1e-40), (np.float64, 1e-320)))
def test_weights_the_dtype_cannot_hold_are_refused(dtype, value):
    """A shard sees only its slice of the weights, so it cannot rescale them: refused clearly
    rather than overflowing to a NaN loss (fastsce.cross_entropy computes them)."""
    case = make_case(6, 10, dtype)
    with pytest.raises(ValueError, match=r"weight\[0\] = .* outside the normal range"):
        fastsce.partial_stats(case.logits, case.target, 0, weight=np.full(10, value))


@pytest.mark.parametrize("value", (1e-320, 1.7e308, "spread"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_sample_weights_as_the_reference(value, reduction):
    """Sample weights are whole rows, the same on every shard, so a "mean" over them is
    rescaled by a power of two as in fastsce.cross_entropy: a subnormal weight neither
    loses digits of the loss nor makes the gradient 0/0 = NaN."""
    case = make_case(6, 10, np.float64)
    sw = np.geomspace(1e-300, 1e300, 6) if value == "spread" else np.full(6, value)
    shards = [(0, case.logits[:, :4]), (4, case.logits[:, 4:])]
    stats = fastsce.combine(*(fastsce.partial_stats(z, case.target, offset) for offset, z in shards))
    with np.errstate(over="ignore"):  # "sum" of 1.7e308-weighted rows is inf, in both
        loss = fastsce.finish(stats, reduction=reduction, sample_weight=sw)
        grad = np.concatenate(
            [fastsce.finish_grad(z, case.target, stats, offset, reduction=reduction, sample_weight=sw) for offset, z in shards],
            axis=1,
        )
        ref_loss, ref_grad = reference.cross_entropy_with_grad(case.logits, case.target, reduction=reduction, sample_weight=sw)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-300)
