"""python -m fastsce loss: softmax cross-entropy of logits and targets stored in .npy
files, in bounded memory.

The inputs are memory-mapped and processed in chunks along their first axis (the second
with --axis 0): the loss over the whole file (and the gradient, with --grad-out) equals
that of one in-memory call of fastsce.cross_entropy_with_grad with the same options.
Logits are float32, float64, float16 or bfloat16 (as ml_dtypes saves it: read when
ml_dtypes is installed), (N, K) or any shape with the classes on --axis. A first pass
over the targets and row weights checks the labels and computes the "mean"
denominators, so a bad label fails before anything is written.

Outputs are reserved on disk in full before any work (a full disk is an error, not a
crash half-way), written to an unnamed temporary file where the filesystem allows (else
a hidden one next to the destination) and put in place only when complete: an error,
Ctrl-C or SIGTERM leaves no partial output behind, and neither does SIGKILL on
filesystems with unnamed temporary files (Linux ext4, xfs, btrfs, tmpfs).

The first run of a dtype and set of options compiles its kernels (seconds to a minute;
said on stderr, and cached on disk for later runs); the speed reported leaves it out.

Exit status: 0 on success, 2 for bad arguments or input files, 1 for other errors
(e.g. a full disk), 130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM),
129 on SIGHUP."""

from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

CHUNK_BYTES = 64 << 20  # default chunk: about this many bytes of logits

# NumPy's own limit on the header of a file it loads without trusting it; np.save
# writes about a hundred bytes.
MAX_HEADER_BYTES = 10000
NPY_MAGIC = b"\x93NUMPY"


class InputError(Exception):
    """A bad input file or option: a one-line message, exit status 2."""


class OutputError(Exception):
    """An output that cannot be written (e.g. a full disk): a one-line message, exit status 1."""


class _Terminated(BaseException):
    """SIGTERM (or SIGHUP), raised in the main thread so that outputs are cleaned up as
    for Ctrl-C; the exit status is 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.status = 128 + signum


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "logits",
        metavar="LOGITS.npy",
        help="float32, float64, float16 or bfloat16 logits: (N, K), or any shape with the classes on --axis",
    )
    parser.add_argument(
        "target",
        metavar="TARGET.npy",
        help="integer class indices shaped like the logits without the class axis, "
        "or float class probabilities shaped like the logits",
    )
    parser.add_argument(
        "--axis", type=int, default=-1, help="the class axis (default -1; 1 for PyTorch's (N, K, d1, ...))"
    )
    parser.add_argument("--weight", metavar="W.npy", help="(K,) per-class weights")
    parser.add_argument("--reduction", choices=["mean", "sum", "none"], default="mean", help="default mean")
    parser.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS", help="in [0, 1] (default 0)")
    parser.add_argument("--ignore-index", type=int, default=-100, metavar="I", help="label to ignore (default -100)")
    parser.add_argument(
        "--z-loss", type=float, default=0.0, metavar="S", help="adds S * logsumexp^2 per row (default 0)"
    )
    parser.add_argument("--logit-scale", type=float, metavar="A", help="the loss sees A * logits")
    parser.add_argument("--softcap", type=float, metavar="C", help="the loss sees C * tanh(logits / C), C > 0")
    parser.add_argument(
        "--sample-weight", metavar="SW.npy", help="per-row weights, shaped like the logits without the class axis"
    )
    parser.add_argument(
        "--where", metavar="MASK.npy", help="bool per row, shaped like --sample-weight: rows to include"
    )
    parser.add_argument(
        "--all-ignored", choices=["nan", "zero"], default="nan", help='the "mean" of no counted row (default nan)'
    )
    parser.add_argument("--grad-out", metavar="GRAD.npy", help="write the gradient (logits' shape and dtype) here")
    parser.add_argument("--per-row-out", metavar="LOSS.npy", help="write the per-row losses (the target's shape) here")
    parser.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help=f"rows (entries of the chunked axis) per chunk (default: about {CHUNK_BYTES >> 20} MiB of logits)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


# --- reading ------------------------------------------------------------------------------


def _load(path: str, what: str, half: bool = False) -> np.ndarray:
    """The array of an .npy file, memory-mapped. The header is parsed here, as a literal
    (never unpickled: files holding Python objects are refused), and checked against
    the file's size before anything is mapped. half: read 2-byte void data (how
    np.save stores ml_dtypes' bfloat16) as bfloat16."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path}: is a directory, not a .npy file") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot be opened ({e.strerror})") from None
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InputError(f"{what} {path}: not a regular file (it is memory-mapped); save it with np.save")
        shape, fortran, dtype, offset = _read_header(f, path, what)
        size = os.fstat(f.fileno()).st_size
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes > size:
        raise InputError(
            f"{what} {path}: truncated: its header says shape {shape} of {dtype} "
            f"({offset + nbytes:,} bytes with the header) but the file has {size:,} bytes"
        )
    if half and dtype == np.dtype("V2"):
        try:
            import ml_dtypes
        except ImportError:
            raise InputError(
                f"{what} {path}: 2-byte void data (how np.save stores bfloat16): install ml_dtypes to read it as bfloat16"
            ) from None
        dtype = np.dtype(ml_dtypes.bfloat16)
    order = "F" if fortran else "C"
    if nbytes == 0:  # an empty array cannot be memory-mapped
        return np.zeros(shape, dtype, order=order)
    # Copy-on-write rather than "r": the same read-only use of the file (nothing is ever
    # written back), but arrays Numba types as writeable, so the kernels compiled and
    # cached for ordinary arrays are used (readonly arrays would be new signatures to
    # compile, and the small-K loss-only kernel does not accept them).
    try:
        return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape, order=order)
    except (OSError, ValueError) as e:
        raise InputError(f"{what} {path}: cannot be memory-mapped ({e})") from None


