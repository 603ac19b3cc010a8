"""Dask arrays: softmax cross-entropy of batches larger than memory, or spread over a cluster.

    import dask.array as da
    import fastsce.dask

    logits = da.from_zarr("logits.zarr")                  # (N, K), chunked along rows and/or classes
    loss, grad = fastsce.dask.cross_entropy_with_grad(logits, labels)   # lazy
    loss.compute()

Logits chunked along the rows only (one chunk of classes): each block of rows is one task
that calls the fused kernel (:func:`fastsce.cross_entropy` /
:func:`fastsce.cross_entropy_with_grad`) on it. Only per-block scalars travel between
tasks: loss sums and the "mean" denominators, added up in a tree.

Logits chunked along the classes too: each block (rows i, classes j) is reduced by
:func:`fastsce.partial_stats` to O(rows) statistics, those of a block of rows are merged
in a tree of :func:`fastsce.combine` tasks, the loss of the block of rows comes from the
merged statistics, and every gradient block from :func:`fastsce.finish_grad` on its own
logits block and the merged statistics of its rows. No task ever holds a whole row.

The "mean" denominators D (the summed weight of the counted rows) and D_z (of the z-loss:
the summed sample weight of the counted rows) are global: for the gradient they are
computed first from the target (and sample weights) alone, a cheap pass that reads no
logits, and every gradient block is formed already divided by them. The result does not
depend on the chunking: it equals the in-memory call within ``reference.TOLERANCE``.

:func:`evaluate` (the metrics of :func:`fastsce.evaluate`) needs whole rows: one task per
block of rows computes its float64 sums (:class:`fastsce.metrics.MetricSums`), added in a
binary tree of fixed shape, finished into the :class:`fastsce.Evaluation` by a Delayed.

This module imports dask; ``import fastsce`` does not. Optional extra ``fastsce[dask]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Literal, overload

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

import fastsce
from fastsce import metrics, reference, sharded
from fastsce._typing import ArrayLike
from fastsce._validate import _check_axis, as_array, is_float, native

__all__ = ["cross_entropy", "cross_entropy_with_grad", "evaluate"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def cross_entropy(
    logits: da.Array | ArrayLike,
    target: da.Array | ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: da.Array | ArrayLike | None = None,
    where: da.Array | ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
) -> da.Array | tuple[da.Array, ...]:
    """Lazy softmax cross-entropy loss of a Dask array of logits.

    Parameters
    ----------
    logits : (N, K) float32 or float64 ``dask.array.Array`` (or NumPy array)
        2-D, the classes last (there is no ``axis`` argument). Chunked along the rows,
        the classes, or both: a row may be split across chunks of classes.
    target : (N,) integer class indices or (N, K) float probabilities, Dask or NumPy
        Rechunked to the logits' chunks when they differ (cheap for class indices).
    sample_weight : (N,) real array, where : (N,) bool array, optional; Dask or NumPy
        Row weights and row mask, rechunked to the logits' rows.
    weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale, softcap, \
