"""Stacks of saved artifacts (issue 46): several artifacts over one base model applied in
one forward, the same composition for `fedsteer eval` and `fedsteer serve`; mismatches
refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedsteer.artifacts import ArtifactMismatch, score_artifact, score_stack
from fedsteer.cli import app as cli
from fedsteer.data import load_task
from fedsteer.methods.ifed_icl import load_steering
from fedsteer.models import load_model
from fedsteer.models.hooks import inject
from fedsteer.models.scoring import LabelScorer

ROWS = 6
RUNS = {  # the smallest runs that save each kind, on the tiny random model
    "steering": ("ifed-icl", ["--rounds", "1", "-o", "local_epochs=1", "-o", "demos_per_class=1",
                              "-o", "calibration_per_class=1"]),
    "prompt": ("bdpl", ["--rounds", "1", "-o", "prompt_length=2", "-o", "candidates=6",
                        "-o", "samples=2", "-o", "shots_per_class=2", "-o", "steps_per_round=1"]),
    "proxy": ("fedpt", ["--rounds", "1", "-o", "large=tiny-random", "-o", "rank=2",
                        "-o", "local_examples=4", "-o", "distill_examples=4",
                        "-o", "alpha=2.0"]),
}


def save(root: Path, kind: str, extra: list[str] = ()) -> str:
    method, options = RUNS[kind]
    out = root / kind
    result = CliRunner().invoke(cli, [
        "run", method, "--model", "tiny-random", "--clients", "3", "--test-size", "10",
        *options, *extra, "--out", str(root / f"run-{kind}"), "--save", str(out)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("artifacts")
    return {kind: save(root, kind) for kind in RUNS}


@pytest.fixture(scope="module")
def task():
    return load_task("sst2")


@pytest.mark.parametrize("kind", ["steering", "prompt"])
def test_a_stack_of_one_scores_exactly_as_the_artifact_alone(artifacts, task, kind):
    alone = score_artifact(artifacts[kind], task, None, ROWS, 0, 4)
    stacked = score_stack([artifacts[kind]], task, None, ROWS, 0, 4)
    np.testing.assert_array_equal(stacked.scores, alone.scores)


def test_a_proxy_stack_of_one_scores_as_the_proxy_alone(artifacts, task):
    """FedPT's own evaluation adds its adapter with peft, the stack with per-row hooks (peft's
    ops, as `fedsteer serve` runs it): the same numbers up to float summation order."""
    alone = score_artifact(artifacts["proxy"], task, None, ROWS, 0, 4)
    stacked = score_stack([artifacts["proxy"]], task, None, ROWS, 0, 4)
    np.testing.assert_allclose(stacked.scores, alone.scores, atol=1e-5)


def test_prompt_and_steering_stacked_equal_both_applied_by_hand(artifacts, task):
    stacked = score_stack([artifacts["prompt"], artifacts["steering"]], task, None, ROWS, 0, 4)
    lm = load_model("tiny-random")
    saved = load_steering(Path(artifacts["steering"]))
    prefix = json.loads((Path(artifacts["prompt"]) / "prompt.json").read_text())["prefix"]
    queries = [task.spec.format_query(ex) for ex in stacked.test]
    with torch.no_grad(), inject(lm, saved.attn, saved.mlp, saved.coef):
        by_hand = LabelScorer(lm, task.spec.label_words, batch_size=4).score(queries, prefix)
    np.testing.assert_array_equal(stacked.scores, by_hand.numpy())
    alone = [score_artifact(artifacts[k], task, None, ROWS, 0, 4).scores
             for k in ("prompt", "steering")]
    assert not any(np.allclose(stacked.scores, a) for a in alone)  # both parts count


def test_the_order_given_does_not_change_a_stack(artifacts, task):
    """One artifact per point, each applied at its own point: the forward is the same."""
    dirs = [artifacts["prompt"], artifacts["steering"], artifacts["proxy"]]
    forward = score_stack(dirs, task, None, ROWS, 0, 4)
    backward = score_stack(dirs[::-1], task, None, ROWS, 0, 4)
    assert forward.kind == "stack"
    np.testing.assert_array_equal(forward.scores, backward.scores)


def _made_for_another_model(artifact: str, other: Path, marker: str) -> Path:
    """A copy of `artifact` whose files say it was made on qwen2.5-coder-0.5b."""
    shutil.copytree(artifact, other)
    for name in (marker, "provenance.json"):
        saved = json.loads((other / name).read_text())
        saved["model"] = "qwen2.5-coder-0.5b"
        (other / name).write_text(json.dumps(saved))
    return other


def test_artifacts_made_on_another_model_are_refused_by_name(artifacts, task, tmp_path):
    other = _made_for_another_model(artifacts["steering"], tmp_path / "other-steering",
                                    "steering.json")
    with pytest.raises(ArtifactMismatch, match=rf"{other}.*model 'qwen2.5-coder-0.5b'"):
        score_stack([artifacts["prompt"], str(other)], task, None, ROWS, 0, 4)


def test_two_artifacts_at_one_point_are_refused_by_name(artifacts, task, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(artifacts["prompt"], twin)
    with pytest.raises(ArtifactMismatch, match=rf"{twin} and .* both steer the input"):
        score_stack([artifacts["prompt"], str(twin)], task, None, ROWS, 0, 4)


def test_eval_scores_a_stack_from_repeated_artifacts(artifacts, task):
    args = ["eval", "--task", "sst2", "--test-size", str(ROWS), "--batch-size", "4"]
    stacked = CliRunner().invoke(cli, [*args, "--artifact", artifacts["prompt"],
                                       "--artifact", artifacts["steering"]])
    joined = CliRunner().invoke(cli, [*args, "--artifact",
                                      f"{artifacts['prompt']}+{artifacts['steering']}"])
    assert stacked.exit_code == 0 and joined.exit_code == 0, stacked.output + joined.output
    expected = score_stack([artifacts["prompt"], artifacts["steering"]], task, None, ROWS, 0, 4)
    shown = f"{100 * expected.metrics()['accuracy']:.1f}"
    for output in (stacked.output, joined.output):
        row = next(line for line in output.splitlines() if "sst2" in line)
        cells = [cell.strip() for cell in row.split("│")]
        assert "stack" in cells and shown in cells


def test_serve_answers_under_the_stack_name_as_eval_scores_it(artifacts, task):
    from openai import OpenAI

    from fedsteer.blackbox import OpenAIBlackBox
    from fedsteer.serve import Limits, Server, build_adaptations, make_app
    from http_server import ServerThread

    base = load_model("tiny-random")
    dirs = [artifacts["prompt"], artifacts["steering"], artifacts["proxy"]]
    served = build_adaptations(base, [f"all-three={'+'.join(dirs)}"], load_model)
    server = Server(served, Limits(max_logprobs=len(base.tokenizer)))
    offline = score_stack(dirs, task, None, ROWS, 0, 4)
    with ServerThread(make_app(server)) as url:
        cards = {m.id: m for m in OpenAI(base_url=url, api_key="x").models.list().data}
        assert cards["all-three"].kind == "stack"
        assert [p["kind"] for p in cards["all-three"].parts] == ["prompt", "steering", "proxy"]
        box = OpenAIBlackBox(url, "all-three", top_logprobs=len(base.tokenizer), batch_size=4)
        scores = box.label_logprobs([task.spec.format_query(ex) for ex in offline.test],
                                    task.spec.label_words)
    np.testing.assert_allclose(scores, offline.scores, atol=1e-4)


# ------------------------------------------------------------------ in place
def record_of(root: Path, kind: str) -> dict:
    return json.loads((root / f"run-{kind}" / "result.json").read_text())


def test_ifed_icl_trained_on_top_of_a_prompt_is_what_the_stack_scores(artifacts, task,
                                                                      tmp_path):
    """The run evaluates with the prompt in place; the stack of the prompt and the new
    vectors, scored by `eval`, gives the run's own accuracy; record and provenance name
    the prompt it was trained on (path, digest, its run)."""
    from fedsteer.stacks import artifact_sha256

    saved = save(tmp_path, "steering", ["--on-top-of", artifacts["prompt"]])
    record = record_of(tmp_path, "steering")
    named = record["stack"]
    assert [s["path"] for s in named] == [artifacts["prompt"]] and named[0]["kind"] == "prompt"
    assert named[0]["sha256"] == artifact_sha256(Path(artifacts["prompt"]))
    assert named[0]["provenance"]["method"] == "bdpl"
    assert json.loads((Path(saved) / "provenance.json").read_text())["stack"] == named
    assert record["config"]["on_top_of"] == artifacts["prompt"]
    stacked = score_stack([artifacts["prompt"], saved], task, None, 10, 0, 16)
    assert stacked.metrics()["accuracy"] == record["metrics"]["accuracy"]


def test_every_forward_of_a_run_on_top_of_steering_has_its_hooks_on(artifacts, task):
    """BDPL has no hooks of its own: every forward of its clients and its evaluation runs
    with the steering artifact's, and none is left behind on the shared model."""
    from fedsteer.experiment import RunConfig, run_experiment

    lm = load_model("tiny-random")
    attention = lm.layers[0].attention
    seen: list[int] = []
    spy = lm.model.register_forward_pre_hook(
        lambda module, args: seen.append(len(attention._forward_hooks)))
    method, options = RUNS["prompt"]
    opts = dict(o.split("=") for o in options[3::2])
    config = RunConfig(method=method, model="tiny-random", clients=3, test_size=10, rounds=1,
                       options={k: int(v) for k, v in opts.items()},
                       on_top_of=artifacts["steering"])
    try:
        run_experiment(config, Path(artifacts["steering"]).parent / "bdpl-on-steering", lm=lm,
                       task=task)
    finally:
        spy.remove()
    assert seen and min(seen) == 1  # the stack's one hook on every forward
    assert len(attention._forward_hooks) == 0


