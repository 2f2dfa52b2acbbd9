"""A run folder belongs to one run; an unwritable path is one line, before any work (issue 44).

The guard at the top walks every command of the typer app, so a command added later is held
to the same rule: an `--out`/`--save`/`--data-dir` that cannot be used is exit 2 and one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import click
import pytest
import typer
from typer.testing import CliRunner

from fedsteer.cli import app
from fedsteer.eval.report import comparison_table, mixed_fields
from fedsteer.run_folder import LOCK_FILE, RunFolderError, run_folder_lock
from fedsteer.settings import DATA_DIR_ENV

runner = CliRunner()
TINY_RUN = ["zero-shot", "--model", "tiny-random", "--test-size", "4", "--clients", "2"]
#: parameters through which a command writes (or, `coordinator FOLDER`, reads) a folder
WRITING_PARAMS = ("out", "save", "work_dir", "folder")


def minimal_args(tmp_path) -> dict[str, list[str]]:
    """The least each writing command needs to reach its check of where it writes. A new
    command with `--out`/`--save` is listed here, else the guard below fails naming it."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nmodels: [tiny-random]\ntasks: [sst2]\nmethods: [zero-shot]\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine", "label": "positive"}\n')
    return {"run": TINY_RUN, "bench": [str(grid)], "report": [str(tmp_path)],
            "federation init": ["--parties", "2", "--host", "localhost"], "coordinator": [],
            "party": ["--coordinator", "127.0.0.1:1", "--task", "sst2", "--data", str(rows),
                      "--insecure", "--partition-id", "0", "--max-wait", "1"]}


def commands() -> list[tuple[list[str], click.Command]]:
    """Every leaf command of the app with its path of names (sub-groups included)."""
    def walk(group: click.Group, prefix: list[str]):
        for name, command in sorted(group.commands.items()):
            if isinstance(command, click.Group):
                yield from walk(command, [*prefix, name])
            else:
                yield [*prefix, name], command
    return list(walk(typer.main.get_command(app), []))


