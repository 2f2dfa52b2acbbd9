"""Where fedsteer reads data and caches models; one place so tests can redirect both."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

DATA_DIR_ENV = "FEDSTEER_DATA_DIR"
CACHE_DIR_ENV = "FEDSTEER_CACHE_DIR"


BUILTIN_DATA_DIR = Path(__file__).parent / "data" / "builtin"


def data_dir() -> Path:
    """Where built-in task names are looked up: `$FEDSTEER_DATA_DIR` (a user's own copy,
    e.g. the full splits) if set, else the copy shipped inside the package.

    Never relative to the working directory or the checkout: a run means the same thing
    wherever it is started from.
    """
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env).expanduser()
    return BUILTIN_DATA_DIR


def cache_dir() -> Path:
    """Dequantized model weights live here (`$FEDSTEER_CACHE_DIR`, else the user cache dir)."""
    path = Path(os.environ.get(CACHE_DIR_ENV) or user_cache_dir("fedsteer"))
    path.mkdir(parents=True, exist_ok=True)
    return path
