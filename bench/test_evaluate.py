"""What every evaluation metric costs next to the loss alone.

    python -m pytest bench/test_evaluate.py --benchmark-group-by=group

On each shape, with the same logits (3 * N(0, 1), the target's logit raised so that about
65-72 % of the rows are right), the variants are: ``fastsce.cross_entropy`` (the loss only:
the baseline), ``fastsce.evaluate``, ``fastsce.evaluate(per_row=True)``, the NumPy
reference ``fastsce.reference.evaluate`` and, when scikit-learn is installed, the same
loss and accuracies with scikit-learn (``log_loss``, ``accuracy_score``,
``top_k_accuracy_score``) on the softmax probabilities a user computes for them (the
softmax is timed too). Every benchmark checks its output; the terminal summary lists
each median over the loss-only median of the same shape, and how much faster evaluate
is than the reference and scikit-learn (measured in this run). scikit-learn takes about
5 s a round at 1024 x 32000 (2 cores; top_k_accuracy_score sorts every row), under the
10 s a round past which it would be left out of that shape.
"""

import importlib.util

import numpy as np
import pytest

import fastsce
from fastsce import reference
from fastsce._tools import impls as _impls

SHAPES = ((65536, 10), (16384, 100), (8192, 1000), (1024, 32000))
VARIANTS = ("loss only", "evaluate", "evaluate per_row", "reference", "scikit-learn")
IDS = {"loss only": "loss", "evaluate per_row": "evaluate-per_row", "scikit-learn": "sklearn"}
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
TOPK = (1, 5)  # evaluate's default, and scikit-learn's k
TOL = reference.TOLERANCE[np.float32]

_cache = {}


def _batch(n, k):
    """float32 logits 3 * N(0, 1) with the target's logit raised by 3 * sqrt(2 ln K) (about
    the largest of K such logits: 65-72 % of the rows right at every K here), int64 targets."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n)
    x = (3 * rng.standard_normal((n, k))).astype(np.float32)
    x[np.arange(n), y] += np.float32(3 * np.sqrt(2 * np.log(k)))
    return x, y


def _expected(shape):
    """(logits, target, the reference's per-row Evaluation, fastsce's Evaluation) of one
    shape, computed once (one shape's at a time: they are large)."""
    if shape not in _cache:
        _cache.clear()
        x, y = _batch(*shape)
        _cache[shape] = (x, y, reference.evaluate(x, y, per_row=True), fastsce.evaluate(x, y))
    return _cache[shape]


def _close(name, got, want, atol=0.0):
    """Within reference.TOLERANCE for float32 (atol relative to values above 1, compared
    after dividing by them), plus ``atol``; NaN where (and only where) ``want`` is NaN."""
    want = np.asarray(want, np.float64)
    scale = np.maximum(np.abs(np.where(np.isfinite(want), want, 0)), 1.0)
    got = np.asarray(got, np.float64) / scale
    np.testing.assert_allclose(got, want / scale, rtol=TOL["rtol"], atol=TOL["atol"] + atol, err_msg=name)


def _sklearn(x, y):
    """scikit-learn's loss, accuracy and top-5 accuracy, from the probabilities as a user
    computes them (scipy.special.softmax; the labels given, as a batch need not hold
    every class)."""
    from scipy.special import softmax
    from sklearn.metrics import accuracy_score, log_loss, top_k_accuracy_score

    labels = np.arange(x.shape[1])

    def run():
        p = softmax(x, axis=1)
        return (
            log_loss(y, p, labels=labels),
            accuracy_score(y, p.argmax(axis=1)),
            top_k_accuracy_score(y, p, k=TOPK[1], labels=labels),
        )

    def check(result, evaluation):
        # scikit-learn ranks the float32 probabilities, fastsce the logits: distinct logits
        # can round to equal probabilities, and a row whose target ties another class may
        # count differently (argmax order, stable-sort order); those rows may differ.
        loss, accuracy, top5 = result
        p = softmax(x, axis=1)
        p_target = p[np.arange(len(y)), y]
        tied_target = (p == p_target[:, None]).sum(axis=1) > 1
        tied_max = (p == p.max(axis=1, keepdims=True)).sum(axis=1) > 1
        ties = np.count_nonzero(tied_target | tied_max)
        _close("scikit-learn log_loss", loss, evaluation.loss)
        _close("scikit-learn accuracy_score", accuracy, evaluation.accuracy, atol=ties / len(y))
        _close("scikit-learn top_k_accuracy_score", top5, evaluation.topk_accuracy[TOPK[1]], atol=ties / len(y))

    return run, check


@pytest.mark.parametrize(
    ("shape", "variant"),
    [(shape, variant) for shape in SHAPES for variant in VARIANTS],  # shape by shape: one cached at a time
    ids=[f"{n}x{k}-{IDS.get(v, v)}" for n, k in SHAPES for v in VARIANTS],
)
def test_evaluate(benchmark, shape, variant):
    n, k = shape
    x, y, want, fast = _expected(shape)
    if variant == "loss only":
        run = lambda: fastsce.cross_entropy(x, y)

        def check(result):
            _close("loss", result, want.loss)
    elif variant in ("evaluate", "evaluate per_row"):
        per_row = variant == "evaluate per_row"
        run = lambda: fastsce.evaluate(x, y, per_row=per_row)

        def check(result):
            assert all((getattr(result, name) is not None) == per_row for name in fastsce.Evaluation.PER_ROW)
            _impls.check_evaluation(variant, result, want, want.confidence, x.dtype)
    elif variant == "reference":
        run = lambda: reference.evaluate(x, y)

        def check(result):
            _impls.check_evaluation(variant, result, fast, want.confidence, x.dtype)
    else:
        if not HAS_SKLEARN:
            pytest.skip("scikit-learn not installed (pip install scikit-learn)")
        run, check_sklearn = _sklearn(x, y)

        def check(result):
            check_sklearn(result, fast)

    check(run())  # compiles (and imports) outside the timing; a wrong result fails before timing
    benchmark.group = f"{n}x{k} evaluate float32"
    benchmark.extra_info.update(n=n, k=k, metrics=variant)
    check(benchmark(run))
    benchmark.extra_info["checked"] = True
