"""fastsce.dask against the in-memory call: chunkings (of the rows, and of the classes),
options, laziness, bad input, the threaded scheduler, and a LocalCluster of worker
processes (one of them killed mid-run)."""

import dataclasses
import os
import signal
import time

import numpy as np
import pytest
from _cases import DTYPES, REDUCTIONS, assert_close, make_case, make_labels, make_logits, make_weight, seed_of, short

import fastsce

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
fastsce_dask = pytest.importorskip("fastsce.dask")
Delayed = pytest.importorskip("dask.delayed").Delayed

N, K = 37, 11

# Row chunks (and class chunks) of the (N, K) logits.
CHUNKINGS = {
    "one-block": ((N,), (K,)),
    "uneven": ((20, 5, 12), (K,)),
    "one-row-chunk": ((16, 1, 20), (K,)),
    "class-chunks": ((20, 17), (4, 7)),
    "class-chunk-of-1": ((N,), (1, 3, 7)),
    "class-chunks-uneven": ((10, 1, 26), (5, 1, 2, 3)),
}

OPTIONS = {
    "plain": dict(),
    "weighted": dict(weighted=True),
    "ignore-3": dict(ignore_index=3),
    "ignore-3-weighted-smooth": dict(ignore_index=3, weighted=True, label_smoothing=0.2),
    "soft": dict(soft=True),
    "soft-weighted-smooth": dict(soft=True, weighted=True, label_smoothing=0.3),
}


def chunked(case, chunks):
    """The case's logits and target as Dask arrays with the given chunks."""
    logits = da.from_array(case.logits, chunks=chunks)
    target = da.from_array(case.target, chunks=chunks if case.soft else chunks[:1])
    return logits, target


def check(case, loss, grad=None):
    """The computed Dask results equal the in-memory fastsce call, with its types."""
    expected_loss, expected_grad = case.loss_grad(fastsce)
    loss_unit, grad_unit = case.units()
    assert isinstance(loss, da.Array) and loss.shape == np.shape(expected_loss)
    loss, grad = dask.compute(loss, grad)
    assert type(loss) is type(expected_loss) and loss.dtype == expected_loss.dtype
    assert_close(loss, expected_loss, unit=loss_unit)
    if grad is not None:
        assert grad.dtype == expected_grad.dtype and grad.shape == expected_grad.shape
        assert_close(grad, expected_grad, unit=grad_unit)


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_in_memory(chunking, dtype, reduction, option):
    case = make_case(N, K, dtype, reduction=reduction, **OPTIONS[option])
    logits, target = chunked(case, CHUNKINGS[chunking])
    loss, grad = fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs)
    assert grad.chunks == logits.chunks
    check(case, loss, grad)
    check(case, fastsce_dask.cross_entropy(logits, target, **case.kwargs))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_numpy_inputs(reduction):
    case = make_case(N, K, np.float32, reduction=reduction, weighted=True, ignore_index=3)
    check(case, *fastsce_dask.cross_entropy_with_grad(case.logits, case.target, **case.kwargs))
    check(case, fastsce_dask.cross_entropy(case.logits, case.target, **case.kwargs))


@pytest.mark.parametrize("classes", [(K,), (6, 5)], ids=["rows", "classes"])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probs"])
def test_target_chunks_differing_from_the_logits_are_rechunked(soft, classes):
    case = make_case(N, K, np.float64, soft=soft, weighted=True)
    logits = da.from_array(case.logits, chunks=((10, 10, 10, 7), classes))
    target = da.from_array(case.target, chunks=(7, 3) if soft else 7)
    loss, grad = fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs)
    assert grad.chunks == logits.chunks  # the target moved, not the logits
    check(case, loss, grad)


@pytest.mark.parametrize("weights", ["ones", "zero-on-counted"])
def test_nothing_counted_gives_nan_mean(weights):
    case = make_case(N, K, np.float64, weighted=True)
    if weights == "ones":
        case.target[:] = -100  # every row ignored
    else:
        case.kwargs["weight"][case.target[case.target >= 0]] = 0.0
    check(case, *fastsce_dask.cross_entropy_with_grad(*chunked(case, ((20, 17), (K,))), **case.kwargs))
    check(case, fastsce_dask.cross_entropy(*chunked(case, ((20, 17), (K,))), **case.kwargs))


def test_no_rows():
    case = make_case(0, K, np.float32)
    check(case, *fastsce_dask.cross_entropy_with_grad(case.logits, case.target))


