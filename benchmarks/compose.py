"""Issue 46: does steering at every point at once pay? Singles, pairs and the full stack.

On the default model, each single method (a prompt: BDPL, or AsynDBT with --prompt-method;
IFed-ICL's vectors; FedPT's proxy), every pair, and the full stack `prompt+ifed-icl+fedpt`,
each stack trained in place stage by stage (`fedsteer bench`'s `a+b` entries: a stage is
trained with the earlier stages' artifacts in every forward), with zero-shot as the floor.
The budgets are the default grid's (benchmarks/default.yaml: rounds, options, FedPT's
emulator pair), without its per-round evaluations (`eval_every`: a curve this measurement
does not use). Per task: every row's accuracy with its 95 % interval on the same test rows,
the exact McNemar test of the best stack against the best single method on those rows,
and the whole pipeline's bytes and client compute (the sum over a stack's stages) against
the sum of its singles' bytes. The bar (issue 46): the best stack beats the best single
method with p < 0.05 on at least two of the three tasks, at no more than the sum of its
singles' bytes.

trec is measured on 400 test rows: its test split has 500, and FedPT distils on held-out
task texts (TEST_SIZE_CAP).

Every cell is a bench cell (resumable: a killed run continues; a finished cell is read
back). About 20 minutes per task in bfloat16 on 2 cores, a task at a time:

    nohup flock /tmp/fedsteer-heavy.lock .venv/bin/python benchmarks/compose.py --tasks sst2 \
        --dtype bfloat16 > benchmarks/results/compose_sst2.log 2>&1 &
    ... --tasks subj, --tasks trec, then with no --tasks (all three read back) to write the
    summary: benchmarks/results/compose.json / compose.md.

`--recorded` writes the summary from the records alone (no model loaded, nothing run).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from common import RESULTS, write_outputs

from fedsteer.bench import BenchConfig, expand, run_grid, stages
from fedsteer.eval.metrics import mcnemar_exact, recorded_interval
from fedsteer.eval.record import read_result
from fedsteer.eval.report import human_bytes, paired_difference, run_bytes, whole_costs

DEFAULT_GRID = Path(__file__).parent / "default.yaml"
TASKS = ("sst2", "subj", "trec")


def entries(prompt: str) -> list[str]:
    """Zero-shot, each single point, every pair, the full stack (input → activations →
    output: the order a stack is trained in, each stage on top of the ones before)."""
    singles = [prompt, "ifed-icl", "fedpt"]
    pairs = ["+".join(p) for p in itertools.combinations(singles, 2)]
    return ["zero-shot", *singles, *pairs, "+".join(singles)]


#: test rows where the task's test split cannot give --test-size and leave FedPT held-out
#: texts to distil on (trec's test split has 500 rows)
TEST_SIZE_CAP = {"trec": 400}


def grid(args: argparse.Namespace, task: str) -> BenchConfig:
    """One task's measurement as a bench grid, its budgets read from the default grid."""
    base = BenchConfig.load(args.grid)
    methods = entries(args.prompt_method)
    named = {m for entry in methods for m in stages(entry)}
    run = {m: {k: v for k, v in base.run[m].items() if k != "eval_every"}
           for m in named if m in base.run}
    return BenchConfig(
        name="compose", out=args.out, models=[args.model or base.models[0]],
        tasks=[task], methods=methods, seeds=[args.seed], alphas=[args.alpha],
        clients=[args.clients], test_size=min(args.test_size, TEST_SIZE_CAP.get(task, 10**9)),
        run={m: r for m, r in run.items() if r},
        options={m: dict(base.options[m]) for m in named if m in base.options},
        dtype=args.dtype or base.dtype, device=base.device)


def correct_rows(record: dict[str, Any] | None) -> list[int] | None:
    """Each test row scored right (1) or wrong (0), where the record has them."""
    return (record.get("per_row") or {}).get("correct") if record else None


def paired(stack: dict[str, Any], single: dict[str, Any]) -> dict[str, Any]:
    """The stack against the single on the same rows: exact McNemar where both scored each
    row right or wrong (with the rows only one gets right), else Wilcoxon on the rows' shares
    (a single whose clients evaluated alone: AsynDBT's workers)."""
    _, p, test = paired_difference(stack, single)
    out: dict[str, Any] = {"p": p, "test": test}
    rows = [correct_rows(r) for r in (stack, single)]
    if test == "McNemar" and all(rows):
        out["only_stack_right"], out["only_single_right"], _ = mcnemar_exact(*rows)
    return out