all_ignored, return_z_loss, return_lse
        As in :func:`fastsce.cross_entropy`. ``weight`` is a small (K,) array, NumPy.

    Returns
    -------
    loss : 0-d Dask array of the logits' dtype for "mean"/"sum", (N,) for "none",
        chunked like the logits' rows; ``(loss, z_loss, lse)`` with the requested extras
        (``lse``: (N,), chunked like the rows). Nothing is computed until ``.compute()``.

    Option errors are raised here; labels outside [0, K) raise ``IndexError`` and bad
    sample weights ``ValueError`` (naming the row in the whole batch) when computed.
    """
    job = _Job(logits, target, locals())
    return job.build(grad=False)


def cross_entropy_with_grad(
    logits: da.Array | ArrayLike,
    target: da.Array | ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    sample_weight: da.Array | ArrayLike | None = None,
    where: da.Array | ArrayLike | None = None,
    all_ignored: str = "nan",
    return_z_loss: bool = False,
    return_lse: bool = False,
) -> tuple[da.Array, ...]:
    """Lazy loss and gradient with respect to the logits; see :func:`cross_entropy`.

    Returns
    -------
    (loss, grad), then z_loss and lse when requested: Dask arrays. ``grad`` has the
        logits' shape, dtype and chunks. Computing them together (``dask.compute(loss,
        grad)``) shares the tasks: logits chunked along the rows only are read once;
        chunked along the classes, twice (statistics, then gradient).
    """
    job = _Job(logits, target, locals())
    return job.build(grad=True)


@overload
def evaluate(
    logits: da.Array | ArrayLike,
    target: da.Array | ArrayLike,
    *,
    topk: int | tuple[int, ...] = (1, 5),
    bins: int = 15,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    axis: int = -1,
    sample_weight: da.Array | ArrayLike | None = None,
    where: da.Array | ArrayLike | None = None,
    per_row: Literal[False] = False,
) -> Delayed: ...


@overload
def evaluate(
    logits: da.Array | ArrayLike,
    target: da.Array | ArrayLike,
    *,
    topk: int | tuple[int, ...] = (1, 5),
    bins: int = 15,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    axis: int = -1,
    sample_weight: da.Array | ArrayLike | None = None,
    where: da.Array | ArrayLike | None = None,
    per_row: Literal[True],
) -> tuple[Delayed, dict[str, da.Array]]: ...


@overload
def evaluate(
    logits: da.Array | ArrayLike,
    target: da.Array | ArrayLike,
    *,
    topk: int | tuple[int, ...] = (1, 5),
    bins: int = 15,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    axis: int = -1,
    sample_weight: da.Array | ArrayLike | None = None,
    where: da.Array | ArrayLike | None = None,
    per_row: bool = False,
) -> Delayed | tuple[Delayed, dict[str, da.Array]]: ...


def evaluate(
    logits: da.Array | ArrayLike,
    target: da.Array | ArrayLike,
    *,
    topk: int | tuple[int, ...] = (1, 5),
    bins: int = 15,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    axis: int = -1,
    sample_weight: da.Array | ArrayLike | None = None,
    where: da.Array | ArrayLike | None = None,
    per_row: bool = False,
) -> Delayed | tuple[Delayed, dict[str, da.Array]]:
    """Lazy :func:`fastsce.evaluate` of a Dask array of logits: loss, perplexity, accuracy,
    top-k accuracy, entropy, target probability, confidence and calibration error.

    Parameters
    ----------
    logits : (N, K) float Dask array (or NumPy array)
        2-D; ``axis`` is the class axis (-1 or 1: (N, K); 0 or -2: (K, N)). float32,
        float64, float16 or bfloat16 (the last two computed in float32). Chunked along
        the rows; logits chunked along the classes too are rechunked to whole rows
        (``logits.rechunk({axis: -1})``, the row chunks kept): every metric needs a whole
        row (its argmax, the target's rank, the entropy), so each task then holds a block
        of rows times K.
    target : (N,) integer class indices, Dask or NumPy
        Rechunked to the logits' rows when they differ (cheap).
    sample_weight : (N,) real array, where : (N,) bool array, optional; Dask or NumPy
        Row weights and row mask, rechunked to the logits' rows.
    topk, bins, weight, ignore_index
        As in :func:`fastsce.evaluate`. ``weight`` is a small (K,) array.
    per_row : bool
        Also return the per-row arrays, lazily.

    Returns
    -------
    evaluation : dask.delayed.Delayed
        ``evaluation.compute()`` (or ``dask.compute(evaluation, ...)``) gives the
        :class:`fastsce.Evaluation` of the whole batch, without per-row arrays.
    (evaluation, rows) with ``per_row=True``
        ``rows``: a dict of (N,) Dask arrays chunked like the logits' rows, keyed
        target_logprob, entropy, argmax, target_rank, confidence (as the Evaluation's
        fields of those names). Computing them together with the evaluation
        (``dask.compute(evaluation, rows)``) reads the logits once.

    Each block of rows is one task that computes its float64 sums
    (:class:`fastsce.metrics.MetricSums`); the sums are added in a binary tree of fixed
    shape (neighbouring blocks first), so the result depends on the chunking only by
    rounding and not at all on the scheduling; it equals the in-memory call within
    ``reference.TOLERANCE``. Option errors are raised here; labels outside [0, K) raise
    ``IndexError`` and bad sample weights ``ValueError`` (naming the row in the whole
    batch) when computed.
    """
    return _EvaluationJob(locals()).build()


class _Job:
    """Checked, chunk-aligned inputs of one call, and the graph built from them."""

    def __init__(self, logits, target, given):
        logits = _checked_logits(logits)
        n, k = logits.shape
        rows, cols = logits.chunks
        target, soft = _checked_target(target, logits)
        row_arrays = _checked_row_arrays(given, n, rows)
        weight = given["weight"]
        if isinstance(weight, da.Array):
            weight = weight.compute()  # (K,): small
        options = _checked_options(given, logits, target, soft, weight, row_arrays)

        self.logits, self.target, self.soft = logits, target, soft
        self.sample_weight, self.where = row_arrays.get("sample_weight"), row_arrays.get("where")
        self.dtype, self.k, self.rows, self.cols = logits.dtype, k, rows, cols
        self.row_starts = _starts(rows)
        self.col_starts = _starts(cols)
        self.reduction = options["reduction"]
        self.returns = (bool(options["return_z_loss"]), bool(options["return_lse"]))
        # The class weights go into the graph once, as a one-chunk array, not into every task.
        self.weight = None if weight is None else da.from_array(np.asarray(weight, np.float64), chunks=-1)
        # What every task is told (as keywords): the problem and the options.
        self.options = dict(
            k=k, soft=soft, dtype=logits.dtype,
            **{key: options[key] for key in (
                "reduction", "ignore_index", "label_smoothing", "z_loss", "logit_scale", "softcap", "all_ignored",
            )},
        )  # fmt: skip

    # --- the graph ---------------------------------------------------------------------

    def build(self, grad):
        if len(self.cols) == 1:
            loss, g, z_term, lse = self._by_rows(grad)
        else:
            loss, g, z_term, lse = self._by_rows_and_classes(grad)
        extra = [x for x, wanted in zip((z_term, lse), self.returns) if wanted]
        if not grad and not extra:
            return loss
        return (loss, *extra) if not grad else (loss, g, *extra)

    def _keys(self, i, j=0):
        """Keys of block i of the rows (j of the classes): target, class weights, sample
        weights, where."""
        t = self.target
        t_key = (t.name, i, j) if self.soft else (t.name, i)
        weight_key = None if self.weight is None else (self.weight.name, 0)
        sw_key = None if self.sample_weight is None else (self.sample_weight.name, i)
        where_key = None if self.where is None else (self.where.name, i)
        return t_key, weight_key, sw_key, where_key

    def _inputs(self):
        return [a for a in (self.target, self.weight, self.sample_weight, self.where) if a is not None]

    def _denominators(self):
        """(2,) Dask array: the global "mean" denominators (D, D_z), from the target, class
        weights and sample weights only (no logits read); checks labels and sample weights."""
        name = f"fastsce-denominators-{tokenize(self._inputs(), self.options)}"
        call = functools.partial(_denominators_block, **self.options)
        dsk = {}
        for i, start in enumerate(self.row_starts):
            t_key, weight_key, sw_key, where_key = self._keys(i)
            t_key = None if self.soft else t_key  # probabilities: only the row count matters
            dsk[(name, i, 0)] = (call, t_key, weight_key, sw_key, where_key, self.rows[i], start)
        parts = _array(name, dsk, self._inputs(), ((1,) * len(self.rows), (2,)), np.float64)
        return parts.sum(axis=0)

    def _by_rows(self, grad):
        """One class chunk: one fused-kernel task per block of rows."""
        dens = self._denominators() if self.reduction == "mean" else None
        inputs = [self.logits] + self._inputs() + ([dens] if dens is not None else [])
        name = f"fastsce-{'loss-grad' if grad else 'loss'}-{tokenize(inputs, self.options, self.returns)}"
        call = functools.partial(_fused_block, grad=grad, want_lse=self.returns[1], **self.options)
        dens_key = None if dens is None else (dens.name, 0)
        dsk = {}
        for i, start in enumerate(self.row_starts):
            t_key, weight_key, sw_key, where_key = self._keys(i)
            dsk[(name, i)] = (call, (self.logits.name, i, 0), t_key, weight_key, sw_key, where_key, dens_key, start)
        parts = _array(name, dsk, inputs, ((1,) * len(self.rows),), object)
        g = _select(parts, 2, "fastsce-grad", self.logits.chunks, self.dtype) if grad else None
        lse = _select(parts, 3, "fastsce-lse", (self.rows,), self.dtype) if self.returns[1] else None
        loss, z_term = self._reduce(parts, dens, fused=True)
        return loss, g, z_term, lse

    def _by_rows_and_classes(self, grad):
        """Several class chunks: partial statistics per block, combined per block of rows."""
        options = self.options
        shard_inputs = [self.logits] + [a for a in (self.target, self.weight) if a is not None]
        token = tokenize(shard_inputs, options)
        stats_name, combined_name = f"fastsce-stats-{token}", f"fastsce-combined-{token}"
        call = functools.partial(_stats_block, **options)
        stats, combined = {}, {}
        for i, start in enumerate(self.row_starts):
            level = []
            for j, offset in enumerate(self.col_starts):
                t_key, weight_key, _, _ = self._keys(i, j)
                stats[(stats_name, i, j)] = (call, (self.logits.name, i, j), t_key, weight_key, offset, start)
                level.append((stats_name, i, j))
            depth = 0
            while len(level) > 1:  # a binary tree of combines, neighbours first
                depth += 1
                merged = []
                for p in range(0, len(level) - 1, 2):
                    key = (f"{combined_name}-tree", i, depth, p // 2)
                    combined[key] = (_combine_block, level[p], level[p + 1])
                    merged.append(key)
                level = merged + level[len(level) - len(level) % 2 :]
            combined[(combined_name, i)] = level[0]  # an alias of the root
        blocks = (1,) * len(self.rows)
        stats = _array(stats_name, stats, shard_inputs, (blocks, (1,) * len(self.cols)), object)
        combined = _array(combined_name, combined, [stats], (blocks,), object)

        # The loss of each block of rows, from its combined statistics.
        inputs = [combined] + self._inputs()
        name = f"fastsce-rows-{tokenize(inputs, options, self.returns)}"
        call = functools.partial(_rows_block, want_lse=self.returns[1], **options)
        dsk = {}
        for i, start in enumerate(self.row_starts):
            t_key, _, sw_key, where_key = self._keys(i)
            dsk[(name, i)] = (call, (combined_name, i), t_key, sw_key, where_key, start)
        parts = _array(name, dsk, inputs, (blocks,), object)
        loss, z_term = self._reduce(parts, None, fused=False)
        lse = _select(parts, 3, "fastsce-lse", (self.rows,), self.dtype) if self.returns[1] else None

        g = None
        if grad:
            dens = self._denominators() if self.reduction == "mean" else None
            inputs = [self.logits, combined] + self._inputs() + ([dens] if dens is not None else [])
            name = f"fastsce-grad-{tokenize(inputs, options)}"
            call = functools.partial(_grad_block, **options)
            dens_key = None if dens is None else (dens.name, 0)
            dsk = {}
            for i, start in enumerate(self.row_starts):
                for j, offset in enumerate(self.col_starts):
                    t_key, weight_key, sw_key, where_key = self._keys(i, j)
                    dsk[(name, i, j)] = (
                        call, (self.logits.name, i, j), t_key, weight_key, (combined_name, i),
                        sw_key, where_key, dens_key, offset, start,
                    )  # fmt: skip
            g = _array(name, dsk, inputs, self.logits.chunks, self.dtype)
        return loss, g, z_term, lse

    def _reduce(self, parts, dens, fused):
        """(loss, z-term) from the blocks' parts: item 0 of each block (see _total), per-row
        arrays for "none"."""
        if self.reduction == "none":
            return (
                _select(parts, 0, "fastsce-loss", (self.rows,), self.dtype),
                _select(parts, 1, "fastsce-z-loss", (self.rows,), self.dtype),
            )
        sums = _select(parts, 0, "fastsce-parts", ((1,) * len(self.rows), (4,)), np.float64).sum(axis=0)
        inputs = [sums] + ([dens] if dens is not None else [])
        out = []
        for which in ("loss", "z-loss"):
            name = f"fastsce-{which}-{tokenize(inputs, self.options)}"
            source = "stats" if not fused else ("shares" if dens is not None else "sums")
            call = functools.partial(_total, which=which, source=source, **self.options)
            dsk = {(name,): (call, (sums.name, 0), None if dens is None else (dens.name, 0))}
            out.append(_array(name, dsk, inputs, (), self.dtype))
        return tuple(out)


# --- the checks of one call, in the order _Job makes them ---------------------------------


def _checked_logits(logits):
    """logits as a 2-D float Dask array of known chunk sizes and at least one class."""
    logits = _as_dask(logits, "logits", lambda a: ("auto", -1))
    if not logits.dtype.isnative:  # the other byte order: its values, in native order
        logits = logits.astype(logits.dtype.newbyteorder("="))
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32 or float64; got dtype {logits.dtype}. "
            "Convert with logits.astype(np.float32)"
        )
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D with shape (N, K); got shape {logits.shape}")
    if any(math.isnan(c) for c in logits.chunks[0] + logits.chunks[1]):
        raise ValueError("logits have unknown chunk sizes; call logits.compute_chunk_sizes() first")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class; got shape {logits.shape}")
    return logits


def _checked_target(target, logits):
    """(target, soft): class indices (N,) or probabilities (N, K), told apart by shape,
    chunked like the logits' rows (and classes)."""
    n, k = logits.shape
    if not isinstance(target, (da.Array, np.ndarray)):
        raise TypeError(f"target must be a dask.array.Array or a numpy.ndarray; got {type(target).__name__}")
    soft = target.shape == (n, k)
    if soft:
        if target.dtype.kind != "f":
            raise TypeError(
                f"target of shape {target.shape} (same as logits) holds class probabilities "
                f"and must be a float array; got dtype {target.dtype}. For class indices "
                "pass a 1-D integer array of shape (N,)"
            )
    elif target.shape != (n,):
        raise ValueError(
            f"target has shape {target.shape} but logits have shape {logits.shape}; "
            f"target must be class indices of shape ({n},) or probabilities of shape {logits.shape}"
        )
    elif target.dtype.kind not in "iu":
        raise TypeError(
            f"target of shape {target.shape} holds class indices and must be an integer array; "
            f"got dtype {target.dtype}. Convert with target.astype(np.int64)"
        )
    rows, cols = logits.chunks
    target_chunks = (rows, cols) if soft else (rows,)
    target = _as_dask(target, "target", lambda a: target_chunks)
    if target.chunks != target_chunks:
        target = target.rechunk(target_chunks)
    return target, soft


def _checked_row_arrays(given, n, rows):
    """{name: Dask array chunked like the rows} of the given sample_weight and where."""
    row_arrays = {}
    for name in ("sample_weight", "where"):
        x = given[name]
        if x is None:
            continue
        if not isinstance(x, (da.Array, np.ndarray)):
            raise TypeError(f"{name} must be a dask.array.Array or a numpy.ndarray; got {type(x).__name__}")
        if x.shape != (n,):
            raise ValueError(f"{name} has shape {x.shape}; it needs one entry per row, shape ({n},)")
        x = _as_dask(x, name, lambda a: (rows,))
        row_arrays[name] = x if x.chunks == (rows,) else x.rechunk((rows,))
    return row_arrays


def _checked_options(given, logits, target, soft, weight, row_arrays):
    """The scalar options, checked by the reference on an empty batch: the same errors as
    the in-memory call, raised now rather than inside a task."""
    options = {
        key: given[key]
        for key in (
            "ignore_index", "reduction", "label_smoothing", "z_loss", "logit_scale", "softcap",
            "all_ignored", "return_z_loss", "return_lse",
        )
    }  # fmt: skip
    k = logits.shape[1]
    empty_rows = {name: np.empty(0, x.dtype) for name, x in row_arrays.items()}
    with np.errstate(all="ignore"):
        reference.cross_entropy(
            np.empty((0, k), logits.dtype),
            np.empty((0,) + (k,) * soft, target.dtype),
            weight=weight,
            **empty_rows,
            **options,
        )
    return options


def _starts(chunks):
    return np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(int).tolist() if chunks else []


def _as_dask(x, what, chunks_of):
    if isinstance(x, da.Array):
        if isinstance(x._meta, np.ma.MaskedArray):
            as_array(what, x._meta)  # the TypeError of a masked array
        return x
    if isinstance(x, np.ndarray):
        as_array(what, x)
        return da.from_array(x, chunks=chunks_of(x))
    raise TypeError(f"{what} must be a dask.array.Array or a numpy.ndarray; got {type(x).__name__}")


def _array(name, dsk, dependencies, chunks, dtype):
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=dependencies)
    return da.Array(graph, name, chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype))