def test_lazy_and_one_call_per_block(monkeypatch):
    """Nothing runs until compute; loss and gradient together call the kernel once per block."""
    calls = []
    real = fastsce.cross_entropy_with_grad

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastsce, "cross_entropy_with_grad", counting)
    case = make_case(N, K, np.float32, weighted=True)
    logits, target = chunked(case, CHUNKINGS["uneven"])
    loss, grad = fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs)
    assert calls == []
    dask.compute(loss, grad)
    assert sorted(calls) == [5, 12, 20]
    monkeypatch.undo()
    check(case, loss, grad)


def test_threaded_scheduler_many_blocks():
    case = make_case(2000, 50, np.float32, weighted=True, label_smoothing=0.1)
    logits, target = chunked(case, ((100,) * 20, (50,)))
    loss, grad = fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs)
    with dask.config.set(scheduler="threads", num_workers=8):
        check(case, loss, grad)


# --- the options of large-model training ---------------------------------------------

NEW_OPTIONS = {
    "z_loss": dict(z_loss=1e-2),
    "scale-softcap": dict(logit_scale=1.5, softcap=5.0),
    "sample_weight": dict(sample_weight="random"),
    "where": dict(where="random"),
    "everything": dict(z_loss=0.01, logit_scale=0.7, softcap=8.0, sample_weight="random", where="random"),
}


def with_options(case, options, seed):
    """The case with the options; row arrays drawn at random (rows of weight 0 among them)."""
    rng = np.random.default_rng(seed)
    for key, value in options.items():
        if value == "random" and key == "sample_weight":
            value = rng.uniform(0, 2, len(case.logits))
            value[::5] = 0
        elif value == "random" and key == "where":
            value = rng.random(len(case.logits)) < 0.7
        case.kwargs[key] = value
    return case


def as_dask_rows(case, chunks):
    """The case's keyword arguments, sample_weight / where as Dask arrays of other row chunks."""
    return {
        key: da.from_array(value, chunks=chunks) if key in ("sample_weight", "where") else value
        for key, value in case.kwargs.items()
    }


def check_all(case, got, with_grad, units=None, **returns):
    """Every output (loss, [grad], z-term, lse) against the in-memory fastsce call."""
    fn = fastsce.cross_entropy_with_grad if with_grad else fastsce.cross_entropy
    want = fn(case.logits, case.target, **case.kwargs, **returns)
    got = dask.compute(*got)
    assert len(got) == len(want)
    loss_unit, grad_unit = units or case.units()
    units = [max(loss_unit, 1.0)] + [max(grad_unit, 1e-3)] * with_grad + [max(loss_unit, 1.0), 1.0]
    if not returns.get("return_z_loss"):
        units.pop(1 + with_grad)
    for a, b, unit in zip(got, want, units, strict=False):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, (type(a), type(b), a.shape, b.shape)
        assert_close(a, b, unit=unit)


@pytest.mark.parametrize("chunking", ["uneven", "class-chunks-uneven"])
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", NEW_OPTIONS)
def test_new_options_match_in_memory(chunking, dtype, soft, reduction, option):
    base = make_case(N, K, dtype, soft=soft, weighted=True, label_smoothing=0.1, reduction=reduction)
    case = with_options(base, NEW_OPTIONS[option], seed_of(option, reduction, soft))
    logits, target = chunked(case, CHUNKINGS[chunking])
    kwargs = as_dask_rows(case, 9)
    returns = dict(return_z_loss=True, return_lse=True)
    got = fastsce_dask.cross_entropy_with_grad(logits, target, **kwargs, **returns)
    assert got[1].chunks == logits.chunks and got[3].chunks == (logits.chunks[0],)
    check_all(case, got, True, **returns)
    check_all(case, fastsce_dask.cross_entropy(logits, target, **kwargs, **returns), False, **returns)
    check_all(case, fastsce_dask.cross_entropy(logits, target, **kwargs, return_lse=True), False, return_lse=True)


@pytest.mark.parametrize("chunking", ["uneven", "class-chunks"])
@pytest.mark.parametrize("all_ignored", ["nan", "zero"])
@pytest.mark.parametrize("nothing", ["ignored", "where-false", "zero-class-weight"])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_mean_of_nothing(chunking, all_ignored, nothing, z_loss):
    """D = 0 (and D_z = 0, or not: counted rows of class weight 0) gives what the in-memory
    call gives, loss, z-term and gradient, for either all_ignored."""
    case = make_case(N, K, np.float64, weighted=True, label_smoothing=0.2)
    case.kwargs.update(all_ignored=all_ignored, z_loss=z_loss)
    if nothing == "ignored":
        case.target[:] = -100
    elif nothing == "where-false":
        case.kwargs["where"] = np.zeros(N, bool)
    else:
        case.kwargs["weight"][case.target[case.target >= 0]] = 0.0
    logits, target = chunked(case, CHUNKINGS[chunking])
    returns = dict(return_z_loss=True)
    check_all(case, fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs, **returns), True, **returns)
    check_all(case, fastsce_dask.cross_entropy(logits, target, **case.kwargs, **returns), False, **returns)


