"""`fedsteer bench` grids (expansion, resume) and `fedsteer report` (tables, plots)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedsteer.bench import BenchConfig, StaleCell, expand, run_grid
from fedsteer.eval.summary import (
    Row,
    alpha_lines,
    collect,
    pareto_front,
    point_labels,
    summarize,
    write_report,
)

TINY_IFED = {"rounds": 1, "local_epochs": 1, "demos_per_class": 1, "calibration_per_class": 1}


def write_grid(tmp_path: Path, **overrides) -> Path:
    grid = {"name": "t", "out": "cells", "models": ["tiny-random"], "tasks": ["sst2"],
            "methods": ["zero-shot", "ifed-icl"], "seeds": [0, 1], "alphas": [0.5, "iid"],
            "clients": [3], "test_size": 8, "options": {"ifed-icl": TINY_IFED}, **overrides}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_the_grid_expands_every_cell_once(tmp_path):
    bench = BenchConfig.load(write_grid(tmp_path))
    cells = expand(bench)
    # zero-shot once; ifed-icl for 2 skews x 2 seeds
    assert len(cells) == 1 + 4
    names = {c.path.relative_to(bench.out).as_posix() for c in cells}
    assert "tiny-random/sst2/ifed-icl/iid-clients3-seed1" in names
    assert "tiny-random/sst2/ifed-icl/alpha0.5-clients3-seed0" in names
    ifed = [c for c in cells if c.config.method == "ifed-icl"]
    assert all(c.config.options == TINY_IFED and c.config.test_size == 8 for c in ifed)
    assert bench.out == tmp_path / "cells"  # relative to the config file


def test_a_method_may_run_on_a_model_of_its_own(tmp_path):
    bench = BenchConfig.load(write_grid(tmp_path, seeds=[0], alphas=[0.5], run={
        "ifed-icl": {"model": "tiny-other", "clients": 5}}))
    cells = {c.config.method: c.config for c in expand(bench)}
    assert cells["zero-shot"].model == "tiny-random"
    assert (cells["ifed-icl"].model, cells["ifed-icl"].clients) == ("tiny-other", 5)
    paths = {c.config.method: c.path.relative_to(bench.out).parts[0] for c in expand(bench)}
    assert paths["ifed-icl"] == "tiny-other"  # cells live under the model they ran


@pytest.mark.parametrize("change, message", [
    ({"methods": ["zero-shot", "nope"]}, "unknown method"),
    ({"colour": "red"}, "unknown key"),
    ({"run": {"ifed-icl": {"modle": "x"}}}, r"run.ifed-icl: unknown RunConfig field"),
    ({"options": {"ifed-icl": {"local_epoch": 2}}}, "local_epoch"),
    ({"tasks": []}, "'tasks' must list"),
    ({"options": {"fedpt": {"rounds": 1}}}, r"options: \['fedpt'\] not in this grid"),
    ({"run": {"bdpl": {"clients": 1}}}, r"run: \['bdpl'\] not in this grid"),
])
def test_a_bad_grid_is_refused_with_the_reason(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig.load(write_grid(tmp_path, **change))


def test_a_finished_grid_runs_nothing_again_and_reports(tmp_path):
    rounds = {**TINY_IFED, "rounds": 2}
    bench = BenchConfig.load(write_grid(tmp_path, alphas=[0.5], seeds=[0, 1],
                                        run={"ifed-icl": {"eval_every": 1}},
                                        options={"ifed-icl": rounds}))
    ran = []
    records = run_grid(bench, on_cell=lambda cell, record: ran.append(cell.path))
    assert len(ran) == len(records) == 3
    ran.clear()
    run_grid(bench, on_cell=lambda cell, record: ran.append(cell.path))
    assert ran == []  # resumed: every cell was already done
    rows = summarize(collect(bench.out))
    ifed = [r for r in rows if r.method == "ifed-icl"]
    assert len(ifed) == 1 and ifed[0].seeds == 2
    assert len(ifed[0].round_accuracy) == 3  # the vectors' round, then 2 calibration rounds
    for record in (r for r in records if r["method"] == "ifed-icl"):  # not evaluated twice
        assert record["metrics"]["accuracy"] == record["costs"]["rounds"][-1]["accuracy"]
    md, page = write_report(bench.out, title="tiny")
    text = md.read_text()
    assert "## sst2" in text and "ifed-icl" in text and "zero-shot" in text
    assert "| 95 % CI | vs zero-shot |" in text  # intervals and the paired test in the report
    assert "<table>" in page.read_text()
    pngs = sorted(bench.out.glob("*.png"))
    assert pngs and all(p.stat().st_size > 5000 for p in pngs)
    assert (bench.out / "sst2-accuracy-per-round.png") in pngs
    assert "Published numbers" in text  # I2CL reports sst2 ...
    assert "Published numbers" in page.read_text()  # ... in both reports


def test_the_pareto_front_keeps_only_undominated_points():
    points = [(10, 80), (100, 85), (50, 70), (1000, 85), (5, 60)]
    assert pareto_front(points) == [4, 0, 1]


def test_report_refuses_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result.json"):
        write_report(tmp_path)


@pytest.mark.parametrize("name", ["quick.yaml", "default.yaml"])
def test_the_shipped_grids_load_and_expand(name):
    """`make demo` and the README's table run these: a typo must fail here, not an hour in."""
    bench = BenchConfig.load(Path(__file__).parents[1] / "benchmarks" / name)
    cells = expand(bench)
    assert {c.config.method for c in cells} == set(bench.methods)


