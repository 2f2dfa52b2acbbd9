"""Where fedsteer reads data and caches models; one place so tests can redirect both."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

DATA_DIR_ENV = "FEDSTEER_DATA_DIR"
CACHE_DIR_ENV = "FEDSTEER_CACHE_DIR"


def data_dir() -> Path:
    """The built-in tasks' directory: `$FEDSTEER_DATA_DIR`, else `../shared/data` if present."""
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env)
    repo = Path(__file__).parents[2]  # src/fedsteer/settings.py -> the checkout
    for candidate in (Path.cwd() / "../shared/data", repo / "../shared/data"):
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"No task data found: set {DATA_DIR_ENV} to a folder holding <task>/train.jsonl, "
        "or run from a checkout with ../shared/data beside it."
    )


def cache_dir() -> Path:
    """Dequantized model weights live here (`$FEDSTEER_CACHE_DIR`, else the user cache dir)."""
    path = Path(os.environ.get(CACHE_DIR_ENV) or user_cache_dir("fedsteer"))
    path.mkdir(parents=True, exist_ok=True)
    return path
