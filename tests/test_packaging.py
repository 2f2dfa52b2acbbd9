"""A clone or a wheel is all a user needs: the built-in tasks travel inside the package, and
the CLI works from any folder with nothing set in the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from fedsteer import settings
from fedsteer.data import builtin_task_names

REPO = Path(__file__).resolve().parents[1]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user who set nothing of ours (the model cache stays shared)."""
    env = {k: v for k, v in os.environ.items() if k != settings.DATA_DIR_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    env["COLUMNS"] = "200"
    return env


def _fedsteer(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsteer", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_runs_from_an_empty_folder_with_no_data_dir_set(tmp_path):
    env = _clean_env(tmp_path)
    listed = _fedsteer(["tasks"], tmp_path, env)
    assert listed.returncode == 0, listed.stderr
    for name in builtin_task_names():
        assert name in listed.stdout
    assert "5452" in listed.stdout and "500" in listed.stdout  # trec's train/test sizes
    out = tmp_path / "X"
    ran = _fedsteer(["run", "zero-shot", "--task", "trec", "--model", "tiny-random",
                     "--test-size", "20", "--out", str(out)], tmp_path, env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["task"] == "trec" and record["metrics"]["num_test"] == 20


def test_a_missing_user_data_dir_is_one_clear_line(tmp_path):
    env = _clean_env(tmp_path) | {settings.DATA_DIR_ENV: str(tmp_path / "nowhere")}
    listed = _fedsteer(["tasks"], tmp_path, env)
    assert listed.returncode == 2
    assert str(tmp_path / "nowhere" / "sst2") in listed.stdout.replace("\n", "")
    assert "Traceback" not in listed.stdout + listed.stderr


def test_the_wheel_carries_every_builtin_task(tmp_path):
    """Builds the wheel as `pip wheel .` would and reads its file list."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("fedsteer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for task in builtin_task_names():
        meta = json.loads((settings.BUILTIN_DATA_DIR / task / "meta.json").read_text())
        assert f"fedsteer/data/builtin/{task}/meta.json" in names
        for split in meta["splits"]:
            assert f"fedsteer/data/builtin/{task}/{split}.jsonl.gz" in names
