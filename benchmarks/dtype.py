"""bfloat16 vs float32 on this machine: speed of the key paths, and whether answers agree.

Both copies of the model are loaded in one process and every timed step alternates
between them (float32, bfloat16, float32, …), best of `--repeats` kept: other work on the
machine slows both arms alike, so the *ratio* is what this records, not absolute speed.

* lm_head: the head matmul on the strided slice `logits_to_keep=1` hands it (what the
  scorer did before `contiguous_head_input`) and on a contiguous copy, per dtype.
* scorer: zero-shot and 4-shot ICL (prefix reused) over `--speed-rows` rows.
* one IFed-ICL calibration round and one FedAvg-LoRA round (small budgets, see flags),
  timed as the round's client compute seconds in the result record.
* agreement: zero-shot and central ICL (and, with `--methods`, others) on `--rows` test
  rows of each task in both dtypes: predicted labels equal, accuracies with Wilson 95 %
  intervals, exact McNemar test on per-row correctness. Each (task, method, dtype) is a cell
  of its own under `--out` (result.json + predictions.json): a cut run resumes there.
* `--answers`: the agreement cells alone, added to the existing record (its speed rows
  kept): the issue's size (500 rows) and the trained methods, IFed-ICL and FedAvg-LoRA, each
  trained once per dtype with the same seed and partition (`--clients`, `--alpha`), at the
  budgets of `--budget` (benchmarks/default.yaml) unless `--set method:key=value` says less.

    nohup flock /tmp/fedsteer-heavy.lock .venv/bin/python benchmarks/dtype.py \
        > benchmarks/results/dtype.log 2>&1 &
    nohup flock /tmp/fedsteer-heavy.lock .venv/bin/python benchmarks/dtype.py --answers \
        --rows 500 --methods zero-shot central-icl ifed-icl fedavg-lora \
        > benchmarks/results/dtype_answers.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml
from common import RESULTS, output_arguments, write_outputs

from fedsteer.bench import reuse_finished
from fedsteer.data import load_task
from fedsteer.eval.metrics import mcnemar_exact, wilson_interval
from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.models import DEFAULT_MODEL, load_model
from fedsteer.models.placement import cpu_bf16_probe
from fedsteer.models.scoring import LabelScorer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: methods whose answer depends on training (run once per dtype, same seed and partition)
TRAINED = ("ifed-icl", "fedavg-lora")
#: the agreement the issue asks of bfloat16 against float32 on the same rows
AGREEMENT_BAR = 0.98
ORDER = ("zero-shot", "central-icl", *TRAINED)  # of a task's rows in the table


def alternate(arms: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, float]:
    """Best seconds of each arm, the arms run in turn `repeats` times (an arm may return
    its own measure of seconds as a float; anything else: its wall time is taken)."""
    best = {name: float("inf") for name in arms}
    for _ in range(repeats):
        for name, arm in arms.items():
            started = time.perf_counter()
            measured = arm()
            seconds = measured if isinstance(measured, float) else time.perf_counter() - started
            best[name] = min(best[name], seconds)
    return best


def head_times(models: dict, repeats: int) -> dict:
    """The LM head on a strided last-position slice vs a contiguous one (16 rows x 48)."""
    out = {}
    for name, lm in models.items():
        head = lm.model.get_output_embeddings()
        hidden = torch.randn(16, 48, head.in_features).to(DTYPES[name])
        sliced = hidden[:, -1:, :]
        with torch.no_grad():
            out[name] = alternate({
                "strided": lambda h=head, x=sliced: torch.nn.functional.linear(x, h.weight),
                "contiguous": lambda h=head, x=sliced: torch.nn.functional.linear(
                    x.contiguous(), h.weight)}, repeats)
    return out


def demonstrations(task, shots: int) -> list:
    """`shots` training rows, one label after another (the prefix the timing reuses)."""
    by_label: dict[int, list] = {}
    for ex in task.train:
        by_label.setdefault(ex.label, []).append(ex)
    picked, i = [], 0
    while len(picked) < shots:
        queue = by_label[sorted(by_label)[i % len(by_label)]]
        picked.append(queue[i // len(by_label)])
        i += 1
    return picked


def scorer_times(models: dict, task, args) -> dict:
    queries = [task.spec.format_query(ex) for ex in task.test[: args.speed_rows]]
    prefix = task.spec.demo_prefix(demonstrations(task, 4))
    scorers = {name: LabelScorer(lm, task.spec.label_words, batch_size=16)
               for name, lm in models.items()}
    def arm(scorer: LabelScorer, pre: str) -> Callable[[], None]:
        def run() -> None:
            scorer.score(queries, pre)

        return run

    out = {}
    for kind, pre in (("zero-shot", ""), ("icl-4shot", prefix)):
        out[kind] = alternate({name: arm(s, pre) for name, s in scorers.items()}, args.repeats)
    return out


def round_seconds(method: str, options: dict, lm, args) -> float:
    """Client compute seconds of the last round of a one-round run (its calibration
    round, for IFed-ICL: the extraction round before it is not counted)."""
    config = RunConfig(method, task="sst2", model=args.model, clients=args.round_clients,
                       rounds=1, test_size=8, seed=0, options=options)
    with tempfile.TemporaryDirectory() as tmp:
        record = run_experiment(config, Path(tmp), lm=lm)
    last = record["costs"]["rounds"][-1]
    return last["client_seconds"] - last.get("client_wait_seconds", 0.0)


class PredictionTap:
    """Records the labels every `LabelScorer.score` call predicts (the evaluation's last)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self._original = LabelScorer.score

    def __enter__(self) -> PredictionTap:
        tap = self

        def score(scorer, *a, **kw):
            scores = tap._original(scorer, *a, **kw)
            tap.calls.append(scores.argmax(-1).tolist())
            return scores

        LabelScorer.score = score
        return self

    def __exit__(self, *exc) -> None:
        LabelScorer.score = self._original


def cell_config(task_name: str, method: str, dtype: str, options: dict, args) -> RunConfig:
    """One agreement cell's run: the same rows, seed and partition for both dtypes."""
    return RunConfig(method, task=task_name, model=args.model, test_size=args.rows, seed=0,
                     clients=args.clients, alpha=args.alpha, dtype=dtype, options=options)


def run_cell(config: RunConfig, lm, path: Path) -> dict:
    """The cell's record and the label it predicted on each test row; a finished cell (its
    result.json and predictions.json there, run with the same settings) is read back."""
    predictions_file = path / "predictions.json"
    if predictions_file.exists() and (record := reuse_finished(path, config)) is not None:
        return {"record": record, "predictions": json.loads(predictions_file.read_text())}
    with PredictionTap() as tap:
        record = run_experiment(config, path, lm=lm)
    predictions = [c for c in tap.calls if len(c) == record["metrics"]["num_test"]][-1]
    predictions_file.write_text(json.dumps(predictions))
    return {"record": record, "predictions": predictions}


def agreement(models: dict, task_name: str, method: str, options: dict, args) -> dict:
    """Both dtypes on the same rows: labels, accuracies and the paired test."""
    runs = {}
    for name, lm in models.items():
        config = cell_config(task_name, method, name, options, args)
        runs[name] = run_cell(config, lm, args.out / f"rows{args.rows}" / task_name / method / name)
    a, b = runs["float32"], runs["bfloat16"]
    same = sum(x == y for x, y in zip(a["predictions"], b["predictions"], strict=True))
    n = len(a["predictions"])
    only_a, only_b, p = mcnemar_exact(a["record"]["per_row"]["correct"],
                                      b["record"]["per_row"]["correct"])
    accuracy = {}
    for name, run in runs.items():
        correct = sum(run["record"]["per_row"]["correct"])
        accuracy[name] = {"accuracy": correct / n, "ci95": list(wilson_interval(correct, n)),
                          "seconds": run["record"]["costs"]["wall_seconds"]}
    row = {"task": task_name, "method": method, "rows": n, "agree": same / n,
           "bar_met": same / n >= AGREEMENT_BAR, "accuracy": accuracy,
           "only_float32": only_a, "only_bfloat16": only_b, "mcnemar_p": p}
    if method in TRAINED:
        record = a["record"]
        row["trained"] = {"clients": record["config"]["clients"],
                          "alpha": record["config"]["alpha"], "seed": record["config"]["seed"],
                          "options": options}
    return row


def trained_options(args) -> dict[str, dict]:
    """Each trained method's budget: `--budget`'s options, then the `--set` overrides."""
    grid = yaml.safe_load(Path(args.budget).read_text()) if args.budget else {}
    options = {m: dict((grid.get("options") or {}).get(m, {})) for m in TRAINED}
    for item in args.set:
        method, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        if method not in options or not key or not value:
            raise SystemExit(f"--set {item!r}: expected METHOD:KEY=VALUE, METHOD in {TRAINED}")
        options[method][key] = yaml.safe_load(value)
    return options


def markdown(summary: dict, args) -> str:
    probe = summary["probe"]
    repeats = summary.get("settings", {}).get("repeats", args.repeats)  # of the speed run
    lines = [
        "# bfloat16 vs float32 (benchmarks/dtype.py)", "",
        f"Model {args.model}; CPU {probe['cpu']} with "
        f"{', '.join(probe['flags']) or 'no bf16 flags'}"
        f"; torch threads {summary['threads']}. Timings: same process, the two dtypes "
        f"alternating, best of {repeats}; "
        + summary.get("speed_machine", "other engineers' jobs shared the machine")
        + ", so read the **ratios**, not the seconds. `auto` here: " + summary["auto"], "",
        "## Speed", "", *([f"bfloat16 rows: {summary['speed_head']}.", ""]
                          if summary.get("speed_head") else []),
        "| path | float32 s | bfloat16 s | float32 / bfloat16 |",
        "|---|---|---|---|"]
    for path, times in summary["speed"].items():
        f32, bf16 = times["float32"], times["bfloat16"]
        lines.append(f"| {path} | {f32:.3f} | {bf16:.3f} | {f32 / bf16:.2f}× |")
    lines += ["", "## Answers on the same rows", "",
              f"Bar: labels agree on ≥ {100 * AGREEMENT_BAR:.0f} % of rows. Seconds: the "
              "cell's wall time, machine shared."
              + (f" bfloat16 cells: {summary['answers_head']}." if summary.get("answers_head")
                 else ""), "",
              "| task | method | rows | labels agree | bar met | float32 acc [95 %] "
              "| bfloat16 acc [95 %] | only f32 / only bf16 right | McNemar p | s f32 / bf16 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["agreement"]:
        acc = {k: f"{100 * v['accuracy']:.1f} [{100 * v['ci95'][0]:.1f}, "
                  f"{100 * v['ci95'][1]:.1f}]" for k, v in row["accuracy"].items()}
        met = "yes" if row["agree"] >= AGREEMENT_BAR else "**no**"
        seconds = " / ".join(f"{row['accuracy'][k]['seconds']:.0f}" for k in DTYPES)
        lines.append(f"| {row['task']} | {row['method']} | {row['rows']} | "
                     f"{100 * row['agree']:.1f} % | {met} | {acc['float32']} | "
                     f"{acc['bfloat16']} | {row['only_float32']} / {row['only_bfloat16']} | "
                     f"{row['mcnemar_p']:.3g} | {seconds} |")
    trained = {(r["method"], json.dumps(r["trained"], sort_keys=True)): r["trained"]
               for r in summary["agreement"] if "trained" in r}
    for (method, _), how in trained.items():
        lines.append(f"\n{method}: trained once per dtype, {how['clients']} clients, "
                     f"Dirichlet α = {how['alpha']}, seed {how['seed']}, options "
                     f"{json.dumps(how['options'])}.")
    if summary.get("answers_cut"):
        lines.append(f"\nCut for time: {summary['answers_cut']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "subj", "trec"])
    parser.add_argument("--methods", nargs="+", default=["zero-shot", "central-icl"])
    parser.add_argument("--rows", type=int, default=300, help="test rows per agreement cell")
    parser.add_argument("--speed-rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head-repeats", type=int, default=1,
                        help="the strided bfloat16 head alone takes seconds to minutes")
    parser.add_argument("--round-clients", type=int, default=2)
    parser.add_argument("--ifed-epochs", type=int, default=1)
    parser.add_argument("--speed", action="store_true",
                        help="only the speed rows, replacing the record's (its answers kept)")
    parser.add_argument("--alone", action="store_true",
                        help="say the machine ran nothing else (recorded beside the timings)")
    parser.add_argument("--answers", action="store_true",
                        help="only the agreement cells, added to the existing record")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--budget", default=str(RESULTS.parent / "default.yaml"),
                        help="a grid whose options give the trained methods' budgets")
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD:KEY=VALUE",
                        help="a smaller budget for a trained method, the same in both dtypes")
    parser.add_argument("--trained-tasks", nargs="+", default=None,
                        help="tasks of the trained methods (default: --tasks)")
    parser.add_argument("--stop-at", default=None, metavar="HH:MM",
                        help="UTC time after which no new agreement cell starts")
    parser.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                        help="minutes of this run after which no new agreement cell starts")
    output_arguments(parser, "dtype")
    args = parser.parse_args()
    if args.answers:
        answers(args)
        return
    summary = new_summary()
    if args.speed:  # the record's answers are kept: only the speed rows are measured again
        kept = json.loads((args.report_dir / "dtype.json").read_text())
        summary |= {k: kept[k] for k in ANSWER_KEYS if k in kept}
    summary["speed_head"] = "float32 LM head over bfloat16 activations (float32_head)"
    summary["speed_machine"] = machine_note(args.alone)
    models = {name: load_model(args.model, dtype=dtype) for name, dtype in DTYPES.items()}

    def save() -> None:
        write_outputs(args.report_dir, "dtype", summary, markdown(summary, args), args)

    measure_speed(summary, models, args, save)
    if args.speed:
        return
    for task_name in args.tasks:
        for method in args.methods:
            summary["agreement"].append(agreement(models, task_name, method, {}, args))
            save()


