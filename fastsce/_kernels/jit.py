"""All Numba compile options live here, so every kernel is built the same way, and so
does the on-disk cache every kernel is saved in."""

from __future__ import annotations

import contextlib
import hashlib
import os
import types
from pathlib import Path

import numba
from numba import types as nb_types
from numba.core import caching, cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.core.dispatcher import Dispatcher
from numba.extending import intrinsic, overload
from numba.misc.appdirs import AppDirs

from fastsce._version import __version__

# No "nnan"/"ninf": -inf logits (masked classes) and NaN propagation must keep their
# IEEE meaning. No "reassoc" either: it let LLVM turn log_s - (z_y - m) into
# (log_s + m) - z_y, which loses the whole loss when |z| ~ 1e300. "contract" allows
# FMA; "nsz"/"arcp" are harmless here.
FASTMATH = frozenset({"nsz", "arcp", "contract"})

# Loop helpers that only sum or take maxima may let LLVM reorder those into vector lanes.
# They hold no loss formula; the exp they call keeps its own flags when inlined.
VECTOR_FASTMATH = FASTMATH | {"reassoc"}

# error_model="numpy": x / 0 gives inf/NaN instead of raising, which keeps exception
# checks out of the inner loops. nogil: callers may run us from several threads.
# cache=False here: every dispatcher gets the cache below instead of Numba's default one.
OPTIONS = dict(cache=False, nogil=True, fastmath=set(FASTMATH), error_model="numpy")

# --- The on-disk cache -------------------------------------------------------------
# Numba's default cache lives next to each source file (the checkout and an installed
# copy each compile everything once, and an installed copy in a read-only site-packages
# falls back to a directory keyed by the source's path) and is keyed on that one file's
# contents: a kernel did not notice an edit of a helper it inlines from simd.py.
# Here the cache of every kernel is one per-user directory named by fastsce's version and
# a hash of all the compiled layer's sources, so any copy of the same code (checkout,
# installed, another working directory) shares it, and an edit of any kernel file
# starts a new one: a stale kernel is never loaded. NUMBA_CACHE_DIR, when set, replaces
# the per-user base directory. Numba's own locators remain the fallback when that
# directory is not writable.

KERNEL_DIR = Path(__file__).resolve().parent