def test_fedpt_trained_on_top_of_prompt_and_steering_is_what_the_stack_scores(
        artifacts, task, tmp_path):
    saved = save(tmp_path, "proxy",
                 ["--on-top-of", f"{artifacts['prompt']}+{artifacts['steering']}"])
    record = record_of(tmp_path, "proxy")
    assert [s["kind"] for s in record["stack"]] == ["prompt", "steering"]
    stacked = score_stack([artifacts["prompt"], artifacts["steering"], saved], task, None, 10,
                          0, 16)
    assert stacked.metrics()["accuracy"] == record["metrics"]["accuracy"]


def test_a_run_on_top_of_another_models_artifact_is_refused_by_name(artifacts, tmp_path):
    other = _made_for_another_model(artifacts["prompt"], tmp_path / "other-prompt",
                                    "prompt.json")
    result = CliRunner().invoke(cli, [
        "run", "ifed-icl", "--model", "tiny-random", "--clients", "3", "--test-size", "10",
        *RUNS["steering"][1], "--out", str(tmp_path / "run"), "--on-top-of", str(other)])
    assert result.exit_code != 0
    assert str(other) in result.output and "qwen2.5-coder-0.5b" in result.output


def test_a_run_that_would_steer_its_stacks_point_again_is_refused(artifacts, tmp_path):
    result = CliRunner().invoke(cli, [
        "run", "bdpl", "--model", "tiny-random", "--clients", "3", "--test-size", "10",
        *RUNS["prompt"][1], "--out", str(tmp_path / "run"), "--on-top-of", artifacts["prompt"]])
    assert result.exit_code != 0 and "steers the input already" in result.output


