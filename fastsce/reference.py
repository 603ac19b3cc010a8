"""Plain NumPy softmax cross-entropy, written straight from the formulas.

This is the oracle the fast kernels are tested against and the baseline they are
benchmarked against. It takes the same arguments, raises the same errors and returns
the same things as :func:`fastsce.cross_entropy` / :func:`fastsce.cross_entropy_with_grad`.
It works in the logits' dtype (as PyTorch does; float32 for float16 / bfloat16) with
(M, K) temporaries, and sums the batch in float64.

Notation: x = logits as M rows of K classes (class axis moved last), z = c tanh(a x / c)
the logits the loss sees (a = logit_scale, c = softcap), log p = log_softmax(z),
lse = logsumexp(z), w = class weights (ones if None), v = sample_weight * where (ones if
None), eps = label_smoothing, s = z_loss, D / D_z = the "mean" denominators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fastsce._typing import Array, ArrayLike, same_signature
from fastsce._validate import Problem, check_denominator, check_labels, check_out, check_problem, check_returns, native

__all__ = ["cross_entropy", "cross_entropy_with_grad", "linear_cross_entropy", "linear_cross_entropy_with_grad", "evaluate", "TOLERANCE"]


class _Tolerances(dict):
    """dtype -> dict(rtol, atol). bfloat16 is looked up by its name when first asked for:
    its dtype comes from ml_dtypes, whose import alone takes about a second, so it is
    never imported here (whoever holds a bfloat16 dtype has imported it already)."""

    def __missing__(self, key):
        try:
            dtype = np.dtype(key)
        except TypeError:
            raise KeyError(key) from None
        if dtype.name == "bfloat16":
            self[dtype] = dict(rtol=8e-3, atol=1e-5)
            return self[dtype]
        if dtype in self.keys():  # e.g. TOLERANCE["float32"]
            return self[dtype]
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True


# How closely fastsce matches this reference, per logits dtype, for np.allclose /
# np.testing.assert_allclose. The reference rounds in the logits' dtype at every step
# (as PyTorch does), so float32 differences are a few float32 ulps of O(1) quantities.
# Half-precision results are both rounded from float32, so they differ by at most one ulp
# of their own (2^-11 relative for float16, 2^-8 for bfloat16), or a subnormal's spacing.
TOLERANCE: dict[np.dtype, dict[str, float]] = _Tolerances({
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-14),
    np.dtype(np.float16): dict(rtol=1e-3, atol=1e-6),
})  # fmt: skip


if TYPE_CHECKING:  # the API's signatures, for type checkers; not imported at run time (the kernels)
    from fastsce import api, linear
else:

    class api:  # stand in for them at run time: same_signature ignores its argument
        cross_entropy = cross_entropy_with_grad = None

    class linear:
        linear_cross_entropy = linear_cross_entropy_with_grad = None


@same_signature(api.cross_entropy)
def cross_entropy(logits: ArrayLike, target: ArrayLike, **options: Any) -> Any:
    """Loss only; see :func:`fastsce.cross_entropy` (same keyword arguments)."""
    returns, denominator, options = _split_returns(options)
    problem = check_problem(logits, target, **options)
    denominator = check_denominator(denominator, problem.reduction)
    check_labels(problem)
    loss, _, z_term, lse = _solve(problem, want_grad=False, given=denominator)
    return _pack(loss, None, z_term, lse, returns)


@same_signature(api.cross_entropy_with_grad)
def cross_entropy_with_grad(logits: ArrayLike, target: ArrayLike, *, out: Array | None = None, **options: Any) -> Any:
    """Loss and gradient; see :func:`fastsce.cross_entropy_with_grad` (same arguments)."""
    returns, denominator, options = _split_returns(options)
    problem = check_problem(logits, target, **options)
    denominator = check_denominator(denominator, problem.reduction)
    check_labels(problem)
    if out is not None:
        check_out(out, problem)
    loss, grad, z_term, lse = _solve(problem, want_grad=True, given=denominator)
    if out is not None:
        out[...] = grad
        grad = out
    return _pack(loss, grad, z_term, lse, returns)


def _split_returns(options):
    """(return flags, denominator, the options check_problem takes)."""
    options = dict(options)
    returns = check_returns(options.pop("return_z_loss", False), options.pop("return_lse", False))
    return returns, options.pop("denominator", None), options


def _pack(loss, grad, z_term, lse, returns):
    """loss, or (loss, [grad], [z_term], [lse]): the order of fastsce's functions."""
    extra = [x for x, wanted in zip((z_term, lse), returns) if wanted]
    head = [loss] if grad is None else [loss, grad]
    return head[0] if len(head) == 1 and not extra else (*head, *extra)