def _read_header(f, path: str, what: str):
    """(shape, fortran_order, dtype, data offset) of an open .npy file, or InputError."""

    def bad(why: str) -> InputError:
        return InputError(f"{what} {path}: not a .npy file ({why}); save arrays with np.save")

    magic = f.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        if magic[:4] == b"PK\x03\x04":
            raise bad("a zip archive, e.g. .npz; save one array per file")
        raise bad("it does not start with the .npy magic string")
    version = f.read(2)
    if len(version) < 2 or version[0] not in (1, 2, 3):
        raise bad(f"unknown format version {tuple(version)}")
    size_format = "<H" if version[0] == 1 else "<I"
    raw = f.read(struct.calcsize(size_format))
    if len(raw) < struct.calcsize(size_format):
        raise bad("the header is cut short")
    (header_bytes,) = struct.unpack(size_format, raw)
    if header_bytes > MAX_HEADER_BYTES:
        raise bad(f"its header claims {header_bytes:,} bytes; np.save writes about a hundred")
    header = f.read(header_bytes)
    if len(header) < header_bytes:
        raise bad("the header is cut short")
    try:
        d = ast.literal_eval(header.decode("utf8" if version[0] == 3 else "latin1"))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError, UnicodeDecodeError):
        raise bad("the header is not a Python literal")
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise bad("the header is not a dict of descr, fortran_order and shape")
    shape, fortran = d["shape"], d["fortran_order"]
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise bad(f"shape {shape!r} is not a tuple of integers")
    if any(n < 0 for n in shape):
        raise bad(f"shape {shape} has a negative dimension")
    if not isinstance(fortran, bool):
        raise bad(f"fortran_order {fortran!r} is not a bool")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dtype = np.lib.format.descr_to_dtype(d["descr"])
    except Exception:  # noqa: BLE001 - any descr NumPy cannot read
        raise bad(f"unknown dtype {d['descr']!r}")
    if dtype.hasobject:
        raise InputError(
            f"{what} {path}: holds Python objects (dtype {dtype}), which would have to be unpickled, "
            "and files are never unpickled here; save a numeric array"
        )
    return shape, fortran, dtype, f.tell()


# --- writing ------------------------------------------------------------------------------


