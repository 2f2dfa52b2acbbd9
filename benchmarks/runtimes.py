"""IFed-ICL on three runtimes (in-process, Flower simulation, localhost deployment), SecAgg+, DP.

Same task, seed and settings everywhere, so accuracies must match across runtimes. Wall
time is split into the run itself (`costs.wall_seconds`, measured inside the ServerApp or
`run_experiment`) and engine start-up (everything else the outer call took: SuperLink,
Ray, process spawns). DP rows run in-process at target ε ∈ {1, 8, ∞} (noise calibrated
by dp_accounting for the run's rounds), with per-record clip norms.

    nohup .venv/bin/python benchmarks/runtimes.py > benchmarks/results/runtimes.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from common import output_arguments, write_outputs

from fedsteer.eval.record import RESULT_FILE, read_result
from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.federation.privacy import noise_for_epsilon
from fedsteer.flower.launch import run_on_flower
from fedsteer.models import DEFAULT_MODEL

RUNTIMES = ("simulation", "secagg", "deployment")


def timed_cell(path: Path, run) -> dict:
    """Run once (`run(path)` returns a record) unless recorded; keep the outer wall time."""
    if (path / RESULT_FILE).exists():
        return read_result(path)
    started = time.perf_counter()
    record = run(path)
    record["outer_seconds"] = time.perf_counter() - started
    (path / RESULT_FILE).write_text(json.dumps(record, indent=2))
    print(f"{path.name}: acc {record['metrics']['accuracy']:.4f}, "
          f"run {record['costs']['wall_seconds']:.0f} s, outer {record['outer_seconds']:.0f} s",
          flush=True)
    return record


def row(name: str, record: dict) -> dict:
    costs = record["costs"]
    return {
        "runtime": name,
        "accuracy": record["metrics"]["accuracy"],
        "run_seconds": costs["wall_seconds"],
        "startup_seconds": record["outer_seconds"] - costs["wall_seconds"],
        "client_seconds": costs["client_seconds"],
        "bytes_up_per_round": costs["bytes_up_per_round"],
        "epsilon": (record.get("privacy") or {}).get("epsilon"),
    }


def markdown(rows: list[dict], dp_rows: list[dict], args) -> str:
    base = rows[0]["run_seconds"]
    lines = [
        f"# Runtimes: IFed-ICL, {args.task}, {args.clients} clients, seed {args.seed}",
        "",
        f"Model {args.model}; {args.test_size} test rows; rounds {args.rounds}, local epochs "
        f"{args.local_epochs}. `run s` is measured inside the run; `start-up s` is the rest "
        "of the outer wall time (SuperLink, Ray, processes).",
        "",
        "| runtime | acc % | run s | × in-process | start-up s | up/round B |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['runtime']} | {100 * r['accuracy']:.1f} | {r['run_seconds']:.0f} | "
                     f"{r['run_seconds'] / base:.2f} | {r['startup_seconds']:.0f} | "
                     f"{r['bytes_up_per_round']:.0f} |")
    lines += ["", "## Client-level DP (in-process)", "",
              "| target ε | measured ε (δ=1e-5) | noise multiplier | acc % |",
              "|---|---:|---:|---:|"]
    for r in dp_rows:
        eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['target']} | {eps} | {r['noise']:.3f} | {100 * r['accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 8.0, math.inf])
    parser.add_argument("--clip", type=float, default=1.0, help="coefficient update clip norm")
    parser.add_argument("--vector-clip", type=float, default=60.0)
    output_arguments(parser, "runtimes")
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES,
                        help="which runtimes to run (in-process is always the reference)")
    parser.add_argument("--name", default="runtimes",
                        help="summary files <report-dir>/<name>.{md,json}")
    args = parser.parse_args()
    started = time.time()

    config = RunConfig("ifed-icl", args.task, args.model, clients=args.clients, seed=args.seed,
                       test_size=args.test_size, rounds=args.rounds,
                       options={"local_epochs": args.local_epochs})
    out = args.out / args.model
    rows = [row("in-process", timed_cell(out / "inprocess",
                                         lambda p: run_experiment(config, p)))]
    if "simulation" in args.runtimes:
        rows.append(row("Flower simulation", timed_cell(out / "simulation",
                                                        lambda p: run_on_flower(config, p))))
    secure = RunConfig(**{**config.__dict__, "secagg": True})
    if "secagg" in args.runtimes:
        rows.append(row("Flower simulation + SecAgg+", timed_cell(
            out / "simulation-secagg", lambda p: run_on_flower(secure, p))))
    if "deployment" in args.runtimes and not args.skip_deployment:
        rows.append(row("Flower deployment (127.0.0.1)", timed_cell(
            out / "deployment", lambda p: run_on_flower(config, p, deployment=True))))

    dp_rows = []
    messages = args.rounds + 1  # IFed-ICL: the vectors, then one message per round
    for target in args.epsilons:
        noise = noise_for_epsilon(target, 1e-5, messages)
        dp_config = RunConfig(**{**config.__dict__, "dp_clip": args.clip, "dp_noise": noise,
                                 "dp_record_clips": {"vectors": args.vector_clip}})
        if math.isinf(target):
            record = read_result(out / "inprocess")
        else:
            record = timed_cell(out / f"dp-eps{target:g}", lambda p, c=dp_config:
                                run_experiment(c, p))
        dp_rows.append({"target": f"{target:g}", "noise": noise, **row("dp", record)})

    summary = {"rows": rows, "dp": dp_rows, "wall_seconds": time.time() - started}
    args.report_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, dp_rows, args)
    write_outputs(args.report_dir, args.name, summary, text, args)


if __name__ == "__main__":
    main()
