"""python -m fastsce score: every metric of fastsce.evaluate — loss, perplexity, accuracy,
top-k accuracy, entropy, target probability, confidence and expected calibration error
— of logits and class-index targets stored in .npy files, in bounded memory.

The files are read as by python -m fastsce loss: memory-mapped and processed in chunks
along their first axis (the second with --axis 0), float32, float64, float16 or bfloat16
logits, any shape with the classes on --axis. The labels are checked over the whole
file before any logits are read. The metrics over the whole file equal those of one
in-memory call of fastsce.evaluate with the same options (each chunk's sums added in
order: the means to float64 rounding, the bin counts exactly).

Prints a table of the metrics and the calibration bins, or JSON with --json (the keys
of Evaluation.as_dict, and the run's shape, dtype, chunks and time). --per-row-out DIR
writes target_logprob.npy, entropy.npy, argmax.npy, target_rank.npy and confidence.npy
(the target's shape; created with DIR when it does not exist); --plot FILE.png draws the
reliability diagram (needs matplotlib). Outputs are written as by loss: reserved on disk
first, put in place only when complete, all of them or none.

Exit status: 0 on success, 2 for bad arguments or input files, 1 for other errors
(e.g. a full disk), 130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM),
129 on SIGHUP."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import time

import numpy as np

from fastsce._tools import score
from fastsce._tools.score import InputError, _AtomicBytes, _AtomicNpy, _fail, _output_path

# the per-row arrays of Evaluation, each written to DIR/NAME.npy by --per-row-out
PER_ROW = ("target_logprob", "entropy", "argmax", "target_rank", "confidence")
INTEGER_ROWS = ("argmax", "target_rank")  # int64; the others in the compute dtype (float32 for half logits)


def _topk(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,5") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "logits",
        metavar="LOGITS.npy",
        help="float32, float64, float16 or bfloat16 logits: (N, K), or any shape with the classes on --axis",
    )
    parser.add_argument(
        "target", metavar="TARGET.npy", help="integer class indices shaped like the logits without the class axis"
    )
    parser.add_argument(
        "--topk", type=_topk, default=(1, 5), metavar="K,...", help="the k of the top-k accuracies (default 1,5)"
    )
    parser.add_argument(
        "--bins", type=int, default=15, metavar="B", help="equal-width confidence bins of the ECE (default 15)"
    )
    parser.add_argument(
        "--axis", type=int, default=-1, help="the class axis (default -1; 1 for PyTorch's (N, K, d1, ...))"
    )
    parser.add_argument("--weight", metavar="W.npy", help="(K,) per-class weights (they weight the loss only)")
    parser.add_argument("--ignore-index", type=int, default=-100, metavar="I", help="label to ignore (default -100)")
    parser.add_argument(
        "--sample-weight", metavar="SW.npy", help="per-row weights, shaped like the logits without the class axis"
    )
    parser.add_argument(
        "--where", metavar="MASK.npy", help="bool per row, shaped like --sample-weight: rows to include"
    )
    parser.add_argument(
        "--per-row-out",
        metavar="DIR",
        help="write target_logprob.npy, entropy.npy, argmax.npy, target_rank.npy and confidence.npy here",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="draw the reliability diagram here (needs matplotlib)"
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help=f"rows (entries of the chunked axis) per chunk (default: about {score.CHUNK_BYTES >> 20} MiB of logits)",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``score`` subcommand; returns the exit status."""
    from fastsce._validate import check_labels
    from fastsce.metrics import check_evaluation

    score.check_chunk_rows(args, parser)
    if args.plot:
        _check_plot(args.plot, parser)
    named_outputs = []
    if args.per_row_out:
        named_outputs += [("--per-row-out", os.path.join(args.per_row_out, name + ".npy")) for name in PER_ROW]
    if args.plot:
        named_outputs.append(("--plot", args.plot))
    score.refuse_overwriting_inputs(args, parser, named_outputs)
    try:
        rows_out = None if args.per_row_out is None else _per_row_paths(args.per_row_out)
        plot_out = None if args.plot is None else _output_path(args.plot, "--plot")
        sources, logits, target, weight, (sample_weight, where) = score.read_inputs(args)
        problem, topk, bins = check_evaluation(
            logits, target, args.topk, args.bins, weight, args.ignore_index, args.axis, sample_weight, where
        )
        check_labels(problem)  # over the whole file, before any logits are read
    except (InputError, TypeError, ValueError, IndexError) as e:  # the API's checks too
        return _fail(f"error: {e}", 2)

    def work(compiling, written):
        return _compute(args, problem, topk, bins, sources["logits"], rows_out, plot_out, written, compiling)

    summary = score.execute("score", work)
    if isinstance(summary, int):
        return summary
    evaluation = summary.pop("evaluation")
    seconds = summary["seconds"]
    total_rows = evaluation.rows + evaluation.ignored_rows
    summary["rows_per_s"] = total_rows / seconds if seconds > 0 else None
    summary["logits_gb_per_s"] = summary.pop("logits_bytes") / seconds / 1e9 if seconds > 0 else None
    if args.json:
        print(json.dumps({**evaluation.as_dict(), **summary}))
    else:
        print(format_table(evaluation, summary))
    return 0


