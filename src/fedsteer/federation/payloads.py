"""Checks a runtime applies to every client reply before the server may see it.

A reply is rejected (and the round goes on without it) when it is not a `RecordDict`, when
an array does not decode, holds anything but real floating-point numbers, has the wrong
shape (checked before it is decoded), holds NaN/Inf, when a metric is NaN/Inf, or when the
update's global L2 norm exceeds the bound: one broken or hostile client must not poison an
average, nor fail the run. Its self-reported example count (its weight) is checked too.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import RecordDict

#: what a reply's arrays may hold: real floating-point numbers of a width a checkpoint
#: stores. Not integers or bools (a running mean keeps the first reply's dtype, and a float
#: added into an integer sum fails), complex (squaring it into float64 for the norm raised
#: and failed the run), nor strings, bytes, objects, dates or structures.
REPLY_DTYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))
#: the most examples a reply may claim: past 2**53 a float64 no longer counts them one by
#: one, and no party holds that many rows
MAX_EXAMPLES = 2**53


class InvalidReply(ValueError):
    """Why a reply was rejected; the runtime logs it and records it in the round's costs."""


def example_count(value: object) -> int:
    """A reply's self-reported example count as its aggregation weight: a whole number from 1
    to `MAX_EXAMPLES`, else `InvalidReply`. A cap only bounds a weight from above; one below
    1 would shift the weighted mean by the others' total times its update (minus the total:
    a division by zero), so it is refused, as a bool, NaN, Inf or a fraction is."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidReply(f"num-examples {value!r} is not a number")
    if isinstance(value, float | np.floating) and not (math.isfinite(value)
                                                       and float(value).is_integer()):
        raise InvalidReply(f"num-examples {value!r} is not a whole number")
    if value < 1:
        raise InvalidReply(f"num-examples {value!r} is below 1: a weight is at least one example")
    if value > MAX_EXAMPLES:
        raise InvalidReply(f"num-examples {value!r} is above 2**53, more than any party holds")
    return int(value)


def reply_arrays(content: RecordDict) -> dict[str, np.ndarray]:
    """`"record.array" -> ndarray` for every array in a RecordDict; `InvalidReply` for one
    whose bytes do not decode (a client's bytes: whatever `np.load` makes of them)."""
    arrays = {}
    for rec_name, record in content.array_records.items():
        for arr_name, array in record.items():
            key = f"{rec_name}.{arr_name}"
            try:
                arrays[key] = array.numpy()
            except Exception as error:  # untrusted bytes: any failure is a malformed reply
                raise InvalidReply(f"array {key!r} does not decode: {error}") from None
    return arrays


def declared_shapes(content: RecordDict) -> dict[str, tuple[int, ...]]:
    """The shape each array says it has, read without decoding a byte of it."""
    return {f"{rec_name}.{arr_name}": tuple(array.shape)
            for rec_name, record in content.array_records.items()
            for arr_name, array in record.items()}


def check_reply(
    content: object,
    expected_shapes: dict[str, tuple[int, ...]] | None = None,
    max_norm: float | None = None,
) -> None:
    """Raise `InvalidReply` naming the first problem found."""
    if not isinstance(content, RecordDict):
        raise InvalidReply(f"reply is a {type(content).__name__}, not a RecordDict")
    if expected_shapes is not None:  # an oversized array is refused before it is decoded
        _check_shapes(declared_shapes(content), expected_shapes)
    arrays = reply_arrays(content)
    if expected_shapes is not None:  # and the bytes must hold what the array declared
        _check_shapes({key: value.shape for key, value in arrays.items()}, expected_shapes)
    squared = 0.0
    for key, value in arrays.items():
        if value.dtype not in REPLY_DTYPES:
            raise InvalidReply(f"array {key!r} holds {value.dtype}, not float16/32/64")
        if not np.all(np.isfinite(value)):
            raise InvalidReply(f"array {key!r} holds NaN or Inf")
        squared += float(np.sum(np.square(value, dtype=np.float64)))
    _check_metrics(content)
    norm = math.sqrt(squared)
    if max_norm is not None and norm > max_norm:
        raise InvalidReply(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")


def _check_metrics(content: RecordDict) -> None:
    """A metric a server averages or records (a loss, a score) must be a finite number."""
    for rec_name, record in content.metric_records.items():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float | np.floating) and not math.isfinite(v) for v in values):
                raise InvalidReply(f"metric '{rec_name}.{key}' holds NaN or Inf")


def _check_shapes(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise InvalidReply(f"arrays differ from those expected: missing {missing}, extra {extra}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != tuple(shape):
            raise InvalidReply(
                f"array {key!r} has shape {tuple(shapes[key])}, expected {tuple(shape)}"
            )