def test_the_demo_grid_is_recorded_as_it_is_written_and_shows_where_steering_pays():
    """`make demo` must show the point: its recorded run (every cell of quick.yaml, with the
    settings the file asks for) ends with a line naming methods that beat zero-shot by the
    paired test. Editing quick.yaml without re-recording it fails here."""
    from fedsteer.bench import check_finished
    from fedsteer.eval.record import read_result
    from fedsteer.eval.report import takeaways

    bench = BenchConfig.load(Path(__file__).parents[1] / "benchmarks" / "quick.yaml")
    cells = expand(bench)
    assert all(c.done for c in cells), [str(c.path) for c in cells if not c.done]
    check_finished(cells)
    first, *_ = takeaways([read_result(c.path) for c in cells])
    assert first.startswith("Steering helped (") and "ifed-icl" in first


def _row(model: str, method: str, skew: str, accuracy: float, clients: int = 10) -> Row:
    return Row(model, "sst2", method, skew, clients, 1, accuracy, 0.0, accuracy, 0, 0, 0, 0,
               0, None, [], [])


def test_accuracy_vs_alpha_keeps_models_apart_and_orders_skew_from_strongest():
    rows = [_row("big", "ifed-icl", "iid", 0.82), _row("big", "ifed-icl", "α=0.5", 0.81),
            _row("big", "ifed-icl", "α=10", 0.80), _row("big", "ifed-icl", "α=0.1", 0.75),
            _row("small", "ifed-icl", "α=0.5", 0.60)]
    lines = alpha_lines(rows)
    assert lines["ifed-icl, 10 cl. (big)"] == [("α=0.1", 75.0), ("α=0.5", 81.0),
                                              ("α=10", 80.0), ("iid", 82.0)]
    assert "ifed-icl, 10 cl. (small)" not in lines  # one skew: nothing to say about α


def test_plot_labels_name_only_what_tells_a_method_s_points_apart():
    rows = [_row("big", "ifed-icl", "α=0.5", 0.8), _row("big", "ifed-icl", "α=0.5", 0.8, 30),
            _row("big", "zero-shot", "α=0.5", 0.7, 1), _row("small", "zero-shot", "α=0.5", 0.6, 1)]
    assert point_labels(rows) == ["ifed-icl (10 cl.)", "ifed-icl (30 cl.)",
                                  "zero-shot (big)", "zero-shot (small)"]


