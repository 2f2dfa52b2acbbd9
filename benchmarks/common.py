"""What every benchmark script shares: resumable cells and mean ± std summaries.

A cell is one `run_experiment` with its own result.json under
`<out>/<model>/<task>/<method>-<tag>/`; a finished cell is read back, never recomputed, so a
killed script continues where it stopped and scripts share cells they have in common.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedsteer.bench import reuse_finished
from fedsteer.eval.metrics import mean_interval, recorded_interval
from fedsteer.experiment import RunConfig, run_experiment

RESULTS = Path(__file__).parent / "results"


#: one run in a process of its own; prints its costs as one JSON line. The peak is VmHWM,
#: the process's own: ru_maxrss would carry over the launching script's peak (fork + exec)
FRESH_RUN = """
import json, sys, time
from fedsteer.eval.costs import peak_rss_bytes
from fedsteer.experiment import RunConfig, run_experiment
started = time.perf_counter()
record = run_experiment(RunConfig(**json.loads(sys.argv[1])), sys.argv[2])
costs = record["costs"]
print(json.dumps({"wall_seconds": time.perf_counter() - started,
                  "peak_rss_bytes": peak_rss_bytes(),
                  "bytes_up_per_round": costs["bytes_up_per_round"],
                  "client_seconds": costs["client_seconds"],
                  "client_batches": (costs["rounds"] or [{}])[-1].get("client_batches", []),
                  "accuracy": record["metrics"]["accuracy"]}))
"""


def run_in_fresh_process(config: dict, out: Path, env: dict[str, str] | None = None) -> dict:
    """`run_experiment(RunConfig(**config), out)` in a new Python process: its memory is its
    own, not what the calling script has loaded."""
    done = subprocess.run([sys.executable, "-c", FRESH_RUN, json.dumps(config), str(out)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:  # say why, not just the exit status
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the run for {out} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.splitlines()[-1])


def grid_arguments(parser: argparse.ArgumentParser, out: Path) -> argparse.ArgumentParser:
    """The grid every benchmark shares: tasks, seeds, test rows, clients, skew, models."""
    parser.add_argument("--tasks", nargs="+", default=["sst2", "subj", "agnews", "trec"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--local-fraction", type=float, default=0.5,
                        help="share of clients that evaluate local ICL (each scores all rows)")
    parser.add_argument("--small-model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=out)
    return parser


def output_arguments(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """Where a script's cells go (--out) and where its summary files go (--report-dir)."""
    parser.add_argument("--out", type=Path, default=RESULTS / name)
    parser.add_argument("--report-dir", type=Path, default=RESULTS)
    return parser


def cell_tag(config: RunConfig, default_clients: int = 10, default_alpha: float = 0.5) -> str:
    """`seed0`, plus the settings that differ from the benchmark's defaults."""
    tag = f"seed{config.seed}"
    if config.partition != "dirichlet":
        tag += f"-{config.partition}"
    elif config.alpha != default_alpha:
        tag += f"-alpha{config.alpha:g}"
    if config.clients != default_clients:
        tag += f"-clients{config.clients}"
    if config.dtype != "float32":  # a bfloat16 cell never answers for a float32 one
        tag += f"-{config.dtype}"
    return tag


def cell_path(out: Path, config: RunConfig) -> Path:
    """Where a cell's record and checkpoints live: model / task / method-tag."""
    return out / config.model / config.task / f"{config.method}-{cell_tag(config)}"


def cell(out: Path, config: RunConfig, lm, task) -> dict:
    """Run one cell unless its result is already recorded; print one line when it ran."""
    path = cell_path(out, config)
    finished = reuse_finished(path, config)  # refuses a record of other settings, by name
    if finished is not None:
        return finished
    started = time.time()
    # resume=True: a cell killed mid-run continues from its last round's checkpoint
    record = run_experiment(config, path, lm=lm, task=task, resume=True)
    print(f"{config.model} {config.task} {config.method} {cell_tag(config)}: "
          f"acc {record['metrics']['accuracy']:.4f} ({time.time() - started:.0f} s)", flush=True)
    return record