def _output_path(path: str, option: str) -> str:
    """The file an output option will replace: its real path (written through a symlink,
    as a shell redirection would), after checking that its directory exists."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        why = "does not exist" if not os.path.exists(directory) else "is not a directory"
        raise InputError(f"{option} {path}: the directory {directory} {why}")
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise InputError(f"{option} {path}: is a directory; give a file name")
    if os.path.exists(real) and not stat.S_ISREG(os.stat(real).st_mode):
        # renamed onto, a device such as /dev/null would be replaced by a regular file
        raise InputError(f"{option} {path}: is not a regular file (a device, pipe or socket); give a file name")
    if not os.path.isdir(os.path.dirname(real)):  # a symlink into a missing directory
        raise InputError(f"{option} {path}: links to {real}, whose directory does not exist")
    if not os.access(os.path.dirname(real), os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: the directory {os.path.dirname(real)} is not writable")
    return real


def _same_file(a: str, b: str) -> bool:
    """The same file, through symlinks and hard links (or the same path, if neither exists)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _npy_header(shape, dtype: np.dtype) -> bytes:
    import io

    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # a header longer than 64 KiB: format 2.0
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def _reserve(fd: int, nbytes: int, path: str, option: str) -> None:
    """Allocate the whole file now: a memory-mapped write to a sparse file on a full disk
    would be a SIGBUS half-way, not an error."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return
    except AttributeError:  # no posix_fallocate on this platform
        pass
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            directory = os.path.dirname(path)
            free = shutil.disk_usage(directory).free
            raise OutputError(
                f"{option} {path}: {e.strerror}: needs {_size(nbytes)}, {_size(free)} free in {directory}"
            ) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    os.ftruncate(fd, nbytes)  # the filesystem cannot reserve: a sparse file, as before


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


class _AtomicFile:
    """A file of ``nbytes``, reserved in full on disk, put in place at ``path`` by
    :meth:`commit` and removed by :meth:`discard`; subclasses fill it (:meth:`_fill`).

    Written through an unnamed file (O_TMPFILE) where the filesystem allows: nothing is
    visible until commit links it into the directory, so even SIGKILL leaves nothing
    behind. Elsewhere, through a hidden named file next to the destination."""

    def __init__(self, path: str, nbytes: int, option: str):
        self.path = path  # a real path (see _output_path)
        self.directory = os.path.dirname(path)
        self.fd = None
        self.tmp = None  # the named temporary file, when O_TMPFILE is not available
        self.array = None
        try:
            self._open()
            _reserve(self.fd, nbytes, path, option)
            self._fill()
        except BaseException:
            self.discard()
            raise

    def _fill(self) -> None:
        pass

    def _open(self) -> None:
        if hasattr(os, "O_TMPFILE"):
            try:
                self.fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
                return
            except OSError as e:  # not supported by this filesystem or kernel
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
        prefix = "." + os.path.basename(self.path) + "."
        self.fd, self.tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self.directory)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(self.fd, 0o666 & ~umask)  # as a file the shell would create, not mkstemp's 0600

    def prepare(self) -> None:
        """Flush to disk: the slow part of putting the file in place."""
        if self.array is not None:
            self.array.flush()
            self.array = None  # unmaps
        os.fsync(self.fd)

    def commit(self) -> None:
        """Put in place (after prepare)."""
        if self.tmp is None:
            # An unnamed file gets a name only now, and is renamed onto the destination at
            # once (linkat cannot replace an existing file).
            self.tmp = _link_unnamed(self.fd, self.path)
        os.replace(self.tmp, self.path)
        self.tmp = None
        os.close(self.fd)
        self.fd = None

    def discard(self) -> None:
        self.array = None
        if self.fd is not None:
            os.close(self.fd)  # an unnamed file is freed here
            self.fd = None
        if self.tmp is not None:
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


class _AtomicNpy(_AtomicFile):
    """An .npy file of the given shape and dtype, memory-mapped as ``array`` to be
    written in place."""

    def __init__(self, path: str, shape, dtype: np.dtype, option: str):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.header = _npy_header(shape, dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        super().__init__(path, len(self.header) + self.nbytes, option)

    def _fill(self) -> None:
        os.pwrite(self.fd, self.header, 0)
        if self.nbytes:
            with os.fdopen(os.dup(self.fd), "r+b") as f:  # np.memmap maps its own descriptor
                self.array = np.memmap(f, dtype=self.dtype, mode="r+", offset=len(self.header), shape=self.shape)


class _AtomicBytes(_AtomicFile):
    """A file holding ``data`` (e.g. a rendered image)."""

    def __init__(self, path: str, data: bytes, option: str):
        self.data = data
        super().__init__(path, len(data), option)

    def _fill(self) -> None:
        os.pwrite(self.fd, self.data, 0)
        self.data = None


def _link_unnamed(fd: int, path: str) -> str:
    """Give the O_TMPFILE file fd a hidden name next to path; return that name."""
    directory, base = os.path.split(path)
    # With a directory descriptor os.link calls linkat with AT_SYMLINK_FOLLOW, which
    # links the file /proc/self/fd/N stands for (plain link() would link the magic
    # symlink itself: EXDEV).
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            name = f".{base}.{secrets.token_hex(4)}.tmp"
            try:
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                return os.path.join(directory, name)
            except FileExistsError:
                continue
    finally:
        os.close(dir_fd)


# --- validation ---------------------------------------------------------------------------


def _native_labels(target: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Class indices of other integer dtypes as int64 (O(N), as the API does for all but
    int32): one compiled path for every label dtype instead of a second compile for int32."""
    if target.shape != logits.shape and target.dtype.kind in "iu" and target.dtype.itemsize < 8:
        return np.asarray(target, np.int64)
    return target


