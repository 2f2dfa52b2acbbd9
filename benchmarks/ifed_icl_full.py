"""IFed-ICL at the paper's budget (issue 22): 10 rounds × 10 local epochs, beside its rivals.

Per task and seed, on the same test rows: zero-shot, local ICL and central ICL with the fair
demonstration budget (`shots` per class, capped by what the holder has), central I2CL at
the same number of calibration epochs in all (10 × 10 = 100), and IFed-ICL (10 clients,
Dirichlet α = 0.5). Accuracy with its 95 % interval (Wilson for one seed, t over seeds), and
IFed-ICL's paired difference from zero-shot, local ICL and central ICL on every seed
(McNemar where both score rows 0/1; Wilcoxon on the share of clients right for local ICL).
`--pooled-i2cl` adds central I2CL on as many examples as the clients hold in all (clients ×
5 per class): IFed-ICL may beat plain I2CL only because it sees up to 10× the examples.

The model defaults to smollm2-135m: on qwen2.5-coder-0.5b one seed of sst2 alone costs
≈ 85 min of calibration here (README), so the paper's grid cannot fit 2 hours on 2 cores;
the 135M model is ≈ 4× cheaper. In bfloat16 (`--dtype bfloat16`, its own cells and
summary) one task and seed of the 0.5B model took 58 min here (sst2). Cells resume, so
the grid runs in parts, e.g.

    nohup .venv/bin/python benchmarks/ifed_icl_full.py --tasks sst2 --seeds 1 \
        --report-dir /tmp/sst2 >> benchmarks/results/ifed_icl_full.log 2>&1 &

and `--recorded` then writes the summary of every task and seed whose cells are all finished
(running nothing), so a part never overwrites the whole.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import RESULTS, Unfinished, cell, grid_arguments, recorded_cell, write_outputs

from fedsteer.data import load_task
from fedsteer.eval.metrics import mean_interval, recorded_interval
from fedsteer.eval.report import paired_difference
from fedsteer.experiment import RunConfig
from fedsteer.methods.ifed_icl import IFedICL
from fedsteer.models import load_placed

DEFAULT_GRID_MODEL = "smollm2-135m"
RIVALS = ("zero-shot", "local-icl", "central-icl", "central-i2cl")
POOLED = "central-i2cl-pooled"  # I2CL on as many examples as all clients together hold


def rivals(args) -> tuple[str, ...]:
    return RIVALS + ((POOLED,) if args.pooled_i2cl else ())


def methods(args) -> tuple[str, ...]:
    return (*rivals(args), "ifed-icl")


def task_cells(args, lm, task_name: str,
               run_cell=cell) -> tuple[list[int], dict[str, list[dict]]]:
    """The seeds of `args.seeds` that have every method's record, and those records per
    seed (zero-shot has no seed: one record, reused). A seed is left out only where
    `run_cell` raises `Unfinished` for it (`recorded_cell`); `cell` runs what is missing."""
    task = load_task(task_name)
    common = dict(clients=args.clients, alpha=args.alpha, test_size=args.test_size,
                  dtype=args.dtype)
    steering = dict(rounds=args.rounds, options={"local_epochs": args.local_epochs})
    zero = run_cell(args.out, RunConfig("zero-shot", task_name, args.model, **common), lm, task)
    seeds, records = [], {m: [] for m in methods(args)}
    for seed in args.seeds:
        try:
            found = seed_cells(args, lm, task, task_name, seed, steering, common, run_cell)
        except Unfinished:
            continue
        seeds.append(seed)
        for method, record in {"zero-shot": zero, **found}.items():
            records[method].append(record)
    return seeds, records


def seed_cells(args, lm, task, task_name: str, seed: int, steering: dict, common: dict,
               run_cell=cell) -> dict[str, dict]:
    """One seed's record of every method but zero-shot."""
    found = {"local-icl": run_cell(args.out, RunConfig(
        "local-icl", task_name, args.model, seed=seed, fraction=args.local_fraction,
        shots=args.shots, **common), lm, task)}
    found["central-icl"] = run_cell(args.out, RunConfig(
        "central-icl", task_name, args.model, seed=seed, shots=args.shots, **common), lm, task)
    for method in ("central-i2cl", "ifed-icl"):
        found[method] = run_cell(args.out, RunConfig(
            method, task_name, args.model, seed=seed, **steering, **common), lm, task)
    if args.pooled_i2cl:
        found[POOLED] = pooled_i2cl(args, lm, task, task_name, seed, steering, common, run_cell)
    return found