class Unfinished(LookupError):
    """A cell `--recorded` needs has no finished record."""


def recorded_cell(out: Path, config: RunConfig, lm, task) -> dict:
    """`cell` that never runs: the finished record, or `Unfinished` (a script's `--recorded`
    mode re-renders its tables from the records alone, without loading a model)."""
    path = cell_path(out, config)
    finished = reuse_finished(path, config)
    if finished is None:
        raise Unfinished(path)
    return finished


def summarize(records: list[dict]) -> dict:
    """Mean ± std over seeds per (model, task, method); local ICL also its client spread."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["task"], r["method"]), []).append(r)
    rows = {}
    for (model, task, method), recs in sorted(groups.items()):
        acc = [r["metrics"]["accuracy"] for r in recs]
        f1 = [r["metrics"]["macro_f1"] for r in recs]
        rounds = [r["costs"]["num_rounds"] for r in recs]
        row = {
            "model": model, "task": task, "method": method, "seeds": len(recs),
            "accuracy": statistics.mean(acc),
            "accuracy_std": statistics.pstdev(acc),
            "macro_f1": statistics.mean(f1),
            "macro_f1_std": statistics.pstdev(f1),
            "eval_seconds": statistics.mean(r["costs"]["eval_seconds"] for r in recs),
            "client_seconds": statistics.mean(r["costs"]["client_seconds"] for r in recs),
            "client_seconds_per_round": statistics.mean(
                r["costs"]["client_seconds"] / max(n, 1)
                for r, n in zip(recs, rounds, strict=True)
            ),
            "bytes_up_per_round": statistics.mean(r["costs"]["bytes_up_per_round"] for r in recs),
            "bytes_down_per_round": statistics.mean(
                r["costs"]["bytes_down_per_round"] for r in recs),
        }
        # 95 % interval: over seeds (t) when there are several, else the one record's own
        row["accuracy_ci95"] = list(mean_interval(acc) if len(recs) > 1
                                    else recorded_interval(recs[0]["metrics"]))
        demos = [r["metrics"].get("demonstrations") for r in recs]
        if all(d is not None for d in demos):
            row["demonstrations"] = demos[0]
        clients = [c for r in recs for c in r["metrics"].get("per_client", [])]
        if clients:
            row["client_accuracy_std"] = statistics.pstdev(c["accuracy"] for c in clients)
            row["client_accuracy_min"] = min(c["accuracy"] for c in clients)
            row["client_accuracy_max"] = max(c["accuracy"] for c in clients)
            row["clients_evaluated"] = len(clients)
        rows[f"{model}/{task}/{method}"] = row
    return rows


def pct(row: dict | None, with_clients: bool = False) -> str:
    """`83.3 ± 1.2 [80.1, 86.5]`: mean ± std over seeds, the 95 % interval (and the clients'
    range where clients evaluated on their own)."""
    if row is None:
        return "—"
    text = f"{100 * row['accuracy']:.1f} ± {100 * row['accuracy_std']:.1f}"
    if "accuracy_ci95" in row:
        low, high = row["accuracy_ci95"]
        text += f" [{100 * low:.1f}, {100 * high:.1f}]"
    if with_clients and "client_accuracy_min" in row:
        text += (f" (clients {100 * row['client_accuracy_min']:.0f}–"
                 f"{100 * row['client_accuracy_max']:.0f})")
    return text


def write_outputs(report_dir: Path, name: str, summary: dict, text: str,
                  args: argparse.Namespace | None = None) -> None:
    """`<name>.json` (the numbers, with the script's settings and the machine; paths as text)
    and `<name>.md`; print it. Every benchmark ends here, so every record says where and
    how it was measured."""
    from fedsteer.eval.record import environment

    summary = {**summary, "env": environment()}
    if args is not None:
        summary["settings"] = vars(args)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    (report_dir / f"{name}.md").write_text(text)
    print(text)
