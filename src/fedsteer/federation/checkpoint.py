"""Checkpoints of a run's state: safetensors for arrays, JSON for the rest, never pickle.

A round's checkpoint is one unit: every file of it (server state, client state, progress)
goes into a hidden folder, a manifest of their SHA-256 hashes is written last, and the folder
is renamed to `round-NNNN` — the commit. A run killed at any point leaves the previous round's
folder intact, and a resume verifies the newest folder against its manifest before trusting it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from fedsteer.files import atomic_write_bytes, atomic_write_json

SEPARATOR = "/"
MANIFEST = "manifest.json"
ROUND_PREFIX = "round-"
KEEP_ROUNDS = 2  # the newest and the one before it, to fall back on if the newest is damaged


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: the message names the file and what to do."""




def _json_hook(obj: dict) -> Any:
    return base64.b64decode(obj["__bytes__"]) if set(obj) == {"__bytes__"} else obj


def save_recorddict(content: RecordDict, path: Path) -> None:
    """Write `path.safetensors` (arrays) and `path.json` (configs, metrics) atomically."""
    arrays = {
        f"{rec}{SEPARATOR}{name}": np.ascontiguousarray(arr.numpy())
        for rec, record in content.array_records.items()
        for name, arr in record.items()
    }
    atomic_write_bytes(path.with_suffix(".safetensors"), save(arrays))
    atomic_write_json(
        path.with_suffix(".json"),
        {
            "array_records": {k: list(v) for k, v in content.array_records.items()},
            "configs": {k: dict(v) for k, v in content.config_records.items()},
            "metrics": {k: dict(v) for k, v in content.metric_records.items()},
        },
    )


def load_recorddict(path: Path) -> RecordDict:
    """The inverse of `save_recorddict`; a truncated or foreign file is a `CheckpointError`."""
    meta_path, arrays_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    try:
        meta = json.loads(meta_path.read_text(), object_hook=_json_hook)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
    try:
        arrays = load_file(str(arrays_path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{arrays_path}: unreadable ({err})") from None
    content = RecordDict()
    for rec, names in meta["array_records"].items():
        content[rec] = ArrayRecord({n: Array(arrays[f"{rec}{SEPARATOR}{n}"]) for n in names})
    for rec, values in meta["configs"].items():
        content[rec] = ConfigRecord(values)
    for rec, values in meta["metrics"].items():
        content[rec] = MetricRecord(values)
    return content


# ------------------------------------------------------------------ round checkpoints


def round_number(folder: Path) -> int | None:
    """The round count a `round-NNNN` folder's name carries, or None for any other name."""
    digits = folder.name.removeprefix(ROUND_PREFIX)
    return int(digits) if folder.name.startswith(ROUND_PREFIX) and digits.isdigit() else None


def round_dirs(root: Path) -> list[Path]:
    """Committed round folders, oldest first: by their number, since `{:04d}` grows a digit
    past round 9,999 and "round-10000" sorts before "round-9999" as text."""
    folders = [p for p in root.glob(f"{ROUND_PREFIX}[0-9]*")
               if p.is_dir() and round_number(p) is not None]
    return sorted(folders, key=round_number)


def commit_round(root: Path, done: int, write: Callable[[Path], None]) -> Path:
    """Checkpoint the state after `done` rounds as one unit; older folders but one are pruned.

    `write(folder)` puts every file of the round into `folder`; the manifest goes in last and
    the rename is the commit, so no reader ever sees half a round.
    """
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{ROUND_PREFIX}{done:04d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    write(partial)
    files = {p.relative_to(partial).as_posix(): _sha256(p)
             for p in sorted(partial.rglob("*")) if p.is_file()}
    atomic_write_json(partial / MANIFEST, {"rounds_done": done, "files": files})
    final = root / f"{ROUND_PREFIX}{done:04d}"
    if final.exists():  # a replayed round after a resume from an older folder
        shutil.rmtree(final)
    rename_into_place(partial, final)
    for old in round_dirs(root)[:-KEEP_ROUNDS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rename_into_place(source: Path, target: Path) -> None:
    """The commit of a round: one atomic rename, then the folder's entry made durable."""
    os.replace(source, target)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def latest_round(root: Path) -> Path | None:
    """The newest committed round folder, verified file by file against its manifest."""
    committed = round_dirs(root)
    if not committed:
        return None
    newest = committed[-1]
    verify_round(newest, previous=committed[-2] if len(committed) > 1 else None)
    return newest


def verify_round(folder: Path, previous: Path | None = None) -> None:
    fallback = (f"remove {folder} to resume from {previous.name}, the previous complete round"
                if previous else f"remove {folder.parent} to start the run afresh")
    manifest_path = folder / MANIFEST
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err}); {fallback}") from None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint; {fallback}")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: truncated or changed since it was written "
                                  f"(SHA-256 differs from {MANIFEST}); {fallback}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
