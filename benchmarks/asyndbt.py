"""AsynDBT vs sync-DBT, cen-DBT, BDPL and zero-shot through a local black box; Byzantine workers.

Local black box on the default model. Workers get heterogeneous simulated latencies per
local round (the first is fast, the last a straggler), so asynchrony has something to win.
Budget (each part within 2 h here): M = 5 prompt words from N = 50 candidates, V = 4
demonstration candidates per class, I = 4 samples, mini-batches of 4, 1 local step per
message, 10 server iterations (BDPL: 10 steps), 100 test rows; the paper's sizes (M = 75,
N = 100, V = 50) are `PAPER` below, far beyond this machine. Zero-shot, BDPL and cen-DBT
have no workers: one cell per task, shown in every row of that task.

    nohup .venv/bin/python benchmarks/asyndbt.py > benchmarks/results/asyndbt.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import cell, output_arguments, write_outputs  # noqa: E402

from fedsteer.data import load_task  # noqa: E402
from fedsteer.eval.record import environment  # noqa: E402
from fedsteer.experiment import RunConfig  # noqa: E402
from fedsteer.models import DEFAULT_MODEL, load_model  # noqa: E402

PAPER = {"prompt_length": 75, "candidates": 100, "demo_candidates": 50, "lr": 1e-4}
BUDGET = {"prompt_length": 5, "candidates": 50, "demo_candidates": 4, "samples": 4,
          "batch_size": 4, "steps_per_round": 1, "shots_per_class": 8, "lr": 0.05}
METHODS = ("zero-shot", "bdpl", "cen-dbt", "sync-dbt", "asyndbt")


def latencies(workers: int, slowest: float) -> list[float]:
    """Heterogeneous per-worker latency: 0 for the first, `slowest` seconds for the last."""
    return [slowest * i / max(workers - 1, 1) for i in range(workers)]


def options_for(method: str, workers: int, args) -> dict:
    if method == "zero-shot":
        return {}
    if method == "bdpl":
        return {**BUDGET, "rounds": args.iterations, "api_budget": None}
    # "threads": the recorded cells measured real wall time with slept latencies; the
    # re-run asked for in issue 16 moves to the reproducible simulated clock
    options = {**BUDGET, "iterations": args.iterations, "staleness": 3,
               "latency": latencies(workers, args.slowest), "schedule": "threads"}
    if method == "asyndbt":  # sync-DBT waits for every worker; cen-DBT has one
        options["active"] = max(workers // 2, 1)
    return options


CENTRAL = ("zero-shot", "bdpl", "cen-dbt")  # no workers: one cell per task, in every row


def grid(args, lm, cells: dict, workers: int) -> None:
    for task_name in args.tasks:
        task = load_task(task_name)
        for method in METHODS:
            size = 1 if method in CENTRAL else workers
            config = RunConfig(method, task_name, args.model, clients=size,
                               test_size=args.test_size, options=options_for(method, size, args))
            cells[(task_name, workers, method)] = cell(args.out / "grid", config, lm, task)


def byzantine(args, lm, cells: dict) -> None:
    """1 of 4 workers sends sign-flipped prompts: ψ vs mean and Flower's robust rules."""
    task = load_task("sst2")
    for consensus, bad in [("sign", 0), ("sign", 1), ("mean", 0), ("mean", 1),
                           ("median", 1), ("trimmed-mean", 1), ("krum", 1)]:
        options = {**options_for("asyndbt", 4, args), "consensus": consensus, "byzantine": bad,
                   "attack": "sign-flip"}
        config = RunConfig("asyndbt", "sst2", args.model, clients=4, test_size=args.test_size,
                           options=options)
        cells[(consensus, bad)] = cell(args.out / f"byzantine-{consensus}-{bad}", config, lm,
                                       task)


def row(record: dict) -> dict:
    m = record["metrics"]
    costs = record["costs"]
    return {"accuracy": m["accuracy"], "wall_seconds": costs["wall_seconds"],
            # wall minus the final evaluation; DBT's per-worker evaluation happens inside the
            # run (the same 100 rows per worker for sync and async), so it stays in
            "train_seconds": costs["wall_seconds"] - costs.get("eval_seconds", 0.0),
            "api_calls": m.get("api_training_calls", m.get("api_calls", 0)),
            "api_prompt_tokens": m.get("api_prompt_tokens", 0)}