def _source_hash() -> str:
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(KERNEL_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


SOURCE_HASH = _source_hash()


def cache_dir() -> Path:
    """The directory the kernels are cached in (it may not exist yet)."""
    base = os.environ.get("NUMBA_CACHE_DIR") or AppDirs(appname="fastsce", appauthor=False).user_cache_dir
    return Path(base) / "fastsce" / f"{__version__}-{SOURCE_HASH[:16]}"


class _Locator(caching._CacheLocator):
    def __init__(self, py_func, py_file):
        self._lineno = py_func.__code__.co_firstlineno
        self._path = str(cache_dir())

    def get_cache_path(self):
        return self._path

    def get_source_stamp(self):
        return SOURCE_HASH

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != KERNEL_DIR:
            return None
        self = cls(py_func, py_file)
        try:
            self.ensure_cache_path()
        except OSError:  # not writable: Numba's default locators
            return None
        return self


class _CacheImpl(caching.CompileResultCacheImpl):
    _locator_classes = [_Locator, *caching.CompileResultCacheImpl._locator_classes]


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock (one process at a time there)
    fcntl = None


@contextlib.contextmanager
def _locked(directory: str):
    """An exclusive lock on the cache directory. Numba reads and rewrites a function's
    index without one: two processes compiling the same function (fastsce.warmup's
    workers, two programs) could pair one's index entry with the other's code."""
    if fcntl is None:
        yield
        return
    with open(os.path.join(directory, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Cache(caching.FunctionCache):
    _impl_class = _CacheImpl

    def _load_overload(self, sig, target_context):
        try:
            with _locked(self._cache_path):
                return super()._load_overload(sig, target_context)
        except FileNotFoundError:  # the directory was removed: compile
            return None

    def _save_overload(self, sig, data):
        self._impl.locator.ensure_cache_path()
        with _locked(self._cache_path):
            super()._save_overload(sig, data)


DISPATCHERS: list = []  # every kernel and helper compiled here, for compile_count()


def _njit(fn, **options):
    dispatcher = numba.njit(**options)(fn)
    if isinstance(dispatcher, Dispatcher):  # not the plain function of NUMBA_DISABLE_JIT=1
        dispatcher._cache = _Cache(fn)  # what numba.njit(cache=True) does, with our cache
        DISPATCHERS.append(dispatcher)
    return dispatcher


def compile_count() -> int:
    """How many (function, signature) pairs this process has compiled rather than
    loaded from the on-disk cache."""
    return sum(sum(d.stats.cache_misses.values()) for d in DISPATCHERS)


def jit(fn):
    """A serial helper or kernel."""
    return _njit(fn, **OPTIONS)


def vector(fn):
    """A loop helper whose sums and maxima may be reordered into SIMD lanes."""
    return _njit(fn, **{**OPTIONS, "fastmath": set(VECTOR_FASTMATH)})


def parallel(fn):
    """A kernel whose prange loop is spread over Numba's thread pool; ``.serial`` is the
    same code compiled without threads (prange runs as range over the same chunks), for
    small problems and forked children (see fastsce._threads)."""
    kernel = _njit(fn, parallel=True, **OPTIONS)
    # A copy of the function under another name: Numba's disk cache keys entries by the
    # function's name and bytecode, not by parallel=, so the twins would overwrite each other.
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    kernel.serial = _njit(twin, **OPTIONS)
    return kernel


# --- copies ---------------------------------------------------------------------------


def copy_into(dst, src):
    """dst = src for 1-D or 2-D arrays of one shape, element by element. ``dst[...] =
    src`` from an array compiles NumPy's broadcasting and its shape-mismatch message
    (string formatting): 1.5-4 s of a kernel's first compile, for copies whose shapes
    the kernels already guarantee."""
    raise NotImplementedError  # only callable from jitted code


@overload(copy_into)
def _copy_into(dst, src):
    if dst.ndim == 1 and src.ndim == 1:

        def copy_1d(dst, src):
            for j in range(dst.shape[0]):
                dst[j] = src[j]

        return copy_1d
    if dst.ndim == 2 and src.ndim == 2:

        def copy_2d(dst, src):
            for i in range(dst.shape[0]):
                for j in range(dst.shape[1]):
                    dst[i, j] = src[i, j]

        return copy_2d
    return None


# --- reference counts ----------------------------------------------------------------
# Every array view a compiled function makes (T[j], z[i:i + R], unpacking a tuple of
# arrays) increments its owner's reference count and decrements it again: two locked
# instructions. Helpers that Numba does not inline pay them per call;
# measured with perf, they took 25% of the small-K kernel's time. A borrowed view has no
# owner to count: its views cost nothing. The owner must outlive it: borrow arguments
# (the caller holds them) or arrays kept alive by keep_alive() after the last use. In a
# parallel kernel borrow inside the prange body (or pass the borrowed array to a call
# there): an array borrowed outside the loop and written in it lost its writes.


@intrinsic
def borrowed(typingctx, a):
    """a, without its reference (NRT meminfo and parent left null). Never return it, or
    a view of it, to Python: nothing would keep its memory alive there."""
    if not isinstance(a, nb_types.Array):
        return None

    def codegen(context, builder, sig, args):
        view = context.make_array(sig.args[0])(context, builder, value=args[0])
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        view.parent = cgutils.get_null_value(view.parent.type)
        return view._getvalue()

    return a(a), codegen


@intrinsic
def read_only_view(typingctx, a):
    """a typed as read-only (the same array): a helper called with it and with read-only
    logits compiles once, not once per writeability."""
    if not isinstance(a, nb_types.Array):
        return None

    def codegen(context, builder, sig, args):
        return impl_ret_borrowed(context, builder, sig.return_type, args[0])

    return a.copy(readonly=True)(a), codegen


@intrinsic
def keep_alive(typingctx, owners):
    """Nothing; a use of ``owners`` (an array or a tuple of them) here keeps them alive
    until this point, for the borrowed views made of them before it."""

    def codegen(context, builder, sig, args):
        return context.get_dummy_value()

    return nb_types.none(owners), codegen


def borrow_outs(outs):
    """The kernels' five output arrays (row_loss, row_z, lse, chunk_loss, chunk_z),
    borrowed: the caller holds them for the call."""
    raise NotImplementedError  # only callable from jitted code


@overload(borrow_outs)
def _borrow_outs(outs):
    return lambda outs: (borrowed(outs[0]), borrowed(outs[1]), borrowed(outs[2]), borrowed(outs[3]), borrowed(outs[4]))
