"""All Numba compile options live here, so every kernel is built the same way."""

import types

import numba

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
OPTIONS = dict(cache=True, nogil=True, fastmath=set(FASTMATH), error_model="numpy")


def jit(fn):
    """A serial helper or kernel."""
    return numba.njit(**OPTIONS)(fn)


def vector(fn):
    """A loop helper whose sums and maxima may be reordered into SIMD lanes."""
    return numba.njit(**{**OPTIONS, "fastmath": set(VECTOR_FASTMATH)})(fn)


def parallel(fn):
    """A kernel whose prange loop is spread over Numba's thread pool; ``.serial`` is the
    same code compiled without threads (prange runs as range over the same chunks), for
    small problems and forked children (see fastsce._threads)."""
    kernel = numba.njit(parallel=True, **OPTIONS)(fn)
    # A copy of the function under another name: Numba's disk cache keys entries by the
    # function's name and bytecode, not by parallel=, so the twins would overwrite each other.
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    kernel.serial = numba.njit(**OPTIONS)(twin)
    return kernel