def _select(parts, index, prefix, chunks, dtype):
    """The index-th item of every block of a 1-D layer whose blocks are tuples."""
    name = f"{prefix}-{parts.name}"
    rest = (0,) * (len(chunks) - 1)
    dsk = {(name, i) + rest: (operator.getitem, (parts.name, i), index) for i in range(parts.numblocks[0])}
    return _array(name, dsk, [parts], chunks, dtype)


# --- the tasks (module-level functions: they travel to workers by reference) ----------
# Each takes its blocks (None where absent) and the call's options as keywords: k, soft,
# dtype, reduction, ignore_index, label_smoothing, z_loss, logit_scale, softcap, all_ignored.

_SHARD_KEYS = ("ignore_index", "label_smoothing", "logit_scale", "softcap")


def _denominators_block(t, weight, sw, wh, n_rows, start, *, soft, ignore_index, dtype, k, **options):
    """[[D, D_z]] of one block of rows, as the in-memory call sums them (class weights in
    the logits' dtype, sums in float64)."""
    v = _row_weights(sw, wh, n_rows, start)
    if soft:
        d = float(v.sum())
        return np.array([[d, d]])
    _check_labels(t, start, ignore_index, k)
    counted = t != ignore_index
    w = np.ones(k) if weight is None else weight.astype(dtype).astype(np.float64)
    d = float((v[counted] * w[t[counted]]).sum())
    return np.array([[d, float(v[counted].sum())]])