def _times(a, b):
    """a * b with 0 * inf = 0: a zero weight or probability removes a -inf log-probability
    (as in scipy.special.xlogy). NaN stays NaN."""
    with np.errstate(invalid="ignore"):
        return np.where((a == 0) & np.isinf(b), 0, a * b)


def _solve(problem: Problem, want_grad: bool, given=None):
    """(loss, grad or None, z-term, lse), straight from the formulas over M = prod(lead) rows.
    given: None, or the (D, D_z) that "mean" divides by instead of the rows' own."""
    m, k = problem.shape
    dtype = problem.compute  # float16 / bfloat16 logits are computed in float32
    x = problem.rows.reshape(m, k).astype(dtype)
    eps = problem.label_smoothing
    w = np.ones(k, dtype) if problem.weight is None else problem.weight
    v = np.ones(m) if problem.row_weight is None else problem.row_weight

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        z, dz_dx = _transformed(problem, x)

        shifted = z - z.max(axis=1, keepdims=True)
        log_s = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_s
        lse = _lse(z)  # max + log_s, or the max itself where that is +-inf (see _lse)
        p = np.exp(log_p)

        if problem.soft:
            # l_n = -sum_j w_j t_nj log p_nj, with t smoothed to (1 - eps) t + eps / K
            t = problem.target.reshape(m, k).astype(dtype)
            if eps > 0:
                t = (1 - eps) * t + dtype.type(eps / k)
            counted = v > 0  # ignore_index does not apply to probabilities
            row_loss = -_times(w * t, log_p).sum(axis=1)
            denominator = float(v.sum()) / problem.fold  # v carries the class weights' scale
            # d l_n / d z_nj = p_nj sum_k w_k t_nk - w_j t_nj
            grad = p * (w * t).sum(axis=1, keepdims=True) - w * t if want_grad else None
        else:
            # l_n = (1 - eps) w_y (-log p_ny) + (eps / K) sum_j w_j (-log p_nj), 0 for ignored rows
            counted = (problem.target != problem.ignore_index) & (v > 0)
            y = np.where(counted, problem.target, 0)
            w_y = np.where(counted, w[y], 0).astype(dtype)
            rows = np.arange(m)
            row_loss = _times(w_y, -log_p[rows, y])
            if eps > 0:
                # (eps / K in float64: a tiny eps is not 0 here, so a -inf class still gives +inf)
                row_loss = (1 - eps) * row_loss + np.float64(eps / k) * -_times(w, log_p).sum(axis=1)
            denominator = float((v * w_y).sum(dtype=np.float64))
            if want_grad:
                one_hot = np.zeros_like(z)
                one_hot[rows, y] = 1
                # d l_n / d z_nj = (1 - eps) w_y (p_nj - [j = y]) + (eps / K) (p_nj sum_k w_k - w_j)
                grad = w_y[:, None] * (p - one_hot)
                if eps > 0:
                    grad = (1 - eps) * grad + eps / k * (p * w.sum() - w)
            else:
                grad = None

        # Sample weights scale rows; the z-loss s lse^2 of a counted row is weighted by v_n
        # alone and its "mean" divides by D_z = sum of v_n over the counted rows.
        row_loss = np.where(counted, v * row_loss, 0)
        z_row = np.zeros(m)
        if problem.z_loss:  # (not 0 * inf when lse^2 overflows)
            lse64 = lse.astype(np.float64)  # (s lse) lse: a tiny s keeps lse^2 of a huge lse finite
            z_row = np.where(counted, v * problem.z_loss * lse64 * lse64, 0)
        z_denominator = float(np.where(counted, v, 0).sum()) / problem.fold
        if given is not None:  # the caller's (D, D_z), e.g. a global batch's, in the given weights' units
            denominator, z_denominator = given[0] / problem.units[0], given[1] / problem.units[1]
        if problem.reduction == "mean":  # 0 / 0 is NaN (as PyTorch) or 0 (all_ignored="zero")
            nothing = np.nan if problem.all_ignored == "nan" else 0.0
            scale = 1.0 / denominator if denominator else nothing
            z_scale = 1.0 / z_denominator if z_denominator else nothing
        else:
            scale = z_scale = denominator = z_denominator = 1.0
        if problem.reduction == "none":
            loss, z_term = row_loss + z_row, z_row
        else:
            loss = row_loss.sum(dtype=np.float64) / denominator if denominator else nothing
            z_term = 0.0
            if problem.z_loss:
                z_term = z_row.sum(dtype=np.float64) / z_denominator if z_denominator else nothing
            loss = loss + z_term
        if grad is not None:
            # d (s lse^2) / d z_nj = 2 s lse_n p_nj
            grad = grad * (v * scale)[:, None]
            if problem.z_loss:
                grad = grad + (2 * problem.z_loss * v * z_scale * lse)[:, None] * p
            grad = np.where(counted[:, None], grad * dz_dx, 0).astype(dtype)
            grad = np.moveaxis(grad.reshape(problem.rows.shape), -1, problem.axis).astype(problem.result)

    if problem.reduction == "none":
        loss, z_term = (np.asarray(x).astype(problem.result).reshape(problem.lead) for x in (loss, z_term))
    else:
        loss, z_term = problem.result.type(loss), problem.result.type(z_term)
    return loss, grad, z_term, lse.astype(dtype).reshape(problem.lead)