def test_a_finished_cell_run_with_other_settings_is_refused_not_reused(tmp_path):
    only_zero_shot = {"methods": ["zero-shot"], "options": {}}
    run_grid(BenchConfig.load(write_grid(tmp_path, **only_zero_shot)))
    result = next((tmp_path / "cells").rglob("result.json"))
    before = result.read_text()
    edited = BenchConfig.load(write_grid(tmp_path, **only_zero_shot, test_size=6))
    with pytest.raises(StaleCell, match=r"result\.json was run with other settings "
                                        r"\(test_size: recorded 8, asked 6\)"):
        run_grid(edited)
    assert result.read_text() == before  # nothing lost


def test_cell_folders_are_portable_names_and_old_records_stay_readable(tmp_path):
    bench = BenchConfig.load(write_grid(tmp_path, seeds=[0], alphas=[0.5], methods=["fedpt"],
                                        options={}, run={"fedpt": {
                                            "model": "emulator:2:tiny-random"}}))
    (cell,) = expand(bench)
    assert ":" not in str(cell.path.relative_to(bench.out))
    assert cell.path.relative_to(bench.out).parts[0] == "emulator-2-tiny-random"
    rest = cell.path.relative_to(bench.out / "emulator-2-tiny-random")
    legacy = bench.out / "emulator:2:tiny-random" / rest
    legacy.mkdir(parents=True)
    (legacy / "result.json").write_text("{}")
    (again,) = expand(bench)
    assert again.path == legacy  # a record written before the rename is still found


@pytest.mark.parametrize("name, folder", [
    ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b"),
    ("emulator:12:qwen2.5-coder-0.5b", "emulator-12-qwen2.5-coder-0.5b"),
    ("/home/me/models/my llama", "home-me-models-my-llama"),
    (r"C:\models\x", "C-models-x"),
])
def test_path_component_keeps_only_portable_characters(name, folder):
    from fedsteer.bench import path_component

    assert path_component(name) == folder


def test_the_bench_command_prints_each_cell_row_then_takeaways_and_the_report_path(tmp_path):
    from typer.testing import CliRunner

    from fedsteer.cli import app

    grid = write_grid(tmp_path, seeds=[0], alphas=[0.5])
    result = CliRunner().invoke(app, ["bench", str(grid)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "zero-shot on sst2: acc" in text and "ifed-icl on sst2: acc" in text
    assert text.index("zero-shot on sst2: acc") < text.index("Steering helped")
    assert "Did not help:" in text and "Cost, whole run:" in text
    assert str((tmp_path / "cells" / "report.html").resolve()) in result.output.replace("\n", "")


def test_benchmark_scripts_reuse_a_cell_only_when_its_settings_match(tmp_path):
    """benchmarks/common.py's cells: a record of other settings is refused, not reused."""
    from fedsteer.bench import reuse_finished
    from fedsteer.eval.record import write_result
    from fedsteer.experiment import RunConfig

    asked = RunConfig(method="zero-shot", task="sst2", model="tiny-random", test_size=500)
    assert reuse_finished(tmp_path, asked) is None
    recorded = {"method": "zero-shot", "task": "sst2", "model": "tiny-random", "metrics": {},
                "costs": {}, "env": {}, "config": {**dataclasses.asdict(asked), "test_size": 300}}
    write_result(recorded, tmp_path)
    with pytest.raises(StaleCell, match="test_size: recorded 300, asked 500"):
        reuse_finished(tmp_path, asked)
    assert reuse_finished(tmp_path, dataclasses.replace(asked, test_size=300))["task"] == "sst2"


def test_a_cell_recorded_before_an_option_existed_is_stale(tmp_path):
    """ICL's `shots` became per class: a record without `per_class` must not pass as new."""
    from fedsteer.bench import Cell, recorded_differences
    from fedsteer.eval.record import write_result
    from fedsteer.experiment import RunConfig

    config = RunConfig(method="central-icl", task="trec", model="tiny-random")
    old_options = {"shots": 4, "seed": 0}  # as written before per_class existed
    write_result({"method": "central-icl", "task": "trec", "model": "tiny-random",
                  "metrics": {}, "costs": {}, "env": {},
                  "config": {**dataclasses.asdict(config), "method_options": old_options}},
                 tmp_path)
    assert recorded_differences(Cell(config, tmp_path)) == {
        "method_options.per_class": ("(absent)", True)}