def pooled_i2cl(args, lm, task, task_name: str, seed: int, steering: dict, common: dict,
                run_cell=cell) -> dict:
    """Central I2CL with `clients` times the per-class budget: the examples IFed-ICL's
    clients can hold in all (each turns up to `demos_per_class` per label it holds into
    vectors and calibrates on as many), so a gap between them is not just more data.
    Its own folder: the plain central-i2cl cell of the same seed has other options. The task
    as the other cells name it (a user's task path, not the task's own name)."""
    pooled = args.clients * IFedICL.demos_per_class
    options = {**steering["options"], "demos_per_class": pooled,
               "calibration_per_class": pooled}
    return run_cell(args.out / "pooled", RunConfig(
        "central-i2cl", task_name, args.model, seed=seed, rounds=steering["rounds"],
        options=options, **common), lm, task)


def accuracy_row(records: list[dict]) -> dict:
    """Mean accuracy over seeds with its 95 % interval (the record's own for one record:
    one seed, or zero-shot, which has no seed), and each seed's own interval: over two
    seeds the t interval is too wide to say much (t₀.₉₇₅ with 1 degree of freedom is 12.7),
    so it is cut to what an accuracy can be, and each seed's row interval is kept beside it."""
    distinct = list({id(r): r for r in records}.values())
    acc = [r["metrics"]["accuracy"] for r in distinct]
    per_seed = [list(recorded_interval(r["metrics"])) for r in distinct]
    low, high = mean_interval(acc) if len(distinct) > 1 else per_seed[0]
    return {"accuracy": statistics.mean(acc), "accuracy_ci95": [max(low, 0.0), min(high, 1.0)],
            "per_seed": acc, "per_seed_ci95": per_seed, "budget": budget(distinct[0]),
            "client_seconds": statistics.mean(r["costs"]["client_seconds"] for r in distinct)}


def percent_interval(accuracy: float, interval: list[float]) -> str:
    return f"{100 * accuracy:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def budget(record: dict) -> str:
    """What a method spends: demonstrations shown in context, or turned into vectors and
    calibrated on (per class, per holder), and its calibration epochs."""
    demos = record["metrics"].get("demonstrations")
    if isinstance(demos, dict):  # local ICL: clients show what they hold
        return f"{demos['mean']:.1f} shown (clients {demos['min']}–{demos['max']})"
    if demos is not None:
        return f"{demos} shown"
    options = record["config"].get("method_options", {})
    if "demos_per_class" in options:
        epochs = options["rounds"] * options["local_epochs"]
        return (f"{options['demos_per_class']}/class into vectors, "
                f"{options['calibration_per_class']}/class calibrated, {epochs} epochs")
    return "none"


def versus(records: dict[str, list[dict]], rival: str) -> dict:
    """IFed-ICL minus `rival`, seed by seed on the same rows: points, p and the test."""
    seeds = [paired_difference(mine, theirs) for mine, theirs in
             zip(records["ifed-icl"], records[rival], strict=True)]
    points = [d for d, _, _ in seeds]
    return {"rival": rival, "points": statistics.mean(points), "per_seed_points": points,
            "per_seed_p": [p for _, p, _ in seeds], "test": seeds[0][2],
            "points_ci95": list(mean_interval(points)) if len(points) > 1 else None}


def verdict(result: dict) -> str:
    """'beats' / 'loses to' only where every seed's paired test has p < 0.05, one way."""
    signs = {d > 0 for d in result["per_seed_points"]}
    if all(p < 0.05 for p in result["per_seed_p"]) and len(signs) == 1:
        return "beats" if signs == {True} else "loses to"
    return "no supported difference from"