def row(record: dict[str, Any]) -> dict[str, Any]:
    """One line of a task's table: accuracy, interval, rows, whole-pipeline costs."""
    costs = whole_costs(record)
    low, high = recorded_interval(record["metrics"])
    return {"method": record["method"], "accuracy": record["metrics"]["accuracy"],
            "ci95": [low, high], "rows": int(record["metrics"]["num_test"]),
            "stages": int(costs.get("stages", 1)), "bytes": run_bytes(costs),
            "client_compute_seconds": costs.get("client_compute_seconds",
                                                costs["client_seconds"])}


def churn(zero: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, int]:
    """Rows a method gets right that zero-shot got wrong, and the reverse (same rows)."""
    rows = [correct_rows(r) for r in (zero, record)]
    if not all(rows) or len(rows[0]) != len(rows[1]):
        return {}
    return {"gained": sum(1 for z, x in zip(*rows, strict=True) if x and not z),
            "lost": sum(1 for z, x in zip(*rows, strict=True) if z and not x)}


def overlap(zero: list[int], a: list[int], b: list[int], pair: list[int]) -> dict[str, int]:
    """Why two points add up or not, on the same rows: the rows each single gets right that
    zero-shot got wrong (its gains), how many both singles gain (the same rows fixed twice
    cannot add), and what the pair trained in place keeps of their union, gains anew and
    loses of what zero-shot had right."""
    wrong = {i for i, c in enumerate(zero) if not c}
    gains = [{i for i in wrong if x[i]} for x in (a, b)]
    union = gains[0] | gains[1]
    pair_gains = {i for i in wrong if pair[i]}
    return {"only_first": len(gains[0] - gains[1]), "both": len(gains[0] & gains[1]),
            "only_second": len(gains[1] - gains[0]), "pair_keeps": len(pair_gains & union),
            "pair_new": len(pair_gains - union),
            "pair_loses": sum(1 for i, c in enumerate(zero) if c and not pair[i])}


def overlaps(by: dict[str, dict[str, Any]], methods: list[str]) -> dict[str, dict[str, int]]:
    """`overlap` for every recorded pair of singles whose two-stage stack is recorded."""
    out = {}
    for pair in (m for m in methods if len(stages(m)) == 2):
        rows = [correct_rows(by.get(m)) for m in ("zero-shot", *stages(pair), pair)]
        if all(rows) and len({len(r) for r in rows}) == 1:
            out[pair] = overlap(*rows)
    return out


