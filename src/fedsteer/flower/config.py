"""A run's settings as Flower's flat run config, and back: how `flwr run` configures fedsteer."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsteer.data import Task, load_task
from fedsteer.experiment import RunConfig

#: Run-config keys beside RunConfig's own fields.
EXTRA_KEYS = {"out-dir": "", "save-dir": "", "data-dir": "", "round-timeout": 3600.0,
              "node-wait": 120.0, "hand-back": False, "hand-back-artifacts": False}


DICT_FIELDS = {f.name for f in dataclasses.fields(RunConfig) if f.type.startswith("dict")}


def to_run_config(config: RunConfig, **extras: Any) -> dict[str, Any]:
    """A flat TOML-able mapping (Flower run config): None becomes "", dicts become JSON."""
    values: dict[str, Any] = {}
    for name, value in dataclasses.asdict(config).items():
        key = name.replace("_", "-")
        values[key] = json.dumps(value) if isinstance(value, dict) else (
            "" if value is None else value)
    for key, default in EXTRA_KEYS.items():
        value = extras.get(key.replace("-", "_"), default)
        values[key] = "" if value is None else (str(value) if isinstance(value, Path) else value)
    return values


@dataclass
class FlowerRun:
    """What the apps read back from the run config."""

    config: RunConfig
    out_dir: str = ""
    save_dir: str = ""
    data_dir: str = ""
    round_timeout: float = 3600.0
    node_wait: float = 120.0
    #: a federation: the ServerApp runs on the coordinator and prints its result folder
    #: for the submitter (`fedsteer.flower.handback`), artifacts too if asked
    hand_back: bool = False
    hand_back_artifacts: bool = False


def from_run_config(values: dict[str, Any]) -> FlowerRun:
    config_args: dict[str, Any] = {}
    for field in dataclasses.fields(RunConfig):
        key = field.name.replace("_", "-")
        if key not in values:
            continue  # the RunConfig default
        raw = values[key]
        if field.name in DICT_FIELDS:
            config_args[field.name] = json.loads(raw) if raw else {}
        else:
            config_args[field.name] = None if raw == "" else raw
    extras = {key.replace("-", "_"): values.get(key, default)
              for key, default in EXTRA_KEYS.items()}
    return FlowerRun(config=RunConfig(**config_args), **extras)


def load_run_task(name: str, data_dir: str) -> Task:
    """The run's task, from the data directory the launcher passed (absolute), if any."""
    return load_task(name, Path(data_dir) if data_dir else None)
