"""``python -m fastsce loss``: softmax cross-entropy of logits and targets stored in .npy
files, in bounded memory.

The inputs are memory-mapped and processed in chunks of rows: the loss over the whole
file (and the gradient, with --grad-out) equals that of one in-memory call of
fastsce.cross_entropy_with_grad. A first pass over the targets alone checks the labels
and computes the "mean" denominator, so a bad label fails before anything is written.
Outputs are written to a temporary file next to the destination and renamed onto it
only when complete: an error or Ctrl-C leaves no partial output behind.

Exit status: 0 on success, 2 for bad arguments or input files, 1 for other errors,
130 when interrupted."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

CHUNK_BYTES = 64 << 20  # default chunk: about this many bytes of logits


class InputError(Exception):
    """A bad input file or option: a one-line message, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logits", metavar="LOGITS.npy", help="(N, K) float32 or float64 logits")
    parser.add_argument(
        "target", metavar="TARGET.npy", help="(N,) integer class indices, or (N, K) float class probabilities"
    )
    parser.add_argument("--weight", metavar="W.npy", help="(K,) per-class weights")
    parser.add_argument("--reduction", choices=["mean", "sum", "none"], default="mean", help="default mean")
    parser.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS", help="in [0, 1] (default 0)")
    parser.add_argument("--ignore-index", type=int, default=-100, metavar="I", help="label to ignore (default -100)")
    parser.add_argument("--grad-out", metavar="GRAD.npy", help="write the gradient (logits' shape and dtype) here")
    parser.add_argument("--per-row-out", metavar="LOSS.npy", help="write the (N,) per-row losses here")
    parser.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help=f"rows per chunk (default: about {CHUNK_BYTES >> 20} MiB of logits)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _load(path: str, what: str) -> np.ndarray:
    try:
        # Copy-on-write rather than "r": the same read-only use of the file (nothing is ever
        # written back), but arrays Numba types as writeable, so the kernels compiled
        # and cached for ordinary arrays are used (readonly arrays would be new signatures
        # to compile, and the small-K loss-only kernel does not accept them).
        arr = np.load(path, mmap_mode="c", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path}: is a directory, not a .npy file") from None
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{what} {path}: not a readable .npy file ({e})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        if hasattr(arr, "close"):
            arr.close()
        raise InputError(f"{what} {path}: not a .npy file (an .npz archive?); save one array with np.save")
    return arr


