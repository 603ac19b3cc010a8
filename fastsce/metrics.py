"""fastsce.evaluate: loss, accuracy, top-k, perplexity, entropy and calibration from one
read of the logits.

The kernels (fastsce._kernels.metrics) reduce the rows into float64 sums, chunk by
chunk; :class:`MetricSums` holds them, adds the sums of several batches (the command
line's chunks, a Dask array's blocks) and finishes them into an :class:`Evaluation`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastsce import _threads, api
from fastsce._kernels import metrics as kernels, rows as row_kernels
from fastsce._kernels.tiles import CHUNK_ROWS
from fastsce._layout import row_blocks
from fastsce._typing import ArrayLike
from fastsce._validate import Problem, check_labels, check_problem

__all__ = ["evaluate", "Evaluation", "MetricSums"]

# Few classes go to the tile kernel (rows across the vector lanes), more one row at a
# time. Measured, tile kernel / row kernel, one thread, ~2M logits: float32 0.34 at K =
# 100, 0.84 at 384, 0.80 at 500, 0.99 at 640, 1.15 at 1000; float64 0.70 at 200, 0.81 at
# 300, 1.02 at 400.
SMALL_K = {np.dtype(np.float32): 512, np.dtype(np.float64): 320}
# Each chunk of rows keeps a row of 10 + len(topk) + 3 bins float64 sums (a fixed
# partition of the rows, so the sums are the same whatever the thread count): at most
# MAX_CHUNKS chunks a call (longer chunks for more rows) and MAX_BINS bins bound that
# memory (24 MB at most), whatever N.
MAX_CHUNKS = 256
MAX_BINS = 4096

_NO_INT = np.empty(0, np.int64)  # per-row integer outputs not asked for (never written)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # beyond the largest float64
        return math.inf


@dataclass(frozen=True, repr=False, eq=False)
class Evaluation:
    """The metrics of a batch of logits against class-index targets.

    Rows count unless their target is ``ignore_index`` or their row weight
    (``sample_weight`` times ``where``) is 0; every mean is over the counted rows, each
    weighted by its row weight. ``loss`` also weights each row by its target's class
    weight and divides by their sum (PyTorch's "mean"); the other metrics ignore class
    weights. Per-row arrays are present only with ``per_row=True``.
    """

    loss: float  #: mean cross-entropy, PyTorch's weighting
    perplexity: float  #: exp of the mean cross-entropy without class weights
    accuracy: float  #: fraction whose argmax (first maximum) is the target
    topk_accuracy: dict[int, float]  #: k -> fraction with fewer than k logits above the target's
    mean_entropy: float  #: mean entropy of the predicted distributions (nats)
    mean_target_probability: float  #: mean softmax probability of the target
    mean_confidence: float  #: mean of the largest softmax probability
    ece: float  #: expected calibration error over equal-width confidence bins
    bin_counts: np.ndarray  #: (bins,) counted rows (their total row weight) per bin (i/B, (i+1)/B]
    bin_confidence: np.ndarray  #: (bins,) mean confidence per bin (NaN when empty)
    bin_accuracy: np.ndarray  #: (bins,) accuracy per bin (NaN when empty)
    rows: int  #: rows counted
    ignored_rows: int  #: rows left out (ignore_index, where=False or weight 0)
    target_logprob: np.ndarray | None = field(default=None)  #: log p of the target (NaN if ignored)
    entropy: np.ndarray | None = field(default=None)  #: per-row entropy
    argmax: np.ndarray | None = field(default=None)  #: per-row first maximum
    target_rank: np.ndarray | None = field(default=None)  #: logits above the target's (-1 if ignored)
    confidence: np.ndarray | None = field(default=None)  #: per-row largest probability

    PER_ROW = ("target_logprob", "entropy", "argmax", "target_rank", "confidence")
    SCALARS = ("loss", "perplexity", "accuracy", "mean_entropy", "mean_target_probability", "mean_confidence", "ece")

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-ready): floats, ints, a dict of top-k accuracies, the bins as
        lists; the per-row arrays, when present, as NumPy arrays under their names."""
        d: dict[str, Any] = {name: float(getattr(self, name)) for name in self.SCALARS}
        d["topk_accuracy"] = {int(k): float(v) for k, v in self.topk_accuracy.items()}
        d["rows"], d["ignored_rows"] = int(self.rows), int(self.ignored_rows)
        d["bins"] = {
            "counts": self.bin_counts.tolist(),
            "confidence": self.bin_confidence.tolist(),
            "accuracy": self.bin_accuracy.tolist(),
        }
        for name in self.PER_ROW:
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    def plot_reliability(self, path: Any = None, **options: Any) -> Any:
        """The reliability diagram (each bin's accuracy against its confidence, the rows
        per bin, the ECE in the title) as a matplotlib Figure, also written to ``path``
        when given (any format matplotlib writes). Needs matplotlib."""
        from fastsce._tools.evaluate_cli import plot_reliability

        return plot_reliability(self, path, **options)

    def __repr__(self) -> str:
        topk = ", ".join(f"{k}: {v:.6g}" for k, v in self.topk_accuracy.items())
        lines = [f"{name}={getattr(self, name):.6g}" for name in self.SCALARS]
        lines.insert(3, f"topk_accuracy={{{topk}}}")
        lines.append(f"bins={self.bin_counts.size}")
        lines.append(f"rows={self.rows}, ignored_rows={self.ignored_rows}")
        per_row = [name for name in self.PER_ROW if getattr(self, name) is not None]
        if per_row:
            lines.append(f"per-row arrays of shape {getattr(self, per_row[0]).shape}: {', '.join(per_row)}")
        return "Evaluation(\n    " + ",\n    ".join(lines) + ",\n)"


@dataclass(frozen=True)
class MetricSums:
    """The float64 sums an Evaluation is made of (layout: fastsce._kernels.metrics), for
    ``topk`` and ``bins``. Sums of batches of rows add up to those of all the rows
    (``a + b``, in a fixed order: the same bits for the same batches).

    ``units``: what the stored sums are in, as powers of two (see
    fastsce._validate.scale_weights, which scales extreme weights into range): the sums
    weighted by class and row weights (LOSS, LOSS_WEIGHT) are ``units[0]`` times
    smaller than in the weights as given, those weighted by row weights ``units[1]``
    times. Adding batches of different units brings both to the larger (exactly, but for
    terms that then fall below the smallest float64)."""

    topk: tuple[int, ...]
    bins: int
    sums: np.ndarray
    rows: int  # rows seen, counted or not
    units: tuple[float, float] = (1.0, 1.0)

    def __add__(self, other: MetricSums) -> MetricSums:
        if (self.topk, self.bins) != (other.topk, other.bins):
            raise ValueError(f"cannot add the sums of topk={other.topk}, bins={other.bins} to topk={self.topk}, bins={self.bins}")
        if not other.rows or not self.rows:  # (a batch of no rows takes the other's units)
            keep = self if other.rows == 0 else other
            return MetricSums(self.topk, self.bins, keep.sums, self.rows + other.rows, keep.units)
        if self.units == other.units:
            return MetricSums(self.topk, self.bins, self.sums + other.sums, self.rows + other.rows, self.units)
        units = (max(self.units[0], other.units[0]), max(self.units[1], other.units[1]))
        return MetricSums(self.topk, self.bins, self._in(units) + other._in(units), self.rows + other.rows, units)

    def _in(self, units: tuple[float, float]) -> np.ndarray:
        """The sums in other units (each a power of two no smaller than this one's)."""
        sums = self.sums * (self.units[1] / units[1])
        sums[[kernels.LOSS, kernels.LOSS_WEIGHT]] = self.sums[[kernels.LOSS, kernels.LOSS_WEIGHT]] * (self.units[0] / units[0])
        sums[kernels.ROWS] = self.sums[kernels.ROWS]  # a count
        return sums

    @classmethod
    def zero(cls, topk: tuple[int, ...], bins: int) -> MetricSums:
        return cls(topk, bins, np.zeros(kernels.sums_size(len(topk), bins)), 0)

    def finish(self, per_row: dict[str, np.ndarray] | None = None) -> Evaluation:
        # Python floats, not NumPy: a few dozen numbers (NumPy's calls took ~35 us here)
        s, t, b = self.sums.tolist(), len(self.topk), self.bins
        weight = s[kernels.WEIGHT]
        base = kernels.SUMS + t
        counts, conf, correct = s[base : base + b], s[base + b : base + 2 * b], s[base + 2 * b : base + 3 * b]
        gaps = math.fsum(abs(a - c) for a, c in zip(correct, conf))
        mean_loss = _ratio(s[kernels.PLAIN_LOSS], weight)
        counted = int(s[kernels.ROWS])
        return Evaluation(
            loss=_ratio(s[kernels.LOSS], s[kernels.LOSS_WEIGHT]),
            perplexity=_exp(mean_loss),
            accuracy=_ratio(s[kernels.CORRECT], weight),
            topk_accuracy={k: _ratio(s[kernels.SUMS + i], weight) for i, k in enumerate(self.topk)},
            mean_entropy=_ratio(s[kernels.ENTROPY], weight),
            mean_target_probability=_ratio(s[kernels.TARGET_PROBABILITY], weight),
            mean_confidence=_ratio(s[kernels.CONFIDENCE], weight),
            ece=math.nan if s[kernels.NAN_CONFIDENCE] else _ratio(gaps, weight),
            bin_counts=np.array(counts) * self.units[1],  # the total row weight as given
            bin_confidence=np.array([c / n if n > 0 else math.nan for c, n in zip(conf, counts)]),
            bin_accuracy=np.array([a / n if n > 0 else math.nan for a, n in zip(correct, counts)]),
            rows=counted,
            ignored_rows=self.rows - counted,
            **(per_row or {}),
        )


def check_topk(topk) -> tuple[int, ...]:
    """topk as a tuple of distinct positive ints, in the order given (may be empty)."""
    items = (topk,) if isinstance(topk, numbers.Integral) else topk
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"topk must be an int or a sequence of ints; got {topk!r}. Pass e.g. topk=(1, 5)") from None
    for k in items:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"topk must hold integers; got {k!r} in topk={topk!r}. Pass e.g. topk=(1, 5)")
        if k < 1:
            raise ValueError(f"topk must hold positive integers; got {k!r} in topk={topk!r}. Pass e.g. topk=(1, 5)")
    if len(set(items)) != len(items):
        raise ValueError(f"topk has a repeated value: topk={topk!r}. Pass each k once")
    return tuple(int(k) for k in items)


