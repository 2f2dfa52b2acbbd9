"""The wire format of every method's arrays: float32, C-contiguous, in Flower records.

One place decides it, so replies from any method count their bytes, checkpoint and pass the
runtime's checks the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["float32", "float32_array", "float32_record"]


def float32(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """A tensor or array as a contiguous float32 array (detached, on the CPU)."""
    if torch.is_tensor(value):
        value = value.detach().cpu().float().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def float32_array(value: np.ndarray | torch.Tensor) -> Array:
    return Array(float32(value))


def float32_record(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: float32_array(value) for name, value in arrays.items()})