#: what a speed-only run keeps of the record: the agreement rows and how they were made
ANSWER_KEYS = ("agreement", "answers_settings", "answers_head", "answers_cut")


def new_summary() -> dict:
    probe = cpu_bf16_probe()
    return {"probe": probe.__dict__ | {"why": probe.why()},
            "auto": f"{'bfloat16' if probe.use_bf16 else 'float32'} ({probe.why()})",
            "threads": torch.get_num_threads(), "speed": {}, "agreement": []}


def machine_note(alone: bool) -> str:
    """Whether the timings had the machine to themselves: the operator's word (`--alone`)
    and the load average the run saw when it started, so a reader can check it."""
    said = "nothing else running (--alone)" if alone else "other jobs may have shared the machine"
    return f"{said}; 1-min load average at the start {os.getloadavg()[0]:.2f}"


def measure_speed(summary: dict, models: dict, args, save: Callable[[], None]) -> None:
    """The speed rows: the LM head, the scorer, one IFed-ICL and one FedAvg-LoRA round."""
    heads = head_times(models, args.head_repeats)
    for kind in ("strided", "contiguous"):
        summary["speed"][f"lm_head, {kind} last position (16 rows)"] = {
            name: heads[name][kind] for name in models}
    save()
    task = load_task("sst2")
    for kind, times in scorer_times(models, task, args).items():
        summary["speed"][f"scorer {kind}, {args.speed_rows} sst2 rows"] = times
    save()
    rounds = {"IFed-ICL calibration round": ("ifed-icl", {"local_epochs": args.ifed_epochs}),
              "FedAvg-LoRA round": ("fedavg-lora", {})}
    for label, (method, options) in rounds.items():
        summary["speed"][f"{label} ({args.round_clients} clients)"] = alternate(
            {name: (lambda lm=lm, m=method, o=options: round_seconds(m, o, lm, args))
             for name, lm in models.items()}, args.repeats)
        save()


