"""An error names the thing the user typed, and its hint can be followed (issue 44, items 5–6):
an artifact is not scored on another task or model unless asked, a suggested setting
exists where it is suggested, a bad flag is blamed as that flag."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedsteer.cli import app

runner = CliRunner()
TINY = ["--model", "tiny-random", "--test-size", "4", "--clients", "2"]


def error_of(*args: str) -> str:
    """The output of a command that must fail as a user error, on one line of words."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    return " ".join(result.output.replace("│", " ").split())


def user_files(folder, rows: int = 12) -> tuple[str, str]:
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"row {i}", "label": "ab"[i % 2]}) + "\n"
                             for i in range(rows)))
    return "--train", str(train)


@pytest.fixture(scope="module")
def steering(tmp_path_factory):
    """An IFed-ICL artifact made on sst2 with tiny-random."""
    root = tmp_path_factory.mktemp("steering")
    result = runner.invoke(app, [
        "run", "ifed-icl", *TINY, "--rounds", "1", "-o", "local_epochs=1",
        "-o", "demos_per_class=1", "-o", "calibration_per_class=1",
        "--out", str(root / "run"), "--save", str(root / "saved")])
    assert result.exit_code == 0, result.output
    return root / "saved"


def test_an_artifact_of_another_task_is_refused_by_name(steering):
    said = error_of("eval", "--artifact", str(steering), "--task", "trec", "--test-size", "4")
    assert "made on task 'sst2' (labels negative, positive)" in said
    assert "asked 'trec'" in said and "--transfer" in said


def test_an_artifact_is_refused_on_another_model_before_loading_it(steering):
    said = error_of("eval", "--artifact", str(steering), "--task", "sst2",
                    "--model", "no-org/no-model")
    assert "made on model 'tiny-random'" in said and "'no-org/no-model'" in said
    assert "--transfer" in said  # not the loader's "unknown model": nothing was loaded


def test_transfer_applies_an_artifact_to_another_task_on_purpose(steering):
    result = runner.invoke(app, ["eval", "--artifact", str(steering), "--task", "trec",
                                 "--test-size", "4", "--transfer"])
    assert result.exit_code == 0, result.output
    assert "trec" in result.output
    assert json.loads((steering / "provenance.json").read_text())["labels"] == [
        "negative", "positive"]


def test_the_label_word_hint_names_a_flag_that_exists(tmp_path):
    flag, train = user_files(tmp_path)
    said = error_of("run", "zero-shot", *TINY, flag, train, "--test", train, "--labels", "a,b",
                    "--label-words", " xylophone, xylograph", "--out", str(tmp_path / "o"))
    assert "share first tokens" in said and "--label-words" in said
    assert "multi_token" not in said


def test_an_option_of_a_method_without_options_lists_no_empty_known(tmp_path):
    said = error_of("run", "zero-shot", *TINY, "-o", "multi_token=true")
    assert "no option multi_token in zero-shot; zero-shot takes no options" in said
    assert "known:" not in said


def test_the_dirichlet_hint_can_be_followed_on_run(tmp_path):
    flag, train = user_files(tmp_path)
    args = ["run", "local-icl", *TINY, "--shots", "1", flag, train, "--test", train,
            "--labels", "a,b", "--clients", "6", "--alpha", "0.01"]
    said = error_of(*args, "--out", str(tmp_path / "refused"))
    assert "lower min_per_client" in said
    result = runner.invoke(app, [*args, "--min-per-client", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "run.json").read_text())[0]["min_per_client"] == 0


def test_a_template_flag_without_text_is_blamed_on_template(tmp_path):
    flag, train = user_files(tmp_path)
    said = error_of("run", "zero-shot", *TINY, flag, train, "--test", train, "--labels", "a,b",
                    "--template", "Ticket: {body}", "--out", str(tmp_path / "o"))
    assert "--template" in said and "--train/--test/--labels" not in said


def test_a_spec_data_path_that_is_a_folder_says_folder(tmp_path):
    (tmp_path / "data").mkdir()
    user_files(tmp_path)
    (tmp_path / "t.yaml").write_text("name: t\nlabels: [a, b]\ntrain: data\n"
                                     "test: train.jsonl\n")
    said = error_of("run", "zero-shot", *TINY, "--task", str(tmp_path / "t.yaml"))
    assert f"{tmp_path / 'data'}: a folder, not a data file" in said
    assert "not found" not in said


@pytest.mark.parametrize("command", [["run", "zero-shot", *TINY], ["partition"]])
@pytest.mark.parametrize("alpha", ["inf", "nan", "0"])
def test_alpha_must_be_a_finite_positive_number(command, alpha, recwarn):
    said = error_of(*command, "--alpha", alpha)
    assert "--alpha" in said and "not a finite number > 0" in said
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_partition_takes_runs_partition_flag():
    result = runner.invoke(app, ["partition", "--partition", "iid", "--clients", "3"])
    assert result.exit_code == 0, result.output
    assert "3 clients, iid" in result.output
