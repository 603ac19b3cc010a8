"""Shared tolerances, input generators and assertion helpers for the fastsce tests.

Everything a test file needs to build inputs or compare results lives here, so the
tolerances are set in one place and no test file repeats setup code.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

import fastsce
from fastsce import reference

DTYPES = (np.float32, np.float64)
REDUCTIONS = ("mean", "sum", "none")

# The two implementations under test: both modules expose cross_entropy and
# cross_entropy_with_grad with the same signature.
IMPLS = {"fast": fastsce, "ref": reference}

# Tolerances for comparing two computations of the same quantity in a given dtype come
# from one place, fastsce.reference.TOLERANCE. ``atol`` is not absolute here:
# assert_close scales it per row by the row's largest |expected| or the quantity's
# natural unit (Case.units), so the tiny gradient entries of a "mean" over many rows are
# compared on their own scale instead of disappearing under an absolute floor.
# Central finite differences in float64 (step FD_STEP): truncation ~ h^2, rounding ~ eps / h.
FD_STEP = 1e-6
FD_TOL = dict(rtol=1e-6, atol=1e-8)


def tol(dtype) -> dict:
    return reference.TOLERANCE[np.dtype(dtype)]


def short(dtype) -> str:
    return {np.float32: "f32", np.float64: "f64"}[np.dtype(dtype).type]


def seed_of(*parts) -> int:
    """A stable seed from readable parts (the same case always gets the same data)."""
    return zlib.crc32(repr(parts).encode())


# --- input generators ------------------------------------------------------------------


def make_logits(rng, n, k, dtype=np.float64, scale=4.0):
    return (scale * rng.standard_normal((n, k))).astype(dtype)


def make_labels(rng, n, k, ignore_index=-100):
    """Class indices in [0, k); rows 2, 6, 10, ... carry ignore_index.

    An ignore_index inside [0, k) also turns up among the random labels.
    """
    labels = rng.integers(0, k, size=n, dtype=np.int64)
    labels[2::4] = ignore_index
    return labels


def make_probs(rng, n, k, dtype=np.float64, zeros=False):
    """Rows of probabilities summing to 1 (softmax of random scores).

    With ``zeros``, about a third of the entries are exactly 0 (each row keeps one > 0).
    """
    p = np.exp(rng.standard_normal((n, k)))
    if zeros and k > 1:
        p[rng.random((n, k)) < 1 / 3] = 0
        p[np.arange(n), rng.integers(0, k, size=n)] += 1
    return (p / p.sum(axis=1, keepdims=True)).astype(dtype)


def make_weight(rng, k, dtype=np.float64):
    return rng.uniform(0.25, 2.0, size=k).astype(dtype)


@dataclass
class Case:
    """One call's inputs: ``call(impl)`` runs it through an implementation."""

    logits: np.ndarray
    target: np.ndarray
    kwargs: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.logits.dtype.type

    @property
    def soft(self) -> bool:
        return self.target.ndim == 2

    def units(self):
        """(loss unit, gradient unit): the size a rounding error of either scales with.

        A confident row has a loss and gradient far below their natural size, so a
        float32 error of one ulp of 1 (e.g. in p - 1 when p ~ 1) is measured against
        max(w) / D (mean), max(w) (sum, none) for the gradient, and against max(w) times
        the number of counted rows divided by D (mean), N (sum), 1 (none) for the loss.
        """
        n, k = self.logits.shape
        w = np.ones(k) if self.kwargs.get("weight") is None else np.asarray(self.kwargs["weight"], np.float64)
        if self.soft:
            counted, denominator = n, float(n)
        else:
            labels = self.target[self.target != self.kwargs.get("ignore_index", -100)]
            counted, denominator = labels.size, float(w[labels].sum())
        w_max = float(w.max())
        reduction = self.kwargs.get("reduction", "mean")
        if reduction == "mean":
            if not denominator:  # NaN loss, exactly zero gradient: compare exactly
                return 0.0, 0.0
            return w_max * counted / denominator, w_max / denominator
        return w_max * (n if reduction == "sum" else 1), w_max

    def loss(self, impl, **extra):
        return impl.cross_entropy(self.logits, self.target, **self.kwargs, **extra)

    def loss_grad(self, impl, **extra):
        return impl.cross_entropy_with_grad(self.logits, self.target, **self.kwargs, **extra)


def make_case(
    n,
    k,
    dtype=np.float64,
    *,
    soft=False,
    weighted=False,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    zeros=False,
    seed=None,
) -> Case:
    """Random logits and targets for one option set; seeded from the options unless given."""
    if seed is None:
        seed = seed_of(n, k, short(dtype), soft, weighted, ignore_index, label_smoothing, reduction)
    rng = np.random.default_rng(seed)
    logits = make_logits(rng, n, k, dtype)
    if soft:
        target = make_probs(rng, n, k, dtype, zeros=zeros)
    else:
        target = make_labels(rng, n, k, ignore_index)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    if ignore_index != -100:
        kwargs["ignore_index"] = ignore_index
    if weighted:
        kwargs["weight"] = make_weight(rng, k)
    return Case(logits, target, kwargs)


# --- assertions ----------------------------------------------------------------------


def assert_close(actual, expected, dtype=None, *, unit=0.0, **override):
    """allclose with the dtype's reference.TOLERANCE, NaN where (and only where) expected is NaN.

    Rows are independent, so the absolute tolerance is per row: its atol times the
    larger of ``unit`` (the natural size of the quantity, see Case.units) and the row's
    largest finite |expected| (for a scalar or 1-D array of row losses: the entry itself).
    """
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    t = dict(tol(dtype or expected.dtype), **override)
    magnitude = np.where(np.isfinite(expected), np.abs(expected), 0).astype(np.float64)
    if magnitude.ndim == 2:
        magnitude = magnitude.max(axis=1, initial=0.0, keepdims=True)
    scale = np.maximum(magnitude, max(unit, float(np.finfo(expected.dtype).tiny)))
    np.testing.assert_allclose(
        actual / scale,
        expected / scale,
        rtol=t["rtol"],
        atol=t["atol"],
        equal_nan=True,
        err_msg=f"(compared after dividing by the scale above)\nactual:   {actual!r}\nexpected: {expected!r}",
    )


def assert_loss_type(loss, dtype, reduction, n):
    """A numpy scalar of the logits' dtype for mean/sum; an (N,) array of it for none."""
    dtype = np.dtype(dtype)
    if reduction == "none":
        assert isinstance(loss, np.ndarray), type(loss)
        assert loss.shape == (n,)
    else:
        assert isinstance(loss, np.generic), type(loss)
    assert loss.dtype == dtype, (loss.dtype, dtype)


def assert_grad_type(grad, dtype, shape):
    assert isinstance(grad, np.ndarray), type(grad)
    assert grad.dtype == np.dtype(dtype), (grad.dtype, dtype)
    assert grad.shape == tuple(shape)


def snapshot(*arrays):
    """Copies of the arrays among the arguments (None and non-arrays are skipped)."""
    return [(a, a.copy()) for a in arrays if isinstance(a, np.ndarray)]


def assert_unchanged(snap):
    for arr, copy in snap:  # bytewise: also catches 0.0 -> -0.0 and NaN payload changes
        assert arr.tobytes() == copy.tobytes(), f"an input array was modified:\n{copy!r}\n->\n{arr!r}"