@pytest.mark.parametrize("chunking", ["uneven", "class-chunks"])
def test_mean_when_weights_over_d_overflow(chunking):
    """float32 class weights w / D beyond float32's range (of a class no row has, without
    smoothing: the in-memory result is finite): the blocks are divided afterwards."""
    case = make_case(N, K, np.float32)
    case.target[case.target >= 0] = 0
    case.kwargs.update(weight=np.array([1e-30] + [1e30] * (K - 1)), z_loss=0.01)
    logits, target = chunked(case, CHUNKINGS[chunking])
    returns = dict(return_z_loss=True)
    units = (1.0, 1.0 / N)  # (case.units() would take the unused weights 1e30 for a scale)
    got = fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs, **returns)
    check_all(case, got, True, units=units, **returns)
    check_all(case, fastsce_dask.cross_entropy(logits, target, **case.kwargs, **returns), False, units=units, **returns)


def test_class_chunks_lazy_and_one_call_per_block(monkeypatch):
    """Class-chunked logits: one partial_stats and one finish_grad per block, nothing
    before compute, no fused call (no block holds whole rows)."""
    calls = {"partial_stats": [], "finish_grad": [], "cross_entropy_with_grad": []}
    for fn in calls:
        real = getattr(fastsce, fn)

        def counting(*args, _real=real, _fn=fn, **kwargs):
            calls[_fn].append(args[0].shape)
            return _real(*args, **kwargs)

        monkeypatch.setattr(fastsce, fn, counting)
    case = make_case(N, K, np.float32, weighted=True)
    logits, target = chunked(case, CHUNKINGS["class-chunks-uneven"])
    loss, grad = fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs)
    assert all(c == [] for c in calls.values())
    dask.compute(loss, grad)
    blocks = sorted((r, c) for r in (10, 1, 26) for c in (5, 1, 2, 3))
    assert sorted(calls["partial_stats"]) == blocks
    assert sorted(calls["finish_grad"]) == blocks
    assert calls["cross_entropy_with_grad"] == []
    monkeypatch.undo()
    check(case, loss, grad)


def test_class_chunks_many_blocks_threads():
    case = make_case(600, 300, np.float32, weighted=True, label_smoothing=0.1, ignore_index=3)
    case.kwargs.update(z_loss=1e-3, sample_weight=np.linspace(0, 2, 600))
    logits, target = chunked(case, ((100,) * 6, (64, 1, 100, 35, 100)))
    returns = dict(return_z_loss=True, return_lse=True)
    got = fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs, **returns)
    with dask.config.set(scheduler="threads", num_workers=8):
        check_all(case, got, True, **returns)


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", ["uneven", "class-chunks-uneven"])
def test_label_out_of_range_names_the_row_in_the_batch(chunking):
    case = make_case(N, K, np.float64)
    case.target[25] = K  # in the third block of rows (25..36 or 11..36)
    logits, target = chunked(case, CHUNKINGS[chunking])
    for loss in (
        fastsce_dask.cross_entropy(logits, target),
        fastsce_dask.cross_entropy(logits, target, reduction="sum"),
        fastsce_dask.cross_entropy_with_grad(logits, target)[1],
        fastsce_dask.cross_entropy_with_grad(logits, target, reduction="none")[1],
    ):
        with pytest.raises(IndexError, match=rf"target\[25\] = {K} is not a class index"):
            loss.compute()