def _fused_block(z, t, weight, sw, wh, dens, start, *, grad, want_lse, **options):
    """(parts, z per row, gradient block or None, lse or None) of one block of whole rows.
    parts: the per-row losses for "none"; else the (1, 4) float64 row [loss, z-term, 0, 0]
    of the block's "sum", or of its share of the "mean" (the cross-entropy sum divided by
    the global D, the z-term sum by D_z)."""
    k, dtype, z_loss = options["k"], options["dtype"], options["z_loss"]
    reduction = options["reduction"]
    w = None if weight is None else weight.astype(dtype)
    kwargs = dict(return_z_loss=True, return_lse=want_lse, all_ignored=options["all_ignored"])
    kwargs.update((key, options[key]) for key in _SHARD_KEYS)
    call = functools.partial(_call, grad, z, t, sw, wh, start, options, **kwargs)
    if reduction != "mean":
        loss, z_term, g, lse = call(weight=w, reduction=reduction, z_loss=z_loss)
        if reduction == "none":
            return loss, z_term, g, lse
        return _parts(loss, z_term), None, g, lse
    d, d_z = (float(x) for x in dens)
    # Loss and gradient are linear in the class weights (the cross-entropy part) and in
    # z_loss: "sum" with weights w / D and z_loss / D_z is the block's share of the
    # "mean", and needs no second pass over the gradient block to divide it.
    if d > 0:
        base = np.ones(k) if w is None else w.astype(np.float64)
        with np.errstate(over="ignore", under="ignore"):
            scaled = (base / d).astype(dtype)
            gamma = z_loss / d_z
        if np.isfinite(scaled).all() and ((scaled != 0) | (base == 0)).all() and np.isfinite(gamma):
            loss, z_term, g, lse = call(weight=scaled, reduction="sum", z_loss=gamma)
            return _parts(loss, z_term), None, g, lse
    # D = 0 (nothing counted, or only rows of class weight 0), or w / D out of range:
    # the cross-entropy and z-loss parts apart, each times its own scale.
    sc, sc_z = _scales(d, d_z, options["all_ignored"])
    ce, _, g, lse = call(weight=w, reduction="sum", z_loss=0.0)
    z_part, g_z = 0.0, None
    if z_loss:  # the z-loss part alone: no class weights
        z_part, _, g_z, _ = call(weight=np.zeros(k, dtype), reduction="sum", z_loss=z_loss)
    if grad:
        g = _combine_parts(g, g_z, sc, sc_z, _counted(t, sw, wh, len(z), options))
    with np.errstate(invalid="ignore", over="ignore"):
        return _parts(sc * float(ce) + sc_z * float(z_part), sc_z * float(z_part)), None, g, lse


