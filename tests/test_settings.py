"""Where data is read from: a user's copy if named, else the copy inside the package — never
the working directory or whatever happens to sit beside the checkout."""

from __future__ import annotations

import json
from pathlib import Path

from fedsteer import settings
from fedsteer.data import builtin_task_names, load_task


def test_env_var_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.DATA_DIR_ENV, str(tmp_path))
    assert settings.data_dir() == tmp_path


def test_without_env_the_package_copy_is_used_from_any_cwd(monkeypatch, tmp_path):
    decoy = tmp_path / "work" / "../shared/data/sst2"  # what the old lookup would have found
    decoy.mkdir(parents=True)
    (decoy / "meta.json").write_text(json.dumps({"name": "sst2", "labels": ["x", "y"]}))
    (tmp_path / "work").mkdir(exist_ok=True)
    monkeypatch.delenv(settings.DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path / "work")
    found = settings.data_dir()
    assert found == settings.BUILTIN_DATA_DIR
    assert Path(settings.__file__).parent in found.parents  # inside the installed package
    assert load_task("sst2").spec.labels == ("negative", "positive")


def test_every_builtin_task_ships_compressed_with_its_meta():
    for name in builtin_task_names():
        folder = settings.BUILTIN_DATA_DIR / name
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["source"], name
        for split in meta["splits"]:
            assert (folder / f"{split}.jsonl.gz").is_file(), (name, split)


def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert settings.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
