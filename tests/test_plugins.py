"""Methods from other packages: found through the `fedsteer.methods` entry points (issue 19)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from fedsteer import methods as registry
from fedsteer.methods import MethodRegistry, describe_options
from test_federation_flower import flower_identity, serve_inline  # noqa: F401 - a fixture

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_method"


def _install_metadata(root: Path, dist: str, entries: dict[str, str]) -> None:
    """What `pip install` leaves for entry points: a dist-info folder on sys.path."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[fedsteer.methods]\n{lines}")


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry that loads the entry points anew (and is dropped after the test)."""
    len(registry.METHODS)  # the real registry loads now, before a test adds to sys.path
    fresh = MethodRegistry()
    monkeypatch.setattr(registry, "METHODS", fresh)
    return fresh


def test_the_example_package_adds_a_method_through_its_entry_point(tmp_path, monkeypatch,
                                                                   fresh_registry):
    from fedsteer.experiment import RunConfig, run_experiment

    _install_metadata(tmp_path / "site", "fedsteer-my-method",
                      {"my-method": "my_method:VectorAveraging"})
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert "my-method" in fresh_registry
    assert fresh_registry.origin("my-method") == "fedsteer-my-method"
    assert fresh_registry.origin("ifed-icl") == "fedsteer"
    names = [o["name"] for o in describe_options("my-method")]
    assert names == ["demos_per_class", "strength", "seed"]
    assert describe_options("my-method")[1]["help"].startswith("how strongly")
    record = run_experiment(RunConfig("my-method", "sst2", "tiny-random", clients=3,
                                      test_size=20, options={"demos_per_class": 1}),
                            tmp_path / "run")
    assert record["method"] == "my-method" and record["costs"]["rounds"][0]["rejected"] == []
    sys.modules.pop("my_method", None)


@pytest.mark.usefixtures("flower_identity")
def test_the_example_method_runs_on_the_flower_apps_unchanged(tmp_path, monkeypatch,
                                                               fresh_registry):
    """The ServerApp and ClientApp find the plugin by name as the CLI does: the same result
    as in process."""
    from fedsteer.experiment import RunConfig, run_experiment

    _install_metadata(tmp_path / "site", "fedsteer-my-method",
                      {"my-method": "my_method:VectorAveraging"})
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    config = RunConfig("my-method", "sst2", "tiny-random", clients=3, test_size=20,
                       options={"demos_per_class": 1})
    expected = run_experiment(config, tmp_path / "inprocess")
    record, _ = serve_inline(config, tmp_path / "flower")
    assert record["method"] == "my-method"
    assert record["metrics"] == expected["metrics"]
    sys.modules.pop("my_method", None)


def test_a_broken_or_clashing_plugin_is_left_out_with_a_warning(tmp_path, monkeypatch, caplog,
                                                               fresh_registry):
    (tmp_path / "bad_plugins.py").write_text(
        "from fedsteer.methods.icl import ZeroShot\n"
        "class NotAMethod: name = 'not-a-method'\n"
        "class Renamed(ZeroShot): name = 'renamed'\n"
        "raise_me = None\n")
    _install_metadata(tmp_path, "bad-plugins", {
        "not-a-method": "bad_plugins:NotAMethod",
        "misnamed": "bad_plugins:Renamed",
        "zero-shot": "bad_plugins:Renamed",
        "missing": "bad_plugins:Nowhere",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        names = set(fresh_registry)
    assert names == {cls.name for cls in registry.BUILTIN}  # only the built-ins
    text = caplog.text
    assert "not a subclass of fedsteer.methods.Method or AsyncMethod" in text
    assert "Renamed.name is 'renamed', the entry point 'misnamed'" in text
    assert "'zero-shot' is taken by" in text
    assert "'missing' from bad-plugins failed to load" in text
    sys.modules.pop("bad_plugins", None)


def test_every_built_in_method_is_declared_as_an_entry_point():
    import tomllib

    pyproject = tomllib.loads((EXAMPLE.parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["fedsteer.methods"]
    assert set(declared) == {cls.name for cls in registry.BUILTIN}
    for name, target in declared.items():
        module, attr = target.split(":")
        assert getattr(__import__(module, fromlist=[attr]), attr).name == name
