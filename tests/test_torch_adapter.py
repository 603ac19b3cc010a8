"""fastsce.torch against torch.nn.functional.cross_entropy: loss, autograd, module, training."""

import numpy as np
import pytest

from _cases import DTYPES, REDUCTIONS, assert_close, make_case, short

torch = pytest.importorskip("torch")
F = torch.nn.functional
fastsce_torch = pytest.importorskip("fastsce.torch")

OPTIONS = {
    "plain": dict(),
    "weighted": dict(weighted=True),
    "ignore-3": dict(ignore_index=3),
    "ignore-3-weighted-smooth": dict(ignore_index=3, weighted=True, label_smoothing=0.2),
    "smooth": dict(label_smoothing=0.1),
    "soft": dict(soft=True),
    "soft-weighted-smooth": dict(soft=True, weighted=True, label_smoothing=0.3),
}


def tensors(case, requires_grad=True):
    logits = torch.tensor(case.logits, requires_grad=requires_grad)
    kwargs = dict(case.kwargs)
    if kwargs.get("weight") is not None:
        kwargs["weight"] = torch.tensor(np.asarray(kwargs["weight"], case.dtype))
    return logits, torch.tensor(case.target), kwargs


def loss_and_grad(fn, case):
    """fn's loss and d/d(logits) of a non-uniformly weighted sum of it (of the loss itself
    for mean/sum)."""
    logits, target, kwargs = tensors(case)
    loss = fn(logits, target, **kwargs)
    if kwargs["reduction"] == "none":
        (loss * torch.arange(len(loss), dtype=loss.dtype)).sum().backward()
    else:
        (3.5 * loss).backward()
    return loss, logits.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_torch(dtype, reduction, option):
    case = make_case(37, 11, dtype, reduction=reduction, **OPTIONS[option])
    loss, grad = loss_and_grad(fastsce_torch.cross_entropy, case)
    expected_loss, expected_grad = loss_and_grad(F.cross_entropy, case)
    assert isinstance(loss, torch.Tensor) and loss.dtype == expected_loss.dtype
    assert loss.shape == expected_loss.shape == ((37,) if reduction == "none" else ())
    loss_unit, grad_unit = case.units()
    scale = 36.0 if reduction == "none" else 3.5
    assert_close(loss.detach().numpy(), expected_loss.detach().numpy(), unit=loss_unit)
    assert_close(grad.numpy(), expected_grad.numpy(), unit=grad_unit * scale)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["weighted", "ignore-3-weighted-smooth", "soft-weighted-smooth"])
def test_gradcheck(reduction, option):
    case = make_case(6, 5, np.float64, reduction=reduction, **OPTIONS[option])
    logits, target, kwargs = tensors(case)
    assert torch.autograd.gradcheck(lambda z: fastsce_torch.cross_entropy(z, target, **kwargs), (logits,))


