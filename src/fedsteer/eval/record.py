"""The result record (`result.json`): the public contract between runs, bench and report.

Top-level keys: `method`, `task`, `model`, `config` (everything needed to rerun),
`metrics` (`accuracy`, `macro_f1`, per-client where it applies), `costs` (`bytes_up`,
`bytes_down`, `client_seconds`, `server_seconds`, `peak_rss_bytes`, `rounds`), `env`, and
`privacy` (null, or `epsilon`, `delta`, `clip`, `noise_multiplier` of a client-level DP run).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from fedsteer import __version__
from fedsteer.files import atomic_write_json

RESULT_FILE = "result.json"
REQUIRED_KEYS = ("method", "task", "model", "config", "metrics", "costs", "env")
_PACKAGES = ("torch", "transformers", "peft", "flwr", "numpy")


def environment() -> dict[str, Any]:
    """Versions and machine facts, so a number can be traced to where it was measured."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "fedsteer": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "packages": versions,
    }


def write_result(record: dict[str, Any], out_dir: Path) -> Path:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"result record lacks {missing}")
    path = out_dir / RESULT_FILE
    atomic_write_json(path, record)
    return path


def read_result(path: Path) -> dict[str, Any]:
    path = path / RESULT_FILE if path.is_dir() else path
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err}); rerun the run that wrote it"
                         ) from None
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"{path}: not a fedsteer result record (lacks {missing})")
    return record


#: beside a saved artifact: which run made it and how it scored (`fedsteer serve` shows it)
PROVENANCE_FILE = "provenance.json"
#: a run's costs that add up over a pipeline of runs (a stack trained stage by stage)
PIPELINE_KEYS = ("bytes_up", "bytes_down", "client_seconds", "client_compute_seconds",
                 "client_wait_seconds", "server_seconds")


def write_provenance(directory: Path, record: dict[str, Any],
                     labels: Sequence[str] = ()) -> None:
    """`labels`: the task's, so an artifact is not scored on another task's by mistake;
    `stack`: the artifacts it was trained on top of (each one's path, kind, digest and
    provenance), so it is known to belong after them; `costs`: the run's own totals, so a
    run on top of it can add up the whole pipeline's."""
    metrics = record["metrics"]
    atomic_write_json(Path(directory) / PROVENANCE_FILE, {
        "method": record["method"], "task": record["task"], "model": record["model"],
        **({"labels": list(labels)} if labels else {}),
        **({"stack": record["stack"]} if record.get("stack") else {}),
        "costs": {k: v for k, v in record["costs"].items() if k in PIPELINE_KEYS},
        **{k: metrics[k] for k in ("accuracy", "accuracy_ci95", "test_rows") if k in metrics}})
