"""Dask arrays: softmax cross-entropy of batches larger than memory, or spread over a cluster.

    import dask.array as da
    import fastsce.dask

    logits = da.from_zarr("logits.zarr")                  # (N, K), chunked along the rows
    loss, grad = fastsce.dask.cross_entropy_with_grad(logits, labels)   # lazy
    loss.compute()

Each block of rows is one task that calls the fused kernel
(:func:`fastsce.cross_entropy` / :func:`fastsce.cross_entropy_with_grad`) on it. Only
per-block scalars travel between tasks: the loss sums, and for ``reduction="mean"`` the
denominators D (the summed class weight of the counted rows, or the row count for
probabilities), added up in a tree. The result does not depend on the chunking (it equals
the in-memory call to rounding). For the "mean" gradient, D is computed first from the
target alone (a cheap pass, no logits read), then every block's gradient is formed
already divided by D, in the same task that reads the block's logits.

This module imports dask; ``import fastsce`` does not. Optional extra ``fastsce[dask]``.
"""

from __future__ import annotations

import functools
import math
import operator

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

import fastsce
from fastsce import reference

__all__ = ["cross_entropy", "cross_entropy_with_grad"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Lazy softmax cross-entropy loss of a Dask array of logits.

    Parameters
    ----------
    logits : (N, K) float32 or float64 ``dask.array.Array`` (or NumPy array)
        Chunked along the rows; the K classes of a row must be in one chunk (logits
        chunked along the class axis are rechunked to one class chunk for now).
    target : (N,) integer class indices or (N, K) float probabilities, Dask or NumPy
        Rechunked to the logits' row chunks when they differ (cheap for class indices).
    weight, ignore_index, reduction, label_smoothing
        As in :func:`fastsce.cross_entropy`. ``weight`` is a small (K,) array, NumPy.

    Returns
    -------
    loss : 0-d Dask array of the logits' dtype for "mean"/"sum", (N,) for "none",
        chunked like the logits' rows. Nothing is computed until ``.compute()``.

    Option errors are raised here; labels outside [0, K) raise ``IndexError`` (naming
    the row in the whole batch) when the loss is computed.
    """
    job = _Job(logits, target, weight, ignore_index, reduction, label_smoothing)
    if job.reduction == "none":
        return job.layer(_loss_rows, "fastsce-loss", chunks=(job.rows,), dtype=job.dtype)
    if job.reduction == "sum":
        parts = job.layer(_loss_sum, "fastsce-loss-sum", chunks=((1,) * job.blocks,), dtype=np.float64)
        return _to_scalar(_cast, parts.sum(), job.dtype)
    parts = job.layer(_loss_sum_and_denominator, "fastsce-loss-mean", chunks=((1,) * job.blocks, (2,)))
    return _to_scalar(_mean, parts.sum(axis=0), job.dtype)


def cross_entropy_with_grad(
    logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """Lazy loss and gradient with respect to the logits; see :func:`cross_entropy`.

    Returns
    -------
    (loss, grad) : Dask arrays. ``loss`` as in :func:`cross_entropy`; ``grad`` has the
        logits' shape, dtype and row chunks. Both come from the same tasks: computing
        them together (``dask.compute(loss, grad)``) reads the logits once.
    """
    job = _Job(logits, target, weight, ignore_index, reduction, label_smoothing)
    scale = None
    if job.reduction == "mean":
        # D first, from the target only: every gradient block needs it.
        scale = job.layer(_denominator, "fastsce-denominator", chunks=((1,) * job.blocks,), target_only=True)
        scale = scale.sum()
    parts = job.layer(_loss_and_grad, "fastsce-loss-grad", chunks=((1,) * job.blocks,), dtype=object, scale=scale)
    grad = _select(parts, 1, "fastsce-grad", job.logits.chunks, job.dtype)
    if job.reduction == "none":
        return _select(parts, 0, "fastsce-loss", (job.rows,), job.dtype), grad
    sums = _select(parts, 0, "fastsce-loss-part", ((1,) * job.blocks,), np.float64, wrap=True)
    return _to_scalar(_cast, sums.sum(), job.dtype), grad


class _Job:
    """Checked, row-aligned inputs of one call, and the graph layers built from them."""

    def __init__(self, logits, target, weight, ignore_index, reduction, label_smoothing):
        logits = _as_dask(logits, "logits", lambda a: ("auto", -1))
        if logits.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"logits must be float32 or float64; got dtype {logits.dtype}. "
                "Convert with logits.astype(np.float32)"
            )
        if logits.ndim != 2:
            raise ValueError(f"logits must be 2-D with shape (N, K); got shape {logits.shape}")
        n, k = logits.shape
        if any(math.isnan(c) for c in logits.chunks[0]):
            raise ValueError("logits have unknown chunk sizes; call logits.compute_chunk_sizes() first")
        if k == 0:
            raise ValueError(f"logits must have at least one class; got shape {logits.shape}")
        if len(logits.chunks[1]) > 1:
            # Temporary: each task needs whole rows. Rechunking moves the logits once more
            # through memory; chunk along the rows only to avoid it.
            logits = logits.rechunk({1: -1})
        rows = logits.chunks[0]

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
        target = _as_dask(target, "target", lambda a: (rows, -1)[: a.ndim])
        if target.chunks[0] != rows or (soft and len(target.chunks[1]) > 1):
            target = target.rechunk((rows,) + ((k,),) * soft)

        if isinstance(weight, da.Array):
            weight = weight.compute()  # (K,): small
        # The options are checked by the reference on an empty batch: the same errors as
        # the in-memory call, raised now rather than inside a task.
        with np.errstate(all="ignore"):
            reference.cross_entropy(
                np.empty((0, k), logits.dtype),
                np.empty((0,) + (k,) * soft, target.dtype),
                weight=weight,
                ignore_index=ignore_index,
                reduction=reduction,
                label_smoothing=label_smoothing,
            )

        self.logits, self.target, self.soft = logits, target, soft
        self.dtype, self.k, self.rows, self.blocks = logits.dtype, k, rows, len(rows)
        self.starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int).tolist()
        self.reduction = reduction
        # The class weights go into the graph once, as a one-chunk array, not into every task.
        self.weight = None if weight is None else da.from_array(np.asarray(weight, np.float64), chunks=-1)
        self.options = dict(
            k=k, soft=soft, dtype=logits.dtype, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing,
        )

    def layer(self, func, prefix, chunks, dtype=np.float64, scale=None, target_only=False):
        """A 1-D-per-row-block array whose block i is func(logits block i, target block i,
        weight, scale, start row of block i, options); without the logits if target_only."""
        inputs = ([] if target_only else [self.logits]) + [self.target]
        extras = [a for a in (self.weight, scale) if a is not None]
        name = f"{prefix}-{tokenize(func, *inputs, *extras, self.options)}"
        weight_key = None if self.weight is None else (self.weight.name, 0)
        scale_key = None if scale is None else (scale.name,)
        call = functools.partial(func, **self.options)
        dsk = {}
        for i, start in enumerate(self.starts):
            blocks = [(a.name, i) + (0,) * (a.ndim - 1) for a in inputs]
            if target_only:
                blocks = [None] + blocks
            out = (name, i) + (0,) * (len(chunks) - 1)
            dsk[out] = (call, *blocks, weight_key, scale_key, start)
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=inputs + extras)
        return da.Array(graph, name, chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype))


def _as_dask(x, what, chunks_of):
    if isinstance(x, da.Array):
        return x
    if isinstance(x, np.ndarray):
        return da.from_array(x, chunks=chunks_of(x))
    raise TypeError(f"{what} must be a dask.array.Array or a numpy.ndarray; got {type(x).__name__}")


def _select(parts, index, prefix, chunks, dtype, wrap=False):
    """The index-th item of every block of a layer whose blocks are tuples."""
    name = f"{prefix}-{parts.name}"
    get = _item_as_array if wrap else operator.getitem
    dsk = {(name, i) + (0,) * (len(chunks) - 1): (get, (parts.name, i), index) for i in range(parts.numblocks[0])}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[parts])
    return da.Array(graph, name, chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype))


def _to_scalar(func, total, dtype):
    return total.map_blocks(func, dtype, drop_axis=list(range(total.ndim)), dtype=dtype, meta=np.empty((), dtype))


# --- the tasks (module-level functions: they travel to workers by reference) ----------
# Each takes (logits block or None, target block, class weights (float64) or None, the
# "mean" denominator or None, the block's first row) and the call's options as keywords.


def _loss_rows(z, t, weight, scale, start, **options):
    return _call(fastsce.cross_entropy, z, t, weight, start, dict(options, reduction="none"))


def _loss_sum(z, t, weight, scale, start, **options):
    return np.array([float(_call(fastsce.cross_entropy, z, t, weight, start, dict(options, reduction="sum")))])


def _loss_sum_and_denominator(z, t, weight, scale, start, **options):
    loss = _loss_sum(z, t, weight, scale, start, **options)[0]
    return np.array([[loss, _block_denominator(t, weight, **options)]])


def _denominator(z, t, weight, scale, start, **options):
    if not options["soft"]:
        _check_labels(t, start, options["ignore_index"], options["k"])
    return np.array([_block_denominator(t, weight, **options)])


def _loss_and_grad(z, t, weight, scale, start, **options):
    """(loss part, gradient block). With a "mean" denominator D, both come out divided by D."""
    if scale is None:  # "sum" / "none": the blocks are independent
        return _call(fastsce.cross_entropy_with_grad, z, t, weight, start, options)
    d = float(scale)
    if d == 0:
        # Nothing counted anywhere, so nothing in this block either: the block's own
        # "mean" is what the whole batch's is (NaN loss; gradient as in memory).
        return _call(fastsce.cross_entropy_with_grad, z, t, weight, start, options)
    # Loss and gradient are linear in the class weights: "sum" with weights w / D is the
    # "mean", and needs no second pass over the gradient block to divide it by D.
    options = dict(options, reduction="sum")
    base = np.ones(options["k"]) if weight is None else weight
    with np.errstate(over="ignore"):
        scaled = base / d
    if np.isfinite(scaled.astype(options["dtype"])).all():
        return _call(fastsce.cross_entropy_with_grad, z, t, scaled, start, options)
    loss, grad = _call(fastsce.cross_entropy_with_grad, z, t, weight, start, options)  # w / D overflows
    grad *= grad.dtype.type(1 / d)
    return loss / d, grad


def _call(fn, z, t, weight, start, options):
    """fn on one block, with a bad label reported by its row in the whole batch."""
    k, soft, dtype, ignore_index = (options[key] for key in ("k", "soft", "dtype", "ignore_index"))
    w = None if weight is None else weight.astype(dtype)
    try:
        result = fn(
            z, t, weight=w, ignore_index=ignore_index, reduction=options["reduction"],
            label_smoothing=options["label_smoothing"],
        )
    except IndexError:
        if not soft:
            _check_labels(t, start, ignore_index, k)
        raise
    if isinstance(result, tuple) and np.ndim(result[0]) == 0:
        return float(result[0]), result[1]
    return result


def _check_labels(t, start, ignore_index, k):
    bad = (t != ignore_index) & ((t < 0) | (t >= k))
    if bad.any():
        row = int(np.argmax(bad))
        raise IndexError(
            f"target[{start + row}] = {int(t[row])} is not a class index for logits with K={k} "
            f"classes: labels must lie in [0, {k - 1}] or equal ignore_index={ignore_index}"
        )


def _block_denominator(t, weight, *, soft, ignore_index, dtype, **options):
    """The block's share of the "mean" denominator: its counted rows' class weights (in
    the logits' dtype, as fastsce takes them) summed in float64; its row count for
    probabilities."""
    if soft:
        return float(len(t))
    labels = t[t != ignore_index]
    if weight is None:
        return float(labels.size)
    return float(weight.astype(dtype)[labels].sum(dtype=np.float64))


def _item_as_array(parts, index):
    return np.array([parts[index]], np.float64)


def _cast(total, dtype):
    with np.errstate(over="ignore"):  # a float32 loss beyond 3.4e38 is inf, quietly
        return dtype.type(total)


def _mean(sums, dtype):
    total, denominator = sums
    with np.errstate(over="ignore"):
        return dtype.type(total / denominator if denominator else np.nan)  # 0 / 0, as in memory