def markdown(summary: dict, args) -> str:
    lines = [f"# IFed-ICL at the paper's budget: {args.model}"
             + (f" in {args.dtype}" if args.dtype != "float32" else ""), "",
             f"IFed-ICL: {args.clients} clients, Dirichlet α = {args.alpha}, {args.rounds} "
             f"calibration rounds × {args.local_epochs} local epochs; central I2CL "
             f"{args.rounds * args.local_epochs} epochs on 5 per class from the pooled data"
             + (f" ({POOLED}: on {args.clients} × 5 per class)" if args.pooled_i2cl else "")
             + "; local and central "
             f"ICL {args.shots} demonstrations per class (capped by what the holder has; "
             f"local ICL: a seeded {args.local_fraction:g} of the clients evaluate). "
             f"{args.test_size} test rows per task (fewer where the split is smaller). "
             "Accuracy % [95 %: Wilson for one seed, t over seeds cut to 0–100; "
             "per seed: Wilson; local ICL's: Wilson over the rows its evaluating clients "
             "all scored, widened by the t half-width over those clients].", ""]
    for task, entry in summary["tasks"].items():
        rows = entry["accuracy"]
        lines += [f"## {task} ({entry['num_test']} test rows, seeds {entry['seeds']})", "",
                  "| method | accuracy [95 %] | per seed [95 %] | budget (per holder) | client s |",
                  "|---|---:|---|---:|---:|"]
        for method in methods(args):
            r = rows[method]
            low, high = r["accuracy_ci95"]
            per_seed = "; ".join(percent_interval(a, ci) for a, ci in
                                 zip(r["per_seed"], r["per_seed_ci95"], strict=True))
            lines.append(
                f"| {method} | {100 * r['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}] "
                f"| {per_seed} "
                f"| {r['budget']} "
                f"| {r['client_seconds']:.0f} |")
        lines += ["", "| IFed-ICL vs | points (mean over seeds) | per seed: points (p) | test "
                  "| verdict |", "|---|---:|---|---|---|"]
        for result in entry["versus"]:
            seeds = ", ".join(f"{d:+.1f} ({p:.2g})" for d, p in
                              zip(result["per_seed_points"], result["per_seed_p"], strict=True))
            lines.append(f"| {result['rival']} | {result['points']:+.1f} | {seeds} | "
                         f"{result['test']} | IFed-ICL {verdict(result)} {result['rival']} |")
        lines.append("")
    if args.recorded:
        lines.append("Summarised from the recorded cells (`--recorded`); each invocation's "
                     f"wall time is in `{summary_name(args)}.log`.")
    else:
        lines.append(f"Wall time of this invocation: {summary['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = grid_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                            RESULTS / "ifed_icl_full")
    parser.set_defaults(test_size=500, tasks=["sst2", "subj", "trec", "agnews"])
    parser.add_argument("--model", default=DEFAULT_GRID_MODEL)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--shots", type=int, default=5,
                        help="ICL demonstrations per class (IFed-ICL: 5 per class into vectors)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the model's dtype (bfloat16: a float32 LM head, see dtype.md)")
    parser.add_argument("--report-dir", type=Path, default=RESULTS)
    parser.add_argument("--pooled-i2cl", action="store_true",
                        help=f"add {POOLED}: central I2CL on clients × 5 examples per class")
    parser.add_argument("--recorded", action="store_true",
                        help="run nothing: summarise each task's seeds whose cells are all "
                             "finished")
    args = parser.parse_args()
    started = time.time()
    lm = None if args.recorded else load_placed(args.model, dtype=args.dtype)
    summary: dict = {"tasks": {}}
    for task_name in args.tasks:
        try:
            seeds, records = task_cells(args, lm, task_name,
                                        recorded_cell if args.recorded else cell)
        except Unfinished:  # its zero-shot cell
            seeds = []
        if not seeds:
            print(f"{task_name}: no seed with every cell finished; left out", flush=True)
            continue
        summary["tasks"][task_name] = {
            "seeds": seeds,
            "num_test": records["zero-shot"][0]["metrics"]["num_test"],
            "accuracy": {m: accuracy_row(records[m]) for m in methods(args)},
            "versus": [versus(records, rival) for rival in rivals(args)]}
    summary["wall_seconds"] = time.time() - started
    write_outputs(args.report_dir, summary_name(args), summary, markdown(summary, args), args)


def summary_name(args) -> str:
    """The pooled check has its own summary and log, beside the grid's; so has a grid on
    another model or dtype than the 135M float32 one."""
    name = "ifed_icl_full_pooled" if args.pooled_i2cl else "ifed_icl_full"
    if args.model != DEFAULT_GRID_MODEL:
        name += f"_{args.model}"
    return name + (f"_{args.dtype}" if args.dtype != "float32" else "")


if __name__ == "__main__":
    main()