@pytest.mark.parametrize("chunking", ["uneven", "class-chunks-uneven"])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probs"])
def test_bad_sample_weight_names_the_row_in_the_batch(chunking, soft):
    case = make_case(N, K, np.float64, soft=soft)
    sample_weight = np.ones(N)
    sample_weight[30] = -1.0
    logits, target = chunked(case, CHUNKINGS[chunking])
    sample_weight = da.from_array(sample_weight, chunks=7)
    for reduction in REDUCTIONS:
        for got in (
            fastsce_dask.cross_entropy(logits, target, reduction=reduction, sample_weight=sample_weight),
            fastsce_dask.cross_entropy_with_grad(logits, target, reduction=reduction, sample_weight=sample_weight)[1],
        ):
            with pytest.raises(ValueError, match=r"sample_weight\[30\] = -1.0"):
                got.compute()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sample_weight=np.ones(4)), ValueError, r"shape \(4,\)"),
        (dict(sample_weight=np.ones(3, bool)), TypeError, "sample_weight must be a real numeric array"),
        (dict(sample_weight=[1.0, 1.0, 1.0]), TypeError, "sample_weight must be a dask.array.Array or a numpy"),
        (dict(where=np.ones(3)), TypeError, "where must be a boolean array"),
        (dict(where=da.ones(2, dtype=bool)), ValueError, r"where has shape \(2,\)"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(logit_scale="2"), TypeError, "logit_scale"),
        (dict(all_ignored="inf"), ValueError, "all_ignored"),
        (dict(return_lse=1), TypeError, "return_lse"),
    ],
    ids=["sw-shape", "sw-bool", "sw-list", "where-float", "where-shape", "z_loss", "softcap", "scale", "all_ignored",
         "return_lse"],
)
@pytest.mark.parametrize("chunks", [(2, 2), (2, 1)], ids=["rows", "classes"])
def test_bad_new_options_raise_before_computing(kwargs, error, match, chunks):
    logits = da.zeros((3, 2), chunks=chunks)
    for fn in (fastsce_dask.cross_entropy, fastsce_dask.cross_entropy_with_grad):
        with pytest.raises(error, match=match):
            fn(logits, np.zeros(3, np.int64), **kwargs)


@pytest.mark.parametrize(
    "logits, target, kwargs, error, match",
    [
        ([[0.0, 1.0]], [0], {}, TypeError, "dask.array.Array or a numpy.ndarray; got list"),
        (np.zeros((3, 2), np.int64), np.zeros(3, np.int64), {}, TypeError, "float32 or float64"),
        (np.zeros((3, 2, 1)), np.zeros(3, np.int64), {}, ValueError, "2-D"),
        (np.zeros((3, 0)), np.zeros(3, np.int64), {}, ValueError, "at least one class"),
        (np.zeros((3, 2)), np.zeros(4, np.int64), {}, ValueError, r"target has shape \(4,\)"),
        (np.zeros((3, 2)), np.zeros(3), {}, TypeError, "integer array"),
        (np.zeros((3, 2)), np.zeros((3, 2), np.int64), {}, TypeError, "float array"),
        (np.zeros((3, 2)), [0, 1, 0], {}, TypeError, "target must be"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(reduction="avg"), ValueError, "reduction"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(weight=[1.0, -1.0]), ValueError, "weight"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(label_smoothing=2.0), ValueError, "label_smoothing"),
        (np.zeros((3, 2)), np.zeros((3, 2)), dict(ignore_index=0), ValueError, "ignore_index"),
    ],
    ids=["list", "int-logits", "3d", "no-classes", "short-target", "float-labels", "int-probs",
         "list-target", "reduction", "weight", "smoothing", "ignore-with-probs"],
)
def test_bad_input_raises_before_computing(logits, target, kwargs, error, match):
    if isinstance(logits, np.ndarray):
        logits = da.from_array(logits)
    for fn in (fastsce_dask.cross_entropy, fastsce_dask.cross_entropy_with_grad):
        with pytest.raises(error, match=match):
            fn(logits, target, **kwargs)


def test_unknown_chunk_sizes():
    logits = da.from_array(np.zeros((6, 3)), chunks=(2, 3))
    logits = logits[logits[:, 0] == 0]  # unknown row count per chunk
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        fastsce_dask.cross_entropy(logits, np.zeros(6, np.int64))


# --- a cluster of worker processes -----------------------------------------------------