def _native(a):
    """A small array (O(N) or O(K)) in the native byte order."""
    return a if a is None or a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _native_view(a):
    """An (N, K) array's bytes seen in the native byte order: for the checks, which look
    at the shape and dtype only (the values are read a chunk at a time, converted)."""
    return a if a.dtype.isnative else a.view(a.dtype.newbyteorder("="))


def _check(logits, target, weight, row_weights, args):
    """The API's checks on the whole problem (O(N + K): the logits only by shape and
    dtype); the Problem, with target as the kernels take it."""
    from fastsce._validate import check_problem

    sample_weight, where = row_weights
    return check_problem(
        logits, target, weight, args.ignore_index, args.reduction, args.label_smoothing,
        axis=args.axis, sample_weight=sample_weight, where=where, z_loss=args.z_loss,
        logit_scale=args.logit_scale, softcap=args.softcap, all_ignored=args.all_ignored,
    )  # fmt: skip


# --- the subcommand -----------------------------------------------------------------------


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``loss`` subcommand; returns the exit status."""
    from fastsce import api

    check_chunk_rows(args, parser)
    named_outputs = [(o, p) for o, p in (("--grad-out", args.grad_out), ("--per-row-out", args.per_row_out)) if p]
    refuse_overwriting_inputs(args, parser, named_outputs)
    try:
        outputs = {option: _output_path(p, option) for option, p in named_outputs}
        sources, logits, target, weight, row_weights = read_inputs(args)
        problem = _check(logits, target, weight, row_weights, args)
    except (InputError, TypeError, ValueError, IndexError) as e:  # the API's checks too
        return _fail(f"error: {e}", 2)

    def work(compiling, written):
        try:
            # The first pass over the labels (and row weights): the "mean"
            # denominators; an IndexError names the first bad label.
            _, _, d, d_z = api._weights(problem)
        except (TypeError, ValueError, IndexError) as e:
            raise InputError(str(e)) from None
        return _compute(args, problem, sources, (d, d_z), outputs, written, compiling)

    summary = execute("loss", work)
    if isinstance(summary, int):
        return summary
    _timing(summary)
    if args.json:
        print(json.dumps(summary))
    else:
        print(_text(summary))
    return 0


# --- pieces shared with the score subcommand (fastsce/_tools/evaluate_cli.py) -------------


def check_chunk_rows(args, parser) -> None:
    if args.chunk_rows is not None and args.chunk_rows < 1:
        parser.error("--chunk-rows must be positive")


def refuse_overwriting_inputs(args, parser, named_outputs) -> None:
    """parser.error (exit 2) when two outputs, or an output and an input file (args.logits,
    target, weight, sample_weight, where), are the same file. named_outputs: (option, path)."""
    for i, (option, out) in enumerate(named_outputs):
        for other, earlier in named_outputs[:i]:
            if _same_file(out, earlier):
                parser.error(f"{other} and {option} name the same file")
    inputs = [args.logits, args.target, args.weight, args.sample_weight, args.where]
    for _, out in named_outputs:
        for src in inputs:
            if src and _same_file(out, src):
                parser.error(f"output {out} would replace the input {src} (the same file)")


def read_inputs(args):
    """(sources, logits, target, weight, (sample_weight, where)) of the files args names,
    memory-mapped: sources are the logits and target as read (chunks of them are
    converted to the native byte order), the others seen in the native byte order for
    the checks. InputError for a file that cannot be read."""
    logits = _load(args.logits, "logits", half=True)
    target = _native_labels(_load(args.target, "target", half=True), logits)
    weight = None if args.weight is None else _load(args.weight, "weight")
    row_weights = tuple(None if p is None else _load(p, what) for p, what in
                        ((args.sample_weight, "sample_weight"), (args.where, "where")))  # fmt: skip
    # Files in the other byte order (written on a big-endian machine): the (N, K)
    # arrays converted a chunk at a time, the per-row and per-class ones whole.
    sources = {"logits": logits, "target": target}
    weight, *row_weights = (_native(a) for a in (weight, *row_weights))
    if target.shape != logits.shape:
        sources["target"] = target = _native(target)
    logits, target = (_native_view(a) for a in (logits, target))
    return sources, logits, target, weight, tuple(row_weights)


def execute(name: str, work):
    """Runs ``work(compiling, written)`` -> summary (a dict with "seconds"), which
    creates its outputs (objects with prepare, commit and discard) and appends them to
    ``written``; then puts every output in place, or none. Returns the summary, or the
    exit status of a failure after printing its one-line message: 2 for an InputError
    raised by work, 1 for a full disk or any other error, 128 + the signal for Ctrl-C,
    SIGTERM and SIGHUP. name: the subcommand, as the compile notice says it."""
    written = []
    with _Signals() as signals:
        try:
            with _CompileNotice(name) as compiling:
                summary = work(compiling, written)
                t_commit = time.perf_counter()
                for out in written:
                    out.prepare()
                signals.held = True  # every output renamed into place, or none
                for out in written:
                    out.commit()
                summary["seconds"] += time.perf_counter() - t_commit  # the flush is part of the work
        except InputError as e:
            _discard(written)
            return _fail(f"error: {e}", 2)
        except KeyboardInterrupt:
            _discard(written)
            return _fail("interrupted: no output written", 130)
        except _Terminated as e:
            _discard(written)
            return _fail("terminated: no output written", e.status)
        except OutputError as e:
            _discard(written)
            return _fail(f"error: {e}; no output written", 1)
        except Exception as e:  # noqa: BLE001 - any failure: remove partial output, one line
            _discard(written)
            first_line = (str(e).splitlines() or [""])[0]  # e.g. a compiler's many-line report
            return _fail(f"error: {type(e).__name__}: {first_line}; no output written", 1)
    return summary


class _Signals:
    """Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP (a closed terminal)
    _Terminated, in the main thread, once (a second signal does not interrupt the
    clean-up of the first), and none while ``held`` (the outputs being renamed into
    place: all of them or none)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))

    def __enter__(self):
        self.previous = {}
        self.raised = self.held = False
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) != signal.SIG_IGN:  # e.g. SIGHUP under nohup stays ignored
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.raised and not self.held:
            self.raised = True
            raise KeyboardInterrupt() if signum == signal.SIGINT else _Terminated(signum)

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        return False


