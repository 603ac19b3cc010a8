"""Type aliases of the public signatures."""

from __future__ import annotations

from typing import Any, Callable, TypeVar, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

__all__ = ["Array", "ArrayLike", "DTypeLike", "Loss", "same_signature"]

Array = NDArray[Any]
# A NumPy scalar for reduction "mean" / "sum", an array of per-row losses for "none".
Loss = Union[np.floating[Any], NDArray[np.floating[Any]]]

F = TypeVar("F", bound=Callable[..., Any])


def same_signature(model: F) -> Callable[[Callable[..., Any]], F]:
    """Give a function the static type of ``model`` (a function taking the same
    arguments), e.g. the reference's ``**options`` the API's keywords. No effect at run
    time; the model may be None there."""
    return lambda fn: fn  # type: ignore[return-value]