def agreement_cells(args) -> list[tuple[str, str]]:
    """(task, method) in run order: the untrained methods on every task first (cheap), then
    the trained ones task by task."""
    untrained = [m for m in args.methods if m not in TRAINED]
    trained = [m for m in args.methods if m in TRAINED]
    return ([(t, m) for t in args.tasks for m in untrained]
            + [(t, m) for t in (args.trained_tasks or args.tasks) for m in trained])


def past(args, started: float) -> bool:
    """Whether the UTC clock is past `--stop-at` (HH:MM today) or the run past `--stop-after`
    minutes: a cell started later could run over the time the machine was given for it."""
    late = args.stop_at is not None and datetime.now(UTC).strftime("%H:%M") >= args.stop_at
    return late or (args.stop_after is not None
                    and time.perf_counter() - started > 60 * args.stop_after)


def answers(args) -> None:
    """The agreement cells alone, each (task, method) row replacing the record's earlier one;
    the record's speed rows and the settings they were measured with are kept."""
    record_file = args.report_dir / "dtype.json"
    summary = (json.loads(record_file.read_text()) if record_file.exists()
               else new_summary())
    summary.pop("env", None)
    summary.pop("answers_cut", None)
    summary.setdefault("speed_head", "bfloat16 LM head (measured before models.load.float32_head)")
    summary["answers_head"] = "float32 LM head over bfloat16 activations (float32_head)"
    summary["answers_settings"] = {k: str(v) if isinstance(v, Path) else v
                                   for k, v in vars(args).items()}
    options = trained_options(args)
    started = time.perf_counter()
    models = {name: load_model(args.model, dtype=dtype) for name, dtype in DTYPES.items()}
    for task_name, method in agreement_cells(args):
        if past(args, started):
            print(f"out of time: {task_name} {method} and later cells not started")
            summary["answers_cut"] = f"{task_name} {method} and later cells not started"
            write_outputs(args.report_dir, "dtype", summary, markdown(summary, args))
            break
        row = agreement(models, task_name, method, options.get(method, {}), args)
        rows = [r for r in summary["agreement"] if (r["task"], r["method"]) != (task_name, method)]
        summary["agreement"] = sorted(rows + [row], key=lambda r: (
            r["task"], ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER)))
        write_outputs(args.report_dir, "dtype", summary, markdown(summary, args))


if __name__ == "__main__":
    main()