class _CompileNotice:
    """Says on stderr when Numba starts compiling (the first run of a dtype and set of
    options) and, at the end of the warm-up, how long it took; ``seconds`` is the time
    spent compiling (0 when every kernel came from the on-disk cache)."""

    def __init__(self, name: str = "loss"):
        self.name = name  # the subcommand

    def __enter__(self):
        from numba.core import event

        self.seconds = 0.0
        self.depth = 0
        self.announced = False
        self.listener = self._Listener(self)
        self.context = event.install_listener("numba:compile", self.listener)
        self.context.__enter__()
        return self

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        return False

    def report(self) -> None:
        if self.announced:
            print(f"{self.name}: compiled in {self.seconds:.1f} s (cached on disk for the next runs)", file=sys.stderr)
            self.announced = False

    def _start(self):
        if self.depth == 0:
            self.t0 = time.perf_counter()
            if not self.announced:
                message = f"{self.name}: compiling the kernels for these dtypes and options (first use only)..."
                print(message, file=sys.stderr)
                self.announced = True
        self.depth += 1

    def _end(self):
        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.perf_counter() - self.t0

    @staticmethod
    def _Listener(notice):
        from numba.core import event

        class Listener(event.Listener):
            def on_start(self, ev):
                notice._start()

            def on_end(self, ev):
                notice._end()

        return Listener()


