"""fastsce.evaluate: against fastsce.reference.evaluate over shapes, dtypes and options,
against direct NumPy computations, closed forms and scikit-learn, its invariances
(shift, row order, thread count, chunking), bad input and the Evaluation it returns.

Bins: a row whose confidence lies within rounding of a bin edge i/B may land in either
neighbouring bin (the reference bins its float32 confidence, the kernels 1 / s in
float64). The comparisons find exactly those rows (EDGE), evaluate each alone to learn
where each implementation put it, and compare the bins of every other row exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import numpy as np
import pytest
from _cases import assert_close, assert_unchanged, make_labels, make_logits, make_weight, seed_of, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsce
from fastsce import reference
from fastsce.metrics import Evaluation, MetricSums, check_evaluation, metric_sums

IMPLS = {"fast": fastsce, "ref": reference}

# A confidence closer than this to a bin edge may fall in either neighbouring bin.
EDGE = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}



# --- helpers ---------------------------------------------------------------------------------


def compute_dtype(dtype) -> np.dtype:
    """The dtype the metrics are computed in: float16 / bfloat16 logits in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def half_dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def as_rows(z, t, kwargs):
    """(M, K) logits, (M,) targets and (M,) float64 row weights of a call (axis moved last)."""
    axis = kwargs.get("axis", -1)
    z2 = np.moveaxis(np.asarray(z), axis, -1)
    k = z2.shape[-1]
    lead = z2.shape[:-1]
    v = np.ones(lead)
    if kwargs.get("sample_weight") is not None:
        v = v * np.asarray(kwargs["sample_weight"], np.float64)
    if kwargs.get("where") is not None:
        v = v * np.asarray(kwargs["where"])
    return z2.reshape(-1, k), np.asarray(t).reshape(-1), v.reshape(-1)


def counted_rows(t, v, kwargs):
    return (t != kwargs.get("ignore_index", -100)) & (v != 0)


def bin_sums(ev):
    """(3, B): per bin the row weight, the sum of weight x confidence and of weight x correct."""
    counts = np.asarray(ev.bin_counts, np.float64)
    with np.errstate(invalid="ignore"):
        return np.stack(
            [
                counts,
                np.where(counts > 0, ev.bin_confidence * counts, 0),
                np.where(counts > 0, ev.bin_accuracy * counts, 0),
            ]
        )


def edge_rows(confidences, bins, dtype):
    """Rows whose confidence (any of the given per-row arrays) is within EDGE of an inner
    bin edge i / bins, 0 < i < bins (the outer edges 0 and 1 are never crossed)."""
    near = np.zeros(np.asarray(confidences[0]).size, bool)
    for conf in confidences:
        c = np.asarray(conf, np.float64).reshape(-1)
        i = np.round(c * bins)
        with np.errstate(invalid="ignore"):
            near |= (
                np.isfinite(c) & (i >= 1) & (i <= bins - 1) & (np.abs(c - i / bins) < EDGE[compute_dtype(conf.dtype)])
            )
    return np.flatnonzero(near)


def assert_bins_match(got, want, z, t, kwargs):
    """got's bins equal want's, each row in the same bin, but for rows within EDGE of a bin
    edge: each of those is evaluated alone by both implementations, must be in one of the
    two bins next to its edge, and its contribution is taken out before comparing."""
    bins = kwargs.get("bins", 15)
    z2, t2, v2 = as_rows(z, t, kwargs)
    dtype = compute_dtype(z2.dtype)
    assert got.bin_counts.shape == want.bin_counts.shape == (bins,)
    g, w = bin_sums(got), bin_sums(want)
    near = edge_rows([got.confidence, want.confidence], bins, dtype) if got.confidence is not None else []
    near = [i for i in near if counted_rows(t2[i : i + 1], v2[i : i + 1], kwargs)[0]]
    touched = np.zeros(bins, bool)
    single = {k: v for k, v in kwargs.items() if k in ("ignore_index", "topk")}
    for i in near:
        edge = int(np.round(float(want.confidence.reshape(-1)[i]) * bins))
        touched[edge - 1 : edge + 1] = True
        for sums, impl in ((g, "fast"), (w, "ref")):
            one = IMPLS[impl].evaluate(z2[i : i + 1], t2[i : i + 1], bins=bins, sample_weight=v2[i : i + 1], **single)
            (b,) = np.flatnonzero(one.bin_counts)
            assert b in (edge - 1, edge), f"{impl}: row {i}, confidence {want.confidence.reshape(-1)[i]!r} in bin {b}"
            sums -= bin_sums(one)
    # Every other row in the same bin: the same non-empty bins, the same weights (exact for
    # unweighted rows), sums within the float64 rounding of adding them in another order.
    scale = max(float(v2.sum()), 1.0)
    unweighted = kwargs.get("sample_weight") is None
    if unweighted:
        np.testing.assert_array_equal(g[0], w[0], err_msg="bin counts")
    np.testing.assert_allclose(g / scale, w / scale, rtol=0, atol=1e-12 if dtype == np.float64 else 2e-6)
    np.testing.assert_array_equal(g[0] > 1e-9 * scale, w[0] > 1e-9 * scale, err_msg="non-empty bins")
    keep = ~touched
    np.testing.assert_array_equal(np.isnan(got.bin_confidence[keep]), np.isnan(want.bin_confidence[keep]))
    for name in ("bin_counts", "bin_confidence", "bin_accuracy"):
        assert_close(getattr(got, name)[keep], np.asarray(getattr(want, name), np.float64)[keep], dtype, unit=1.0)
    if not near:
        assert_close(got.ece, want.ece, dtype, unit=1.0)
    for ev in (got, want):  # either way, the ECE is the one of its own bins
        if ev.rows and not math.isnan(ev.ece):
            s = bin_sums(ev)
            assert_close(ev.ece, np.abs(s[2] - s[1]).sum() / (v2 * counted_rows(t2, v2, kwargs)).sum(), dtype, unit=1.0)
    return len(near)


def assert_same_evaluation(got, want, z, t, kwargs):
    """got (fastsce.evaluate) equals want (reference.evaluate) for the call z, t, **kwargs:
    scalars within reference.TOLERANCE of the compute dtype, integers exactly, bins as
    assert_bins_match says."""
    dtype = compute_dtype(np.asarray(z).dtype)
    assert isinstance(got, Evaluation) and isinstance(want, Evaluation)
    for name in Evaluation.SCALARS:
        a, b = getattr(got, name), getattr(want, name)
        assert isinstance(a, float), (name, type(a))
        if name == "ece":
            continue  # assert_bins_match: it moves with the rows on a bin edge
        try:
            assert_close(a, b, dtype, unit=0.0 if name == "perplexity" else 1.0)
        except AssertionError as e:
            raise AssertionError(f"{name}: fast {a!r}, reference {b!r}") from e
    assert list(got.topk_accuracy) == list(want.topk_accuracy)
    for k in want.topk_accuracy:
        assert_close(got.topk_accuracy[k], want.topk_accuracy[k], dtype, unit=1.0)
    assert (got.rows, got.ignored_rows) == (want.rows, want.ignored_rows)
    assert got.rows + got.ignored_rows == np.asarray(t).size
    assert got.bin_counts.dtype == got.bin_confidence.dtype == got.bin_accuracy.dtype == np.float64
    for name in Evaluation.PER_ROW:
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape == np.shape(t), (name, a.shape, b.shape)
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        if a.dtype.kind == "i":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            try:
                assert_close(a, b, dtype, unit=1.0)
            except AssertionError as e:
                raise AssertionError(name) from e
    return assert_bins_match(got, want, z, t, kwargs)


