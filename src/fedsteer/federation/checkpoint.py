"""Checkpoints of a run's state: safetensors for arrays, JSON for the rest, never pickle.

Every file is written to a temporary name and renamed into place, so a run killed
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.numpy import load_file, save_file

SEPARATOR = "/"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _json_hook(obj: dict) -> Any:
    return base64.b64decode(obj["__bytes__"]) if set(obj) == {"__bytes__"} else obj


def save_recorddict(content: RecordDict, path: Path) -> None:
    """Write `path.safetensors` (arrays) and `path.json` (configs, metrics) atomically."""
    arrays = {
        f"{rec}{SEPARATOR}{name}": np.ascontiguousarray(arr.numpy())
        for rec, record in content.array_records.items()
        for name, arr in record.items()
    }
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(tmp))
    os.replace(tmp, path.with_suffix(".safetensors"))
    atomic_write_json(
        path.with_suffix(".json"),
        {
            "array_records": {k: list(v) for k, v in content.array_records.items()},
            "configs": {k: dict(v) for k, v in content.config_records.items()},
            "metrics": {k: dict(v) for k, v in content.metric_records.items()},
        },
    )


def load_recorddict(path: Path) -> RecordDict:
    meta = json.loads(path.with_suffix(".json").read_text(), object_hook=_json_hook)
    arrays = load_file(str(path.with_suffix(".safetensors")))
    content = RecordDict()
    for rec, names in meta["array_records"].items():
        content[rec] = ArrayRecord({n: Array(arrays[f"{rec}{SEPARATOR}{n}"]) for n in names})
    for rec, values in meta["configs"].items():
        content[rec] = ConfigRecord(values)
    for rec, values in meta["metrics"].items():
        content[rec] = MetricRecord(values)
    return content
