"""Baselines benchmark (issue: foundation): zero-shot, local ICL and central ICL.

Default model on sst2, subj, agnews and trec (10 clients, Dirichlet alpha = 0.5, 300 test
rows, 3 seeds), plus zero-shot and central ICL on smollm2-135m, plus the scoring cost of
zero-shot vs ICL with and without shared-prefix reuse. Every cell goes through
`fedsteer.experiment.run_experiment` (the CLI's path) and writes its own result.json, so
the run resumes: finished cells are read back, not recomputed.

    nohup .venv/bin/python benchmarks/baselines.py > benchmarks/results/baselines.log 2>&1 &

Choices, said here so the table can be read right:
* zero-shot is deterministic given the test rows, so it runs once per task (std 0).
* local ICL evaluates a seeded half of the 10 clients per seed (`--local-fraction 0.5`):
  each client scores all test rows, which is 10x the cost of one evaluation.
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, cell, grid_arguments, pct, summarize, write_outputs

from fedsteer.data import load_task
from fedsteer.eval.metrics import mcnemar_exact
from fedsteer.experiment import RunConfig
from fedsteer.methods import seeded_rng
from fedsteer.methods.icl import select_demonstrations
from fedsteer.models import DEFAULT_MODEL, load_model
from fedsteer.models.scoring import LabelScorer


def scoring_cost(lm, task_name: str, n: int = 96, shots: int = 4, repeats: int = 2) -> dict:
    """Seconds per example: zero-shot, k-shot ICL with prefix reuse, and re-encoding."""
    task = load_task(task_name)
    queries = [task.spec.format_query(ex) for ex in task.test[:n]]
    prefix = task.spec.demo_prefix(select_demonstrations(task.train, shots, seeded_rng(0)))
    scorer = LabelScorer(lm, task.spec.label_words)
    scorer.score(queries[:8])  # warm-up

    def best_of(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) / n

    zero = best_of(lambda: scorer.score(queries))
    reuse = best_of(lambda: scorer.score(queries, prefix))
    reencode = best_of(lambda: scorer.score(queries, prefix, reuse_prefix=False))
    return {
        "task": task_name, "examples": n, "shots": shots,
        "prefix_tokens": len(lm.tokenizer(prefix)["input_ids"]),
        "zero_shot_s_per_example": zero,
        "icl_prefix_reuse_s_per_example": reuse,
        "icl_reencode_s_per_example": reencode,
        "reuse_over_zero_shot": reuse / zero,
        "reencode_over_zero_shot": reencode / zero,
    }


def paired_lines(records: list[dict]) -> list[str]:
    """Central ICL against zero-shot on the same rows, per seed: exact McNemar. (Local ICL's
    rows stay with its clients, which report only their accuracy, so it has no paired test.)"""
    zero = {(r["model"], r["task"]): r for r in records if r["method"] == "zero-shot"}
    lines = ["", "Central ICL vs zero-shot on the same rows (exact McNemar per seed: rows only "
             "central ICL gets right / only zero-shot gets right, p):", "",
             "| model | task | seed | Δ acc (points) | only central / only zero-shot | p |",
             "|---|---|---:|---:|---:|---:|"]
    for r in sorted((r for r in records if r["method"] == "central-icl"),
                    key=lambda r: (r["model"], r["task"], r["config"]["seed"])):
        base = zero.get((r["model"], r["task"]))
        if base is None or not (r.get("per_row") and base.get("per_row")):
            continue
        only_central, only_zero, p = mcnemar_exact(r["per_row"]["correct"],
                                                   base["per_row"]["correct"])
        delta = 100 * (r["metrics"]["accuracy"] - base["metrics"]["accuracy"])
        lines.append(f"| {r['model']} | {r['task']} | {r['config']['seed']} | {delta:+.1f} | "
                     f"{only_central} / {only_zero} | {p:.2g}{' *' if p < 0.05 else ''} |")
    return lines


def markdown(rows: dict, records: list[dict], cost: dict, wall: float, args) -> str:
    lines = [f"{args.clients} clients, Dirichlet α = {args.alpha}, {args.test_size} test rows "
             f"(the same rows for every method), seeds {args.seeds}; accuracy % as mean ± std "
             "over seeds [95 % interval: Wilson for one run, t over seeds]; ICL shows `shots` "
             "demonstrations per class (the total per client is in each result.json).", "",
             "| model | task | zero-shot | local ICL (mean client) | central ICL |",
             "|---|---|---|---|---|"]
    for model, task in sorted({(r["model"], r["task"]) for r in rows.values()}):
        def get(method, model=model, task=task):
            return pct(rows.get(f"{model}/{task}/{method}"), with_clients=True)
        lines.append(f"| {model} | {task} | {get('zero-shot')} | {get('local-icl')} | "
                     f"{get('central-icl')} |")
    lines += paired_lines(records)
    lines += [
        "",
        f"Scoring cost on {cost['task']} ({cost['examples']} queries, {cost['shots']}-shot "
        f"prefix of {cost['prefix_tokens']} tokens), seconds per example:",
        "",
        "| zero-shot | ICL, prefix reused | ICL, re-encoded | reused / zero-shot | "
        "re-encoded / zero-shot |",
        "|---|---|---|---|---|",
        f"| {cost['zero_shot_s_per_example']:.3f} | {cost['icl_prefix_reuse_s_per_example']:.3f} "
        f"| {cost['icl_reencode_s_per_example']:.3f} | {cost['reuse_over_zero_shot']:.2f}× | "
        f"{cost['reencode_over_zero_shot']:.2f}× |",
        "",
        f"Total wall time of the cells: {wall / 60:.1f} min (summed over their records, so a "
        "resumed run counts every part).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = grid_arguments(
        argparse.ArgumentParser(description=__doc__.splitlines()[0]), RESULTS / "baselines"
    )
    parser.add_argument("--name", default="baselines",
                        help="summary files benchmarks/results/<name>.{md,json}")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the summary from recorded cells (no model loaded; a "
                             "missing cell loads its model and runs)")
    args = parser.parse_args()

    lm = None if args.report_only else load_model(DEFAULT_MODEL)
    cost_file = args.out / "scoring_cost.json"  # measured once, like every other cell
    if cost_file.exists():
        cost = json.loads(cost_file.read_text())
    else:
        lm = lm or load_model(DEFAULT_MODEL)
        cost = scoring_cost(lm, "sst2")
        cost_file.parent.mkdir(parents=True, exist_ok=True)
        cost_file.write_text(json.dumps(cost, indent=2))
    print("scoring cost:", json.dumps(cost), flush=True)

    common = dict(clients=args.clients, alpha=args.alpha, test_size=args.test_size)
    records = []
    for task_name in args.tasks:
        task = load_task(task_name)
        records.append(cell(args.out, RunConfig("zero-shot", task_name, DEFAULT_MODEL, **common),
                            lm, task))
        for seed in args.seeds:
            records.append(cell(args.out, RunConfig("central-icl", task_name, DEFAULT_MODEL,
                                                    seed=seed, **common), lm, task))
            records.append(cell(args.out, RunConfig("local-icl", task_name, DEFAULT_MODEL,
                                                    seed=seed, fraction=args.local_fraction,
                                                    **common), lm, task))
    del lm
    if args.small_model != "none":
        small = None if args.report_only else load_model(args.small_model)
        task = load_task("sst2")
        records.append(cell(args.out, RunConfig("zero-shot", "sst2", args.small_model,
                                                **common), small, task))
        for seed in args.seeds:
            records.append(cell(args.out, RunConfig("central-icl", "sst2", args.small_model,
                                                    seed=seed, **common), small, task))

    rows = summarize(records)
    wall = sum(r["costs"].get("wall_seconds", 0.0) for r in records)
    summary = {"rows": rows, "scoring_cost": cost, "wall_seconds": wall}
    write_outputs(RESULTS, args.name, summary, markdown(rows, records, cost, wall, args), args)


if __name__ == "__main__":
    main()