def assert_one_line_error(result, *needles: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def blocker(tmp_path):
    """A regular file: neither it nor anything under it can become a folder (as root,
    permissions block nothing, so this is the unwritable path a test can rely on)."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def test_every_writing_command_refuses_an_unusable_out_or_save_in_one_line(tmp_path,
                                                                          blocker):
    needs = minimal_args(tmp_path)
    writing = [(path, command, param) for path, command in commands()
               for param in command.params if param.name in WRITING_PARAMS]
    assert {" ".join(path) for path, _, _ in writing} >= {"run", "bench", "report"}
    unlisted = sorted({" ".join(path) for path, _, _ in writing} - set(needs))
    assert not unlisted, f"add the minimal arguments of {unlisted} to minimal_args"
    for path, _, param in writing:
        flag = max(param.opts, key=len) if isinstance(param, click.Option) else None
        for bad in (blocker, blocker / "below"):
            result = runner.invoke(app, [*path, *needs[" ".join(path)], *[flag] * bool(flag),
                                         str(bad), *(["--out", str(tmp_path / "o")]
                                                     if flag == "--save" else [])])
            assert_one_line_error(result, flag or "", str(bad))
        assert not (tmp_path / "o").exists()  # refused before it made anything


def test_every_command_refuses_a_data_dir_under_a_file_in_one_line(blocker, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, "restored after the test")  # the callback sets it
    monkeypatch.delenv(DATA_DIR_ENV)
    for path, _ in commands():
        result = runner.invoke(app, ["--data-dir", str(blocker / "tasks"), *path])
        assert_one_line_error(result, "--data-dir", str(blocker))


def test_save_at_a_file_is_refused_before_training(tmp_path, blocker):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *TINY_RUN, "--out", str(out), "--save", str(blocker)])
    assert_one_line_error(result, "--save")
    assert not out.exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished zero-shot run on sst2 (copied by the tests that alter it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = runner.invoke(app, ["run", *TINY_RUN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def copy_of(finished, tmp_path, name="run"):
    return shutil.copytree(finished, tmp_path / name)


def test_a_second_run_into_a_locked_folder_refuses_naming_the_first(tmp_path):
    out = tmp_path / "run"
    with run_folder_lock(out):
        result = runner.invoke(app, ["run", *TINY_RUN, "--out", str(out)])
        with pytest.raises(RunFolderError, match=f"PID {os.getpid()}"), run_folder_lock(out):
            pass
    assert_one_line_error(result, str(out), f"PID {os.getpid()}")
    assert not (out / "run.json").exists()
    assert not (out / LOCK_FILE).exists()  # let go when its holder finished


def test_a_lock_left_by_a_dead_run_is_taken_over_and_said(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{dead.pid}\n")
    result = runner.invoke(app, ["run", *TINY_RUN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"took over {out} from PID {dead.pid}" in " ".join(result.output.split())
    assert (out / "result.json").exists() and not (out / LOCK_FILE).exists()


def test_a_new_run_into_a_used_folder_is_refused_and_force_clears_it(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    stale = out / "checkpoint" / "round-0009"  # as a longer earlier run would leave it
    stale.mkdir(parents=True)
    (out / "notes.txt").write_text("the user's own")
    before = (out / "result.json").read_text()
    again = ["run", *TINY_RUN, "--task", "trec", "--out", str(out)]
    assert_one_line_error(runner.invoke(app, again), str(out), "--resume", "--force")
    assert (out / "result.json").read_text() == before and stale.is_dir()
    result = runner.invoke(app, [*again, "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "result.json").read_text())["task"] == "trec"
    assert not stale.exists() and (out / "notes.txt").exists()


def test_resume_refuses_a_folder_whose_records_disagree_and_show_warns(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    record = json.loads((out / "result.json").read_text())
    record["config"]["seed"] = 7  # another run's result.json beside this run's run.json
    (out / "result.json").write_text(json.dumps(record))
    assert_one_line_error(runner.invoke(app, ["run", "--resume", str(out)]),
                          "seed 7", "run.json says 0")
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "warning:" in shown.output
    assert "seed 7" in " ".join(shown.output.split())


def test_show_of_rows_from_two_tasks_has_a_task_column_and_a_warning(finished, tmp_path):
    both = tmp_path / "both"
    copy_of(finished, both, "a")
    record = json.loads((both / "a" / "result.json").read_text())
    (both / "b").mkdir()
    (both / "b" / "result.json").write_text(json.dumps({**record, "task": "trec"}))
    shown = runner.invoke(app, ["show", str(both)])
    assert shown.exit_code == 0, shown.output
    header = next(line for line in shown.output.splitlines() if "method" in line)
    assert "task" in header and "trec" in shown.output and "sst2" in shown.output
    assert "warning: these rows come from 2 tasks (sst2, trec)" in " ".join(
        shown.output.split())


def test_a_table_of_one_task_and_model_has_no_context_columns(finished):
    record = json.loads((finished / "result.json").read_text())
    assert mixed_fields([record, record]) == []
    assert [c.header for c in comparison_table([record]).columns][:2] == ["method",
                                                                           "acc % (95 % CI)"]
    assert mixed_fields([record, {**record, "model": "other"}]) == ["model"]


def test_a_run_stopped_by_a_user_error_can_be_retried_into_its_folder(tmp_path):
    out = tmp_path / "run"
    failed = runner.invoke(app, ["run", "local-icl", *TINY_RUN, "--clients", "400",
                                 "--alpha", "0.01", "--out", str(out)])
    assert failed.exit_code == 2 and "min_per_client" in failed.output
    assert (out / "run.json").exists() and not (out / "result.json").exists()
    retried = runner.invoke(app, ["run", *TINY_RUN, "--out", str(out)])  # no --force needed
    assert retried.exit_code == 0, retried.output
    assert json.loads((out / "run.json").read_text())[0]["method"] == "zero-shot"
