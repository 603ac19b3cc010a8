"""A typed use of the public API, checked by mypy (``mypy tests/typing``): the results
have types (not Any) that a user's own annotations can rely on. Not run by pytest."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

import fastsce
from fastsce import reference

logits = np.zeros((4, 10), np.float32)
labels = np.zeros(4, np.int64)

loss: np.floating[Any] | NDArray[np.floating[Any]] = fastsce.cross_entropy(logits, labels, label_smoothing=0.1)
loss2, grad = fastsce.cross_entropy_with_grad(logits, labels, out=np.empty_like(logits))
g: NDArray[Any] = grad
extras: tuple[Any, ...] = fastsce.cross_entropy_with_grad(logits, labels, return_lse=True)
ref_loss, ref_grad = reference.cross_entropy_with_grad(logits, labels, weight=np.ones(10))
tol: dict[str, float] = reference.TOLERANCE[logits.dtype]
p: NDArray[Any] = fastsce.softmax(logits, axis=-1)
lp: NDArray[Any] = fastsce.log_softmax(logits)
lse = fastsce.logsumexp(logits, keepdims=True)
stats: fastsce.ShardStats = fastsce.combine(
    fastsce.partial_stats(logits[:, :5], labels, 0), fastsce.partial_stats(logits[:, 5:], labels, 5)
)
shard_loss = fastsce.finish(stats, reduction="sum")
shard_grad: NDArray[Any] = fastsce.finish_grad(logits[:, :5], labels, stats, 0)
timings: dict[tuple[str, str], tuple[float, int]] = fastsce.warmup(
    dtypes="float64", paths=["logsumexp"], progress=False
)
version: str = fastsce.__version__

fastsce.cross_entropy(logits, labels, label_smoothing="0.1")  # type: ignore[call-overload]  # a str is refused


def torch_use() -> None:
    import torch

    from fastsce.torch import CrossEntropyLoss, cross_entropy

    t: torch.Tensor = cross_entropy(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))
    t2: torch.Tensor = CrossEntropyLoss()(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))


def dask_use() -> None:
    import dask.array as da

    import fastsce.dask

    loss, grad = fastsce.dask.cross_entropy_with_grad(da.zeros((4, 10), chunks=2), np.zeros(4, np.int64))
    d: da.Array = grad
    lazy = fastsce.dask.evaluate(da.zeros((4, 10), chunks=2), np.zeros(4, np.int64))
    evaluation: fastsce.Evaluation = lazy.compute()
    lazy, rows = fastsce.dask.evaluate(da.zeros((4, 10), chunks=2), np.zeros(4, np.int64), per_row=True)
    confidence: da.Array = rows["confidence"]


def linear_use() -> None:
    hidden = np.zeros((4, 8), np.float32)
    head = np.zeros((10, 8), np.float32)
    lin_loss = fastsce.linear_cross_entropy(hidden, head, labels, chunk_rows=2)
    lin: tuple[Any, ...] = fastsce.linear_cross_entropy_with_grad(hidden, head, labels, denominator=8.0)
    fastsce.linear_cross_entropy(hidden, head, labels, chunk_rows="2")  # type: ignore[arg-type]  # a str is refused
