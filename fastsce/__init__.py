"""fastsce: fused, Numba-accelerated softmax cross-entropy (loss and gradient) on the CPU.

    loss = fastsce.cross_entropy(logits, target)
    loss, grad = fastsce.cross_entropy_with_grad(logits, target)

``fastsce.reference`` holds the same two functions in plain NumPy, as an oracle.
"""

from fastsce import reference
from fastsce.api import cross_entropy, cross_entropy_with_grad
from fastsce.primitives import log_softmax, logsumexp, softmax

__version__ = "0.1.0"
__all__ = ["cross_entropy", "cross_entropy_with_grad", "log_softmax", "logsumexp", "softmax", "reference", "__version__"]
