"""Time and peak memory of a linear head's loss and gradients at full size, each variant
in its own process, the variants interleaved (round after round), as in README's table.

    python bench/linear_table.py 4096 1024 32000 [--rounds 2] [--variants a,b,...]

A fastsce variant takes its tile after an @: "fastsce.linear@1024" (chunk_rows=1024, whole
rows), "fastsce.linear@1024x16000" (and chunk_classes=16000), "fastsce.linear (loss)@1024".

Per run: float32 input (N, H), weight (V, H), integer labels, "mean", loss + gradients
with respect to the input and the weight (or the loss only, for the "loss" variants).
Time: the median of ``--rounds`` runs (one per process, after a warm-up at a small
shape). Peak memory: the process's peak resident set during the run (VmHWM, reset
with /proc/self/clear_refs) minus its resident set before it, so the inputs are not
counted and the returned gradients are. Every result's loss is checked against the
float64 loss of the first variant's run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

VARIANTS = {
    "matmuls": "the three products alone: h Wᵀ, G W, Gᵀ h (NumPy)",
    "fastsce.linear": "fastsce.linear_cross_entropy_with_grad",
    "numpy+fastsce": "NumPy matmuls + fastsce.cross_entropy_with_grad(out=logits)",
    "torch eager": "F.cross_entropy(F.linear(h, W), y) forward + backward",
    "torch chunked": "F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()) fwd + bwd",
    "matmul (loss)": "the one product h Wᵀ alone",
    "fastsce.linear (loss)": "fastsce.linear_cross_entropy",
}

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np

    variant, n, h_dim, v = sys.argv[1], *map(int, sys.argv[2:5])

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    def inputs(n, h_dim, v):
        rng = np.random.default_rng(0)
        h = rng.standard_normal((n, h_dim), dtype=np.float32)
        w = (rng.standard_normal((v, h_dim), dtype=np.float32) / np.float32(h_dim ** 0.5))
        y = rng.integers(0, v, n)
        return h, w, y

    if variant.startswith("torch"):
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(2)

        def run(h, w, y):
            ht = torch.from_numpy(h).requires_grad_()
            wt = torch.from_numpy(w).requires_grad_()
            yt = torch.from_numpy(y)
            if variant == "torch eager":
                loss = F.cross_entropy(F.linear(ht, wt), yt)
            else:
                loss = F.linear_cross_entropy(ht, wt, yt, options=torch.nn.LinearCrossEntropyOptions())
            loss.backward()
            return float(loss), ht.grad, wt.grad
    else:
        import fastsce

        variant, _, at = variant.partition("@")
        rows, _, cols = at.partition("x")
        tile = dict(chunk_rows=int(rows) if rows else None, chunk_classes=int(cols) if cols else None)

        def run(h, w, y):
            if variant == "matmuls":
                z = np.matmul(h, w.T)
                return float("nan"), np.matmul(z, w), np.matmul(z.T, h)
            if variant == "matmul (loss)":
                z = np.matmul(h, w.T)
                return float("nan"), None, None
            if variant == "numpy+fastsce":
                z = np.matmul(h, w.T)
                loss, g = fastsce.cross_entropy_with_grad(z, y, out=z)
                return float(loss), np.matmul(g, w), np.matmul(g.T, h)
            if variant == "fastsce.linear (loss)":
                return float(fastsce.linear_cross_entropy(h, w, y, **tile)), None, None
            loss, gh, gw, _ = fastsce.linear_cross_entropy_with_grad(h, w, y, **tile)
            return float(loss), gh, gw

    run(*inputs(64, 32, 1000))  # compile / warm up
    if not variant.startswith("torch") and variant not in ("matmuls", "matmul (loss)"):
        # the class-split kernels too, threaded (as a wide vocabulary's default tile uses them)
        h0, w0, y0 = inputs(1024, 8, 1000)
        if "loss" in variant:
            fastsce.linear_cross_entropy(h0, w0, y0, chunk_classes=300)
        else:
            fastsce.linear_cross_entropy_with_grad(h0, w0, y0, chunk_classes=300)
    h, w, y = inputs(n, h_dim, v)
    before = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    t0 = time.perf_counter()
    loss, gh, gw = run(h, w, y)
    seconds = time.perf_counter() - t0
    peak = hwm() - before
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "loss": loss}))
    """
)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int)
    parser.add_argument("h", type=int)
    parser.add_argument("v", type=int)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [name for name in variants if name.partition("@")[0] not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)} (fastsce ones with @rows[xclasses])")
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, name, str(args.n), str(args.h), str(args.v)],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], file=sys.stderr, flush=True)
    losses = [r["loss"] for rs in results.values() for r in rs if r["loss"] == r["loss"]]
    print(f"N={args.n} H={args.h} V={args.v} float32, {args.rounds} interleaved rounds, each run its own process")
    base = statistics.median(r["seconds"] for r in results["matmuls"]) if results.get("matmuls") else None
    base_loss = statistics.median(r["seconds"] for r in results["matmul (loss)"]) if results.get("matmul (loss)") else None
    print(f"{'variant':<32} {'time s':>8} {'x products':>11} {'peak MB':>8}")
    for name, rs in results.items():
        if not rs:
            continue
        t = statistics.median(r["seconds"] for r in rs)
        peak = max(r["peak_bytes"] for r in rs) / 1e6
        ref = base_loss if "loss" in name else base
        ratio = f"{t / ref:.2f}" if ref else "-"
        print(f"{name:<32} {t:8.2f} {ratio:>11} {peak:8.0f}")
    if losses:
        spread = max(losses) - min(losses)
        print(f"losses agree to {spread:.2e} (max - min over the runs that compute one)")
        assert spread < 1e-4 * max(1.0, abs(losses[0])), losses


if __name__ == "__main__":
    main()
