"""What fastsce is benchmarked against: one registry shared by ``python -m fastsce bench``
and the pytest-benchmark suite in bench/, so the same code is timed everywhere.

Each :class:`Implementation` turns a batch (logits, labels) into a zero-argument callable
returning ``(loss, grad)`` — ``grad`` is None for loss-only entries, and the copy for
memcpy; either may be another library's array (anything ``np.asarray`` takes) — and
checks such a result against the NumPy reference with :meth:`Implementation.check`.
Buffers an entry can preallocate (fastsce's ``out=``, the memcpy destination) are
allocated, and other libraries' compilers run, when the callable is built, outside any
timing. Every entry computes the default problem: integer labels, no weights, ``"mean"``.

The peers (PyTorch eager, torch.compile, optax under jax.jit, TensorFlow's fused op) are
imported only when built: importing TensorFlow or JAX takes seconds. A peer that cannot
run here (torch.compile without a working C++ compiler) raises :class:`Skip`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
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
    "Skip",
    "check_evaluation",
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


class Skip(Exception):
    """An installed implementation cannot run on this machine (e.g. torch.compile with no
    working C++ compiler): the report notes the reason and goes on without it."""


@dataclass(frozen=True)
class Implementation:
    name: str  # the key, for --impls
    label: str  # what tables and plots call it
    description: str
    build: Callable  # (logits, labels) -> () -> (loss, grad)
    # "loss+grad", "loss" (grad is None), "copy" (grad is a copy of the logits) or
    # "evaluate" (an Evaluation in place of the loss, grad None)
    kind: str
    requires: tuple[str, ...] = ()  # modules that must be importable
    # (threads) -> (the thread count it runs with, as text; a callable restoring the
    # previous setting, or None): the same count as fastsce's, where the library allows
    pin_threads: Callable | None = None
    warmup: str = "warming up"  # what its first call does, for the status line
    sweep: bool = True  # in --sweep-k by default

    def available(self) -> bool:
        return all(importlib.util.find_spec(module) is not None for module in self.requires)

    def check(self, result, logits, expected, labels=None) -> None:
        """Raise :class:`Mismatch` unless ``result`` (what the callable returned for
        ``logits`` and ``labels``) agrees with ``expected`` (:func:`reference_result` of
        the batch).

        Tolerances are ``fastsce.reference.TOLERANCE``, with atol divided by N for the
        gradient, whose entries are O(1/N) under the "mean" reduction. memcpy must
        return an exact copy of the logits. An "evaluate" entry returns an Evaluation in
        place of the loss, checked with :func:`check_evaluation` against
        ``fastsce.reference.evaluate`` (which needs ``labels``).
        """
        try:
            loss, grad = result
        except (TypeError, ValueError):
            raise Mismatch(f"{self.name}: returned {type(result).__name__}, not a (loss, grad) pair") from None
        if self.kind == "copy":
            _compare(self.name, "copy", grad, logits, rtol=0, atol=0, against="the logits")
            return
        if self.kind == "evaluate":  # every metric, against the reference's (computed here: only this needs it)
            if labels is None:
                raise TypeError(f"{self.name}: check needs the labels, to compute the reference's metrics")
            want = reference.evaluate(logits, labels, per_row=True)
            check_evaluation(self.name, loss, want, want.confidence, logits.dtype)
            return
        tol = reference.TOLERANCE[np.dtype(logits.dtype)]
        ref_loss, ref_grad = expected
        _compare(self.name, "loss", np.asarray(loss, np.float64), ref_loss, **tol)
        if self.kind == "loss+grad":
            if grad is None:
                raise Mismatch(f"{self.name}: returned no gradient")
            atol = tol["atol"] / max(logits.shape[0], 1)
            _compare(self.name, "gradient", grad, ref_grad, rtol=tol["rtol"], atol=atol)


def check_evaluation(name, got, want, confidence, dtype) -> None:
    """Raise :class:`Mismatch` unless the Evaluation ``got`` agrees with ``want`` (the other
    implementation's) within ``fastsce.reference.TOLERANCE[dtype]``; per-row arrays are
    compared where both have them. ``confidence``: the reference's per row.

    Argmax and ranks compare logits, so accuracies and per-row integers agree exactly
    (to float64 rounding of the sums). A confidence within float32 rounding of a bin edge
    may fall on either side of it: that moves the row's weight between two bins, and at
    most 2 / rows in the ECE, so those rows (within 4e-6, about 30 float32 ulps, where
    the two differ by a few) loosen the bins' comparison, and the ECE is also checked
    against the bins' own gaps."""
    if not isinstance(got, fastsce.Evaluation):
        raise Mismatch(f"{name}: returned {type(got).__name__}, not an Evaluation")
    tol = reference.TOLERANCE[np.dtype(dtype)]
    for field in fastsce.Evaluation.SCALARS:
        if field != "ece":
            _compare(name, field, getattr(got, field), getattr(want, field), **tol)
    if list(got.topk_accuracy) != list(want.topk_accuracy):
        ks, want_ks = list(got.topk_accuracy), list(want.topk_accuracy)
        raise Mismatch(f"{name}: top-k accuracies for k in {ks}, the reference's for {want_ks}")
    _compare(name, "topk_accuracy", list(got.topk_accuracy.values()), list(want.topk_accuracy.values()), **tol)
    if (got.rows, got.ignored_rows) != (want.rows, want.ignored_rows):
        raise Mismatch(
            f"{name}: rows, ignored_rows {got.rows}, {got.ignored_rows}; the reference's {want.rows}, {want.ignored_rows}"
        )
    bins = got.bin_counts.size
    scaled = np.asarray(confidence, np.float64) * bins
    edge = np.round(scaled)  # (inner edges only: confidences of 1 stay in the last bin)
    near = int(np.count_nonzero((np.abs(scaled - edge) < 4e-6 * scaled) & (edge > 0) & (edge < bins)))
    moved = float(np.abs(got.bin_counts - want.bin_counts).sum())
    if moved > 2 * near + 1e-9:
        raise Mismatch(f"{name}: bin_counts {got.bin_counts}, the reference's {want.bin_counts}: {moved:g} apart")
    _compare(name, "ece", got.ece, want.ece, rtol=tol["rtol"], atol=tol["atol"] + 2 * near / max(want.rows, 1))
    filled = got.bin_counts > 0
    gaps = got.bin_counts[filled] * np.abs(got.bin_accuracy[filled] - got.bin_confidence[filled])
    _compare(name, "ece", got.ece, gaps.sum() / got.bin_counts.sum(), **tol, against="its bins' gaps")
    same = got.bin_counts == want.bin_counts
    _compare(name, "bin_confidence", got.bin_confidence[same], want.bin_confidence[same], **tol)
    _compare(name, "bin_accuracy", got.bin_accuracy[same], want.bin_accuracy[same], **tol)
    for field in fastsce.Evaluation.PER_ROW:
        a, b = getattr(got, field), getattr(want, field)
        if a is None or b is None:
            continue
        if a.dtype != b.dtype:
            raise Mismatch(f"{name}: {field} of dtype {a.dtype}, the reference's {b.dtype}")
        exact = a.dtype.kind == "i"
        _compare(name, field, a, b, **({"rtol": 0, "atol": 0} if exact else tol))


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


def _fastsce_fresh(logits, labels):
    return lambda: fastsce.cross_entropy_with_grad(logits, labels)


def _fastsce_loss(logits, labels):
    return lambda: (fastsce.cross_entropy(logits, labels), None)


def _fastsce_evaluate(logits, labels):
    return lambda: (fastsce.evaluate(logits, labels), None)


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


def _torch_compile(logits, labels):
    import torch
    import torch.nn.functional as F

    # A fresh compile cache for every shape: no recompile limit reached over a K sweep, and
    # dynamic=False compiles each shape's own kernels (no dynamic-shape fallback).
    torch._dynamo.reset()
    x = torch.from_numpy(logits)
    y = torch.from_numpy(labels.astype(np.int64))

    def run():
        xg = x.detach().requires_grad_()
        loss = compiled(xg, y)
        loss.backward()  # AOTAutograd compiled the backward graph with the forward
        return loss.item(), xg.grad.numpy()

    try:
        with warnings.catch_warnings():
            # inductor's first import warns that torch.jit.script_method, which it uses, is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            compiled = torch.compile(F.cross_entropy, dynamic=False)
            run()  # compiles forward and backward now, outside any timing
    except Exception as e:
        if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise  # not the compiler's failure: a bug, reported as such
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise Skip(
            f"torch.compile failed ({type(e).__name__}: {first_line}); "
            "its inductor backend needs a working C++ compiler"
        ) from e
    return run


def _torch_threads(threads):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    return f"{torch.get_num_threads()} (torch.set_num_threads)", lambda: torch.set_num_threads(before)


def _optax(logits, labels):
    import jax

    jax.config.update("jax_enable_x64", logits.dtype == np.float64)
    import optax

    def loss_fn(z, y):
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    fn = jax.jit(jax.value_and_grad(loss_fn))
    # int32 labels: JAX's default integer type (int64 would be truncated, with a warning)
    z, y = jax.device_put(logits), jax.device_put(labels.astype(np.int32))

    def run():
        loss, grad = fn(z, y)
        return loss, grad.block_until_ready()

    run()  # traces and compiles with XLA now
    return run


def _available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _jax_threads(threads):
    # XLA's CPU client sizes its thread pool from the CPUs available when JAX starts, and has
    # no setting for it: XLA_FLAGS' intra_op_parallelism_threads=1 still ran on two threads
    # of this 2-CPU machine (per-thread CPU time, jaxlib 0.10).
    cpus = _available_cpus()
    text = f"{cpus} (XLA's default, one per available CPU; no setting"
    return text + (")" if threads == cpus else f": not pinned to {threads})"), None


def _import_tensorflow():
    # TensorFlow's C++ start-up messages (oneDNN notices) would break the status line.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _tensorflow(logits, labels):
    tf = _import_tensorflow()
    z = tf.constant(logits)
    y = tf.constant(labels.astype(np.int64))
    n = tf.constant(max(logits.shape[0], 1), dtype=z.dtype)
    op = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits  # the fused kernel: per-row loss and backprop

    def run():
        loss, backprop = op(features=z, labels=y)
        return tf.reduce_mean(loss), backprop / n  # "mean": the gradient of the mean is backprop / N

    return run


def _tensorflow_threads(threads):
    tf = _import_tensorflow()
    try:
        # intra-op: the threads one op runs on; only settable before TensorFlow's runtime starts
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass
    current = tf.config.threading.get_intra_op_parallelism_threads()
    if current == 0:
        return f"{_available_cpus()} (TensorFlow's default: one per available CPU; runtime already started)", None
    note = "" if current == threads else ": runtime already started"
    return f"{current} (tf.config.threading intra-op{note})", None


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation(
            "memcpy",
            "memcpy (np.copyto)",
            "np.copyto of the logits into a preallocated array: reads and writes N x K, "
            "the floor for anything that reads logits and writes a gradient",
            _memcpy,
            "copy",
        ),
        Implementation(
            "fastsce",
            "fastsce loss+grad (out=)",
            "fastsce.cross_entropy_with_grad(logits, labels, out=preallocated)",
            _fastsce,
            "loss+grad",
            warmup="first call (Numba compiles, or loads its on-disk cache)",
        ),
        Implementation(
            "fastsce-fresh",
            "fastsce loss+grad (fresh gradient)",
            "fastsce.cross_entropy_with_grad(logits, labels): a new gradient array every call (no out=)",
            _fastsce_fresh,
            "loss+grad",
            warmup="first call (Numba compiles, or loads its on-disk cache)",
            sweep=False,
        ),
        Implementation(
            "fastsce-loss",
            "fastsce loss only",
            "fastsce.cross_entropy: loss only, no gradient",
            _fastsce_loss,
            "loss",
            warmup="first call (Numba compiles, or loads its on-disk cache)",
        ),
        Implementation(
            "fastsce-evaluate",
            "fastsce evaluate (every metric)",
            "fastsce.evaluate: loss, perplexity, accuracy, top-5, entropy, confidence and ECE in one read "
            "of the logits (checked against fastsce.reference.evaluate)",
            _fastsce_evaluate,
            "evaluate",
            warmup="first call (Numba compiles, or loads its on-disk cache)",
            sweep=False,
        ),
        Implementation(
            "reference",
            "NumPy reference",
            "fastsce.reference.cross_entropy_with_grad (plain NumPy)",
            _reference,
            "loss+grad",
            sweep=False,
        ),
        Implementation(
            "torch",
            "PyTorch eager",
            "F.cross_entropy + .backward() on CPU tensors sharing the arrays",
            _torch,
            "loss+grad",
            ("torch",),
            _torch_threads,
        ),
        Implementation(
            "torch-compile",
            "torch.compile",
            "torch.compile(F.cross_entropy, dynamic=False) + .backward(): inductor's compiled forward and backward",
            _torch_compile,
            "loss+grad",
            ("torch",),
            _torch_threads,
            warmup="compiling (torch.compile, inductor: forward and backward)",
        ),
        Implementation(
            "optax",
            "optax (jax.jit)",
            "jax.jit(jax.value_and_grad(mean of optax.softmax_cross_entropy_with_integer_labels)) on CPU",
            _optax,
            "loss+grad",
            ("jax", "optax"),
            _jax_threads,
            warmup="compiling (jax.jit, XLA)",
        ),
        Implementation(
            "tensorflow",
            "TensorFlow fused op",
            "tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits (loss and backprop in one op); "
            "mean of the loss, backprop / N",
            _tensorflow,
            "loss+grad",
            ("tensorflow",),
            _tensorflow_threads,
            warmup="importing TensorFlow and warming up",
        ),
    )
}