@pytest.fixture(scope="module")
def client():
    # dashboard_address=None still asks for port 8787: a second test process starting a
    # cluster at the same time (pytest-xdist) got a "port in use" warning, an error here.
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
        # The workers run the fastsce under test, not another installed copy.
        assert set(client.run(lambda: fastsce.__file__).values()) == {fastsce.__file__}
        yield client


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("option", ["ignore-3-weighted-smooth", "soft-weighted-smooth"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_local_cluster(client, dtype, option, reduction):
    case = make_case(N, K, dtype, reduction=reduction, **OPTIONS[option])
    logits, target = chunked(case, CHUNKINGS["one-row-chunk"])
    loss, grad = fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs)
    expected_loss, expected_grad = case.loss_grad(fastsce)
    loss, grad = dask.compute(loss, grad, scheduler=client)
    loss_unit, grad_unit = case.units()
    assert type(loss) is type(expected_loss)
    assert_close(loss, expected_loss, unit=loss_unit)
    assert_close(grad, expected_grad, unit=grad_unit)


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_local_cluster_class_chunks(client, soft, reduction):
    base = make_case(N, K, np.float32, soft=soft, weighted=True, label_smoothing=0.1, reduction=reduction)
    case = with_options(base, NEW_OPTIONS["everything"], seed_of("cluster", soft, reduction))
    logits, target = chunked(case, CHUNKINGS["class-chunks-uneven"])
    returns = dict(return_z_loss=True, return_lse=True)
    got = fastsce_dask.cross_entropy_with_grad(logits, target, **as_dask_rows(case, 9), **returns)
    check_all(case, client.compute(list(got), sync=True), True, **returns)


def test_local_cluster_survives_a_killed_worker(client):
    """SIGKILL one worker process while blocks run: the nanny restarts it, the scheduler
    reruns its tasks elsewhere, and the answer is unchanged."""
    case = make_case(3200, 20, np.float32, weighted=True, label_smoothing=0.1, ignore_index=3)

    def slowly(block):  # each block of logits takes a while to "load"
        time.sleep(0.1)
        return block

    logits = da.from_array(case.logits, chunks=(100, 20)).map_blocks(slowly, dtype=case.dtype)
    target = da.from_array(case.target, chunks=100)
    futures = client.compute(list(fastsce_dask.cross_entropy_with_grad(logits, target, **case.kwargs)))
    pids = client.run(os.getpid)
    victim = min(pids.values())
    time.sleep(0.6)  # 32 blocks x 0.1 s over 2 workers: about 1.6 s in all
    assert not any(f.done() for f in futures), "finished before the kill: make the blocks slower"
    os.kill(victim, signal.SIGKILL)
    loss, grad = client.gather(futures)
    expected_loss, expected_grad = case.loss_grad(fastsce)
    loss_unit, grad_unit = case.units()
    assert_close(loss, expected_loss, unit=loss_unit)
    assert_close(grad, expected_grad, unit=grad_unit)
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid).values()  # it was really killed and replaced


def test_byte_order_and_masked_arrays():
    """Logits of the other byte order are their values; numpy.ma inputs are refused, as in memory."""
    case = make_case(40, 7, np.float32, weighted=True)
    want = fastsce.cross_entropy(case.logits, case.target, weight=case.kwargs["weight"])
    swapped = da.from_array(case.logits.astype(">f4"), chunks=(16, -1))
    got = fastsce_dask.cross_entropy(swapped, case.target, weight=case.kwargs["weight"]).compute()
    assert_close(got, want)
    for name in ("logits", "target", "sample_weight"):
        args = dict(logits=case.logits, target=case.target, sample_weight=np.ones(40))
        args[name] = np.ma.array(args[name])
        with pytest.raises(TypeError, match=f"{name} is a numpy.ma masked array"):
            fastsce_dask.cross_entropy(args["logits"], args["target"], sample_weight=args["sample_weight"])
    masked = da.from_array(np.ma.array(case.logits), chunks=(16, -1))
    with pytest.raises(TypeError, match="logits is a numpy.ma masked array"):
        fastsce_dask.cross_entropy(masked, case.target)


# --- evaluate --------------------------------------------------------------------------

EVAL_OPTIONS = {
    "plain": dict(),
    "ignore-3": dict(ignore_index=3),
    "weighted": dict(weight="random"),
    "rows": dict(sample_weight="random", where="random"),
    "everything": dict(
        ignore_index=3, weight="random", sample_weight="random", where="random", topk=(3, 1, 20), bins=7
    ),
}


def eval_case(n, k, dtype, option, seed=None):
    """(logits, target, kwargs) of an evaluate call; row weights with zeros among them."""
    rng = np.random.default_rng(seed_of("evaluate", n, k, short(dtype), option) if seed is None else seed)
    kwargs = dict(EVAL_OPTIONS[option])
    target = make_labels(rng, n, k, kwargs.get("ignore_index", -100))
    if kwargs.get("weight") == "random":
        kwargs["weight"] = make_weight(rng, k)
    if kwargs.get("sample_weight") == "random":
        kwargs["sample_weight"] = rng.uniform(0, 2, n)
        kwargs["sample_weight"][::5] = 0
    if kwargs.get("where") == "random":
        kwargs["where"] = rng.random(n) < 0.7
    return make_logits(rng, n, k, dtype), target, kwargs


def assert_same_evaluation(got, want, dtype):
    """Every field of two Evaluations, within the dtype's tolerance (per-row integers and
    row counts exactly; bin counts, float64 sums of row weights, within float64 rounding)."""
    assert type(got) is fastsce.Evaluation
    for name in fastsce.Evaluation.SCALARS:
        assert_close(getattr(got, name), getattr(want, name), dtype, unit=1.0)
    assert list(got.topk_accuracy) == list(want.topk_accuracy)
    assert_close(list(got.topk_accuracy.values()), list(want.topk_accuracy.values()), dtype, unit=1.0)
    np.testing.assert_allclose(got.bin_counts, want.bin_counts, rtol=1e-12, atol=1e-12)
    assert_close(got.bin_confidence, want.bin_confidence, dtype, unit=1.0)
    assert_close(got.bin_accuracy, want.bin_accuracy, dtype, unit=1.0)
    assert (got.rows, got.ignored_rows) == (want.rows, want.ignored_rows)
    for name in fastsce.Evaluation.PER_ROW:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
            if a.dtype.kind == "i":
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                assert_close(a, b, dtype, unit=1.0)


