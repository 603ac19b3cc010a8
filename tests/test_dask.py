"""fastsce.dask against the in-memory call: chunkings (of the rows, and of the classes),
options, laziness, bad input, the threaded scheduler, and a LocalCluster of worker
processes (one of them killed mid-run)."""

import os
import signal
import time

import numpy as np
import pytest
from _cases import DTYPES, REDUCTIONS, assert_close, make_case, seed_of, short

import fastsce

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
fastsce_dask = pytest.importorskip("fastsce.dask")

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
        (dict(sample_weight=np.ones(4)), ValueError, r"sample_weight has shape \(4,\)"),
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
