"""What the benchmarks compare: each entry turns (logits, labels) into a zero-argument
callable returning (loss, grad) — grad None for loss-only, the copy for memcpy."""

from __future__ import annotations

import numpy as np

import fastsce
from fastsce import reference


def _fastsce(logits, labels):
    out = np.empty_like(logits)
    return lambda: fastsce.cross_entropy_with_grad(logits, labels, out=out)


def _fastsce_loss(logits, labels):
    return lambda: (fastsce.cross_entropy(logits, labels), None)


def _reference(logits, labels):
    return lambda: reference.cross_entropy_with_grad(logits, labels)


def _memcpy(logits, labels):
    # Reads N x K and writes N x K: the floor for anything that reads logits and writes a gradient.
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


# name -> (builder, module it needs or None)
IMPLEMENTATIONS = {
    "memcpy": (_memcpy, None),
    "fastsce": (_fastsce, None),
    "fastsce-loss": (_fastsce_loss, None),
    "reference": (_reference, None),
    "torch": (_torch, "torch"),
    "jax": (_jax, "jax"),
}