# ------------------------------------------------------------------ the harness
TINY_BDPL = {"rounds": 1, "prompt_length": 2, "candidates": 6, "samples": 2,
             "shots_per_class": 2, "steps_per_round": 1}
TINY_IFED = {"rounds": 1, "local_epochs": 1, "demos_per_class": 1, "calibration_per_class": 1}


def stack_grid(tmp_path: Path, methods: list[str]) -> Path:
    import yaml

    grid = {"name": "stacks", "out": "cells", "models": ["tiny-random"], "tasks": ["sst2"],
            "methods": methods, "clients": [3], "test_size": 10,
            "options": {"bdpl": TINY_BDPL, "ifed-icl": TINY_IFED}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_bench_cell_names_a_stack_and_its_row_is_the_whole_pipeline(tmp_path):
    """`bdpl+ifed-icl`: the bdpl cell keeps its artifact, ifed-icl is trained on top of it;
    the stack's row is paired with zero-shot on the same rows and costs both stages."""
    from fedsteer.bench import BenchConfig, expand, run_grid
    from fedsteer.eval.report import comparison_table, run_bytes, whole_costs

    bench = BenchConfig.load(stack_grid(tmp_path, ["zero-shot", "bdpl", "bdpl+ifed-icl"]))
    cells = {c.name or c.config.method: c for c in expand(bench)}
    assert set(cells) == {"zero-shot", "bdpl", "bdpl+ifed-icl"}
    assert cells["bdpl"].save and not cells["bdpl+ifed-icl"].save
    assert cells["bdpl+ifed-icl"].config.on_top_of == str(cells["bdpl"].artifact)
    ran: list[str] = []
    records = run_grid(bench, on_cell=lambda cell, record: ran.append(cell.name))
    assert ran == ["zero-shot", "bdpl", "bdpl+ifed-icl"]  # the stage before the stack
    by = {r["method"]: r for r in records}
    stacked, stage = by["bdpl+ifed-icl"], by["bdpl"]
    assert stacked["pipeline_costs"]["stages"] == 2
    assert run_bytes(whole_costs(stacked)) == \
        run_bytes(stacked["costs"]) + run_bytes(stage["costs"]) > run_bytes(stacked["costs"])
    table = comparison_table(records)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    row = next(line for line in console.export_text().splitlines() if "bdpl+ifed-icl" in line)
    assert "(p=" in row  # paired with zero-shot on the same rows
    ran.clear()
    run_grid(bench, on_cell=lambda cell, record: ran.append(cell.name))
    assert ran == []  # every cell finished: nothing runs again


@pytest.mark.parametrize("entry, message", [
    ("fedpt+ifed-icl", "fedpt steers the output, which later stages cannot be trained"),
    ("bdpl+asyndbt", "two stages steer the same point"),
    ("zero-shot+ifed-icl", "zero-shot saves no artifact"),
])
def test_a_stack_no_run_could_train_is_refused_when_the_grid_loads(tmp_path, entry, message):
    from fedsteer.bench import BenchConfig

    with pytest.raises(ValueError, match=message):
        BenchConfig.load(stack_grid(tmp_path, [entry]))


def test_the_compose_benchmark_runs_its_grid_and_summarises_it(tmp_path):
    """benchmarks/compose.py end to end on the tiny model: zero-shot, three singles, three
    pairs and the full stack, each stack trained in place; the summary pairs the best stack
    with the best single on the same rows and charges a stack its whole pipeline; a second
    call with --recorded runs nothing and says the same."""
    import subprocess
    import sys

    import yaml

    tiny = {"name": "tiny", "models": ["tiny-random"], "tasks": ["sst2"],
            "methods": ["bdpl", "ifed-icl", "fedpt"],
            "run": {"ifed-icl": {"eval_every": 1}},
            "options": {"bdpl": TINY_BDPL, "ifed-icl": TINY_IFED,
                        "fedpt": {"large": "tiny-random", "rounds": 1, "rank": 2,
                                  "local_examples": 4, "distill_examples": 4}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    script = Path(__file__).parents[1] / "benchmarks" / "compose.py"
    args = [sys.executable, str(script), "--tasks", "sst2", "--grid", str(tmp_path / "tiny.yaml"),
            "--clients", "3", "--test-size", "10", "--out", str(tmp_path / "cells"),
            "--report-dir", str(tmp_path)]
    for extra in ([], ["--recorded"]):
        done = subprocess.run([*args, *extra], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads((tmp_path / "compose.json").read_text())
        result = summary["tasks"]["sst2"]
        rows = {r["method"]: r for r in result["rows"]}
        assert list(rows) == ["zero-shot", "bdpl", "ifed-icl", "fedpt", "bdpl+ifed-icl",
                              "bdpl+fedpt", "ifed-icl+fedpt", "bdpl+ifed-icl+fedpt"]
        assert rows["bdpl+ifed-icl+fedpt"]["stages"] == 3 and rows["fedpt"]["stages"] == 1
        assert all(r["rows"] == 10 for r in rows.values())
        assert result["best_stack"] in rows and "+" in result["best_stack"]
        assert result["best_single"] in ("bdpl", "ifed-icl", "fedpt")
        assert 0 <= result["p"] <= 1 and result["test"] == "McNemar"
        assert summary["bar_met"] is False  # one task of three
        assert summary["grid"]["run"] == {}  # the per-round curve is not part of it
        assert set(result["overlaps"]) == {"bdpl+ifed-icl", "bdpl+fedpt", "ifed-icl+fedpt"}
        for pair, o in result["overlaps"].items():
            first, second = pair.split("+")
            assert o["only_first"] + o["both"] == rows[first]["gained"]
            assert o["only_second"] + o["both"] == rows[second]["gained"]
            assert o["pair_keeps"] + o["pair_new"] == rows[pair]["gained"]
            assert o["pair_loses"] == rows[pair]["lost"]
        if extra:
            assert "acc" not in done.stdout.split("# Composing")[0]  # nothing ran


def test_an_artifact_applied_without_the_stage_it_was_trained_on_is_warned(artifacts, task,
                                                                           tmp_path, caplog):
    from fedsteer.stacks import missing_stages

    saved = save(tmp_path, "steering", ["--on-top-of", artifacts["prompt"]])
    assert missing_stages([Path(artifacts["prompt"]), Path(saved)]) == []
    (alone,) = missing_stages([Path(saved)])
    assert saved in alone and artifacts["prompt"] in alone and "(prompt)" in alone
    with caplog.at_level("WARNING"):
        score_stack([saved], task, None, ROWS, 0, 4)
    assert "not applied with it here" in caplog.text


def test_compose_counts_the_gains_two_points_share_and_what_their_pair_keeps():
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from compose import overlap

    zero = [0, 0, 0, 0, 1, 1]
    first = [1, 1, 0, 0, 1, 0]   # gains rows 0, 1; loses 5
    second = [0, 1, 1, 0, 1, 1]  # gains rows 1, 2; loses none
    pair = [1, 0, 0, 1, 0, 1]    # keeps row 0 of the union, gains row 3 anew, loses row 4
    assert overlap(zero, first, second, pair) == {
        "only_first": 1, "both": 1, "only_second": 1, "pair_keeps": 1, "pair_new": 1,
        "pair_loses": 1}
