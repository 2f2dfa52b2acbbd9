"""The data directory is found from the checkout, whatever the working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsteer import settings


def test_env_var_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.DATA_DIR_ENV, str(tmp_path))
    assert settings.data_dir() == tmp_path


def test_shared_data_beside_the_checkout_is_found_from_any_cwd(monkeypatch, tmp_path):
    beside = Path(settings.__file__).parents[2] / "../shared/data"
    if not beside.is_dir():
        pytest.skip("no ../shared/data beside this checkout")
    monkeypatch.delenv(settings.DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert settings.data_dir() == beside.resolve()


def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert settings.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