def _parts(loss, z_term, d=0.0, d_z=0.0):
    return np.array([[float(loss), float(z_term), d, d_z]])


def _call(grad, z, t, sw, wh, start, options, **kwargs):
    """fastsce's call on one block, as (loss, z-term, gradient or None, lse or None); a bad
    label or sample weight reported by its row in the whole batch."""
    try:
        if grad:
            loss, g, z_term, *lse = fastsce.cross_entropy_with_grad(z, t, sample_weight=sw, where=wh, **kwargs)
        else:
            loss, z_term, *lse = fastsce.cross_entropy(z, t, sample_weight=sw, where=wh, **kwargs)
            g = None
    except (IndexError, ValueError):
        _check_block(t, sw, start, options)
        raise
    return loss, z_term, g, lse[0] if lse else None


def _stats_block(z, t, weight, offset, start, *, k, dtype, **options):
    """fastsce.partial_stats of one block (rows of block i, classes offset..)."""
    w = None if weight is None else weight[offset : offset + z.shape[1]].astype(dtype)
    return fastsce.partial_stats(z, t, offset, weight=w, **{key: options[key] for key in _SHARD_KEYS})


def _combine_block(a, b):
    return fastsce.combine(a, b)


def _rows_block(stats, t, sw, wh, start, *, want_lse, **options):
    """(parts, z per row, None, lse) of one block of rows from its combined statistics.
    parts: the per-row losses for "none"; else the (1, 4) float64 row [cross-entropy,
    z-term, D, D_z] of the block's sums (apart: D and D_z may differ by orders of magnitude)."""
    try:
        rows = sharded._Rows(stats, "sum", options["z_loss"], sw, wh, options["all_ignored"])
    except (IndexError, ValueError):
        _check_block(t, sw, start, options)
        raise
    dtype = options["dtype"].type
    lse = rows.lse.astype(dtype) if want_lse else None
    with np.errstate(over="ignore", invalid="ignore"):
        if options["reduction"] == "none":
            return (rows.ce + rows.zl).astype(dtype), rows.zl.astype(dtype), None, lse
        return _parts(rows.ce.sum(), rows.zl.sum(), rows.d, rows.d_z), None, None, lse


