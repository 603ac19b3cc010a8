"""fastsce: fused, Numba-accelerated softmax cross-entropy (loss and gradient) on the CPU.

    loss = fastsce.cross_entropy(logits, target)
    loss, grad = fastsce.cross_entropy_with_grad(logits, target)

``fastsce.reference`` holds the same functions in plain NumPy, as an oracle;
``fastsce.partial_stats`` / ``combine`` / ``finish`` / ``finish_grad`` compute the loss
with the classes split across shards; ``softmax``, ``log_softmax`` and ``logsumexp``
run on the same kernels; ``linear_cross_entropy(_with_grad)`` computes the loss of a
linear classifier head from its input without holding the logits. ``fastsce.warmup()``
compiles the kernels ahead of time. ``fastsce.evaluate`` computes loss, accuracy, top-k,
perplexity, entropy and calibration from one read of the logits.
"""

from fastsce import reference
from fastsce._version import __version__
from fastsce._warmup import warmup
from fastsce.api import cross_entropy, cross_entropy_with_grad
from fastsce.metrics import Evaluation, evaluate
from fastsce.linear import linear_cross_entropy, linear_cross_entropy_with_grad
from fastsce.primitives import log_softmax, logsumexp, softmax
from fastsce.sharded import ShardStats, combine, finish, finish_grad, partial_stats

__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "evaluate",
    "Evaluation",
    "partial_stats",
    "combine",
    "finish",
    "finish_grad",
    "ShardStats",
    "log_softmax",
    "logsumexp",
    "softmax",
    "reference",
    "warmup",
    "__version__",
]