def _check_plot(path: str, parser) -> None:
    """parser.error (exit 2) when --plot cannot be drawn: no matplotlib, or a file type it cannot write."""
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    from matplotlib.backend_bases import FigureCanvasBase

    kind = os.path.splitext(path)[1][1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if kind not in supported:
        parser.error(
            f"--plot {path}: matplotlib writes {', '.join('.' + t for t in sorted(supported))} files; "
            "name the file e.g. reliability.png"
        )


def _per_row_paths(directory: str) -> dict[str, str]:
    """{name: real path} of the per-row files in directory. A missing directory is
    created (one level, when the work starts) and removed again if the run fails."""
    if os.path.isdir(directory):
        return {name: _output_path(os.path.join(directory, name + ".npy"), "--per-row-out") for name in PER_ROW}
    if os.path.lexists(directory):
        raise InputError(f"--per-row-out {directory}: is not a directory; give a directory (created if missing)")
    real = _output_path(directory, "--per-row-out")  # checks that its parent exists and is writable
    return {name: os.path.join(real, name + ".npy") for name in PER_ROW}


class _NewDirectory:
    """A directory made for the outputs: removed with them when the run fails."""

    def __init__(self, path: str):
        os.mkdir(path)
        self.path = path

    def prepare(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        try:
            os.rmdir(self.path)  # only if empty: never what someone else put there
        except OSError:
            pass


def _compute(args, problem, topk, bins, logits, rows_out, plot_out, written, compiling) -> dict:
    """The chunked run: the summary, with the Evaluation under "evaluation"; outputs
    created and appended to ``written`` (the caller commits or discards them)."""
    from fastsce.metrics import MetricSums, metric_sums

    chunks = score.Chunks(problem, logits, args.chunk_rows)
    lead_view = chunks.lead_view
    target = problem.target.reshape(lead_view)
    v = None if problem.row_weight is None else problem.row_weight.reshape(lead_view)
    per_row = rows_out is not None

    files = {}
    if per_row:
        directory = os.path.dirname(rows_out[PER_ROW[0]])
        if not os.path.isdir(directory):
            written.append(_NewDirectory(directory))
        for name in PER_ROW:
            dtype = np.dtype(np.int64) if name in INTEGER_ROWS else problem.compute
            out = _AtomicNpy(rows_out[name], problem.lead, dtype, "--per-row-out")
            written.append(out)
            files[name] = None if out.array is None else out.array.reshape(lead_view)

    def sums_of(start, stop):
        # A chunk is a Problem cut from the whole file's (checked once, row weights
        # scaled once): its sums add up to the whole file's.
        z = chunks.take_z(chunks.logits, start, stop)
        rows = z if chunks.axis == z.ndim - 1 else np.moveaxis(z, chunks.axis, -1)
        part = dataclasses.replace(
            problem,
            logits=z,
            axis=chunks.axis,
            rows=rows,
            target=target[start:stop].reshape(-1),
            row_weight=None if v is None else v[start:stop].reshape(-1),
        )
        return metric_sums(part, topk, bins, per_row)

    # Warm-up on one entry of the chunked axis, as loss: the compile (or the load from
    # the on-disk cache) timed apart from the work.
    if chunks.length:
        sums_of(0, 1)
    compiling.report()

    total = MetricSums.zero(topk, bins)
    t0 = time.perf_counter()
    with contextlib.closing(chunks.ranges("score")) as ranges:  # progress line cleared on errors too
        for start, stop in ranges:
            sums, arrays = sums_of(start, stop)
            total = total + sums
            if arrays is not None:
                for name, a in arrays.items():
                    if files[name] is not None:
                        files[name][start:stop] = a
    seconds = time.perf_counter() - t0
    evaluation = total.finish()
    if plot_out is not None:  # drawn before any output is put in place: all of them or none
        buffer = io.BytesIO()
        plot_reliability(evaluation, buffer, format=os.path.splitext(plot_out)[1][1:].lower())
        written.append(_AtomicBytes(plot_out, buffer.getvalue(), "--plot"))

    dtype = problem.result
    return {
        "evaluation": evaluation,
        "classes": problem.shape[1],
        "shape": list(problem.logits.shape),
        "axis": problem.axis,
        "dtype": str(dtype),
        "chunks": chunks.count,
        "chunk_rows": chunks.size,
        "per_row_out": args.per_row_out,
        "plot": args.plot,
        "compile_seconds": compiling.seconds,
        "seconds": seconds,
        "logits_bytes": math.prod(problem.logits.shape) * dtype.itemsize,
    }


# --- output -------------------------------------------------------------------------------


def format_table(evaluation, summary: dict | None = None) -> str:
    """Every metric of an Evaluation as a readable table, with its calibration bins; the
    run (shape, dtype, chunks, time, outputs) when summary is given."""
    e = evaluation
    bins = e.bin_counts.size
    metrics = [
        ("loss", e.loss),
        ("perplexity", e.perplexity),
        ("accuracy", e.accuracy),
        *((f"top-{k} accuracy", v) for k, v in e.topk_accuracy.items()),
        ("mean entropy (nats)", e.mean_entropy),
        ("mean target probability", e.mean_target_probability),
        ("mean confidence", e.mean_confidence),
        (f"ECE ({bins} bins)", e.ece),
    ]
    width = max(len(name) for name, _ in metrics)
    lines = [f"{name:<{width}}  {value:.6g}" for name, value in metrics]
    lines.append(f"{'rows':<{width}}  {e.rows:,} counted, {e.ignored_rows:,} ignored")
    if summary is not None:
        shape = " x ".join(f"{n:,}" for n in summary["shape"])
        lines.append(
            f"{summary['classes']:,} classes ({shape}, axis {summary['axis']}), {summary['dtype']}, "
            f"{summary['chunks']} chunk(s) of {summary['chunk_rows']:,}"
        )
        if summary["rows_per_s"] is not None:
            lines.append(
                f"{summary['seconds']:.3f} s: {summary['rows_per_s']:,.0f} rows/s, "
                f"{summary['logits_gb_per_s']:.2f} GB/s of logits"
                + (f" (after {summary['compile_seconds']:.1f} s of compiling)" if summary["compile_seconds"] else "")
            )
        if summary["per_row_out"]:
            names = ", ".join(n + ".npy" for n in PER_ROW)
            lines.append(f"per-row arrays ({names}) written to {summary['per_row_out']}")
        if summary["plot"]:
            lines.append(f"reliability diagram written to {summary['plot']}")
    lines.append("")
    lines.append("calibration bins (confidence = largest softmax probability):")
    lines.append(f"  {'confidence':<16}{'rows':>12}{'mean confidence':>18}{'accuracy':>11}{'gap':>10}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for i in range(bins):
        count, conf, acc = e.bin_counts[i], e.bin_confidence[i], e.bin_accuracy[i]
        span = f"({edges[i]:.3f}, {edges[i + 1]:.3f}]"
        rows = f"{count:,.0f}" if count == int(count) else f"{count:,.4g}"
        if count > 0:
            lines.append(f"  {span:<16}{rows:>12}{conf:>18.4f}{acc:>11.4f}{acc - conf:>+10.4f}")
        else:
            lines.append(f"  {span:<16}{rows:>12}{'-':>18}{'-':>11}{'-':>10}")
    return "\n".join(lines)


def plot_reliability(evaluation, path=None, *, format=None, title=None):
    """The reliability diagram of a :class:`fastsce.Evaluation`: each confidence bin's
    accuracy (bars) against the diagonal of perfect calibration, the gap to the bin's
    mean confidence shaded, the ECE in the title; below, the rows in each bin. Saved to
    ``path`` (a file name or a binary file object; ``format`` e.g. "png", else from the
    file name) when given. Returns the matplotlib Figure. Needs matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    e = evaluation
    bins = e.bin_counts.size
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / bins
    filled = e.bin_counts > 0

    fig = Figure(figsize=(6.4, 7.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    acc, conf = e.bin_accuracy[filled], e.bin_confidence[filled]
    top.bar(centres[filled], acc, width=width, color="tab:blue", edgecolor="black", linewidth=0.6, label="accuracy")
    top.bar(centres[filled], conf - acc, bottom=acc, width=width, color="tab:red", alpha=0.25, edgecolor="tab:red",
            hatch="//", linewidth=0.6, label="gap to mean confidence")  # fmt: skip
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.legend(loc="upper left", fontsize=9)
    top.grid(True, alpha=0.3)
    if title is None:
        title = f"Reliability diagram: ECE = {e.ece:.4f} ({bins} bins)"
    top.set_title(f"{title}\naccuracy {e.accuracy:.4f}, mean confidence {e.mean_confidence:.4f}, {e.rows:,} rows",
                  fontsize=10)  # fmt: skip

    bottom.bar(centres, e.bin_counts, width=width, color="gray", edgecolor="black", linewidth=0.6)
    bottom.set(xlim=(0, 1), xlabel="confidence (largest softmax probability)", ylabel="rows")
    if bins <= 20:
        for x, count in zip(centres[filled], e.bin_counts[filled]):
            label = f"{count:,.0f}" if count == int(count) else f"{count:.3g}"
            bottom.annotate(label, (x, count), ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                            textcoords="offset points")  # fmt: skip
    bottom.margins(y=0.2)
    bottom.grid(True, axis="y", alpha=0.3)
    if path is not None:
        fig.savefig(path, dpi=120, format=format)
    return fig