def _grad_block(z, t, weight, stats, sw, wh, dens, offset, start, **options):
    """fastsce.finish_grad of one block, divided by the global "mean" denominators."""
    k_s, dtype, z_loss = z.shape[1], options["dtype"], options["z_loss"]
    w = None if weight is None else weight[offset : offset + k_s].astype(dtype)
    shard = {key: options[key] for key in _SHARD_KEYS}

    def finish(stats, w, sw, z_loss, reduction="sum"):
        try:
            return fastsce.finish_grad(
                z, t, stats, offset, weight=w, reduction=reduction, z_loss=z_loss,
                sample_weight=sw, where=wh, all_ignored=options["all_ignored"], **shard,
            )  # fmt: skip
        except (IndexError, ValueError):
            _check_block(t, sw, start, options)
            raise

    if options["reduction"] != "mean":
        return finish(stats, w, sw, z_loss, options["reduction"])
    d, d_z = (float(x) for x in dens)
    # "sum" with the row weights times 1 / D and z_loss times D / D_z is the "mean".
    if d > 0:
        v = _row_weights(sw, None, stats.n, start)
        with np.errstate(over="ignore", under="ignore"):
            beta, gamma = 1.0 / d, z_loss * d / d_z
            scaled = v * beta
        if np.isfinite(beta) and np.isfinite(gamma) and ((scaled != 0) | (v == 0)).all():
            return finish(stats, w, scaled, gamma)
    # D = 0, or out of range: both parts apart (see _fused_block).
    sc, sc_z = _scales(d, d_z, options["all_ignored"])
    g = finish(stats, w, sw, 0.0)
    g_z = None
    if z_loss:  # the z-loss part alone: no class weights
        no_ce = dataclasses.replace(stats, a=np.zeros(stats.n), weight_sum=0.0)
        g_z = finish(no_ce, np.zeros(k_s, dtype), sw, z_loss)
    return _combine_parts(g, g_z, sc, sc_z, _counted(stats.labels, sw, wh, stats.n, options))


def _total(sums, dens, *, which, source, reduction, z_loss, all_ignored, dtype, **options):
    """The loss (or the z-term) from the float64 sums over the blocks' parts, which are
    for ``source`` "sums" (one class chunk, "sum"): [loss, z-term, 0, 0]; "shares" (one
    class chunk, "mean"): [the block's share of the loss, of the z-term, 0, 0], with the
    global ``dens`` = (D, D_z); "stats" (from statistics): [cross-entropy, z-term, D, D_z]."""
    first, z_term, d, d_z = (float(x) for x in sums)
    fill = np.nan if all_ignored == "nan" else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        if source == "stats":
            if reduction == "mean":
                first = first / d if d else fill
                z_term = z_term / d_z if d_z else fill
            total = first + (z_term if z_loss else 0.0)
        elif source == "shares" and not dens[0]:  # D = 0: the blocks' shares are moot
            z_term = z_term if dens[1] else fill
            total = fill + (z_term if z_loss else 0.0)
        else:
            total = first
        if not z_loss:
            z_term = 0.0
        return dtype.type(z_term if which == "z-loss" else total)