class _AtomicNpy:
    """An .npy file written through np.lib.format.open_memmap into a temporary file in
    the destination's directory, renamed onto the destination by :meth:`commit`, and
    removed by :meth:`discard`."""

    def __init__(self, path: str, shape, dtype):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # as a file the shell would create, not mkstemp's 0600
        self.array = None
        try:
            if int(np.prod(shape)) == 0:  # an empty file cannot be memory-mapped
                np.lib.format.write_array(open(self.tmp, "wb"), np.empty(shape, dtype))
            else:
                self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        if self.array is not None:
            self.array.flush()
            self.array = None  # unmaps
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        self.array = None
        if self.tmp is not None:
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def _validate(logits, target, weight, args):
    """The API's checks on the whole problem (O(N + K): the logits only by shape and
    dtype) and the first pass over the targets: (problem, weights, denominator)."""
    from fastsce import api
    from fastsce._validate import check_problem

    if logits.dtype not in (np.float32, np.float64):
        raise InputError(f"logits must be float32 or float64 here; got {logits.dtype}")
    if logits.ndim != 2:
        raise InputError(f"logits must be 2-D, (N, K); got shape {logits.shape}")
    options = (weight, args.ignore_index, args.reduction, args.label_smoothing)
    soft = target.ndim == 2 and target.shape == logits.shape and target.dtype.kind == "f"
    if soft and logits.ndim == 2 and target.dtype != logits.dtype:
        # probabilities of another dtype would be converted whole: check a slice
        problem = check_problem(logits[:1], target[:1], *options)
        return problem, None, float(logits.shape[0])
    problem = check_problem(logits, target, *options)
    w, _, denominator, _ = api._weights(problem)  # label check (names the first bad row) and D
    if problem.soft:
        w = None
    return problem, w, denominator


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``loss`` subcommand; returns the exit status."""
    if args.chunk_rows is not None and args.chunk_rows < 1:
        parser.error("--chunk-rows must be positive")
    outputs = [p for p in (args.grad_out, args.per_row_out) if p]
    if args.grad_out and args.per_row_out and os.path.abspath(args.grad_out) == os.path.abspath(args.per_row_out):
        parser.error("--grad-out and --per-row-out name the same file")
    inputs = [p for p in (args.logits, args.target, args.weight) if p]
    for out in outputs:
        for src in inputs:
            if os.path.abspath(out) == os.path.abspath(src):
                parser.error(f"output {out} would replace the input {src}")
    try:
        logits = _load(args.logits, "logits")
        target = _load(args.target, "target")
        weight = None if args.weight is None else _load(args.weight, "weight")
        problem, _, denominator = _validate(logits, target, weight, args)
    except InputError as e:
        return _fail(f"error: {e}", 2)
    except (TypeError, ValueError, IndexError) as e:
        return _fail(f"error: {e}", 2)

    written = []
    t0 = time.perf_counter()
    try:
        summary = _compute(args, logits, target, weight, problem, denominator, written)
        for out in written:
            out.commit()
        _timing(summary, time.perf_counter() - t0)  # including the flush of the outputs
    except KeyboardInterrupt:
        _discard(written)
        return _fail("interrupted: no output written", 130)
    except Exception as e:  # noqa: BLE001 - any failure: remove partial output, one line
        _discard(written)
        return _fail(f"error: {type(e).__name__}: {e}; no output written", 1)

    if args.json:
        print(json.dumps(summary))
    else:
        print(_text(summary))
    return 0


def _discard(written):
    for out in written:
        out.discard()


def _fail(message: str, status: int) -> int:
    print(message, file=sys.stderr)
    return status


def _compute(args, logits, target, weight, problem, denominator, written) -> dict:
    import fastsce
    from fastsce._tools.report import Progress

    n, k = logits.shape
    dtype = logits.dtype
    chunk = args.chunk_rows or max(1, CHUNK_BYTES // (k * dtype.itemsize))
    n_chunks = -(-n // chunk)
    reduction = args.reduction
    per_row = reduction == "none" or args.per_row_out is not None
    grad_file = row_file = None
    if args.grad_out:
        grad_file = _AtomicNpy(args.grad_out, (n, k), dtype)
        written.append(grad_file)
    if args.per_row_out:
        row_file = _AtomicNpy(args.per_row_out, (n,), dtype)
        written.append(row_file)

    if reduction == "mean":
        scale = 1.0 / denominator if denominator else np.nan  # as the API: 0 / 0 is NaN
    else:
        scale = 1.0
    options = dict(
        weight=None if weight is None else np.asarray(weight),
        ignore_index=args.ignore_index,
        label_smoothing=args.label_smoothing,
        reduction="none" if per_row else "sum",
    )
    ignored = 0
    if not problem.soft:
        ignored = int(np.count_nonzero(np.asarray(target) == args.ignore_index))

    progress = Progress() if n_chunks > 1 else None
    total = 0.0
    buffer = None
    t0 = time.perf_counter()
    try:
        for i, start in enumerate(range(0, n, chunk)):
            stop = min(n, start + chunk)
            z = np.asarray(logits[start:stop])
            t = np.asarray(target[start:stop])
            if grad_file is not None:
                g = np.asarray(grad_file.array[start:stop])
                if reduction == "mean":
                    # the gradient of the chunk's sum, in a reused buffer, then divided by
                    # the whole file's D on its way to the file: the file's pages are
                    # written once, not written and then read back to be scaled
                    if buffer is None:
                        buffer = np.empty((min(chunk, n), k), dtype)
                    b = buffer[: stop - start]
                    loss, _ = fastsce.cross_entropy_with_grad(z, t, out=b, **options)
                    _scale(b, t, scale, problem, out=g)
                else:
                    loss, _ = fastsce.cross_entropy_with_grad(z, t, out=g, **options)
            else:
                loss = fastsce.cross_entropy(z, t, **options)
            if per_row:
                row_file_array = None if row_file is None else row_file.array
                if row_file_array is not None:
                    row_file_array[start:stop] = loss
                total += float(np.sum(loss, dtype=np.float64))
            else:
                total += float(loss)
            if progress is not None:
                elapsed = time.perf_counter() - t0
                message = (
                    f"loss: chunk {i + 1}/{n_chunks}, {stop:,}/{n:,} rows, "
                    f"{stop * k * dtype.itemsize / 1e9 / max(elapsed, 1e-9):.2f} GB/s"
                )
                progress.update(message, milestone=(i + 1) % max(1, n_chunks // 10) == 0 or i + 1 == n_chunks)
    finally:
        if progress is not None:
            progress.done()

    with np.errstate(over="ignore", invalid="ignore"):
        if reduction == "mean":
            loss_value = float(dtype.type(total / denominator if denominator else np.nan))
        else:
            loss_value = float(dtype.type(total))  # the sum (for "none": of the per-row losses)
    return {
        "loss": loss_value,
        "reduction": reduction,
        "rows": n,
        "ignored_rows": ignored,
        "classes": k,
        "dtype": str(dtype),
        "target": "probabilities" if problem.soft else "class indices",
        "denominator": denominator,
        "chunks": n_chunks,
        "chunk_rows": chunk,
        "grad_out": args.grad_out,
        "per_row_out": args.per_row_out,
    }


def _timing(summary: dict, seconds: float) -> None:
    nbytes = summary["rows"] * summary["classes"] * np.dtype(summary["dtype"]).itemsize
    summary["seconds"] = seconds
    summary["rows_per_s"] = summary["rows"] / seconds if seconds > 0 else None
    summary["logits_gb_per_s"] = nbytes / seconds / 1e9 if seconds > 0 else None


def _scale(g: np.ndarray, t: np.ndarray, scale: float, problem, out: np.ndarray) -> None:
    """out = a chunk's gradient of the sum g, divided by the whole file's denominator D
    (scale = 1 / D). As in the API, ignored rows keep their all-zero gradient when D = 0."""
    if scale == scale:
        np.multiply(g, g.dtype.type(scale), out=out)
        return
    out[...] = g
    if problem.soft:
        out[...] = np.nan
    else:
        out[t != problem.ignore_index] = np.nan


def _text(s: dict) -> str:
    what = {"mean": "mean loss", "sum": "summed loss", "none": "sum of per-row losses"}[s["reduction"]]
    lines = [
        f"{what}: {s['loss']:.9g}",
        f"{s['rows']:,} rows ({s['ignored_rows']:,} ignored) x {s['classes']:,} classes, {s['dtype']}, "
        f"{s['target']}, {s['chunks']} chunk(s) of {s['chunk_rows']:,} rows",
    ]
    if s["rows_per_s"] is not None:
        lines.append(
            f"{s['seconds']:.3f} s: {s['rows_per_s']:,.0f} rows/s, {s['logits_gb_per_s']:.2f} GB/s of logits"
        )
    for key, label in (("grad_out", "gradient"), ("per_row_out", "per-row losses")):
        if s[key]:
            lines.append(f"{label} written to {s[key]}")
    return "\n".join(lines)