def _discard(written):
    for out in reversed(written):  # a directory created for outputs after the files in it
        out.discard()


def _fail(message: str, status: int) -> int:
    print(message, file=sys.stderr)
    return status


def _slicer(ndim: int, axis: int):
    def take(a, start, stop):
        index = [slice(None)] * ndim
        index[axis] = slice(start, stop)
        chunk = np.asarray(a[tuple(index)])
        return chunk if chunk.dtype.isnative else chunk.astype(chunk.dtype.newbyteorder("="))

    return take


class Chunks:
    """How the memory-mapped logits are cut: along their first axis, or the second when
    it holds the classes, which is always the first axis of the per-row arrays (target,
    row weights, per-row results) seen in ``lead_view``. ``take_z`` / ``take_r`` slice
    the logits / a per-row array there (converted to the native byte order); ``size``
    entries of that axis a chunk (chunk_rows, or about CHUNK_BYTES of logits), ``count``
    chunks."""

    def __init__(self, problem, logits: np.ndarray, chunk_rows: int | None):
        k = problem.shape[1]
        if logits.ndim == 1:  # one row: seen as (1, K) with a target of shape (1,)
            logits, self.lead_view, self.axis = logits.reshape(1, k), (1,), 1
        else:
            self.lead_view, self.axis = problem.lead, problem.axis
        self.logits = logits
        self.chunked_axis = c = 1 if self.axis == 0 else 0
        self.take_z = _slicer(logits.ndim, c)
        self.take_r = _slicer(len(self.lead_view), 0)
        self.length = length = logits.shape[c]
        self.per_index = math.prod(logits.shape) // length if length else 0  # logits per entry of the chunked axis
        self.itemsize = problem.result.itemsize
        size = chunk_rows or max(1, CHUNK_BYTES // max(1, self.per_index * self.itemsize))
        self.size = min(size, max(1, length))
        self.count = -(-length // self.size)

    def ranges(self, name: str):
        """(start, stop) of each chunk; progress on stderr (name: the subcommand) after each."""
        from fastsce._tools.report import Progress

        progress = Progress() if self.count > 1 else None
        c, n = self.chunked_axis, self.count
        unit = "rows" if self.logits.ndim == 2 and c == 0 else f"entries of axis {c}"
        t0 = time.perf_counter()
        try:
            for i, start in enumerate(range(0, self.length, self.size)):
                stop = min(self.length, start + self.size)
                yield start, stop
                if progress is not None:
                    elapsed = time.perf_counter() - t0
                    message = (
                        f"{name}: chunk {i + 1}/{n}, {stop:,}/{self.length:,} {unit}, "
                        f"{stop * self.per_index * self.itemsize / 1e9 / max(elapsed, 1e-9):.2f} GB/s"
                    )
                    progress.update(message, milestone=(i + 1) % max(1, n // 10) == 0 or i + 1 == n)
        finally:
            if progress is not None:
                progress.done()


def _compute(args, problem, sources, denominators, outputs, written, compiling) -> dict:
    """The chunked run: the summary (without rates); outputs created and appended to
    ``written`` (the caller commits or discards them). ``sources``: the logits and target
    as read, chunks of which are converted to the native byte order."""
    import fastsce

    chunks = Chunks(problem, sources["logits"], args.chunk_rows)
    logits, lead_view, axis = chunks.logits, chunks.lead_view, chunks.axis
    take_z, take_r = chunks.take_z, chunks.take_r
    m, k = problem.shape
    dtype = problem.result  # the logits' dtype
    half = problem.compute != dtype  # float16 / bfloat16: chunks computed in float32, rounded once
    soft = problem.soft
    lead = problem.lead
    # class indices as validated (int64); probabilities as read, in the logits' layout
    target = sources["target"].reshape(logits.shape) if soft else problem.target.reshape(lead_view)
    take_t = take_z if soft else take_r
    v = None if problem.row_weight is None else problem.row_weight.reshape(lead_view)
    n_chunks = chunks.count
    reduction = problem.reduction
    per_row = reduction == "none" or "--per-row-out" in outputs

    d, d_z = denominators  # of "mean": D (class and row weights) and D_z (row weights, for the z-loss)
    grad_file = row_file = None
    if "--grad-out" in outputs:
        grad_file = _AtomicNpy(outputs["--grad-out"], problem.logits.shape, dtype, "--grad-out")
        written.append(grad_file)
    if "--per-row-out" in outputs:
        row_file = _AtomicNpy(outputs["--per-row-out"], lead, dtype, "--per-row-out")
        written.append(row_file)
    grad_array = None if grad_file is None or grad_file.array is None else grad_file.array.reshape(logits.shape)
    row_array = None if row_file is None or row_file.array is None else row_file.array.reshape(lead_view)

    # Each chunk's sum (or rows), scaled here by the whole file's 1 / D for "mean". The
    # z-loss terms are divided by D_z instead: folded in as z_loss * D / D_z. With D = 0
    # the cross-entropy part of "mean" is NaN ("nan") or 0 ("zero": zero class weights
    # leave only the z-loss, divided by D_z).
    weight, z_loss, scale, nan_rows = problem.weight, problem.z_loss, 1.0, False
    if reduction == "mean":
        if d:
            scale, z_loss = 1.0 / d, problem.z_loss * d / d_z
        elif problem.all_ignored == "zero":
            scale = 1.0 / d_z if d_z else 0.0
            if problem.z_loss and d_z:
                weight = np.zeros(k, problem.compute)
        else:
            scale, nan_rows = np.nan, True
    options = dict(
        weight=weight,
        ignore_index=problem.ignore_index,
        label_smoothing=problem.label_smoothing,
        reduction="none" if per_row else "sum",
        axis=axis,
        z_loss=z_loss,
        logit_scale=problem.logit_scale,
        softcap=problem.softcap,
        dtype=problem.compute,  # half logits: float32 results, rounded once into the outputs
    )
    direct = grad_array is not None and scale == 1.0 and not half  # the gradient straight into the file
    buffer = None
    # Rows written with a folded z-loss are put back to the row losses of "none": the
    # z-loss terms, returned apart, times D_z / D. Rows of zeroed class weights are
    # computed again (only for a "mean" of nothing with z_loss, all_ignored="zero").
    unfold = per_row and z_loss != problem.z_loss
    if unfold:
        options["return_z_loss"] = True
    again = row_array is not None and weight is not problem.weight

    def call(z, t, vb, g_out):
        """The chunk's loss (its rows for "none"), unscaled; the gradient into g_out when given."""
        if g_out is None:
            result = fastsce.cross_entropy(z, t, sample_weight=vb, **options)
        else:
            result = fastsce.cross_entropy_with_grad(z, t, sample_weight=vb, out=g_out, **options)
            result = (result[0], *result[2:])
        if again:
            rows = fastsce.cross_entropy(z, t, sample_weight=vb, **dict(options, weight=problem.weight))
            return result, rows
        if not unfold:
            return result[0] if isinstance(result, tuple) else result
        loss, z_term = result
        rows = np.asarray(loss, np.float64) + np.asarray(z_term, np.float64) * (d_z / d - 1.0)
        return loss, rows

    def chunk_of(start, stop):
        return (take_z(logits, start, stop), take_t(target, start, stop), None if v is None else take_r(v, start, stop))

    # Warm-up on one entry of the chunked axis: the same kernels as every chunk, so the
    # compile (or the load from the on-disk cache) is timed apart from the work.
    if chunks.length:
        z, t, vb = chunk_of(0, 1)
        call(z, t, vb, None if grad_array is None else np.empty(z.shape, problem.compute))
    compiling.report()

    total = 0.0
    t0 = time.perf_counter()
    with contextlib.closing(chunks.ranges("loss")) as ranges:  # closed (progress line cleared) on errors too
        for start, stop in ranges:
            z, t, vb = chunk_of(start, stop)
            if grad_array is None:
                loss = call(z, t, vb, None)
            else:
                g = take_z(grad_array, start, stop)
                if direct:
                    loss = call(z, t, vb, g)
                else:
                    # the gradient of the chunk's sum in a reused buffer, scaled on its way
                    # to the file: the file's pages are written once, not written and read back
                    if buffer is None or buffer.size < z.size:
                        buffer = np.empty(z.size, problem.compute)
                    b = buffer[: z.size].reshape(z.shape)
                    loss = call(z, t, vb, b)
                    _scale(b, scale, g, _counted(t, vb, problem, axis) if nan_rows else None, axis)
            if per_row:
                rows = loss
                if unfold or again:
                    loss, rows = loss
                if row_array is not None:
                    row_array[start:stop] = rows
                total += float(np.sum(loss, dtype=np.float64))
            else:
                total += float(loss)
    seconds = time.perf_counter() - t0

    with np.errstate(over="ignore", invalid="ignore"):
        # as the API: the float64 total rounded once to the result dtype
        loss_value = float(dtype.type(total * scale))
    summary = {"loss_sum" if reduction == "none" else "loss": loss_value, "reduction": reduction}
    summary.update(
        rows=m,
        ignored_rows=0 if soft else int(np.count_nonzero(problem.target == problem.ignore_index)),
        classes=k,
        shape=list(problem.logits.shape),
        axis=problem.axis,
        dtype=str(dtype),
        target="probabilities" if soft else "class indices",
        denominator=d,
        chunks=n_chunks,
        chunk_rows=chunks.size,
        grad_out=args.grad_out,
        per_row_out=args.per_row_out,
        compile_seconds=compiling.seconds,
        seconds=seconds,
        logits_bytes=math.prod(problem.logits.shape) * dtype.itemsize,
    )
    return summary


def _counted(t, vb, problem, axis) -> np.ndarray:
    """The rows of a chunk the kernels compute (not ignored, row weight not 0), in the
    shape of the chunk's per-row arrays."""
    if problem.soft:
        rows = np.ones(np.delete(t.shape, axis), bool)
    else:
        rows = t != problem.ignore_index
    return rows if vb is None else rows & (vb != 0)


def _scale(g: np.ndarray, scale: float, out: np.ndarray, counted, axis: int) -> None:
    """out = a chunk's gradient of the sum g times scale (1 / D, rounded once into out's
    dtype). For a NaN scale (a "mean" over D = 0), as in the API: NaN on the rows
    computed, the skipped rows' all-zero gradient kept."""
    if counted is None:
        if scale == 1.0:
            out[...] = g
        else:
            np.multiply(g, g.dtype.type(scale), out=out, casting="same_kind")
        return
    out[...] = g
    np.moveaxis(out, axis, -1)[counted] = np.nan


def _timing(summary: dict) -> None:
    seconds = summary["seconds"]
    nbytes = summary.pop("logits_bytes")
    summary["rows_per_s"] = summary["rows"] / seconds if seconds > 0 else None
    summary["logits_gb_per_s"] = nbytes / seconds / 1e9 if seconds > 0 else None


def _text(s: dict) -> str:
    what = {"mean": "mean loss", "sum": "summed loss", "none": "sum of per-row losses"}[s["reduction"]]
    value = s["loss_sum" if s["reduction"] == "none" else "loss"]
    shape = " x ".join(f"{n:,}" for n in s["shape"])
    lines = [
        f"{what}: {value:.9g}",
        f"{s['rows']:,} rows ({s['ignored_rows']:,} ignored) x {s['classes']:,} classes ({shape}, axis {s['axis']}), "
        f"{s['dtype']}, {s['target']}, {s['chunks']} chunk(s) of {s['chunk_rows']:,}",
    ]
    if s["rows_per_s"] is not None:
        lines.append(
            f"{s['seconds']:.3f} s: {s['rows_per_s']:,.0f} rows/s, {s['logits_gb_per_s']:.2f} GB/s of logits"
            + (f" (after {s['compile_seconds']:.1f} s of compiling)" if s["compile_seconds"] else "")
        )
    for key, label in (("grad_out", "gradient"), ("per_row_out", "per-row losses")):
        if s[key]:
            lines.append(f"{label} written to {s[key]}")
    return "\n".join(lines)
