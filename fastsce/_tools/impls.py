"""What fastsce is benchmarked against: one registry shared by ``python -m fastsce bench``
and the pytest-benchmark suite in bench/, so the same code is timed everywhere.

Each :class:`Implementation` turns a batch (logits, labels) into a zero-argument callable
returning ``(loss, grad)`` — ``grad`` is None for loss-only entries, and the copy for
memcpy — and checks such a result against the NumPy reference with
:meth:`Implementation.check`. Buffers an entry can preallocate (fastsce's ``out=``, the
memcpy destination) are allocated when the callable is built, outside any timing.
Every entry computes the default problem: integer labels, no weights, ``"mean"``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import numpy as np

import fastsce
from fastsce import reference

__all__ = [
    "DEFAULT_SHAPES",
    "QUICK_SHAPES",
    "IMPLEMENTATIONS",
    "Implementation",
    "Mismatch",
    "make_batch",
    "reference_result",
]

# (N, K): small K is dominated by per-row overhead, large K by memory bandwidth.
DEFAULT_SHAPES = ((65536, 10), (16384, 100), (8192, 1000), (1024, 32000), (256, 128256))
# A smoke run in a few seconds.
QUICK_SHAPES = ((4096, 10), (512, 1000), (16, 32000))


def make_batch(n, k, dtype=np.float32, seed=0):
    """The benchmark batch: logits 3 * N(0, 1) of ``dtype``, uniform int64 labels in [0, k)."""
    rng = np.random.default_rng(seed)
    return (3 * rng.standard_normal((n, k))).astype(dtype), rng.integers(0, k, n)


def reference_result(logits, labels):
    """(loss, grad) of the NumPy reference: what every entry is checked against."""
    return reference.cross_entropy_with_grad(logits, labels)


class Mismatch(AssertionError):
    """An implementation's output disagrees with the reference."""


@dataclass(frozen=True)
class Implementation:
    name: str
    description: str
    build: Callable  # (logits, labels) -> () -> (loss, grad)
    kind: str  # "loss+grad", "loss" (grad is None) or "copy" (grad is a copy of the logits)
    requires: str | None = None  # a module that must be importable

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def check(self, result, logits, expected) -> None:
        """Raise :class:`Mismatch` unless ``result`` (what the callable returned for
        ``logits``) agrees with ``expected`` (:func:`reference_result` of the batch).

        Tolerances are ``fastsce.reference.TOLERANCE``, with atol divided by N for the
        gradient, whose entries are O(1/N) under the "mean" reduction. memcpy must
        return an exact copy of the logits.
        """
        try:
            loss, grad = result
        except (TypeError, ValueError):
            raise Mismatch(f"{self.name}: returned {type(result).__name__}, not a (loss, grad) pair") from None
        if self.kind == "copy":
            _compare(self.name, "copy", grad, logits, rtol=0, atol=0, against="the logits")
            return
        tol = reference.TOLERANCE[np.dtype(logits.dtype)]
        ref_loss, ref_grad = expected
        _compare(self.name, "loss", np.asarray(loss, np.float64), ref_loss, **tol)
        if self.kind == "loss+grad":
            if grad is None:
                raise Mismatch(f"{self.name}: returned no gradient")
            atol = tol["atol"] / max(logits.shape[0], 1)
            _compare(self.name, "gradient", grad, ref_grad, rtol=tol["rtol"], atol=atol)


def _compare(name, what, actual, desired, rtol, atol, against="the reference"):
    """np.testing.assert_allclose's test (NaN equal to NaN), with a one-line message."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    if actual.shape != desired.shape:
        raise Mismatch(f"{name}: {what} of shape {actual.shape}, {against} has shape {desired.shape}")
    bad = ~np.isclose(actual, desired, rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return
    tolerance = f"rtol={rtol:g}, atol={atol:g}"
    if actual.ndim == 0:
        raise Mismatch(f"{name}: {what} {float(actual):.9g}, {against} gives {float(desired):.9g} ({tolerance})")
    first = np.unravel_index(np.argmax(bad), bad.shape)
    worst = np.max(np.abs(actual[bad].astype(np.float64) - desired[bad].astype(np.float64)))
    raise Mismatch(
        f"{name}: {what} differs from {against} in {np.count_nonzero(bad)} of {bad.size} entries ({tolerance}); "
        f"first at {tuple(int(i) for i in first)}: {float(actual[first]):.9g} instead of {float(desired[first]):.9g}; "
        f"largest difference {worst:.3g}"
    )


# --- adapters ---------------------------------------------------------------------------


def _fastsce(logits, labels):
    out = np.empty_like(logits)
    return lambda: fastsce.cross_entropy_with_grad(logits, labels, out=out)


def _fastsce_loss(logits, labels):
    return lambda: (fastsce.cross_entropy(logits, labels), None)


def _reference(logits, labels):
    return lambda: reference.cross_entropy_with_grad(logits, labels)


def _memcpy(logits, labels):
    dst = np.empty_like(logits)

    def run():
        np.copyto(dst, logits)
        return None, dst

    return run


def _torch(logits, labels):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(logits)
    y = torch.from_numpy(labels.astype(np.int64))

    def run():
        xg = x.detach().requires_grad_()
        loss = F.cross_entropy(xg, y)
        loss.backward()
        return loss.item(), xg.grad.numpy()

    return run


def _jax(logits, labels):
    import jax

    jax.config.update("jax_enable_x64", logits.dtype == np.float64)
    import jax.numpy as jnp

    def loss_fn(z, y):
        lse = jax.nn.logsumexp(z, axis=1)
        return jnp.mean(lse - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])

    fn = jax.jit(jax.value_and_grad(loss_fn))
    z, y = jax.device_put(logits), jax.device_put(labels.astype(np.int32))

    def run():
        loss, grad = fn(z, y)
        return float(loss), np.asarray(grad.block_until_ready())

    return run


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation(
            "memcpy",
            "np.copyto of the logits into a preallocated array: reads and writes N x K, "
            "the floor for anything that reads logits and writes a gradient",
            _memcpy,
            "copy",
        ),
        Implementation("fastsce", "fastsce.cross_entropy_with_grad(..., out=preallocated)", _fastsce, "loss+grad"),
        Implementation("fastsce-loss", "fastsce.cross_entropy: loss only, no gradient", _fastsce_loss, "loss"),
        Implementation("reference", "fastsce.reference.cross_entropy_with_grad (plain NumPy)", _reference, "loss+grad"),
        Implementation(
            "torch", "F.cross_entropy + .backward() on CPU tensors sharing the arrays", _torch, "loss+grad", "torch"
        ),
        Implementation("jax", "jax.jit(jax.value_and_grad(logsumexp - picked logit)) on CPU", _jax, "loss+grad", "jax"),
    )
}