def computed(evaluation, rows=None):
    """The Evaluation with the per-row arrays computed into it (one compute)."""
    got, rows = dask.compute(evaluation, rows)
    return got if rows is None else dataclasses.replace(got, **rows)


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("option", EVAL_OPTIONS)
def test_evaluate_matches_in_memory(chunking, dtype, option):
    logits, target, kwargs = eval_case(N, K, dtype, option)
    chunks = CHUNKINGS[chunking]
    x = da.from_array(logits, chunks=chunks)
    kwargs_dask = {
        key: da.from_array(v, chunks=9) if key in ("sample_weight", "where") else v for key, v in kwargs.items()
    }
    evaluation = fastsce_dask.evaluate(x, da.from_array(target, chunks=chunks[:1]), **kwargs_dask)
    assert isinstance(evaluation, Delayed)
    assert_same_evaluation(evaluation.compute(), fastsce.evaluate(logits, target, **kwargs), dtype)
    evaluation, rows = fastsce_dask.evaluate(x, target, per_row=True, **kwargs_dask)
    assert list(rows) == list(fastsce.Evaluation.PER_ROW)
    assert all(r.chunks == (chunks[0],) for r in rows.values())  # the logits' rows
    assert_same_evaluation(computed(evaluation, rows), fastsce.evaluate(logits, target, per_row=True, **kwargs), dtype)


@pytest.mark.parametrize("chunks", [((300,), (500,)), ((64, 1, 235), (500,)), ((150, 150), (100, 400))],
                         ids=["one-block", "uneven", "class-chunks"])
def test_evaluate_many_classes(chunks):
    """K above the tile kernel's limit: the row kernel."""
    logits, target, kwargs = eval_case(300, 500, np.float32, "everything")
    evaluation, rows = fastsce_dask.evaluate(da.from_array(logits, chunks=chunks), target, per_row=True, **kwargs)
    want = fastsce.evaluate(logits, target, per_row=True, **kwargs)
    assert_same_evaluation(computed(evaluation, rows), want, np.float32)


@pytest.mark.parametrize("dask_input", [False, True], ids=["numpy", "dask"])
def test_evaluate_class_axis_first(dask_input):
    logits, target, kwargs = eval_case(N, K, np.float64, "everything")
    t = np.ascontiguousarray(logits.T)  # (K, N)
    x = da.from_array(t, chunks=(5, 10)) if dask_input else t
    evaluation, rows = fastsce_dask.evaluate(x, target, axis=0, per_row=True, **kwargs)
    if dask_input:
        assert rows["argmax"].chunks == ((10, 10, 10, 7),)
    want = fastsce.evaluate(t, target, axis=0, per_row=True, **kwargs)
    assert_same_evaluation(computed(evaluation, rows), want, np.float64)


def test_evaluate_float16_logits():
    logits, target, kwargs = eval_case(N, K, np.float32, "weighted")
    half = logits.astype(np.float16)
    evaluation, rows = fastsce_dask.evaluate(da.from_array(half, chunks=(10, -1)), target, per_row=True, **kwargs)
    assert rows["entropy"].dtype == np.float32  # computed in float32, as in memory
    want = fastsce.evaluate(half, target, per_row=True, **kwargs)
    assert_same_evaluation(computed(evaluation, rows), want, np.float32)


def test_evaluate_numpy_inputs_and_other_chunks_of_the_row_arrays():
    logits, target, kwargs = eval_case(N, K, np.float32, "everything")
    want = fastsce.evaluate(logits, target, per_row=True, **kwargs)
    evaluation, rows = fastsce_dask.evaluate(logits, target, per_row=True, **kwargs)
    assert_same_evaluation(computed(evaluation, rows), want, np.float32)
    x = da.from_array(logits, chunks=((10, 20, 7), (K,)))
    row_arrays = {key: da.from_array(kwargs[key], chunks=4) for key in ("sample_weight", "where")}
    evaluation, rows = fastsce_dask.evaluate(
        x, da.from_array(target, chunks=5), per_row=True, **dict(kwargs, **row_arrays),
    )
    assert rows["confidence"].chunks == ((10, 20, 7),)  # the logits kept their chunks
    assert_same_evaluation(computed(evaluation, rows), want, np.float32)