def test_no_grad_computes_the_loss_only(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cross_entropy_with_grad called without autograd")

    monkeypatch.setattr(fastsce_torch.fastsce, "cross_entropy_with_grad", refuse)
    case = make_case(9, 4, np.float32, weighted=True)
    logits, target, kwargs = tensors(case)
    expected = F.cross_entropy(logits, target, **kwargs)
    with torch.no_grad():
        loss = fastsce_torch.cross_entropy(logits, target, **kwargs)
    assert loss.grad_fn is None and not loss.requires_grad
    assert_close(loss.numpy(), expected.detach().numpy())
    loss = fastsce_torch.cross_entropy(logits.detach(), target, **kwargs)  # no requires_grad
    assert_close(loss.numpy(), expected.detach().numpy())
    with pytest.raises(AssertionError, match="without autograd"):
        fastsce_torch.cross_entropy(logits, target, **kwargs)


def test_non_contiguous_input_and_int32_targets():
    case = make_case(8, 6, np.float64, ignore_index=2)
    logits = torch.tensor(np.asfortranarray(case.logits), requires_grad=True)
    z = logits.t().contiguous().t()  # same values, column-major
    assert not z.is_contiguous()
    loss = fastsce_torch.cross_entropy(z, torch.tensor(case.target).to(torch.int32), ignore_index=2)
    loss.backward()
    ref = torch.tensor(case.logits, requires_grad=True)
    expected = F.cross_entropy(ref, torch.tensor(case.target), ignore_index=2)
    expected.backward()
    assert_close(loss.detach().numpy(), expected.detach().numpy())
    assert_close(logits.grad.numpy(), ref.grad.numpy())


def test_positional_arguments_match_torch_order():
    case = make_case(10, 5, np.float64, weighted=True, ignore_index=1)
    logits, target, kwargs = tensors(case, requires_grad=False)
    args = (logits, target, kwargs["weight"], None, 1, None, "sum", 0.1)
    assert_close(fastsce_torch.cross_entropy(*args).numpy(), F.cross_entropy(*args).numpy())


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (torch.float16, (7, 5)),
        (torch.bfloat16, (7, 5)),
        (torch.float32, (7, 5, 3)),
        (torch.float64, (4, 6, 3, 2)),
        (torch.float64, (5,)),
    ],
    ids=["f16", "bf16", "class-axis", "class-axis-2d", "1d"],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_other_dtypes_and_layouts_match_torch(dtype, shape, reduction):
    """Half precision, PyTorch's (N, K, d1, ...) layout and unbatched (K,) input run on
    fastsce too (classes on dim 1, or dim 0 unbatched); "none" gradients scaled per row."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    target = torch.tensor(2) if len(shape) == 1 else torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
    results = []
    for fn in (fastsce_torch.cross_entropy, F.cross_entropy):
        loss = fn(logits, target, reduction=reduction)
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        (grad,) = torch.autograd.grad((loss * upstream).sum(), logits)
        results.append((loss.detach().float().numpy(), grad.float().numpy(), loss.dtype, loss.shape))
    (loss, grad, ltype, lshape), (want_loss, want_grad, want_type, want_shape) = results
    assert ltype == want_type and lshape == want_shape
    half = dtype in (torch.float16, torch.bfloat16)
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}.get(dtype, 1e-14 if dtype == torch.float64 else 2e-6)
    # PyTorch rounds half-precision intermediates (fastsce rounds once): an ulp or two apart
    np.testing.assert_allclose(loss, want_loss, rtol=2 * ulp, atol=0)
    np.testing.assert_allclose(grad, want_grad, rtol=2 * ulp, atol=(2 if half else 1) * ulp * np.abs(want_grad).max())


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_legacy_arguments_fall_back_to_torch():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (7,))
    loss = fastsce_torch.cross_entropy(logits, target, size_average=False)
    expected = F.cross_entropy(logits, target, size_average=False)
    assert torch.equal(loss, expected)


def test_negative_weight_falls_back_to_torch():
    logits = torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    weight = torch.tensor([1.0, -0.5, 2.0, 1.0], dtype=torch.float64)
    assert torch.equal(
        fastsce_torch.cross_entropy(logits, target, weight, reduction="sum"),
        F.cross_entropy(logits, target, weight, reduction="sum"),
    )


def test_module_in_sequential():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=gen)
    weight = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    losses, grads = [], []
    for loss_cls in (fastsce_torch.CrossEntropyLoss, torch.nn.CrossEntropyLoss):
        torch.manual_seed(2)
        net = torch.nn.Sequential(torch.nn.Linear(8, 4).double())
        crit = loss_cls(weight=weight, ignore_index=3, label_smoothing=0.05)
        assert isinstance(crit, torch.nn.Module)
        loss = crit(net(x), y)
        loss.backward()
        losses.append(loss.detach().numpy())
        grads.append(net[0].weight.grad.numpy())
    assert "weight" in fastsce_torch.CrossEntropyLoss(weight=weight).state_dict()
    assert_close(losses[0], losses[1])
    assert_close(grads[0], grads[1])


def test_training_follows_the_same_loss_curve():
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal((64, 20)))
    y = torch.tensor(rng.integers(0, 10, 64))
    curves = []
    for loss_fn in (fastsce_torch.cross_entropy, F.cross_entropy):
        torch.manual_seed(4)
        model = torch.nn.Linear(20, 10).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        curve = []
        for _ in range(200):
            opt.zero_grad()
            loss = loss_fn(model(x), y, label_smoothing=0.05)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(np.array(curve))
    assert curves[1][-1] < 0.5 * curves[1][0]  # it did learn
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-10, atol=1e-12)


# --- double backward, autocast, torch.compile, threads, inplace_backward -------------------------


def gradient_penalty_setup(dtype=torch.float64):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(12, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (12,), generator=gen)
    w = torch.randn(6, 4, generator=gen, dtype=dtype, requires_grad=True)
    return x, y, w


@pytest.mark.parametrize("inplace", [False, True], ids=["default", "inplace"])
def test_double_backward_raises_instead_of_a_wrong_gradient(inplace):
    """A gradient penalty differentiates the gradient: the kernels' gradient is a constant to
    autograd, so the result would silently miss a term. It raises, naming the way out."""
    x, y, w = gradient_penalty_setup()
    loss = fastsce_torch.cross_entropy(x @ w, y, inplace_backward=inplace)
    with pytest.raises(RuntimeError, match="no second derivative.*torch.nn.functional.cross_entropy"):
        torch.autograd.grad(loss, w, create_graph=True)
    # the first derivative alone (no create_graph) still matches PyTorch's
    (g,) = torch.autograd.grad(fastsce_torch.cross_entropy(x @ w, y, inplace_backward=inplace), w)
    (want,) = torch.autograd.grad(F.cross_entropy(x @ w, y), w)
    assert_close(g.numpy(), want.numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-in", "f32-in"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_gives_a_float32_loss_as_torch(dtype, reduction):
    """cross_entropy is on CPU autocast's float32 list: half inputs are computed in float32
    and the loss is float32; the gradient reaches the input in its own dtype."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(16, 8, generator=gen, dtype=dtype)
    w = torch.randn(8, 5, generator=gen, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 5, (16,), generator=gen)
    results = []
    for fn in (fastsce_torch.cross_entropy, F.cross_entropy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = a @ w  # bfloat16 under autocast
            loss = fn(logits, y, reduction=reduction, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss.sum(), w)
        results.append((loss, grad))
    (loss, grad), (want_loss, want_grad) = results
    assert loss.dtype == want_loss.dtype == torch.float32 and loss.shape == want_loss.shape
    assert grad.dtype == want_grad.dtype == dtype
    assert_close(loss.detach().numpy(), want_loss.detach().numpy())
    np.testing.assert_allclose(grad.float().numpy(), want_grad.float().numpy(), rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize(
    "reduction, inplace", [(r, False) for r in REDUCTIONS] + [("mean", True)], ids=[*REDUCTIONS, "mean-inplace"]
)
def test_torch_compile_matches_eager_without_graph_breaks_or_warnings(reduction, inplace):
    """The kernels are registered operators (torch.library.custom_op): a compiled model
    traces them as one node with a fake shape (fullgraph=True fails on any graph break) and
    trains as the eager F.cross_entropy does. pytest turns any warning into an error."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(32, 12, generator=gen)
    y = torch.randint(0, 6, (32,), generator=gen)
    y[::5] = 2
    weight = torch.linspace(0.5, 2.0, 6)
    curves = []
    for loss_fn, compiled in ((fastsce_torch.cross_entropy, True), (F.cross_entropy, False)):
        torch.manual_seed(8)
        model = torch.nn.Linear(12, 6)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)

        def step(x, y):
            extra = dict(inplace_backward=True) if inplace and compiled else {}  # (ignored when compiled)
            options = dict(weight=weight, ignore_index=2, reduction=reduction, label_smoothing=0.1)
            loss = loss_fn(model(x), y, **options, **extra)
            return loss.mean() if reduction == "none" else loss

        if compiled:
            step = torch.compile(step, backend="aot_eager", fullgraph=True)
        curve = []
        for _ in range(3):
            opt.zero_grad()
            loss = step(x, y)
            loss.backward()
            curve.append((loss.item(), model.weight.grad.clone().numpy()))
            opt.step()
        curves.append(curve)
    for (loss, grad), (want_loss, want_grad) in zip(*curves, strict=True):
        assert_close(np.float32(loss), np.float32(want_loss))
        assert_close(grad, want_grad)


def test_fake_shapes_match_the_real_ones():
    for shape, target_shape, reduction in [((7, 5), (7,), "none"), ((4, 5, 3), (4, 3), "none"), ((5,), (), "sum")]:
        z = torch.randn(shape)
        t = torch.randint(0, 5, target_shape) if target_shape != shape else torch.rand(shape)
        torch.library.opcheck(fastsce_torch._loss_op, (z, t, None, -100, reduction, 0.0))
        torch.library.opcheck(fastsce_torch._loss_grad_op, (z.requires_grad_(), t, None, -100, reduction, 0.0))


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_torch_thread_count_is_left_alone(layer):
    """With NUMBA_NUM_THREADS=1, starting Numba's pool (GNU OpenMP's sets the shared
    libgomp's thread count) must not change torch.get_num_threads()."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import torch, numpy as np\n"
        "torch.set_num_threads(2)\n"
        "import fastsce.torch, numba\n"
        "z = torch.randn(400, 1000, requires_grad=True)\n"  # big enough for the thread pool
        "fastsce.torch.cross_entropy(z, torch.zeros(400, dtype=torch.long)).backward()\n"
        "print(numba.threading_layer(), torch.get_num_threads())\n"
    )
    env = dict(__import__("os").environ, NUMBA_NUM_THREADS="1", NUMBA_THREADING_LAYER=layer)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [layer, "2"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_backward_writes_the_gradient_over_the_logits(dtype, reduction):
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(23, 7, generator=gen).to(dtype)
    y = torch.randint(0, 7, (23,), generator=gen)
    weight = torch.rand(7, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
    upstream = torch.rand(23, generator=gen).to(dtype) if reduction == "none" else torch.tensor(2.5, dtype=dtype)
    results = []
    for fn, kwargs in ((fastsce_torch.cross_entropy, dict(inplace_backward=True)), (F.cross_entropy, {})):
        z = base.clone().requires_grad_()
        loss = fn(z, y, weight=weight.to(dtype), reduction=reduction, label_smoothing=0.1, **kwargs)
        (loss * upstream).sum().backward()
        results.append((loss.detach().float().numpy(), z.grad, z))
    (loss, grad, z), (want_loss, want_grad, _) = results
    assert grad.data_ptr() == z.data_ptr()  # no gradient buffer: the logits' own storage
    assert torch.equal(z.detach(), grad)  # (which now holds the gradient)
    tol = dict(rtol=2**-7, atol=2**-7) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, want_loss, **tol)
    np.testing.assert_allclose(grad.float().numpy(), want_grad.float().numpy(), **tol)


def test_inplace_backward_in_a_model_and_on_non_contiguous_logits():
    x, y, w = gradient_penalty_setup(torch.float32)
    grads = []
    for kwargs in (dict(inplace_backward=True), {}):
        w.grad = None
        fastsce_torch.CrossEntropyLoss(**kwargs)(x @ w, y).backward()
        grads.append(w.grad.clone())
        w.grad = None
        fastsce_torch.cross_entropy((w.t() @ x.t()).t(), y, **kwargs).backward()  # column-major logits
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])