def evaluate_both(z, t, kwargs):
    """Both implementations' results (per-row arrays too), after checking that no input was
    changed and that fast's aggregates do not depend on per_row."""
    before = snapshot(z, t, *kwargs.values())
    # The reference is given the rows C-contiguous: NumPy sums along a strided axis one
    # term after another (not pairwise), and the float32 sum of the exps then errs by up
    # to ~K ulps, beyond TOLERANCE for the entropy of a confident row (K = 600: 2.7e-6 of
    # an entropy of 0.015). The result's shapes are the same (lead shape kept).
    axis = kwargs.get("axis", -1)
    ref_z = np.ascontiguousarray(np.moveaxis(np.asarray(z), axis, -1)) if np.ndim(z) else z
    ref_t = t if np.ndim(t) < np.ndim(z) else np.moveaxis(np.asarray(t), axis, -1)  # (probabilities: bad input)
    ref_kwargs = dict(kwargs, axis=-1)
    with np.errstate(all="ignore"):  # the reference's NumPy temporaries meet inf - inf
        got = fastsce.evaluate(z, t, per_row=True, **kwargs)
        want = reference.evaluate(ref_z, ref_t, per_row=True, **ref_kwargs)
        plain = fastsce.evaluate(z, t, **kwargs)
    assert_unchanged(before)
    for name in Evaluation.SCALARS + ("rows", "ignored_rows"):
        assert same_bits(getattr(plain, name), getattr(got, name)), name
    for name in Evaluation.PER_ROW:
        assert getattr(plain, name) is None
    return got, want