def check_bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral):
        raise TypeError(f"bins must be an integer; got {bins!r}. Pass e.g. bins=15")
    if not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be from 1 to {MAX_BINS}; got {bins!r}. Pass e.g. bins=15")
    return int(bins)


def check_per_row(per_row) -> bool:
    if not isinstance(per_row, (bool, np.bool_)):  # it decides what is returned
        raise TypeError(f"per_row must be True or False; got {per_row!r}")
    return bool(per_row)


def check_evaluation(logits, target, topk, bins, weight, ignore_index, axis, sample_weight, where):
    """(problem, topk, bins), checked as fastsce.cross_entropy checks its arguments;
    class-index targets only."""
    problem = check_problem(
        logits, target, weight, ignore_index, "mean", axis=axis, sample_weight=sample_weight, where=where
    )
    if problem.soft:
        raise ValueError(
            f"evaluate takes class indices; target has the logits' shape {np.shape(target)} (probabilities). "
            f"Pass target.argmax(axis={problem.axis}) for the most likely class of each row"
        )
    return problem, check_topk(topk), check_bins(bins)


def metric_sums(problem: Problem, topk: tuple[int, ...], bins: int, per_row: bool = False):
    """(MetricSums, per-row arrays or None) of a checked problem (labels checked here)."""
    m, k = problem.shape
    compute = problem.compute
    w = api._ones(k, compute) if problem.weight is None else problem.weight
    v = api._NO_ROW_WEIGHTS if problem.row_weight is None else problem.row_weight
    # only the first bad label is wanted, which no weight changes: the count alone, not the
    # weighted float64 sums
    bad_row, _, _ = row_kernels.label_counts(problem.target, k, problem.ignore_index)
    check_labels(problem, bad_row)
    no_float = api._NO_ROWS[compute]
    if per_row:
        arrays = (np.empty(m, compute), np.empty(m, compute), np.empty(m, compute), np.empty(m, np.int64), np.empty(m, np.int64))
    else:
        arrays = (no_float, no_float, no_float, _NO_INT, _NO_INT)
    ks = np.array([min(t, k + 1) for t in topk], np.int64)  # (k > K: every row counts, as for K + 1)
    small = k <= SMALL_K[compute]
    chunk_rows = CHUNK_ROWS if small else max(1, api.ROW_CHUNK_LOGITS // max(k, 1))
    if m > MAX_CHUNKS * chunk_rows:  # whole multiples of the tile's chunk
        chunk_rows *= -(-m // (MAX_CHUNKS * chunk_rows))
    accs = []
    serial = _threads.runs_serial(m * k)
    with contextlib.nullcontext(_threads._serial) if serial else _threads.launching(m * k) as pick:
        for r0, r1, z, _, _ in row_blocks(problem.rows, compute, api.COPY_BLOCK_LOGITS):
            acc = np.zeros((-(-(r1 - r0) // chunk_rows), kernels.sums_size(len(topk), bins)))
            outs = tuple(a[r0:r1] if a.size else a for a in arrays)
            t, vb = problem.target[r0:r1], v[r0:r1] if v.size else v
            if small:
                pick(kernels.evaluate_tiles)(z, t, problem.ignore_index, w, vb, ks, bins, chunk_rows, acc, outs)
            else:
                pick(kernels.evaluate_rows)(z, t, problem.ignore_index, w, vb, ks, bins, chunk_rows, acc, outs)
            accs.append(acc)
            z = None
    if len(accs) == 1:
        sums = accs[0].sum(axis=0)
    else:
        sums = np.concatenate(accs).sum(axis=0) if accs else MetricSums.zero(topk, bins).sums
    result = MetricSums(topk, bins, sums, m, problem.units)
    if not per_row:
        return result, None
    lead = problem.lead
    names = ("target_logprob", "entropy", "confidence", "argmax", "target_rank")
    return result, {name: a.reshape(lead) for name, a in zip(names, arrays)}


def evaluate(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    topk: int | tuple[int, ...] = (1, 5),
    bins: int = 15,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    axis: int = -1,
    sample_weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    per_row: bool = False,
) -> Evaluation:
    """Loss, perplexity, accuracy, top-k accuracy, entropy, target probability,
    confidence and expected calibration error of ``logits`` against class indices
    ``target``, from one read of each row.

    Arguments as :func:`fastsce.cross_entropy` (class-index targets; ``axis`` the class
    axis; float32, float64, float16 and bfloat16 logits, the last two computed in
    float32). ``topk``: the k of the top-k accuracies (a k of K or more gives 1);
    ``bins``: the number (1 to 4096) of equal-width confidence bins (i/B, (i+1)/B] of the
    calibration error (Guo et al. 2017: sum over bins of |accuracy - confidence|
    weighted by the bin's share of the rows). ``per_row=True`` also returns per-row
    arrays (shaped like ``target``): target_logprob (NaN where ignored), entropy,
    argmax, target_rank (-1 where ignored) and confidence.

    Ties: ``accuracy`` asks whether the argmax (NumPy's: the first maximum) is the target;
    the top-k accuracies count a row when fewer than k logits are strictly greater than
    the target's, so a tie counts in the target's favour (topk_accuracy[1] >= accuracy,
    equal without ties). A row holding NaN has NaN loss, entropy, probabilities and
    accuracies, as its loss is NaN; those NaNs carry into the means. A counted row whose
    confidence is NaN (NaN or +inf logits, or only -inf) makes ``ece`` NaN and is left
    out of the bins. With no row counted every mean is NaN.
    """
    per_row = check_per_row(per_row)
    problem, ks, nbins = check_evaluation(logits, target, topk, bins, weight, ignore_index, axis, sample_weight, where)
    sums, arrays = metric_sums(problem, ks, nbins, per_row)
    return sums.finish(arrays)
