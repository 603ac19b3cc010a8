"""python -m fastsce: run the fused kernel and the NumPy reference on a synthetic
batch, check that they agree, and print the time of each and the speed ratio.

python -m fastsce bench: a benchmark report against memcpy, the NumPy reference and the
peers installed (PyTorch, torch.compile, optax, TensorFlow) over a grid of shapes, or a
sweep of K (python -m fastsce bench --help).

python -m fastsce loss LOGITS.npy TARGET.npy: the loss (and optionally gradient and
per-row losses) of logits and targets in .npy files, in chunks of rows
(python -m fastsce loss --help).

python -m fastsce score LOGITS.npy TARGET.npy: every metric of fastsce.evaluate (loss,
perplexity, accuracy, top-k, entropy, calibration) of the same files, in chunks, with
per-row arrays and a reliability diagram (python -m fastsce score --help).

python -m fastsce warmup: compile every kernel path ahead of time into the on-disk
cache, on all cores (python -m fastsce warmup --help)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

# The check job's options (option -> attribute) and their defaults, filled in after
# parsing so that they can be told apart from options given before a subcommand.
_CHECK_OPTIONS = {"--rows": "rows", "--classes": "classes", "--dtype": "check_dtype", "--repeat": "check_repeat"}
_CHECK_OPTIONS["--seed"] = "seed"
CHECK_DEFAULTS = {"rows": 8192, "classes": 1000, "check_dtype": "float32", "check_repeat": 10, "seed": 0}


def _plain(doc: str) -> str:
    """A docstring as --help shows it: without reStructuredText's ``literal`` quotes."""
    return doc.replace("``", "")


def main(argv=None) -> int:
    from fastsce import __version__, _warmup
    from fastsce._tools import evaluate_cli, report, score

    parser = argparse.ArgumentParser(
        prog="python -m fastsce", description=_plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fastsce {__version__}")
    parser.add_argument("--rows", "-n", type=int, metavar="N", help="batch size N (default 8192)")
    parser.add_argument("--classes", "-k", type=int, metavar="K", help="number of classes K (default 1000)")
    parser.add_argument("--dtype", dest="check_dtype", choices=["float32", "float64"], help="default float32")
    parser.add_argument(
        "--repeat", dest="check_repeat", type=int, metavar="R", help="timed calls per implementation (default 10)"
    )
    parser.add_argument("--seed", type=int, help="random seed of the batch (default 0)")
    commands = parser.add_subparsers(dest="command", title="subcommands", metavar="{bench,loss,score,warmup}")
    bench = commands.add_parser(
        "bench",
        help="benchmark report: fastsce against memcpy, the NumPy reference and the peers installed",
        description=_plain(report.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_arguments(bench)
    loss = commands.add_parser(
        "loss",
        help="loss (and gradient) of logits and targets in .npy files, in chunks",
        description=_plain(score.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_arguments(loss)
    scoring = commands.add_parser(
        "score",
        help="loss, accuracy, top-k, entropy and calibration of logits and targets in .npy files, in chunks",
        description=_plain(evaluate_cli.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate_cli.add_arguments(scoring)
    warm = commands.add_parser(
        "warmup",
        help="compile every kernel path now, into the on-disk cache",
        description=_warmup.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    warm.add_argument(
        "--dtype",
        dest="warmup_dtypes",
        action="append",
        choices=[*_warmup.DTYPES, "all"],
        help="logits dtype to compile for; repeat for several (default float32)",
    )
    warm.add_argument(
        "--path",
        dest="warmup_paths",
        action="append",
        choices=list(_warmup.PATHS),
        metavar="PATH",
        help=f"a path to compile; repeat for several (default all: {', '.join(_warmup.PATHS)})",
    )
    warm.add_argument("--processes", type=int, metavar="P", help="worker processes (default: the CPUs)")
    args = parser.parse_args(argv)

    given = [option for option, dest in _CHECK_OPTIONS.items() if getattr(args, dest) is not None]
    if args.command == "bench":
        if given:
            parser.error(f"{', '.join(given)}: options of the check job (no subcommand); bench's go after 'bench'")
        return report.run(args, bench)
    if args.command == "loss":
        if given:
            parser.error(f"{', '.join(given)}: options of the check job (no subcommand); loss's go after 'loss'")
        return score.run(args, loss)
    if args.command == "score":
        if given:
            parser.error(f"{', '.join(given)}: options of the check job (no subcommand); score's go after 'score'")
        return evaluate_cli.run(args, scoring)
    if args.command == "warmup":
        if given:
            parser.error(f"{', '.join(given)}: options of the check job (no subcommand); warmup's go after 'warmup'")
        try:
            _warmup.warmup(args.warmup_dtypes or ("float32",), args.warmup_paths, processes=args.processes)
        except ValueError as e:
            warm.error(str(e))
        return 0
    for dest, default in CHECK_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    return _check(args, parser)


def _check(args, parser) -> int:
    if args.rows < 1 or args.classes < 1 or args.check_repeat < 1:
        parser.error("--rows, --classes and --repeat must be positive")

    import numba

    import fastsce
    from fastsce import reference

    rng = np.random.default_rng(args.seed)
    dtype = np.dtype(args.check_dtype)
    n, k = args.rows, args.classes
    logits = (3 * rng.standard_normal((n, k))).astype(dtype)
    target = rng.integers(0, k, n)
    print(
        f"fastsce {fastsce.__version__} (numba {numba.__version__}, numpy {np.__version__}, "
        f"{numba.get_num_threads()} threads): {n} x {k} {dtype} logits, integer targets, mean"
    )

    t0 = time.perf_counter()
    loss, grad = fastsce.cross_entropy_with_grad(logits, target)
    t_first = time.perf_counter() - t0
    ref_loss, ref_grad = reference.cross_entropy_with_grad(logits, target)

    tol = reference.TOLERANCE[dtype]
    loss_ok = np.allclose(loss, ref_loss, **tol)
    grad_ok = np.allclose(grad, ref_grad, **tol)
    print(f"loss: fastsce {float(loss):.9g}, reference {float(ref_loss):.9g}")
    print(
        f"max |grad - reference grad| = {np.max(np.abs(grad - ref_grad)):.3g} "
        f"(tolerance rtol={tol['rtol']:g}, atol={tol['atol']:g})"
    )

    out = np.empty_like(logits)
    t_fast = _median_time(lambda: fastsce.cross_entropy_with_grad(logits, target, out=out), args.check_repeat)
    t_ref = _median_time(lambda: reference.cross_entropy_with_grad(logits, target), args.check_repeat)
    print(f"first call (compiles, or loads the on-disk cache): {t_first:.2f} s")
    print(f"median of {args.check_repeat} calls, loss + gradient:")
    print(f"  fastsce    {t_fast * 1e3:9.3f} ms")
    print(f"  reference  {t_ref * 1e3:9.3f} ms")
    print(f"  fastsce is {t_ref / t_fast:.1f}x faster than the NumPy reference")
    if loss_ok and grad_ok:
        print("OK: fastsce agrees with the reference")
        return 0
    print("MISMATCH: fastsce disagrees with the reference", file=sys.stderr)
    return 1


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


if __name__ == "__main__":
    sys.exit(main())