def same_bits(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def assert_identical(a, b):
    """Two Evaluations bit for bit."""
    for name in (
        Evaluation.SCALARS
        + ("rows", "ignored_rows", "bin_counts", "bin_confidence", "bin_accuracy")
        + Evaluation.PER_ROW
    ):
        x, y = getattr(a, name), getattr(b, name)
        assert same_bits(x, y), (name, x, y)
    assert same_bits(list(a.topk_accuracy.items()), list(b.topk_accuracy.items()))


# --- inputs ----------------------------------------------------------------------------------

VARIANTS = ("plain", "weighted", "ignore-in", "specials", "ties")


def build(n, k, dtype, variant, seed=None):
    """(logits, target, kwargs) of one variant:
    plain      normal logits, every 4th row ignored (-100), topk (1, 5), 15 bins
    weighted   class weights, sample_weight with zeros, where, topk (1, 2, 10), 10 bins
    ignore-in  ignore_index = K // 2, a valid class (as PyTorch allows), topk 3, 7 bins
    specials   rows with a NaN, all -inf, a -inf target logit, a +inf logit, all NaN
    ties       integer logits (many ties; exact-tie confidences on bin edges), 12 bins"""
    rng = np.random.default_rng(seed_of(n, k, str(dtype), variant) if seed is None else seed)
    z = make_logits(rng, n, k, np.float32 if compute_dtype(dtype) == np.float32 else np.float64)
    t = make_labels(rng, n, k)
    kwargs = {}
    if variant == "weighted":
        kwargs = dict(
            weight=make_weight(rng, k),
            sample_weight=rng.uniform(0, 2, n) * (rng.random(n) > 0.2),
            where=rng.random(n) > 0.2,
            topk=(1, 2, 10),
            bins=10,
        )
    elif variant == "ignore-in":
        t = rng.integers(0, k, n)
        kwargs = dict(ignore_index=k // 2, topk=3, bins=7)
    elif variant == "specials":
        specials = [("nan", np.nan), ("-inf", -np.inf), ("-inf target", None), ("+inf", np.inf), ("all nan", None)]
        for i in range(n):
            kind, value = specials[i % 7] if i % 7 < len(specials) else (None, None)
            j = rng.integers(k)
            if kind == "-inf target":
                if t[i] < 0:
                    t[i] = j
                z[i, t[i]] = -np.inf
            elif kind == "all nan":
                z[i] = np.nan
            elif kind == "-inf":
                z[i] = -np.inf
            elif kind is not None:
                z[i, j] = value
    elif variant == "ties":
        z = rng.integers(-2, 3, (n, k)).astype(z.dtype)
        kwargs = dict(topk=(1, 2, 3), bins=12)
    return z.astype(dtype), t, kwargs


NS = (0, 1, 63, 64, 65, 1029)  # the tile edges (64 rows); 1029: many tiles, and many row-kernel chunks
KS = (1, 2, 3, 10, 17, 100, 511, 512, 513, 1000)  # SMALL_K (float32) is 512
# and past one chunk of the tile kernel (CHUNK_ROWS = 2048 rows; the row kernel's chunks
# hold 65536 // K rows, several at N = 1029 already)
SHAPES = [*itertools.product(NS, KS), (1, 32000), (65, 32000), (4100, 3), (4100, 17), (4100, 512)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n, k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_fast_matches_reference(n, k, variant):
    z, t, kwargs = build(n, k, np.float32, variant)
    assert_same_evaluation(*evaluate_both(z, t, kwargs), z, t, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ("weighted", "specials"))
def test_fast_matches_reference_big(variant):
    z, t, kwargs = build(1029, 32000, np.float32, variant)
    assert_same_evaluation(*evaluate_both(z, t, kwargs), z, t, kwargs)


# Other dtypes (the full run): float64's own threshold (SMALL_K 320), the half dtypes
# computed in float32 (threshold 512).
OTHER_DTYPE_SHAPES = {
    "float64": list(itertools.product((1, 65, 1029), (2, 17, 319, 320, 321, 1000))),
    "float16": list(itertools.product((1, 65, 1029), (3, 511, 512, 513))),
    "bfloat16": list(itertools.product((1, 65, 1029), (3, 511, 512, 513))),
}
OTHER_DTYPE_CASES = [
    pytest.param(name, n, k, variant, id=f"{name}-{n}x{k}-{variant}")
    for name, shapes in OTHER_DTYPE_SHAPES.items()
    for n, k in shapes
    for variant in VARIANTS
]


@pytest.mark.parametrize("dtype_name, n, k, variant", OTHER_DTYPE_CASES)
def test_fast_matches_reference_other_dtypes(dtype_name, n, k, variant):
    dtype = half_dtype(dtype_name)
    z, t, kwargs = build(n, k, dtype, variant)
    got, want = evaluate_both(z, t, kwargs)
    assert got.entropy.dtype == compute_dtype(dtype)
    assert_same_evaluation(got, want, z, t, kwargs)


LAYOUTS = ("axis0", "3d-axis1", "strided", "fortran", "axis0-blocks-tiles", "axis0-blocks-rows")


def layout(name):
    """(logits, target, kwargs) with the classes not on a C-contiguous last axis. The
    "blocks" ones hold more than COPY_BLOCK_LOGITS logits (copied in several blocks)."""
    rng = np.random.default_rng(seed_of(name))
    if name == "axis0":
        z = make_logits(rng, 17, 130, np.float32)  # (K, N)
        return z, rng.integers(0, 17, 130), dict(axis=0, sample_weight=rng.uniform(0, 1, 130))
    if name == "3d-axis1":
        z = np.ascontiguousarray(make_logits(rng, 5 * 7, 400, np.float32).reshape(5, 7, 400).transpose(0, 2, 1))
        t = rng.integers(0, 400, (5, 7))
        t[0, :3] = 9
        return z, t, dict(axis=1, ignore_index=9, where=rng.random((5, 7)) > 0.3)
    if name == "strided":
        z = make_logits(rng, 70, 2 * 390, np.float32)[:, ::2]
        return z, rng.integers(0, 390, 70), dict(topk=(1, 389, 390))
    if name == "fortran":
        z = np.asfortranarray(make_logits(rng, 130, 12, np.float32))
        return z, rng.integers(0, 12, 130), dict(weight=make_weight(rng, 12), topk=(2,))
    if name == "axis0-blocks-tiles":
        n, k = 110_000, 10
    else:
        n, k = 2_100, 600
    z = np.ascontiguousarray(make_logits(rng, n, k, np.float32).T)
    return z, make_labels(rng, n, k), dict(axis=0)


@pytest.mark.parametrize("name", LAYOUTS)
def test_fast_matches_reference_in_every_layout(name):
    z, t, kwargs = layout(name)
    got, want = evaluate_both(z, t, kwargs)
    assert_same_evaluation(got, want, z, t, kwargs)
    # (evaluate_both gives the reference C-contiguous rows: in the layout itself its
    # integers and counts are the same)
    strided = reference.evaluate(z, t, per_row=True, **kwargs)
    for name_ in ("argmax", "target_rank"):
        np.testing.assert_array_equal(getattr(strided, name_), getattr(want, name_), strict=True)
    assert (strided.rows, strided.ignored_rows) == (want.rows, want.ignored_rows)
    # the same numbers as the rows laid out plainly
    z2, t2, v2 = as_rows(z, t, kwargs)
    plain = {key: val for key, val in kwargs.items() if key not in ("axis", "where", "sample_weight")}
    if "where" in kwargs or "sample_weight" in kwargs:
        plain["sample_weight"] = v2
    again = fastsce.evaluate(np.ascontiguousarray(z2), t2, per_row=True, **plain)
    for name_ in Evaluation.PER_ROW:
        np.testing.assert_array_equal(getattr(got, name_).reshape(-1), getattr(again, name_), err_msg=name_)
    np.testing.assert_array_equal(got.bin_counts, again.bin_counts)
    assert_close(got.loss, again.loss, np.float32, unit=1.0)


def test_rows_on_a_bin_edge_are_found_and_move_one_bin_at_most():
    """The comparison above does meet rows on a bin edge (ties of two classes: confidence
    1/2, the edge 6/12) and accounts for each; a row two bins away would fail it."""
    z, t, kwargs = build(1029, 2, np.float32, "ties")
    got, want = evaluate_both(z, t, kwargs)
    assert assert_same_evaluation(got, want, z, t, kwargs) > 100
    z, t, kwargs = build(65, 17, np.float32, "plain")
    got, want = evaluate_both(z, t, kwargs)
    assert assert_same_evaluation(got, want, z, t, kwargs) == 0
    counts = got.bin_counts.copy()
    b = int(np.flatnonzero(counts)[0])
    counts[b] -= 1
    counts[(b + 2) % counts.size] += 1
    moved = Evaluation(**{**got.__dict__, "bin_counts": counts})
    with pytest.raises(AssertionError):
        assert_bins_match(moved, want, z, t, kwargs)


def test_loss_and_perplexity_agree_with_cross_entropy_and_torch():
    """loss: PyTorch's weighted mean (fastsce.cross_entropy's); perplexity: exp of the mean
    loss without class weights; target_logprob: minus the per-row loss."""
    rng = np.random.default_rng(seed_of("torch"))
    n, k = 300, 50
    z = make_logits(rng, n, k, np.float32)
    t = rng.integers(0, k, n)
    t[::5] = 7
    w = make_weight(rng, k)
    ev = fastsce.evaluate(z, t, weight=w, ignore_index=7, per_row=True)
    assert_close(ev.loss, fastsce.cross_entropy(z, t, weight=w, ignore_index=7), np.float32, unit=1.0)
    assert_close(ev.perplexity, math.exp(fastsce.cross_entropy(z, t, ignore_index=7)), np.float32)
    per_row = fastsce.cross_entropy(z, t, ignore_index=7, reduction="none")
    live = t != 7
    assert_close(-ev.target_logprob[live], per_row[live], np.float32, unit=1.0)
    assert np.isnan(ev.target_logprob[~live]).all() and (ev.target_rank[~live] == -1).all()
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(z), torch.from_numpy(t), weight=torch.from_numpy(w.astype(np.float32)), ignore_index=7
    )
    assert_close(ev.loss, float(want), np.float32, unit=1.0)


# --- the bins and ECE from the per-row arrays -------------------------------------------------


def away_from_edges(z, bins):
    """z with each row's top logit raised until its confidence is 1e-4 (or a tenth of a bin)
    from every bin edge: far beyond the rounding of either confidence."""
    z = z.copy()
    gap = min(1e-4, 0.1 / bins)
    for _ in range(100):
        zz = z.astype(np.float64)
        p = np.exp(zz - zz.max(axis=1, keepdims=True))
        conf = 1 / p.sum(axis=1)
        edge = np.round(conf * bins)
        near = (edge >= 1) & (edge <= bins - 1) & (np.abs(conf * bins - edge) < gap * bins)
        if not near.any():
            return z
        rows = np.flatnonzero(near)
        z[rows, np.argmax(z[rows], axis=1)] += 0.01
    raise AssertionError("could not move the confidences away from the bin edges")


BIN_CASES = [*itertools.product((3, 40, 1000), (1, 2, 15, 100)), (3, 4096)]  # (up to MAX_BINS)


@pytest.mark.parametrize("k, bins", BIN_CASES)
def test_bins_and_ece_equal_a_direct_numpy_computation(k, bins):
    """Per bin (i/B, (i+1)/B]: the rows (weights), mean confidence and accuracy, and the ECE
    sum_b |correct_b - confidence_b| / total, from fast's own per-row confidence and argmax."""
    rng = np.random.default_rng(seed_of("bins", k, bins))
    n = 700
    z = away_from_edges(make_logits(rng, n, k, np.float32, scale=rng.uniform(0.3, 6)), bins)
    t = make_labels(rng, n, k)
    v = rng.uniform(0, 3, n) * (rng.random(n) > 0.1)
    got = fastsce.evaluate(z, t, bins=bins, sample_weight=v, per_row=True)
    counted = (t != -100) & (v > 0)
    conf = got.confidence.astype(np.float64)[counted]
    correct = (got.argmax == t)[counted]
    vc = v[counted]
    index = np.ceil(conf * bins).astype(int) - 1
    assert ((index >= 0) & (index < bins)).all()
    counts = np.bincount(index, vc, bins)
    conf_sum = np.bincount(index, vc * conf, bins)
    correct_sum = np.bincount(index, vc * correct, bins)
    np.testing.assert_array_equal(got.bin_counts > 0, counts > 0)  # every row in its bin
    np.testing.assert_allclose(got.bin_counts, counts, rtol=1e-12)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(got.bin_confidence, conf_sum / counts, rtol=2e-7, equal_nan=True)
        np.testing.assert_allclose(got.bin_accuracy, correct_sum / counts, rtol=1e-12, equal_nan=True)
    ece = np.abs(correct_sum - conf_sum).sum() / vc.sum()
    assert got.ece == pytest.approx(ece, rel=2e-6, abs=1e-7)
    assert got.accuracy == pytest.approx((vc * correct).sum() / vc.sum(), rel=1e-12)
    assert got.mean_confidence == pytest.approx((vc * conf).sum() / vc.sum(), rel=1e-6)
    assert got.rows == counted.sum() and got.ignored_rows == n - counted.sum()


def test_ece_is_nan_when_a_counted_row_has_no_confidence():
    """A counted NaN / all -inf row: ECE NaN, the row in no bin; the same row ignored or
    with weight 0: a number."""
    z = make_logits(np.random.default_rng(3), 6, 5, np.float32)
    z[1] = -np.inf
    z[4, 2] = np.nan
    t = np.array([0, 1, 2, 3, 4, 0])
    for impl in IMPLS.values():
        with np.errstate(all="ignore"):
            ev = impl.evaluate(z, t)
            assert math.isnan(ev.ece) and ev.bin_counts.sum() == 4 and ev.rows == 6
            ev = impl.evaluate(z, t, sample_weight=[1, 0, 1, 1, 0, 1])
            assert not math.isnan(ev.ece) and ev.bin_counts.sum() == 4 and ev.rows == 4
            ev = impl.evaluate(z, np.array([0, -100, 2, 3, -100, 0]))
            assert not math.isnan(ev.ece) and ev.rows == 4


# --- closed forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", (1, 2, 3, 17, 512, 513, 1000))
@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_logits(impl, k):
    """All logits equal: entropy = loss = log K, confidence = p_y = 1/K, perplexity K,
    argmax 0 (the first maximum), rank 0, so every top-k accuracy is 1 (ties count in the
    target's favour) while the accuracy is the share of targets equal to 0."""
    n = 3 * k if k < 100 else k
    t = np.arange(n) % k  # each class equally often (when n is a multiple of K)
    z = np.full((n, k), -2.5, np.float32)
    ev = IMPLS[impl].evaluate(z, t, topk=(1, 2, 5), per_row=True)
    dtype = np.float32
    assert_close(ev.entropy, np.full(n, math.log(k), np.float32), dtype, unit=1.0)
    assert_close(ev.target_logprob, np.full(n, -math.log(k), np.float32), dtype, unit=1.0)
    assert_close(ev.confidence, np.full(n, 1 / k, np.float32), dtype, unit=1.0)
    np.testing.assert_array_equal(ev.argmax, 0)
    np.testing.assert_array_equal(ev.target_rank, 0)
    assert_close(ev.loss, math.log(k), dtype, unit=1.0)
    assert_close(ev.mean_entropy, math.log(k), dtype, unit=1.0)
    assert_close(ev.perplexity, float(k), dtype)
    assert_close(ev.mean_target_probability, 1 / k, dtype, unit=1.0)
    assert_close(ev.mean_confidence, 1 / k, dtype, unit=1.0)
    assert ev.accuracy == np.mean(t == 0)
    assert ev.topk_accuracy == {1: 1.0, 2: 1.0, 5: 1.0}
    # one bin holds every row; its accuracy 1/K equals its confidence: ECE 0
    assert (ev.bin_counts > 0).sum() == 1 and ev.bin_counts.sum() == n
    assert ev.ece == pytest.approx(0, abs=2e-6)


@pytest.mark.parametrize("k", (2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60, 512, 513))
@pytest.mark.parametrize("impl", IMPLS)
def test_a_confidence_on_a_bin_edge_is_in_the_bin_it_closes(request, impl, k):
    """Uniform rows have confidence exactly 1/K: with B = 60 (or 3 K) bins
    that is the edge n/B, which belongs to the bin ((n-1)/B, n/B]."""
    bins = 60 if 60 % k == 0 else 3 * k
    z = np.zeros((4, k), np.float32)
    ev = IMPLS[impl].evaluate(z, np.zeros(4, np.int64), bins=bins)
    expected = bins // k - 1
    assert np.flatnonzero(ev.bin_counts).tolist() == [expected], (np.flatnonzero(ev.bin_counts), expected)


@pytest.mark.parametrize("k", (2, 3, 17, 512, 513, 1000))
@pytest.mark.parametrize("impl", IMPLS)
def test_ties_follow_the_documented_rule(impl, k):
    """argmax: the first maximum; target_rank: logits strictly above the target's; so
    accuracy counts a tie only when the target is the first maximum, top-1 every tie."""
    rng = np.random.default_rng(seed_of("ties", k))
    n = 300
    z = rng.integers(0, 3, (n, k)).astype(np.float32)
    t = rng.integers(0, k, n)
    t[::3] = np.argmax(z[::3] == z[::3].max(axis=1, keepdims=True), axis=1)  # some targets a first max
    last = k - 1 - np.argmax((z == z.max(axis=1, keepdims=True))[:, ::-1], axis=1)
    t[1::3] = last[1::3]  # some the last maximum
    ev = IMPLS[impl].evaluate(z, t, topk=(1, 2, 3), per_row=True)
    rank = (z > z[np.arange(n), t][:, None]).sum(axis=1)
    np.testing.assert_array_equal(ev.argmax, np.argmax(z, axis=1))
    np.testing.assert_array_equal(ev.target_rank, rank)
    assert ev.accuracy == pytest.approx(np.mean(np.argmax(z, axis=1) == t), rel=1e-12)
    for kk in (1, 2, 3):
        assert ev.topk_accuracy[kk] == pytest.approx(np.mean(rank < kk), rel=1e-12)
    assert ev.topk_accuracy[1] >= ev.accuracy
    if k > 1:
        assert ev.topk_accuracy[1] > ev.accuracy  # the data holds ties at the top


@pytest.mark.parametrize("k", (1, 2, 10, 512, 513, 5000))
@pytest.mark.parametrize("impl", IMPLS)
def test_huge_margins(impl, k):
    """One logit 100 above the rest: probability 1 in float32, entropy ~ 0, accuracy 1 when
    it is the target (ECE 0: confidence 1, accuracy 1), 0 when it never is (ECE 1)."""
    rng = np.random.default_rng(seed_of("margin", k))
    n = 130
    z = rng.uniform(-1, 1, (n, k)).astype(np.float32)
    top = rng.integers(0, k, n)
    z[np.arange(n), top] = 100
    ev = IMPLS[impl].evaluate(z, top, topk=(1,), per_row=True)
    assert ev.accuracy == 1 and ev.topk_accuracy == {1: 1.0}
    assert ev.loss == pytest.approx(0, abs=1e-30) and ev.perplexity == pytest.approx(1, abs=1e-6)
    assert ev.mean_entropy == pytest.approx(0, abs=1e-36)
    assert ev.mean_confidence == pytest.approx(1, abs=1e-6) and ev.mean_target_probability == pytest.approx(1, abs=1e-6)
    assert ev.ece == pytest.approx(0, abs=1e-6)
    assert ev.bin_counts[-1] == n and ev.bin_counts[:-1].sum() == 0
    np.testing.assert_array_equal(ev.argmax, top)
    np.testing.assert_array_equal(ev.target_rank, 0)
    if k > 1:
        wrong = (top + 1) % k
        ev = IMPLS[impl].evaluate(z, wrong, topk=(1,))
        assert ev.accuracy == 0 and ev.topk_accuracy == {1: 0.0}
        assert ev.ece == pytest.approx(1, abs=1e-6)
        assert ev.loss > 98


@pytest.mark.parametrize("impl", IMPLS)
def test_a_topk_beyond_int64_is_one(impl):
    """check_topk takes any positive int; the kernels get them as int64."""
    z, t, _ = bad_case()
    ev = IMPLS[impl].evaluate(z, t, topk=(1, 2**63))
    assert ev.topk_accuracy[2**63] == 1.0


def test_topk_of_k_or_more_is_one_and_a_single_class_is_always_right():
    z = make_logits(np.random.default_rng(5), 70, 6, np.float32)
    t = np.arange(70) % 6
    for impl in IMPLS.values():
        ev = impl.evaluate(z, t, topk=(6, 7, 100))
        assert ev.topk_accuracy == {6: 1.0, 7: 1.0, 100: 1.0}
        ev = impl.evaluate(z[:, :1], np.zeros(70, np.int64), per_row=True)
        assert (ev.accuracy, ev.loss, ev.mean_entropy, ev.perplexity, ev.ece) == (1.0, 0.0, 0.0, 1.0, 0.0)
        assert ev.bin_counts[-1] == 70


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ("no rows", "all ignored", "all weight 0"))
def test_no_counted_row_gives_nan_means(impl, case):
    z = make_logits(np.random.default_rng(6), 0 if case == "no rows" else 5, 4, np.float32)
    t = np.full(len(z), -100 if case == "all ignored" else 1)
    ev = IMPLS[impl].evaluate(z, t, sample_weight=np.zeros(len(z)) if case == "all weight 0" else None, per_row=True)
    for name in Evaluation.SCALARS:
        assert math.isnan(getattr(ev, name)), name
    assert all(math.isnan(v) for v in ev.topk_accuracy.values())
    assert (ev.rows, ev.ignored_rows) == (0, len(z))
    np.testing.assert_array_equal(ev.bin_counts, 0)
    assert np.isnan(ev.bin_confidence).all() and np.isnan(ev.bin_accuracy).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_bin_arrays_are_float64_when_no_row_is_counted(impl):
    ev = IMPLS[impl].evaluate(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    assert ev.bin_counts.dtype == ev.bin_confidence.dtype == ev.bin_accuracy.dtype == np.float64


@pytest.mark.parametrize("k", (3, 500))
@pytest.mark.parametrize("impl", IMPLS)
def test_argmax_of_a_row_holding_nan_is_its_first_nan(request, impl, k):
    """As np.argmax (the documented rule), also when the target logit is a later NaN."""
    z = np.zeros((3, k), np.float32)
    z[:, 0] = z[:, 2] = np.nan
    z[2, 1] = 5
    ev = IMPLS[impl].evaluate(z, np.array([2, 1, 0]), per_row=True)
    np.testing.assert_array_equal(ev.argmax, np.argmax(z, axis=1))


@pytest.mark.parametrize("k", (2, 500))
@pytest.mark.parametrize("impl", IMPLS)
def test_perplexity_is_finite_while_exp_of_the_mean_loss_is(impl, k):
    z = np.full((1, k), -np.inf, np.float32)
    z[0, 0], z[0, 1] = 0, -709.5  # loss 709.5: exp of it is 1.35e308
    ev = IMPLS[impl].evaluate(z, np.array([1]))
    assert ev.loss == pytest.approx(709.5)
    assert ev.perplexity == pytest.approx(math.exp(709.5))


# --- scikit-learn -------------------------------------------------------------------------------


def sklearn_case(k, seed):
    rng = np.random.default_rng(seed_of("sklearn", k, seed))
    n = 500
    z = (np.argsort(rng.random((n, k)), axis=1) * np.float32(6 / k) - 3).astype(np.float32)  # distinct in each row
    t = rng.integers(0, k, n)
    v = rng.uniform(0, 2, n) * (rng.random(n) > 0.2)
    return z, t, v


@pytest.mark.parametrize("k", (3, 10, 513, 1000))
def test_against_scikit_learn(k):
    metrics = pytest.importorskip("sklearn.metrics")
    z, t, v = sklearn_case(k, 0)
    assert all(len(np.unique(row)) == k for row in z)  # no ties: top-k is unambiguous
    zz = z.astype(np.float64)
    p = np.exp(zz - zz.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    topk = tuple(kk for kk in (1, 2, 5) if kk < k)
    for sample_weight in (None, v):
        ev = fastsce.evaluate(z, t, topk=topk, sample_weight=sample_weight)
        assert_close(
            ev.loss, metrics.log_loss(t, p, labels=range(k), sample_weight=sample_weight), np.float32, unit=1.0
        )
        assert ev.accuracy == pytest.approx(
            metrics.accuracy_score(t, z.argmax(axis=1), sample_weight=sample_weight), rel=1e-12
        )
        for kk in topk:
            want = metrics.top_k_accuracy_score(t, z, k=kk, labels=range(k), sample_weight=sample_weight)
            assert ev.topk_accuracy[kk] == pytest.approx(want, rel=1e-12), kk


# --- every option drawn together ------------------------------------------------------------------

EXAMPLES = int(os.environ.get("FASTSCE_PROPERTY_EXAMPLES", "60"))
# masked classes, NaN, values whose exp overflows, and values whose differences overflow
SPECIAL = {
    np.float32: (np.inf, -np.inf, np.nan, 1e30, -1e30, 3e38, -3e38),
    np.float64: (np.inf, -np.inf, np.nan, 1e300, -1e300, 1.7e308, -1.7e308),
}


@st.composite
def problems(draw, dtype):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    k = draw(st.sampled_from((1, 2, 3, 7, 64, 100, 319, 321, 511, 513, 700)), label="K")
    if draw(st.booleans(), label="3-D"):
        a, d = draw(st.integers(0, 4), label="A"), draw(st.sampled_from((1, 3, 33)), label="d")
        axis = draw(st.sampled_from((0, 1, 2, -1)), label="axis")
        shape = [a, d]
        shape.insert(axis % 3, k)
    else:
        n = draw(st.sampled_from((0, 1, 2, 63, 64, 65, 129, 200)), label="N")
        axis = draw(st.sampled_from((-1, 0)), label="axis")
        shape = [n, k] if axis == -1 else [k, n]
    shape = tuple(shape)
    lead = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    if draw(st.booleans(), label="integer logits (ties)"):
        x = rng.integers(-3, 3, shape).astype(dtype)
    else:
        x = (draw(st.sampled_from((0.1, 1.0, 30.0)), label="logit scale") * rng.standard_normal(shape)).astype(dtype)
    special = draw(st.sampled_from((0, 0, 0.01, 0.3)), label="special fraction")
    if special and x.size:
        hit = rng.random(shape) < special
        x[hit] = rng.choice(np.array(SPECIAL[dtype], dtype), size=int(hit.sum()))
    if draw(st.booleans(), label="non-contiguous") and x.size:
        x = np.flip(x, axis=axis % len(shape))  # negative strides on the class axis
    options = {"axis": axis}
    ignore_index = draw(st.sampled_from((-100, -1, 0, k // 2, k - 1)), label="ignore_index")
    if ignore_index != -100:
        options["ignore_index"] = ignore_index
    t = rng.integers(0, k, lead)
    if draw(st.booleans(), label="ignored rows") and t.size:
        t[rng.random(lead) < 0.3] = ignore_index
    if draw(st.booleans(), label="weight"):
        options["weight"] = rng.uniform(0, 2, k) * draw(st.sampled_from((1.0, 1e-30, 1e30)), label="weight scale")
    if draw(st.booleans(), label="sample_weight"):
        options["sample_weight"] = rng.uniform(0, 2, lead) * (rng.random(lead) > 0.2)
    if draw(st.booleans(), label="where"):
        options["where"] = rng.random(lead) > 0.3
    options["topk"] = draw(
        st.one_of(st.integers(1, k + 2), st.lists(st.integers(1, k + 2), min_size=1, max_size=4, unique=True)),
        label="topk",
    )
    options["bins"] = draw(st.sampled_from((1, 2, 3, 10, 15, 64)), label="bins")

    bad = draw(st.sampled_from((None,) * 8 + ("label", "topk", "bins", "soft")), label="bad")
    if bad == "label" and t.size:
        t.flat[rng.integers(t.size)] = k
    elif bad == "topk":
        options["topk"] = (1, 0)
    elif bad == "bins":
        options["bins"] = 0
    elif bad == "soft":
        t = np.moveaxis(rng.dirichlet(np.ones(k), size=lead).reshape(lead + (k,)), -1, axis % len(shape))
    return x, t, options


@pytest.mark.parametrize(
    "dtype_name",
    [
        "float32",
        pytest.param("float64", marks=pytest.mark.f64),
        *[pytest.param(h, marks=pytest.mark.half) for h in ("float16", "bfloat16")],
    ],
    ids=["f32", "f64", "f16", "bf16"],
)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_fast_matches_reference_with_every_option(dtype_name, data):
    """The half dtypes are drawn as float32 and rounded (their specials overflow to inf)."""
    dtype = half_dtype(dtype_name)
    x, t, options = data.draw(problems(np.float64 if dtype == np.float64 else np.float32), label="problem")
    if dtype.itemsize == 2:
        with np.errstate(over="ignore"):
            x = x.astype(dtype)
    errors = {}
    for impl in IMPLS:
        try:
            with np.errstate(all="ignore"):
                IMPLS[impl].evaluate(x, t, **options)
        except Exception as e:
            errors[impl] = (type(e), str(e))
    if errors:
        assert errors.get("fast") == errors.get("ref"), errors
        return
    assert_same_evaluation(*evaluate_both(x, t, options), x, t, options)


# --- invariances --------------------------------------------------------------------------------


def dyadic_logits(rng, n, k):
    """Logits on a grid of 1/64 in (-16, 16): adding an integer below 2^10 is exact in float32."""
    return (np.round(rng.uniform(-16, 16, (n, k)) * 64) / 64).astype(np.float32)


@pytest.mark.parametrize("k", (3, 17, 512, 513, 1000))
def test_adding_a_constant_to_a_row_changes_nothing(k):
    """Every quantity depends on the differences z - max only: with an exact shift the
    results are the same bits."""
    rng = np.random.default_rng(seed_of("shift", k))
    n = 200
    z = dyadic_logits(rng, n, k)
    t = make_labels(rng, n, k)
    shift = rng.integers(-1000, 1000, (n, 1)).astype(np.float32)
    assert ((z + shift) - shift == z).all()  # exact
    kwargs = dict(weight=make_weight(rng, k), sample_weight=rng.uniform(0, 2, n), topk=(1, 5), bins=10)
    assert_identical(
        fastsce.evaluate(z + shift, t, per_row=True, **kwargs), fastsce.evaluate(z, t, per_row=True, **kwargs)
    )


@pytest.mark.parametrize("k", (3, 17, 512, 513, 1000))
def test_permuting_rows_permutes_the_per_row_arrays(k):
    rng = np.random.default_rng(seed_of("permute", k))
    n = 300
    z = make_logits(rng, n, k, np.float32)
    t = make_labels(rng, n, k)
    v = rng.uniform(0, 2, n) * (rng.random(n) > 0.2)
    perm = rng.permutation(n)
    a = fastsce.evaluate(z, t, sample_weight=v, per_row=True)
    b = fastsce.evaluate(z[perm], t[perm], sample_weight=v[perm], per_row=True)
    for name in Evaluation.PER_ROW:
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name)[perm], err_msg=name, strict=True)
    for name in Evaluation.SCALARS:
        assert_close(getattr(b, name), getattr(a, name), np.float64, unit=0.0 if name == "perplexity" else 1.0)
    for kk in a.topk_accuracy:
        assert_close(b.topk_accuracy[kk], a.topk_accuracy[kk], np.float64, unit=1.0)
    np.testing.assert_allclose(b.bin_counts, a.bin_counts, rtol=1e-12)
    np.testing.assert_array_equal(b.bin_counts > 0, a.bin_counts > 0)
    np.testing.assert_allclose(b.bin_confidence, a.bin_confidence, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(b.bin_accuracy, a.bin_accuracy, rtol=1e-12, equal_nan=True)
    assert (b.rows, b.ignored_rows) == (a.rows, a.ignored_rows)


@pytest.mark.parametrize("n, k", [(6000, 17), (200, 1000)], ids=["tiles", "rows"])
@pytest.mark.parametrize("per_row", (False, True))
def test_results_do_not_depend_on_the_thread_count(n, k, per_row):
    """Problems above the serial threshold run on the pool: 1 and 2 threads, the same bits."""
    import numba

    rng = np.random.default_rng(seed_of("threads", n, k))
    z = make_logits(rng, n, k, np.float32)
    t = make_labels(rng, n, k)
    kwargs = dict(weight=make_weight(rng, k), sample_weight=rng.uniform(0, 2, n), topk=(1, 3), bins=20, per_row=per_row)
    saved = numba.get_num_threads()
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            results.append(fastsce.evaluate(z, t, **kwargs))
    finally:
        numba.set_num_threads(saved)
    assert_identical(*results)


def test_concurrent_calls_match_serial_calls_bitwise():
    """Calls from several Python threads at once (small ones on the serial kernels, large
    ones through the pool's launch lock) give the serial calls' bits."""
    from concurrent.futures import ThreadPoolExecutor

    work = [build(n, k, np.float32, variant, seed=i) for i, (n, k, variant) in enumerate(
        itertools.product((65, 1029), (3, 513), ("weighted", "specials", "ties"))
    )]  # fmt: skip

    def run(case):
        z, t, kwargs = case
        with np.errstate(all="ignore"):
            return fastsce.evaluate(z, t, per_row=True, **kwargs)

    serial = [run(case) for case in work]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, work * 2))
    for got, want in zip(concurrent, serial * 2, strict=True):
        assert_identical(got, want)


@pytest.mark.parametrize("k", (5, 512, 513))
def test_the_sums_of_parts_add_up_to_the_whole(k):
    """metric_sums of two parts of a batch, added, finish into the whole batch's
    Evaluation: the same per-row arrays and bins, the means within rounding."""
    rng = np.random.default_rng(seed_of("chunks", k))
    n = 1000
    z = make_logits(rng, n, k, np.float32)
    z[7, 1] = np.nan
    t = make_labels(rng, n, k)
    v = rng.uniform(0, 2, n) * (rng.random(n) > 0.2)
    w = make_weight(rng, k)
    topk, bins = (1, 4), 9

    def sums(rows):
        problem, ks, nbins = check_evaluation(z[rows], t[rows], topk, bins, w, -100, -1, v[rows], None)
        return metric_sums(problem, ks, nbins, per_row=True)

    whole, whole_rows = sums(slice(None))
    for cut in (0, 333, 640, n):
        (a, rows_a), (b, rows_b) = sums(slice(0, cut)), sums(slice(cut, n))
        total = a + b
        assert total.rows == n
        per_row = {name: np.concatenate([rows_a[name], rows_b[name]]) for name in rows_a}
        for name in rows_a:
            np.testing.assert_array_equal(per_row[name], whole_rows[name], err_msg=name, strict=True)
        np.testing.assert_allclose(total.sums, whole.sums, rtol=1e-13, atol=1e-13 * n, equal_nan=True)
        got, want = total.finish(per_row), whole.finish(whole_rows)
        np.testing.assert_array_equal(got.bin_counts > 0, want.bin_counts > 0)
        for name in Evaluation.SCALARS:
            assert_close(getattr(got, name), getattr(want, name), np.float64, unit=0.0 if name == "perplexity" else 1.0)
    assert_identical(
        whole.finish(whole_rows), fastsce.evaluate(z, t, topk=topk, bins=bins, weight=w, sample_weight=v, per_row=True)
    )
    assert_identical((MetricSums.zero(topk, bins) + whole).finish(), whole.finish())
    with pytest.raises(ValueError, match="topk"):
        whole + MetricSums.zero((1,), bins)
    with pytest.raises(ValueError, match="bins"):
        whole + MetricSums.zero(topk, 10)


def test_the_sums_of_parts_add_up_with_extreme_sample_weights():
    """Weights outside [2^-500, 2^500] in one part only: the added sums must still be those
    of the whole batch (the command line's chunks and Dask's blocks add MetricSums)."""
    rng = np.random.default_rng(seed_of("extreme parts"))
    z = make_logits(rng, 200, 5, np.float32)
    t = rng.integers(0, 5, 200)
    v = np.ones(200)
    v[:100] = 1e-200

    def sums(rows):
        problem, ks, nbins = check_evaluation(z[rows], t[rows], (1,), 15, None, -100, -1, v[rows], None)
        return metric_sums(problem, ks, nbins)[0]

    whole = fastsce.evaluate(z, t, sample_weight=v, topk=(1,))
    added = (sums(slice(0, 100)) + sums(slice(100, 200))).finish()
    assert_close(added.loss, whole.loss, np.float32, unit=1.0)
    np.testing.assert_allclose(added.bin_counts, whole.bin_counts, rtol=1e-12)


@pytest.mark.parametrize("scale", (2.0**-600, 2.0**600), ids=("2^-600", "2^600"))
@pytest.mark.parametrize("impl", IMPLS)
def test_bin_counts_are_the_total_row_weight_at_any_scale(impl, scale):
    z = make_logits(np.random.default_rng(8), 40, 5, np.float32)
    v = np.random.default_rng(9).uniform(0.5, 1, 40) * scale
    ev = IMPLS[impl].evaluate(z, np.arange(40) % 5, sample_weight=v)
    assert ev.bin_counts.sum() == pytest.approx(v.sum(), rel=1e-12)


MEMORY_SCRIPT = """
import sys, tracemalloc
import numpy as np
import fastsce

n, k, bins = map(int, sys.argv[1:])
rng = np.random.default_rng(0)
z = rng.standard_normal((n, k)).astype(np.float32)
t = rng.integers(0, k, n)
fastsce.evaluate(z[:70], t[:70], bins=bins)  # compile outside the trace
tracemalloc.start()
fastsce.evaluate(z, t, bins=bins)
print(tracemalloc.get_traced_memory()[1])
"""


@pytest.mark.parametrize("n", (2600, 26000))
def test_extra_memory_does_not_grow_with_rows_times_bins(n):
    """Each chunk of rows keeps 10 + T + 3 bins float64 sums; at most MAX_CHUNKS chunks a
    call (longer chunks for more rows) bound them whatever N (measured in a fresh
    interpreter, as tests/test_memory.py does): 1000 classes, the most bins."""
    import subprocess
    import sys

    from fastsce.metrics import MAX_BINS, MAX_CHUNKS

    k, bins = 1000, MAX_BINS
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(n), str(k), str(bins)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split()[-1])
    sums = (10 + 2 + 3 * bins) * 8
    assert peak <= 2 * MAX_CHUNKS * sums + (1 << 20), (peak, MAX_CHUNKS * sums)  # (the chunks' sums, added)


# --- bad input ------------------------------------------------------------------------------------


def bad_case(**options):
    rng = np.random.default_rng(0)
    z = make_logits(rng, 4, 3, np.float32)
    t = np.array([0, 2, 1, 0])
    return z, t, options


def masked_case(name):
    z, t, _ = bad_case()
    given = dict(logits=z, target=t)
    mask = np.zeros(given[name].shape, bool)
    mask.flat[0] = True
    given[name] = np.ma.array(given[name], mask=mask)
    return given["logits"], given["target"], {}


BAD = [
    # (exception types allowed, fragments of the message, the call)
    pytest.param(
        (ValueError,),
        ["probabilities", "argmax"],
        lambda: (bad_case()[0], np.full((4, 3), 1 / 3), {}),
        id="soft-target",
    ),
    *[
        pytest.param(
            (ValueError, TypeError), ["topk", repr(topk)], lambda k=topk: bad_case(topk=k), id=f"topk-{topk!r}"
        )
        for topk in (0, -1, 1.5, (1, 1), "a", (1, 0), (True,), (2.0,), None)
    ],
    *[
        pytest.param(
            (ValueError, TypeError), ["bins", repr(bins)], lambda b=bins: bad_case(bins=b), id=f"bins-{bins!r}"
        )
        for bins in (0, -3, 2.5, True, "15", None, 1 << 21)
    ],
    pytest.param(
        (IndexError,), ["target[1] = 3", "K=3"], lambda: (bad_case()[0], np.array([0, 3, 1, 0]), {}), id="label-K"
    ),
    pytest.param(
        (IndexError,), ["target[2] = -5"], lambda: (bad_case()[0], np.array([0, 1, -5, 0]), {}), id="label-negative"
    ),
    pytest.param(
        (IndexError,),
        ["target[0] = -100"],
        lambda: (bad_case()[0], np.array([-100, 1, 2, 0]), dict(ignore_index=1)),
        id="label-minus-100",
    ),
    pytest.param((TypeError,), ["logits", "masked"], lambda: masked_case("logits"), id="masked-logits"),
    pytest.param((TypeError,), ["target", "masked"], lambda: masked_case("target"), id="masked-target"),
    pytest.param(
        (ValueError,), ["sample_weight"], lambda: bad_case(sample_weight=[1, -1, 1, 1.0]), id="sample-weight-negative"
    ),
    pytest.param((ValueError, TypeError), ["where"], lambda: bad_case(where=np.ones(3, bool)), id="where-shape"),
    pytest.param((ValueError, TypeError), ["weight"], lambda: bad_case(weight=-np.ones(3)), id="weight-negative"),
    pytest.param((ValueError, TypeError, np.exceptions.AxisError), ["axis"], lambda: bad_case(axis=2), id="axis"),
]


@pytest.mark.parametrize("types, fragments, build_call", BAD)
def test_bad_input_raises_the_same_clear_error_everywhere(types, fragments, build_call):
    messages = {}
    for impl in IMPLS:
        z, t, kwargs = build_call()
        before = snapshot(z, t, *kwargs.values())
        with pytest.raises(Exception) as info:
            IMPLS[impl].evaluate(z, t, **kwargs)
        assert isinstance(info.value, types), f"{impl}: {info.value!r}"
        for fragment in fragments:
            assert fragment in str(info.value), f"{impl}: {fragment!r} not in {str(info.value)!r}"
        assert_unchanged(before)
        messages[impl] = (type(info.value), str(info.value))
    assert messages["fast"] == messages["ref"]


@pytest.mark.parametrize("per_row", ("yes", 1, None))
@pytest.mark.parametrize("impl", IMPLS)
def test_per_row_must_be_a_bool(impl, per_row):
    """As fastsce.cross_entropy's flags (return_lse=1 is a TypeError naming it)."""
    z, t, _ = bad_case()
    with pytest.raises(TypeError, match="per_row"):
        IMPLS[impl].evaluate(z, t, per_row=per_row)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_in_the_order_given_and_a_single_row(impl):
    z, t, _ = bad_case()
    ev = IMPLS[impl].evaluate(z, t, topk=np.array([5, 1, 2]))
    assert list(ev.topk_accuracy) == [5, 1, 2] and all(type(k) is int for k in ev.topk_accuracy)
    ev = IMPLS[impl].evaluate(z[0], 1, per_row=True)  # one row: per-row arrays of shape ()
    assert ev.rows == 1 and ev.argmax.shape == () and ev.target_rank == (z[0] > z[0, 1]).sum()
    assert ev.argmax == np.argmax(z[0])


@pytest.mark.parametrize("per_row", (False, True))
@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_are_not_changed(impl, per_row):
    rng = np.random.default_rng(9)
    for n, k in ((70, 5), (70, 500)):
        z = make_logits(rng, n, k, np.float32)
        z[3, 1] = np.nan
        z[5, :] = -np.inf
        t = make_labels(rng, n, k)
        kwargs = dict(
            weight=make_weight(rng, k), sample_weight=rng.uniform(0, 1, n), where=rng.random(n) > 0.5, topk=[1, 2]
        )
        for logits in (z, np.asfortranarray(z), z.astype(np.float16)):
            before = snapshot(logits, t, *kwargs.values())
            with np.errstate(all="ignore"):
                ev = IMPLS[impl].evaluate(logits, t, per_row=per_row, **kwargs)
            assert_unchanged(before)
            assert kwargs["topk"] == [1, 2]
            if per_row:
                assert not np.shares_memory(ev.target_logprob, logits)


# --- the Evaluation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_as_dict_is_json_and_the_repr_readable(impl):
    z = make_logits(np.random.default_rng(4), 100, 7, np.float32)
    t = make_labels(np.random.default_rng(5), 100, 7)
    ev = IMPLS[impl].evaluate(z, t, topk=(1, 3), bins=5)
    d = ev.as_dict()
    text = json.dumps(d)  # NaN (an empty bin) as JSON's usual NaN
    back = json.loads(text)
    assert set(back) == {*Evaluation.SCALARS, "topk_accuracy", "rows", "ignored_rows", "bins"}
    assert back["topk_accuracy"] == {"1": ev.topk_accuracy[1], "3": ev.topk_accuracy[3]}
    assert back["rows"] == ev.rows == 75 and back["ignored_rows"] == ev.ignored_rows == 25
    for name in Evaluation.SCALARS:
        assert back[name] == getattr(ev, name) and type(d[name]) is float
    np.testing.assert_array_equal(back["bins"]["counts"], ev.bin_counts)
    np.testing.assert_array_equal(back["bins"]["confidence"], ev.bin_confidence)
    np.testing.assert_array_equal(back["bins"]["accuracy"], ev.bin_accuracy)

    text = repr(ev)
    assert text.startswith("Evaluation(\n") and text.endswith(")")
    assert "np." not in text and "array(" not in text  # plain numbers, no arrays
    for name in Evaluation.SCALARS:
        assert f"{name}={getattr(ev, name):.6g}" in text
    assert f"topk_accuracy={{1: {ev.topk_accuracy[1]:.6g}, 3: {ev.topk_accuracy[3]:.6g}}}" in text
    assert "rows=75, ignored_rows=25" in text and "bins=5" in text
    assert len(text.splitlines()) < 20

    ev = IMPLS[impl].evaluate(z, t, per_row=True)
    d = ev.as_dict()
    for name in Evaluation.PER_ROW:
        assert isinstance(d[name], np.ndarray) and d[name].shape == (100,)
    assert "per-row arrays of shape (100,)" in repr(ev) and "array(" not in repr(ev)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.loss = 0.0