def test_evaluate_row_weights_scaled_as_one_batch():
    """A block whose sample weights are all tiny (1e-200, below the range the in-memory
    call rescales) weighs what it weighs in the whole batch, not what it would alone."""
    logits, target, kwargs = eval_case(N, K, np.float64, "plain")
    sample_weight = np.ones(N)
    sample_weight[20:] = 1e-200
    want = fastsce.evaluate(logits, target, sample_weight=sample_weight)
    got = fastsce_dask.evaluate(da.from_array(logits, chunks=(20, -1)), target, sample_weight=sample_weight).compute()
    assert_same_evaluation(got, want, np.float64)
    # and a batch of huge weights, which the in-memory call scales down
    want = fastsce.evaluate(logits, target, sample_weight=sample_weight * 1e300)
    got = fastsce_dask.evaluate(da.from_array(logits, chunks=(20, -1)), target, sample_weight=sample_weight * 1e300)
    assert_same_evaluation(got.compute(), want, np.float64)


@pytest.mark.parametrize("n", [0, N], ids=["no-rows", "all-ignored"])
def test_evaluate_nothing_counted(n):
    logits, target, _ = eval_case(n, K, np.float32, "plain")
    target[:] = -100
    got = fastsce_dask.evaluate(da.from_array(logits, chunks=(10, -1)), target).compute()
    want = fastsce.evaluate(logits, target)
    assert np.isnan(got.loss) and got.rows == 0 and got.ignored_rows == n
    assert_same_evaluation(got, want, np.float32)


def test_evaluate_lazy_one_task_per_block_and_same_bits_on_any_scheduler(monkeypatch):
    calls = []
    real = fastsce.metrics.metric_sums

    def counting(problem, *args, **kwargs):
        calls.append(problem.shape[0])
        return real(problem, *args, **kwargs)

    monkeypatch.setattr(fastsce.metrics, "metric_sums", counting)
    logits, target, kwargs = eval_case(2000, 50, np.float32, "everything")
    x = da.from_array(logits, chunks=((100,) * 19 + (37, 63), (20, 30)))  # 21 blocks of rows, 2 of classes
    evaluation = fastsce_dask.evaluate(x, target, **kwargs)
    assert calls == []
    first = evaluation.compute(scheduler="sync")
    assert sorted(calls) == sorted((100,) * 19 + (37, 63))
    monkeypatch.undo()
    with dask.config.set(scheduler="threads", num_workers=8):
        again = [evaluation.compute() for _ in range(3)]
    for other in again:  # the sums are added in the same order whatever finishes first
        a, b = first.as_dict(), other.as_dict()
        assert repr(a) == repr(b)
    assert_same_evaluation(first, fastsce.evaluate(logits, target, **kwargs), np.float32)
    # with the per-row arrays: still one call per block when computed together
    monkeypatch.setattr(fastsce.metrics, "metric_sums", counting)
    calls.clear()
    evaluation, rows = fastsce_dask.evaluate(x, target, per_row=True, **kwargs)
    got = computed(evaluation, rows)
    assert sorted(calls) == sorted((100,) * 19 + (37, 63))
    monkeypatch.undo()
    assert_same_evaluation(got, fastsce.evaluate(logits, target, per_row=True, **kwargs), np.float32)


def test_evaluate_nan_and_infinite_rows():
    """Rows holding NaN, +inf or only -inf, in different blocks: NaN means and ECE, as in memory."""
    logits, target, kwargs = eval_case(N, K, np.float32, "weighted")
    logits[3, 5] = np.nan
    logits[20, 1] = np.inf
    logits[30] = -np.inf
    target[[3, 20, 30]] = 1
    evaluation, rows = fastsce_dask.evaluate(da.from_array(logits, chunks=(10, -1)), target, per_row=True, **kwargs)
    got = computed(evaluation, rows)
    want = fastsce.evaluate(logits, target, per_row=True, **kwargs)
    assert np.isnan(want.ece) and np.isnan(want.loss)
    assert_same_evaluation(got, want, np.float32)
    # the NaN rows in blocks left out: finite again
    kwargs["where"] = ~np.isin(np.arange(N), [3, 20, 30])
    got = fastsce_dask.evaluate(da.from_array(logits, chunks=(10, -1)), target, **kwargs).compute()
    want = fastsce.evaluate(logits, target, **kwargs)
    assert np.isfinite(want.ece)
    assert_same_evaluation(got, want, np.float32)