def _transformed(problem: Problem, x):
    """(z, dz/dx): the logits the loss sees, z = c tanh(a x / c), dz/dx = a (1 - (z / c)^2)."""
    dtype = x.dtype
    with np.errstate(invalid="ignore", over="ignore"):
        a = 1.0 if problem.logit_scale is None else problem.logit_scale
        z, dz_dx = dtype.type(a) * x, dtype.type(a)
        if problem.softcap is not None:
            c = dtype.type(problem.softcap)
            z = c * np.tanh(z / c)
            dz_dx = dz_dx * (1 - (z / c) ** 2)
    return z, dz_dx


def _lse(z):
    """logsumexp of every row of z as fastsce.logsumexp: NaN for a row holding NaN, else
    +inf for one holding +inf, -inf for a row of -inf only (shifting by an infinite max
    would give inf - inf = NaN)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = z.max(axis=1, keepdims=True)
        m = np.where(np.isinf(m), 0, m).astype(z.dtype)
        return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


# --- linear_cross_entropy ----------------------------------------------------------------------
# The oracles of fastsce.linear_cross_entropy(_with_grad): the full (N, V) logits
# x = h Wᵀ + b, the cross-entropy above, then the chain rule dh = G W, dW = Gᵀ h, db = sum_n G_n.


def _linear_logits(input, linear_weight, target, linear_bias, options, want_grad):
    from fastsce import linear  # here: fastsce.linear imports the kernels

    setup = linear._linear_setup(input, linear_weight, target, dict(options, linear_bias=linear_bias))
    options.pop("chunk_rows", None)  # (checked only)
    options.pop("chunk_classes", None)
    h = np.asarray(input)
    x = h @ setup.w.T
    if setup.b is not None:
        x = x + setup.b
    fn = cross_entropy_with_grad if want_grad else cross_entropy
    return setup, fn(x, target, **options)


@same_signature(linear.linear_cross_entropy)
def linear_cross_entropy(
    input: ArrayLike, linear_weight: ArrayLike, target: ArrayLike, *, linear_bias: ArrayLike | None = None, **options: Any
) -> Any:
    """Loss only; see :func:`fastsce.linear_cross_entropy` (same arguments)."""
    return _linear_logits(input, linear_weight, target, linear_bias, dict(options), False)[1]


@same_signature(linear.linear_cross_entropy_with_grad)
def linear_cross_entropy_with_grad(
    input: ArrayLike, linear_weight: ArrayLike, target: ArrayLike, *, linear_bias: ArrayLike | None = None, **options: Any
) -> Any:
    """(loss, grad_input, grad_linear_weight, grad_linear_bias or None, [z_loss], [lse]);
    see :func:`fastsce.linear_cross_entropy_with_grad`."""
    setup, (loss, g, *extra) = _linear_logits(input, linear_weight, target, linear_bias, dict(options), True)
    g = g.reshape(-1, g.shape[-1])
    grad_input = (g @ setup.w).reshape(np.shape(input))
    grad_weight = g.T @ setup.h
    grad_bias = None if setup.b is None else g.sum(axis=0, dtype=np.float64).astype(g.dtype)
    return (loss, grad_input, grad_weight, grad_bias, *extra)


# --- softmax, log_softmax, logsumexp ---------------------------------------------------------
# The oracles of fastsce.softmax / log_softmax / logsumexp: same arguments, same checks and
# errors, computed in x's dtype (float32 for float16 / bfloat16) with full-size temporaries.


def _rows_of(name, x, axis, out, shape=None):
    """(x in its compute dtype, axis, result dtype) after fastsce.primitives' checks."""
    from fastsce import primitives  # here: fastsce.primitives imports the kernels

    x, axis, compute = primitives._check_x(x, axis, name)
    if out is not None:
        primitives._check_out(out, x, x.shape if shape is None else shape(x, axis), name, allow_x=shape is None)
    return x.astype(compute), axis, native(x.dtype)