def _scales(d, d_z, all_ignored):
    """The "mean" scales 1 / D and 1 / D_z; what all_ignored says when one is 0."""
    fill = np.nan if all_ignored == "nan" else 0.0
    with np.errstate(divide="ignore", over="ignore"):
        return (1.0 / d if d else fill), (1.0 / d_z if d_z else fill)


def _combine_parts(g, g_z, sc, sc_z, counted):
    """sc * g + sc_z * g_z on the counted rows, 0 on the others (where sc may be NaN)."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = sc * g.astype(np.float64)
        if g_z is not None:
            out += sc_z * g_z
        return np.where(counted[:, None], out, 0.0).astype(g.dtype)


def _counted(t, sw, wh, n_rows, options):
    """The rows in the loss: sample weight and where not 0, label not ignore_index."""
    counted = np.ones(n_rows, bool)
    if sw is not None:
        counted &= np.asarray(sw) != 0
    if wh is not None:
        counted &= np.asarray(wh)
    if not options["soft"]:
        counted &= np.asarray(t) != options["ignore_index"]
    return counted


def _row_weights(sw, wh, n_rows, start):
    """sample_weight * where in float64 (ones when neither is given), checked."""
    v = np.ones(n_rows) if sw is None else np.array(sw, np.float64)
    _check_sample_weights(v, start)
    if wh is not None:
        v = np.where(wh, v, 0.0)
    return v


def _check_block(t, sw, start, options):
    """Raise the error of a bad label or sample weight of the block, naming its row in
    the whole batch (no error: the caller re-raises its own)."""
    if not options["soft"]:
        _check_labels(t, start, options["ignore_index"], options["k"])
    if sw is not None:
        _check_sample_weights(np.asarray(sw, np.float64), start)


def _check_labels(t, start, ignore_index, k):
    bad = (t != ignore_index) & ((t < 0) | (t >= k))
    if bad.any():
        row = int(np.argmax(bad))
        raise IndexError(
            f"target[{start + row}] = {int(t[row])} is not a class index for logits with K={k} "
            f"classes: labels must lie in [0, {k - 1}] or equal ignore_index={ignore_index}"
        )


def _check_sample_weights(v, start):
    bad = ~np.isfinite(v) | (v < 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"sample_weight[{start + row}] = {float(v[row])!r}; sample weights must be finite and >= 0")


# --- evaluate ----------------------------------------------------------------------------


class _EvaluationJob:
    """Checked, row-aligned inputs of one evaluate call, and the graph built from them."""

    def __init__(self, given):
        logits, shape, axis = _evaluation_logits(given["logits"], given["axis"])
        n, k = logits.shape
        if len(logits.chunks[1]) > 1:
            # Every metric needs whole rows (the argmax, the target's rank, the entropy):
            # one class chunk, the row chunks kept.
            logits = logits.rechunk({1: -1})
        rows = logits.chunks[0]
        target = _evaluation_target(given["target"], logits, shape, axis)
        row_arrays = _checked_row_arrays(given, n, rows)
        weight = given["weight"]
        if isinstance(weight, da.Array):
            weight = weight.compute()  # (K,): small
        per_row = given["per_row"]
        if not isinstance(per_row, (bool, np.bool_)):  # it decides what is returned
            raise TypeError(f"per_row must be True or False; got {per_row!r}")
        # The other options, checked by the in-memory call on an empty batch: the same
        # errors as fastsce.evaluate, raised now rather than inside a task.
        empty = {name: np.empty(0, x.dtype) for name, x in row_arrays.items()}
        _, topk, bins = metrics.check_evaluation(
            np.empty((0, k), logits.dtype), np.empty(0, target.dtype), given["topk"], given["bins"], weight,
            given["ignore_index"], -1, empty.get("sample_weight"), empty.get("where"),
        )  # fmt: skip

        self.logits, self.target, self.rows = logits, target, rows
        self.sample_weight, self.where = row_arrays.get("sample_weight"), row_arrays.get("where")
        # The class weights as given (converted in each task as in memory), once in the graph.
        self.weight = None if weight is None else da.from_array(as_array("weight", weight), chunks=-1)
        self.compute = np.dtype(np.float64) if native(logits.dtype) == np.float64 else np.dtype(np.float32)
        self.options = dict(topk=topk, bins=bins, ignore_index=given["ignore_index"], k=k, per_row=bool(per_row))

    def build(self):
        inputs = [a for a in (self.logits, self.target, self.weight, self.sample_weight, self.where) if a is not None]
        token = tokenize(inputs, self.options)
        name = f"fastsce-evaluate-{token}"
        call = functools.partial(_evaluate_block, **self.options)
        dsk = {}
        for i, start in enumerate(_starts(self.rows)):
            dsk[(name, i)] = (
                call, (self.logits.name, i, 0), (self.target.name, i), _key(self.weight, 0),
                _key(self.sample_weight, i), _key(self.where, i), start,
            )  # fmt: skip
        blocks = (1,) * len(self.rows)
        parts = _array(name, dsk, inputs, (blocks,), object)
        evaluation = self._total(parts, token)
        if not self.options["per_row"]:
            return evaluation
        dtypes = {"argmax": np.dtype(np.int64), "target_rank": np.dtype(np.int64)}
        per_row = {
            field: _select(
                parts, 1 + j, f"fastsce-{field.replace('_', '-')}", (self.rows,), dtypes.get(field, self.compute)
            )
            for j, field in enumerate(metrics.Evaluation.PER_ROW)
        }
        return evaluation, per_row

    def _total(self, parts, token):
        """A Delayed of the Evaluation: the blocks' MetricSums added in a binary tree of fixed
        shape (neighbours first: the same sums in the same order whatever the scheduling),
        then finished."""
        name = f"fastsce-evaluation-{token}"
        tree = {}
        level = []
        for i in range(parts.numblocks[0]):
            tree[(f"{name}-tree", 0, i)] = (operator.getitem, (parts.name, i), 0)
            level.append((f"{name}-tree", 0, i))
        depth = 0
        while len(level) > 1:
            depth += 1
            merged = []
            for p in range(0, len(level) - 1, 2):
                key = (f"{name}-tree", depth, p // 2)
                tree[key] = (operator.add, level[p], level[p + 1])
                merged.append(key)
            level = merged + level[len(level) - len(level) % 2 :]
        if level:
            tree[name] = (metrics.MetricSums.finish, level[0])
        else:  # no blocks at all
            tree[name] = (_no_rows, self.options["topk"], self.options["bins"])
        return Delayed(name, HighLevelGraph.from_collections(name, tree, dependencies=[parts]))


def _evaluation_logits(logits, axis):
    """(logits as an (N, K) float Dask array of known chunks, the shape given, axis as given)."""
    if not isinstance(logits, (da.Array, np.ndarray)):
        raise TypeError(f"logits must be a dask.array.Array or a numpy.ndarray; got {type(logits).__name__}")
    shape = logits.shape
    if logits.ndim != 2:
        raise ValueError(
            f"logits must be 2-D, shape (N, K) (or (K, N) with axis=0); got shape {shape}. "
            "Reshape to 2-D first, e.g. logits.reshape(-1, K) for classes last"
        )
    axis = _check_axis(axis, np.broadcast_to(np.empty((), np.float32), shape))  # its errors, no data read
    if axis == 0:
        logits = logits.T  # rows first (lazy; each block a transposed view)
    logits = _as_dask(logits, "logits", lambda a: ("auto", -1))
    if not logits.dtype.isnative:  # the other byte order: its values, in native order
        logits = logits.astype(logits.dtype.newbyteorder("="))
    if not is_float(logits.dtype):
        raise TypeError(
            f"logits must be float16, bfloat16, float32 or float64; got dtype {logits.dtype}. "
            "Convert with logits.astype(np.float32)"
        )
    if any(math.isnan(c) for c in logits.chunks[0] + logits.chunks[1]):
        raise ValueError("logits have unknown chunk sizes; call logits.compute_chunk_sizes() first")
    return logits, shape, axis


def _evaluation_target(target, logits, shape, axis):
    """target: (N,) integer class indices as a Dask array chunked like the logits' rows."""
    n = logits.shape[0]
    if not isinstance(target, (da.Array, np.ndarray)):
        raise TypeError(f"target must be a dask.array.Array or a numpy.ndarray; got {type(target).__name__}")
    if target.shape == shape:
        raise ValueError(
            f"evaluate takes class indices; target has the logits' shape {shape} (probabilities). "
            f"Pass target.argmax(axis={axis}) for the most likely class of each row"
        )
    if target.shape != (n,):
        raise ValueError(
            f"target has shape {target.shape} but logits have shape {shape}; "
            f"target must be class indices of shape ({n},)"
        )
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"target holds class indices and must be an integer array; got dtype {target.dtype}. "
            "Convert with target.astype(np.int64)"
        )
    rows = logits.chunks[0]
    target = _as_dask(target, "target", lambda a: (rows,))
    return target if target.chunks == (rows,) else target.rechunk((rows,))


def _key(x, i):
    return None if x is None else (x.name, i)


def _evaluate_block(z, t, weight, sw, wh, start, *, topk, bins, ignore_index, k, per_row):
    """(MetricSums, then the per-row arrays in Evaluation.PER_ROW's order when per_row) of
    one block of whole rows; a bad label or sample weight reported by its row in the
    whole batch."""
    try:
        # (each block's sums in its own units of extreme weights: MetricSums' + rescales them)
        problem, _, _ = metrics.check_evaluation(z, t, topk, bins, weight, ignore_index, -1, sw, wh)
        sums, arrays = metrics.metric_sums(problem, topk, bins, per_row)
    except (IndexError, ValueError):
        if sw is not None:  # the in-memory order: sample weights, then labels
            _check_sample_weights(np.asarray(sw, np.float64), start)
        _check_labels(t, start, ignore_index, k)
        raise
    if not per_row:
        return (sums,)
    return (sums, *(arrays[field] for field in metrics.Evaluation.PER_ROW))


def _no_rows(topk, bins):
    return metrics.MetricSums.zero(topk, bins).finish()