@pytest.mark.parametrize("chunking", ["uneven", "class-chunks-uneven"])
@pytest.mark.parametrize("per_row", [False, True])
def test_evaluate_bad_label_or_sample_weight_names_the_row_in_the_batch(chunking, per_row):
    logits, target, _ = eval_case(N, K, np.float64, "plain")
    x = da.from_array(logits, chunks=CHUNKINGS[chunking])
    bad = target.copy()
    bad[25] = K
    got = fastsce_dask.evaluate(x, bad, per_row=per_row)
    with pytest.raises(IndexError, match=rf"target\[25\] = {K} is not a class index"):
        dask.compute(got)
    sample_weight = np.ones(N)
    sample_weight[30] = np.nan
    got = fastsce_dask.evaluate(x, target, per_row=per_row, sample_weight=da.from_array(sample_weight, chunks=7))
    with pytest.raises(ValueError, match=r"sample_weight\[30\] = nan"):
        dask.compute(got)


@pytest.mark.parametrize(
    "logits, target, kwargs, error, match",
    [
        ([[0.0, 1.0]], [0], {}, TypeError, "logits must be a dask.array.Array or a numpy.ndarray; got list"),
        (np.zeros((3, 2), np.int64), np.zeros(3, np.int64), {}, TypeError, "float16, bfloat16, float32 or float64"),
        (np.zeros((3, 2, 4)), np.zeros(3, np.int64), {}, ValueError, r"2-D.*logits.reshape\(-1, K\)"),
        (np.zeros((3, 0)), np.zeros(3, np.int64), {}, ValueError, "at least one class"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(axis=2), ValueError, "axis=2 is out of range"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(axis=1.0), TypeError, "axis must be an integer"),
        (np.zeros((3, 2)), np.zeros(4, np.int64), {}, ValueError, r"target has shape \(4,\).*shape \(3,\)"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(axis=0), ValueError, r"target has shape \(3,\).*shape \(2,\)"),
        (np.zeros((3, 2)), np.zeros(3), {}, TypeError, "integer array"),
        (np.zeros((3, 2)), np.zeros((3, 2)), {}, ValueError, r"class indices.*target.argmax\(axis=1\)"),
        (np.zeros((3, 2)), [0, 1, 0], {}, TypeError, "target must be"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(topk=0), ValueError, "topk"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(topk=(1, 1)), ValueError, "topk has a repeated value"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(bins=0), ValueError, "bins"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(weight=[1.0, -1.0]), ValueError, "weight"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(weight=np.ones(3)), ValueError, "weight"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(ignore_index=1.5), TypeError, "ignore_index"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(sample_weight=np.ones(4)), ValueError, r"shape \(4,\)"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(sample_weight=np.ones(3, bool)), TypeError, "real numeric"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(where=np.ones(3)), TypeError, "where must be a boolean array"),
        (np.zeros((3, 2)), np.zeros(3, np.int64), dict(per_row=1), TypeError, "per_row must be True or False"),
    ],
    ids=["list", "int-logits", "3d", "no-classes", "axis-range", "axis-float", "short-target", "target-axis0",
         "float-labels", "probabilities", "list-target", "topk-0", "topk-repeated", "bins-0", "weight-negative",
         "weight-shape", "ignore-index", "sw-shape", "sw-bool", "where-float", "per-row-int"],
)
@pytest.mark.parametrize("chunks", [(2, 2), (2, 1)], ids=["rows", "classes"])
def test_evaluate_bad_input_raises_before_computing(logits, target, kwargs, error, match, chunks):
    if isinstance(logits, np.ndarray) and logits.ndim == 2 and logits.shape[1]:
        logits = da.from_array(logits, chunks=chunks)
    with pytest.raises(error, match=match):
        fastsce_dask.evaluate(logits, target, **kwargs)


def test_evaluate_masked_arrays_refused():
    logits, target, _ = eval_case(N, K, np.float32, "plain")
    for name in ("logits", "target", "sample_weight"):
        args = dict(logits=logits, target=target, sample_weight=np.ones(N))
        args[name] = np.ma.array(args[name])
        with pytest.raises(TypeError, match=f"{name} is a numpy.ma masked array"):
            fastsce_dask.evaluate(args["logits"], args["target"], sample_weight=args["sample_weight"])


def test_evaluate_local_cluster(client):
    logits, target, kwargs = eval_case(N, K, np.float32, "everything")
    x = da.from_array(logits, chunks=CHUNKINGS["class-chunks-uneven"])
    evaluation, rows = fastsce_dask.evaluate(x, target, per_row=True, **kwargs)
    got, rows = client.compute([evaluation, rows], sync=True)
    want = fastsce.evaluate(logits, target, per_row=True, **kwargs)
    assert_same_evaluation(dataclasses.replace(got, **rows), want, np.float32)