def _store(result, out, dtype):
    if out is None:
        return result.astype(dtype)
    out[...] = result
    return out


def softmax(x: ArrayLike, axis: int = -1, *, out: Array | None = None) -> Array:
    """exp(x - max) / sum exp(x - max); see :func:`fastsce.softmax`."""
    z, axis, dtype = _rows_of("softmax", x, axis, out)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(z - z.max(axis=axis, keepdims=True, initial=-np.inf))
        return _store(e / e.sum(axis=axis, keepdims=True), out, dtype)


def log_softmax(x: ArrayLike, axis: int = -1, *, out: Array | None = None) -> Array:
    """(x - max) - log sum exp(x - max); see :func:`fastsce.log_softmax`."""
    z, axis, dtype = _rows_of("log_softmax", x, axis, out)
    with np.errstate(invalid="ignore", divide="ignore"):
        shifted = z - z.max(axis=axis, keepdims=True, initial=-np.inf)
        return _store(shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True)), out, dtype)


def logsumexp(x: ArrayLike, axis: int = -1, *, keepdims: bool = False, out: Array | None = None) -> Any:
    """m + log sum exp(x - m), m the max, or 0 where the max is infinite (+inf and all
    -inf rows then give +inf and -inf, as in PyTorch); see :func:`fastsce.logsumexp`."""

    def shape(x, axis):
        return x.shape[:axis] + ((1,) if keepdims else ()) + x.shape[axis + 1 :]

    if not isinstance(keepdims, (bool, np.bool_)):
        raise TypeError(f"logsumexp: keepdims must be True or False; got {keepdims!r}")
    z, axis, dtype = _rows_of("logsumexp", x, axis, out, shape)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = z.max(axis=axis, keepdims=True, initial=-np.inf)
        m = np.where(np.isinf(m), 0, m).astype(z.dtype)
        lse = m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))
    lse = lse.reshape(shape(z, axis))
    if out is not None:
        out[...] = lse
        return out
    lse = lse.astype(dtype)
    return lse[()] if lse.ndim == 0 else lse


# --- evaluate ------------------------------------------------------------------------------------
# The oracle of fastsce.evaluate: the full softmax in the logits' dtype, then each metric
# from its definition with NumPy (argmax, a count of larger logits, histograms).