def markdown(grid_rows: dict, byz: dict, wall: float, args) -> str:
    lines = [f"# AsynDBT through a local black box ({args.model})", "",
             f"Budget: {json.dumps(BUDGET)}; {args.iterations} server iterations; "
             f"{args.test_size} test rows; latencies 0…{args.slowest} s per local round.", "",
             "| task | workers | " + " | ".join(METHODS) + " | async / sync training time |",
             "|---|---:|" + "---:|" * (len(METHODS) + 1)]
    for (task, workers) in sorted({(t, w) for t, w, _ in grid_rows}):
        cells = [grid_rows[(task, workers, m)] for m in METHODS]
        ratio = cells[4]["train_seconds"] / max(cells[3]["train_seconds"], 1e-9)
        lines.append(f"| {task} | {workers} | " + " | ".join(
            f"{100 * c['accuracy']:.1f} ({c['api_calls']} calls, {c['train_seconds']:.0f} s)"
            for c in cells) + f" | {ratio:.2f} |")
    if byz:
        lines += ["", "Byzantine (sst2, 4 workers, 1 sign-flipping):", "",
                  "| consensus | honest | 1 Byzantine | accuracy lost |", "|---|---:|---:|---:|"]
    for consensus in ("sign", "mean", "median", "trimmed-mean", "krum") if byz else ():
        honest, bad = byz.get((consensus, 0)), byz[(consensus, 1)]
        honest_text = f"{100 * honest['accuracy']:.1f}" if honest else "—"
        lost = f"{100 * (honest['accuracy'] - bad['accuracy']):.1f}" if honest else "—"
        lines.append(f"| {consensus} | {honest_text} | {100 * bad['accuracy']:.1f} | {lost} |")
    lines += ["", f"Total wall time of the cells {wall / 60:.0f} min (summed over their records, "
              "so a resumed run counts every part)."]
    return "\n".join(lines) + "\n"


def plot(grid_rows: dict, path: Path) -> None:
    """Colour = method, marker = task, filled = fewest workers, hollow = most."""
    from matplotlib.lines import Line2D

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = dict(zip(METHODS, plt.cm.tab10.colors, strict=False))
    tasks = sorted({t for t, _, _ in grid_rows})
    markers = dict(zip(tasks, "osD^v", strict=False))
    fewest = min(w for _, w, _ in grid_rows)
    for (task, workers, method), r in sorted(grid_rows.items()):
        style = {"marker": markers[task], "s": 36, "edgecolors": colours[method],
                 "facecolors": colours[method] if workers == fewest else "none"}
        left.scatter(r["train_seconds"], 100 * r["accuracy"], **style)
        right.scatter(max(r["api_calls"], 1), 100 * r["accuracy"], **style)
    left.set(xlabel="training wall time (s)", ylabel="accuracy (%)",
             title="accuracy vs training time")
    right.set(xscale="log", xlabel="API calls (training)", title="accuracy vs API calls")
    handles = [Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in METHODS]
    handles += [Line2D([], [], color="grey", marker=markers[t], ls="", label=t) for t in tasks]
    right.legend(handles=handles, fontsize=7, loc="center left",
                 title=f"filled: {fewest} workers", title_fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte", "trec"])
    parser.add_argument("--workers", nargs="+", type=int, default=[3, 6])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--slowest", type=float, default=6.0)
    parser.add_argument("--skip-byzantine", action="store_true")
    output_arguments(parser, "asyndbt")
    args = parser.parse_args()
    lm, cells, byz = load_model(args.model), {}, {}
    for i, workers in enumerate(args.workers):  # the Byzantine runs after the first size
        grid(args, lm, cells, workers)
        if i == 0 and not args.skip_byzantine:
            byzantine(args, lm, byz)
    grid_rows = {k: row(v) for k, v in cells.items()}
    byz_rows = {k: row(v) for k, v in byz.items()}
    unique = {json.dumps(r["config"], sort_keys=True, default=str): r  # a worker-free cell
              for r in [*cells.values(), *byz.values()]}  # shows in every row of its task
    wall = sum(r["costs"]["wall_seconds"] for r in unique.values())
    args.report_dir.mkdir(parents=True, exist_ok=True)
    plot(grid_rows, args.report_dir / "asyndbt.png")
    summary = {"grid": {"/".join(map(str, k)): v for k, v in grid_rows.items()},
               "byzantine": {"/".join(map(str, k)): v for k, v in byz_rows.items()},
               "wall_seconds": wall, "env": environment(),
               "settings": vars(args)}
    text = markdown(grid_rows, byz_rows, wall, args)
    write_outputs(args.report_dir, "asyndbt", summary, text)


if __name__ == "__main__":
    main()
