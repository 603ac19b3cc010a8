"""fastsce.torch's inplace_backward against its default: a training step's loss, forward
and backward, float32 (the logits a leaf tensor, restored before each step, untimed).

    PYTHONPATH=. python bench/inplace_backward.py [--rounds 15]

Interleaved rounds in one process; medians of wall time and of CPU time (all threads,
page faults included), and the ratio default / inplace.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastsce.torch import cross_entropy

SHAPES = [(1024, 32000), (256, 128256)]


def step(z, y, inplace):
    z.grad = None
    t, c = time.perf_counter(), time.process_time()
    cross_entropy(z, y, inplace_backward=inplace).backward()
    elapsed = time.perf_counter() - t, time.process_time() - c  # wall; CPU of all threads
    z.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; median of {args.rounds} rounds")
    for n, k in SHAPES:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(n, k, generator=gen)
        y = torch.randint(0, k, (n,), generator=gen)
        z = logits.clone().requires_grad_()
        want = None
        times = {False: [], True: []}
        for r in range(args.rounds + 1):  # the first round warms up (compiles, faults pages in)
            for inplace in (False, True):
                with torch.no_grad():
                    z.copy_(logits)
                t = step(z, y, inplace)
                if r:
                    times[inplace].append(t)
        with torch.no_grad():  # the gradients agree
            z.copy_(logits)
        cross_entropy(z, y).backward()
        want = z.grad.clone()
        z.grad = None
        cross_entropy(z, y, inplace_backward=True).backward()
        assert torch.allclose(z.grad, want, rtol=1e-5, atol=1e-9)
        for i, what in enumerate(("wall", "CPU")):
            base = statistics.median(t[i] for t in times[False])
            inplace = statistics.median(t[i] for t in times[True])
            print(
                f"{n} x {k} ({what}): default {base * 1e3:.1f} ms, inplace_backward {inplace * 1e3:.1f} ms,"
                f" ratio {base / inplace:.2f}"
            )


if __name__ == "__main__":
    main()