def analyse(records: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per task: the rows, the best single and best stack, their paired test on the same
    rows, the stack's bytes against its singles' sum, and whether the bar holds there."""
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in records}):
        by = {r["method"]: r for r in records if r["task"] == task}
        missing = [m for m in methods if m not in by]
        rows = [row(by[m]) | churn(by.get("zero-shot"), by[m]) for m in methods if m in by]
        singles = [m for m in methods if "+" not in m and m != "zero-shot" and m in by]
        stacks = [m for m in methods if "+" in m and m in by]
        result: dict[str, Any] = {"rows": rows, "missing": missing,
                                  "overlaps": overlaps(by, methods)}
        if singles and stacks:
            single = max(singles, key=lambda m: by[m]["metrics"]["accuracy"])
            stack = max(stacks, key=lambda m: by[m]["metrics"]["accuracy"])
            test = paired(by[stack], by[single])
            parts = stages(stack)
            parts_bytes = sum(run_bytes(whole_costs(by[m])) for m in parts if m in by)
            delta = by[stack]["metrics"]["accuracy"] - by[single]["metrics"]["accuracy"]
            stack_bytes = run_bytes(whole_costs(by[stack]))
            result.update({
                "best_single": single, "best_stack": stack, "difference": delta, **test,
                "stack_bytes": stack_bytes, "singles_bytes": parts_bytes,
                "pays": bool(delta > 0 and test["p"] < 0.05 and stack_bytes <= parts_bytes)})
        out[task] = result
    return out


def render(summary: dict[str, Any]) -> str:
    grid = summary["grid"]
    lines = ["# Composing steering points (issue 46)", "",
             f"Model {grid['model']} in {grid.get('dtype', 'float32')}, "
             f"{grid.get('clients', 10)} clients, Dirichlet α = {grid.get('alpha', 0.5)}, "
             f"seed {grid.get('seed', 0)}; test rows {_test_rows(grid)}; {summary['note']}.",
             ""]
    for task, result in summary["tasks"].items():
        lines += [f"## {task}", "",
                  "| method | stages | acc % (95 % CI) | rows | vs zero-shot: rows gained / lost "
                  "| bytes, pipeline | client s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            lines.append(f"| {r['method']} | {r['stages']} | {100 * r['accuracy']:.1f} "
                         f"({100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f}) | {r['rows']} | "
                         f"{_churn(r)} | "
                         f"{human_bytes(r['bytes'])} | {r['client_compute_seconds']:.0f} |")
        if result["missing"]:
            lines.append(f"\nnot recorded yet: {', '.join(result['missing'])}")
        if "best_stack" in result:
            lines += ["", f"Best stack {result['best_stack']} vs best single "
                      f"{result['best_single']}: {100 * result['difference']:+.1f} points "
                      f"({_test(result)}); bytes {human_bytes(result['stack_bytes'])} vs its "
                      f"singles' "
                      f"{human_bytes(result['singles_bytes'])}: "
                      f"{'composing pays' if result['pays'] else 'composing does not pay'}."]
        if result.get("overlaps"):
            lines += ["", "Gains over zero-shot on the same rows (rows zero-shot got wrong that "
                      "a method gets right), and what the pair trained in place makes of them:",
                      "", "| pair | gained by the first only | by both | by the second only | "
                      "pair keeps of their union | pair gains anew | pair loses of zero-shot's |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {pair} | {o['only_first']} | {o['both']} | {o['only_second']} | "
                      f"{o['pair_keeps']} of {o['only_first'] + o['both'] + o['only_second']} | "
                      f"{o['pair_new']} | {o['pair_loses']} |"
                      for pair, o in result["overlaps"].items()]
        lines.append("")
    paid = [t for t, r in summary["tasks"].items() if r.get("pays")]
    lines.append(f"Bar (best stack beats the best single, p < 0.05, within its singles' bytes, "
                 f"on >= 2 of 3 tasks): {'met' if summary['bar_met'] else 'not met'} "
                 f"(pays on: {', '.join(paid) or 'none'}). The best stack and the best single "
                 "are each chosen on these same rows (one seed), and the p-values are not "
                 "corrected for that choice.")
    return "\n".join(lines) + "\n"


def _test_rows(grid: dict[str, Any]) -> str:
    sizes = grid.get("test_size")
    if not isinstance(sizes, dict):
        return str(sizes)
    capped = [t for t in sizes if t in TEST_SIZE_CAP]
    why = (f" ({', '.join(capped)}: its test split leaves FedPT held-out texts to distil on "
           "only below 500)") if capped else ""
    return ", ".join(f"{t} {n}" for t, n in sizes.items()) + why


def _churn(row: dict[str, Any]) -> str:
    return f"+{row['gained']} / −{row['lost']}" if "gained" in row else ""


def _test(result: dict[str, Any]) -> str:
    if "only_stack_right" not in result:
        return f"{result['test']} p = {result['p']:.2g}"
    return (f"McNemar exact p = {result['p']:.2g}; {result['only_stack_right']} rows only the "
            f"stack gets right, {result['only_single_right']} only the single")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--model", default=None, help="default: the default grid's")
    parser.add_argument("--grid", type=Path, default=DEFAULT_GRID,
                        help="where the budgets (run, options) come from")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "auto"),
                        help="every cell's model (default: the grid's); the stacks and "
                        "singles are compared within one dtype")
    parser.add_argument("--prompt-method", default="bdpl", choices=("bdpl", "asyndbt"))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS / "compose")
    parser.add_argument("--report-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="compose", help="the summary files' name")
    parser.add_argument("--recorded", action="store_true",
                        help="summarise the finished cells only; run nothing")
    args = parser.parse_args()
    benches = [grid(args, task) for task in args.tasks]
    records = []
    for bench in benches:
        if args.recorded:
            records += [read_result(c.path) for c in expand(bench) if c.done]
        else:
            records += run_grid(bench, on_cell=lambda cell, record: print(
                f"{cell.name} on {cell.config.task}: acc {record['metrics']['accuracy']:.4f} "
                f"({record['bench_seconds']:.0f} s)", flush=True))
    bench = benches[0]
    shown = [r for r in records if r["method"] in bench.methods]  # not a stack's inner stage
    tasks = analyse(shown, bench.methods)
    paid = sum(bool(r.get("pays")) for r in tasks.values())
    summary = {"tasks": tasks, "bar_met": paid >= 2 and len(tasks) == len(TASKS),
               "grid": {"methods": bench.methods, "run": bench.run, "options": bench.options,
                        "model": bench.models[0],
                        "test_size": {b.tasks[0]: b.test_size for b in benches},
                        "dtype": bench.dtype, "clients": args.clients, "alpha": args.alpha,
                        "seed": args.seed},
               "note": "machine shared with other jobs unless said otherwise: seconds are not "
                       "machine-alone times"}
    write_outputs(args.report_dir, args.name, summary, render(summary), args)


if __name__ == "__main__":
    main()
