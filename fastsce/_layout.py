"""Rows of any array, as the row-wise kernels take them: C-contiguous (rows, K) blocks.

An array with the class axis moved last (a view of shape lead + (K,)) that is already
C-contiguous in the dtype the kernels take goes to them as one block of views. Anything
else (another class axis, another layout, another dtype) is copied a block of about
``block_logits`` values at a time, so a call never holds a second full-size array.
"""

from __future__ import annotations

import math

import numpy as np


def index_blocks(lead: tuple[int, ...], rows: int):
    """Index tuples over the leading axes, each selecting about ``rows`` consecutive rows
    (in row-major order) and at least one; () for a single row."""
    if not lead:
        yield ()
        return
    inner = math.prod(lead[1:])
    if inner <= rows:
        step = max(1, rows // max(inner, 1))
        for a in range(0, lead[0], step):
            yield (slice(a, min(a + step, lead[0])),)
    else:
        for a in range(lead[0]):
            for rest in index_blocks(lead[1:], rows):
                yield (a, *rest)


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a`` (``a`` itself when it is read-only already).

    Every input array goes to the kernels read-only: Numba compiles a kernel again for
    each writeable flag of its arguments (a read-only memmap or broadcast view would
    otherwise compile a second copy of every kernel, 5-30 s each), and the kernels
    cannot write an input by mistake: such a write does not compile."""
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


def row_blocks(rows: np.ndarray, dtype: np.dtype, block_logits: int, inputs=(), outputs=(), *, in_dtype=None, out_dtype=None):
    """(r0, r1, z, ins, outs) per block of rows r0:r1 of ``rows`` (lead + (K,)).

    ``dtype``: the dtype z is given to the kernels in (the compute dtype, or a half
    dtype the kernels convert themselves). ``inputs``: more arrays shaped like ``rows``
    read alongside (e.g. probability targets), converted to ``in_dtype`` (default
    ``dtype``). ``outputs``: arrays shaped like ``rows`` (or None) to be written; each
    block's is a (rows, K) array of ``out_dtype`` (default ``dtype``) the caller fills.

    The fast path (every array C-contiguous in its dtype) is one block of views, so an
    output may be z itself. Otherwise z and the inputs are copies, each output a block
    buffer of its own written back into its array when the caller asks for the next
    block (hence a generator). A block buffer is never z: the in-place kernels can round
    differently, and the layout should not change a result."""
    in_dtype = dtype if in_dtype is None else in_dtype
    out_dtype = dtype if out_dtype is None else out_dtype
    k = rows.shape[-1]
    lead = rows.shape[:-1]
    m = math.prod(lead)

    def direct(a, dt):
        return a is None or (a.flags.c_contiguous and a.dtype == dt)

    if direct(rows, dtype) and all(direct(a, in_dtype) for a in inputs) and all(direct(a, out_dtype) for a in outputs):
        yield (
            0,
            m,
            read_only(rows.reshape(m, k)),
            tuple(read_only(a.reshape(m, k)) for a in inputs),
            tuple(None if a is None else a.reshape(m, k) for a in outputs),
        )
        return
    r0 = 0
    for index in index_blocks(lead, max(1, block_logits // max(k, 1))):
        block = rows[index]
        z = read_only(np.array(block, dtype=dtype, order="C").reshape(-1, k))  # always a copy
        r1 = r0 + z.shape[0]
        ins = tuple(read_only(np.ascontiguousarray(a[index], dtype=in_dtype).reshape(-1, k)) for a in inputs)
        outs = tuple(None if a is None else np.empty(z.shape, out_dtype) for a in outputs)
        yield r0, r1, z, ins, outs
        for a, o in zip(outputs, outs):
            if a is not None:
                a[index] = o.reshape(block.shape)
        z = ins = outs = o = None  # (so that two blocks are never alive at once)
        r0 = r1