def evaluate(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    topk: Any = (1, 5),
    bins: int = 15,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    axis: int = -1,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    per_row: bool = False,
) -> Any:
    """See :func:`fastsce.evaluate` (same arguments, same result)."""
    from fastsce.metrics import Evaluation, check_evaluation, check_per_row

    per_row = check_per_row(per_row)
    problem, ks, nbins = check_evaluation(logits, target, topk, bins, weight, ignore_index, axis, sample_weight, where)
    check_labels(problem)
    m, k = problem.shape
    dtype = problem.compute
    z = problem.rows.reshape(m, k).astype(dtype)
    w = np.ones(k, dtype) if problem.weight is None else problem.weight
    v = np.ones(m) if problem.row_weight is None else problem.row_weight
    has_target = problem.target != problem.ignore_index
    y = np.where(has_target, problem.target, 0)
    rows = np.arange(m)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        shifted = z - z.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        target_logprob = np.where(has_target, log_p[rows, y], np.nan)
        entropy = -_times(p, log_p).sum(axis=1)
        confidence = p.max(axis=1)
        argmax = np.argmax(z, axis=1)
        target_rank = np.where(has_target, (z > z[rows, y][:, None]).sum(axis=1), -1)
        nan_row = np.isnan(z).any(axis=1)

        counted = has_target & (v > 0)
        vc = v[counted]
        total = vc.sum()

        def mean(x):
            return float((vc * x[counted]).sum() / total) if total else np.nan

        loss = -target_logprob.astype(np.float64)
        w_y = w[y].astype(np.float64)[counted]
        loss_weight = float((vc * w_y).sum())
        weighted_loss = float(_times(vc * w_y, loss[counted]).sum() / loss_weight) if loss_weight else np.nan
        correct = np.where(nan_row, np.nan, (argmax == y).astype(np.float64))
        topk_accuracy = {kk: mean(np.where(nan_row, np.nan, (target_rank < kk).astype(np.float64))) for kk in ks}

        # calibration: bins (i/B, (i+1)/B] of the confidence, over the counted rows; the
        # bin from the confidence in float64 (1 / sum exp(z - max)): rounded to float32, 1/K
        # on a bin's closing edge (e.g. 1/3 of 15 bins) would move into the next bin
        conf = (1 / np.exp(shifted.astype(np.float64)).sum(axis=1))[counted]
        finite = ~np.isnan(conf)
        index = np.clip(np.ceil(conf[finite] * nbins).astype(np.int64) - 1, 0, nbins - 1)
        counts = np.bincount(index, vc[finite], nbins).astype(np.float64)
        conf_sums = np.bincount(index, (vc * conf)[finite], nbins).astype(np.float64)
        correct_sums = np.bincount(index, (vc * correct[counted])[finite], nbins).astype(np.float64)
        ece = float(np.abs(correct_sums - conf_sums).sum() / total) if finite.all() and total else np.nan
        mean_loss = mean(loss)
    per_row_arrays = {}
    if per_row:
        lead = problem.lead
        per_row_arrays = dict(
            target_logprob=target_logprob.astype(dtype).reshape(lead),
            entropy=entropy.astype(dtype).reshape(lead),
            argmax=argmax.astype(np.int64).reshape(lead),
            target_rank=target_rank.astype(np.int64).reshape(lead),
            confidence=confidence.astype(dtype).reshape(lead),
        )
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return Evaluation(
            loss=weighted_loss,
            perplexity=float(np.exp(mean_loss)),
            accuracy=mean(correct),
            topk_accuracy=topk_accuracy,
            mean_entropy=mean(entropy.astype(np.float64)),
            mean_target_probability=mean(np.exp(target_logprob.astype(np.float64))),
            mean_confidence=mean(confidence.astype(np.float64)),
            ece=ece,
            bin_counts=counts * problem.units[1],  # in the row weights as given (see scale_weights)
            bin_confidence=np.where(counts > 0, conf_sums / counts, np.nan),
            bin_accuracy=np.where(counts > 0, correct_sums / counts, np.nan),
            rows=int(counted.sum()),
            ignored_rows=int(m - counted.sum()),
            **per_row_arrays,
        )
