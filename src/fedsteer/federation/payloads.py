"""Checks a runtime applies to every client reply before the server may see it.

A reply is rejected (and the round goes on without it) when it is not a `RecordDict`, when
an array has the wrong shape, holds NaN/Inf, or when the update's global L2 norm exceeds
the bound: one broken or hostile client must not poison an average.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import RecordDict


class InvalidReply(ValueError):
    """Why a reply was rejected; the runtime logs it and records it in the round's costs."""


def reply_arrays(content: RecordDict) -> dict[str, np.ndarray]:
    """`"record.array" -> ndarray` for every array in a RecordDict."""
    return {
        f"{rec_name}.{arr_name}": array.numpy()
        for rec_name, record in content.array_records.items()
        for arr_name, array in record.items()
    }


def check_reply(
    content: object,
    expected_shapes: dict[str, tuple[int, ...]] | None = None,
    max_norm: float | None = None,
) -> None:
    """Raise `InvalidReply` naming the first problem found."""
    if not isinstance(content, RecordDict):
        raise InvalidReply(f"reply is a {type(content).__name__}, not a RecordDict")
    arrays = reply_arrays(content)
    if expected_shapes is not None:
        _check_shapes(arrays, expected_shapes)
    squared = 0.0
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.number):
            continue
        if not np.all(np.isfinite(value)):
            raise InvalidReply(f"array {key!r} holds NaN or Inf")
        squared += float(np.sum(np.square(value, dtype=np.float64)))
    norm = math.sqrt(squared)
    if max_norm is not None and norm > max_norm:
        raise InvalidReply(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")


def _check_shapes(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise InvalidReply(f"arrays differ from those expected: missing {missing}, extra {extra}")
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != tuple(shape):
            raise InvalidReply(
                f"array {key!r} has shape {tuple(arrays[key].shape)}, expected {tuple(shape)}"
            )
