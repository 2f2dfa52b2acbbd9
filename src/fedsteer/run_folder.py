"""A run folder belongs to one run: checked writable before any work, locked while a run
writes it, refused when it already holds another run's records, and read back only when its
records agree with each other (issue 44).

Two runs writing one folder leave result.json from one and run.json from the other; a
folder reused without `--resume` keeps the old rows and old round checkpoints. Each of
these is an error the user sees at once, by name, not a mixed table later.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedsteer.eval.record import RESULT_FILE
from fedsteer.experiment import EXECUTION_CHOICES, RunConfig
from fedsteer.methods import METHODS

RUN_CONFIG_FILE = "run.json"
LOCK_FILE = ".fedsteer.lock"
#: what a run writes into its folder (and, per method, into a subfolder): all `--force` clears
RUN_RECORDS = (RUN_CONFIG_FILE, RESULT_FILE, "checkpoint", "comparison.png", "task.yaml")
#: what makes a folder another run's: a result or a round. A run that stopped on a user error
#: before either left only its settings, which the retry overwrites (no --force needed)
RUN_OUTPUTS = (RESULT_FILE, "checkpoint")


class RunFolderError(ValueError):
    """A folder a run cannot use as it stands; the message names it and what to do."""


def check_writable_folder(path: Path, flag: str) -> None:
    """Refuse, before any work, a `flag` path that cannot become a writable folder: a file,
    a path under a file, or a folder this user cannot write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{flag} {path}: a file is there, not a folder; "
                             f"give {flag} a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RunFolderError(f"{flag} {path}: {existing} is a file, so no folder can be made "
                             f"under it; give {flag} another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"{flag} {path}: {existing} is not writable by this user")


@contextmanager
def run_folder_lock(folder: Path) -> Iterator[int | None]:
    """Hold `folder` for this process while a run writes it; yields the PID of a run that
    held it and died without letting go (its lock is taken over), else None.

    An OS lock (flock) on the lock file decides; the PID written in it names the holder.
    The kernel drops the lock when its process dies, so a stale file never blocks.
    """
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _pid_in(path)
        handle.close()
        raise RunFolderError(
            f"{folder} is in use by another run (PID {holder}); wait for it to finish, or "
            "give this run another --out") from None
    stale = _pid_in(path)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield stale
    finally:
        path.unlink(missing_ok=True)
        handle.close()  # closing drops the flock
        if created and not any(folder.iterdir()):
            folder.rmdir()  # refused before it wrote anything: leave no empty folder behind


def _pid_in(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def run_records(folder: Path) -> list[Path]:
    """The records of an earlier run in `folder` (its own and its methods' subfolders'; a
    folder not named after a method is the user's, never touched)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    places = [folder, *(folder / name for name in METHODS if (folder / name).is_dir())]
    return [place / name for place in places for name in RUN_RECORDS
            if (place / name).exists()]


def claim_fresh_folder(folder: Path, force: bool) -> None:
    """A new run starts in a folder without another run's records: refused, or with
    `force` those records (and nothing else) removed."""
    found = run_records(folder)
    if not any(path.name in RUN_OUTPUTS for path in found):
        return
    if not force:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:4])
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        raise RunFolderError(
            f"--out {folder} already holds a run ({names}{more}); continue it with "
            f"--resume {folder}, give another --out, or add --force to clear it")
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def disagreements(folder: Path) -> list[str]:
    """Where the folder's records contradict each other: a result.json whose method or
    settings are not the ones run.json records (two runs wrote the folder)."""
    folder = Path(folder)
    recorded = _recorded_configs(folder)
    if recorded is None:
        return []
    found = []
    for path in sorted(folder.rglob(RESULT_FILE)):
        try:
            config = json.loads(path.read_text()).get("config") or {}
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable record is reported by whoever reads it
        problem = _disagreement(config, recorded)
        if problem:
            found.append(f"{path} {problem} ({folder / RUN_CONFIG_FILE})")
    return found


def _recorded_configs(folder: Path) -> dict[str, dict[str, Any]] | None:
    try:
        configs = json.loads((folder / RUN_CONFIG_FILE).read_text())
        return {c["method"]: c for c in configs}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _disagreement(config: dict[str, Any], recorded: dict[str, dict[str, Any]]) -> str | None:
    method = config.get("method")
    if method not in recorded:
        return f"is a {method!r} run, but run.json records {sorted(recorded)}"
    for field in dataclasses.fields(RunConfig):
        name = field.name
        if name in EXECUTION_CHOICES or name not in config:
            continue
        if config[name] != recorded[method].get(name):
            return (f"says {name} {config[name]!r}, but run.json says "
                    f"{recorded[method].get(name)!r}")
    return None
