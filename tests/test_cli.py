"""The CLI end to end on the tiny random model: run, resume, tasks, partition."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fedsteer.cli import app
from fedsteer.eval.record import REQUIRED_KEYS

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_run_three_baselines_writes_records_table_and_plot(tmp_path, tiny_lm):
    out = tmp_path / "run"
    output = invoke("run", "zero-shot", "local-icl", "central-icl", "--model", "tiny-random",
                    "--task", "sst2", "--clients", "4", "--test-size", "12", "--out", str(out))
    for method in ("zero-shot", "local-icl", "central-icl"):
        assert method in output
        record = json.loads((out / method / "result.json").read_text())
        assert set(REQUIRED_KEYS) <= set(record)
        assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
        assert record["metrics"]["num_test"] == 12
        assert {"bytes_up", "bytes_down", "client_seconds", "server_seconds",
                "peak_rss_bytes", "rounds"} <= set(record["costs"])
    local = json.loads((out / "local-icl" / "result.json").read_text())
    assert len(local["metrics"]["per_client"]) == 4
    assert local["metrics"]["num_clients"] == 4
    assert (out / "comparison.png").stat().st_size > 10_000
    # local ICL's rows can be paired with zero-shot's: each row's share of clients right
    fraction = local["per_row"]["correct_fraction"]
    assert len(fraction) == 12 and all(0.0 <= f <= 1.0 for f in fraction)
    assert sum(fraction) / 12 == pytest.approx(local["metrics"]["accuracy"])


def test_resume_skips_finished_methods(tmp_path, tiny_lm):
    out = tmp_path / "run"
    invoke("run", "zero-shot", "central-icl", "--model", "tiny-random", "--test-size", "8",
           "--out", str(out))
    first = (out / "zero-shot" / "result.json").read_text()
    (out / "central-icl" / "result.json").unlink()  # as if killed before it finished
    invoke("run", "--resume", str(out))
    assert (out / "zero-shot" / "result.json").read_text() == first
    assert (out / "central-icl" / "result.json").exists()


def test_unknown_method_is_a_clear_error():
    result = runner.invoke(app, ["run", "no-such-method", "--model", "tiny-random"])
    assert result.exit_code != 0
    assert "no-such-method" in result.output


def test_tasks_lists_builtin_tasks():
    output = invoke("tasks")
    for name in ("sst2", "agnews", "trec", "rte"):
        assert name in output


def test_partition_prints_label_counts():
    output = invoke("partition", "--task", "sst2", "--clients", "5", "--alpha", "0.5")
    assert "negative" in output and "positive" in output
    rows = [line.split("│") for line in output.splitlines() if line.startswith("│")]
    assert [int(r[1]) for r in rows] == [0, 1, 2, 3, 4]
    assert sum(int(r[4]) for r in rows) == 6920  # every sst2 training row, exactly once


def test_bad_user_task_is_a_clear_error_not_a_traceback(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "fine", "label": "good"}\n'
                                          '{"text": "", "label": "bad"}\n')
    (tmp_path / "task.toml").write_text('name = "t"\nlabels = ["good", "bad"]\n'
                                        'train = "train.jsonl"\ntest = "train.jsonl"\n')
    result = runner.invoke(app, ["run", "zero-shot", "--model", "tiny-random", "--task",
                                 str(tmp_path / "task.toml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "train.jsonl" in result.output and "line 2" in result.output
    assert "Traceback" not in result.output


def test_own_task_from_flags_is_written_as_a_spec(tmp_path, tiny_lm):
    rows = [{"text": f"invoice {i} overdue", "label": "billing"} for i in range(4)]
    rows += [{"text": f"app crash {i}", "label": "bug"} for i in range(4)]
    data = tmp_path / "tickets.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    invoke("run", "zero-shot", "--model", "tiny-random", "--clients", "2", "--train", str(data),
           "--test",
           str(data), "--labels", "billing,bug", "--template", "Ticket: {text}\\nCategory:",
           "--out", str(out))
    record = json.loads((out / "result.json").read_text())
    assert record["task"] == "tickets" and record["metrics"]["num_test"] == 8
    spec = yaml.safe_load((out / "task.yaml").read_text())
    assert spec["template"] == "Ticket: {text}\nCategory:"  # "\\n" on the command line


def test_ifed_icl_saves_steering_and_eval_applies_it(tmp_path, tiny_lm):
    out, saved = tmp_path / "run", tmp_path / "steer"
    invoke("run", "ifed-icl", "--model", "tiny-random", "--clients", "3", "--test-size", "10",
           "--rounds", "1", "-o", "local_epochs=1", "-o", "demos_per_class=1",
           "-o", "calibration_per_class=1", "--out", str(out), "--save", str(saved))
    record = json.loads((out / "result.json").read_text())
    assert record["config"]["method_options"]["local_epochs"] == 1
    assert record["costs"]["num_rounds"] == 2  # extract + one calibration round
    assert (saved / "steering.safetensors").exists()
    output = invoke("eval", "--steering", str(saved), "--task", "sst2", "--test-size", "10",
                    "--model", "tiny-random")
    assert f"{100 * record['metrics']['accuracy']:.1f}" in output  # same rows, same steering


@pytest.mark.parametrize("method, options, kind", [
    ("fedavg-lora", ["-o", "rank=2", "-o", "local_examples=4", "--rounds", "1"], "lora"),
    ("bdpl", ["-o", "prompt_length=2", "-o", "candidates=6", "-o", "samples=2",
              "-o", "shots_per_class=2", "-o", "steps_per_round=1", "--rounds", "1"], "prompt"),
])
def test_saved_adapters_and_prompts_evaluate_to_the_runs_numbers(tmp_path, method, options,
                                                                  kind):
    out, saved = tmp_path / "run", tmp_path / "artifact"
    invoke("run", method, "--model", "tiny-random", "--clients", "3", "--test-size", "10",
           *options, "--out", str(out), "--save", str(saved))
    record = json.loads((out / "result.json").read_text())
    output = invoke("eval", "--artifact", str(saved), "--task", "sst2", "--test-size", "10")
    assert kind in output and "tiny-random" in output
    assert f"{100 * record['metrics']['accuracy']:.1f}" in output


def test_eval_names_a_directory_that_holds_no_artifact(tmp_path):
    result = runner.invoke(app, ["eval", "--artifact", str(tmp_path), "--task", "sst2"])
    assert result.exit_code == 2 and "not a directory written by" in result.output


def test_unknown_method_option_is_refused():
    result = runner.invoke(app, ["run", "zero-shot", "ifed-icl", "--model", "tiny-random",
                                 "-o", "local_epoch=2"])
    assert result.exit_code == 2 and "local_epoch" in result.output


def test_models_lists_install_commands_verbatim():
    output = invoke("models")
    assert "fedsteer[default-model]" in output  # not swallowed as rich markup


def test_bench_runs_a_grid_into_the_given_directory_and_ends_with_a_table(tmp_path, tiny_lm):
    import yaml

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "tiny", "models": ["tiny-random"], "tasks": ["sst2"],
        "methods": ["zero-shot", "central-icl"], "seeds": [0, 1], "clients": [3],
        "test_size": 6}))
    out = tmp_path / "elsewhere"
    output = invoke("bench", str(grid), "--out", str(out))
    assert len(list(out.rglob("result.json"))) == 3  # zero-shot once, central-icl per seed
    assert "tiny: sst2" in output and "central-icl · seed 1" in output
    assert (out / "report.md").is_file()
