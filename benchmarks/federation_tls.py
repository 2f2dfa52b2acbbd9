"""A real federation's price (issue 42): TLS + SuperNode authentication vs --insecure vs in-process.

IFed-ICL on sst2, 3 and 10 parties on 127.0.0.1, each party a SuperNode of its own with its
own CSV (its rows of the in-process partition, so every arm computes on the same rows). A
cell starts a fresh coordinator and its parties, waits until every party is online, and
then times only the submission: `flwr run` to the record back on the submitter's side
(`submit s`), beside the run as the ServerApp measured it (`run s`). The TLS and insecure
arms alternate within each repeat (ABAB, then BABA) so a machine that slows down in between
hurts both; the bar is TLS + auth within 1.1× of insecure, with identical accuracy (every
test row answered the same). Bytes: the payload bytes fedsteer counts (identical by
construction), and the bytes the loopback interface moved during the submission (every
process on the machine, so only indicative when others work).

    nohup flock /tmp/fedsteer-heavy.lock .venv/bin/python benchmarks/federation_tls.py \
        > benchmarks/results/federation_tls.log 2>&1 &
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import output_arguments, write_outputs

from fedsteer.data import load_task
from fedsteer.eval.metrics import wilson_interval
from fedsteer.experiment import RunConfig, build_clients, run_experiment
from fedsteer.flower import deploy, keys
from fedsteer.flower.launch import _executable, flower_processes, free_port, run_on_flower

ARMS = ("tls", "insecure")


def party_files(config: RunConfig, folder: Path) -> list[Path]:
    """Each client's rows of the in-process partition, as that party's CSV."""
    task = load_task(config.task)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for client in build_clients(config, task, None, centralized=False):
        path = folder / f"party-{client.cid}.csv"
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["text", "label"])
            writer.writerows((ex.text, task.spec.labels[ex.label]) for ex in client.data)
        files.append(path)
    return files


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            fields = counters.split()
            return int(fields[0]) + int(fields[8])  # received + sent
    return 0


def wait_online(coordinator: deploy.Coordinator, parties: int, nodes: list,
                timeout: float = 300) -> None:
    """Until the SuperLink lists every party online (so no cell times the parties' start)."""
    deadline, statuses = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        listed = subprocess.run(
            [_executable("flwr"), "supernode", "list", deploy.CONNECTION, "--format", "json"],
            env=coordinator.processes.env, capture_output=True, text=True, check=False)
        try:
            listed_nodes = json.loads(listed.stdout).get("nodes", [])
        except json.JSONDecodeError:
            listed_nodes = []
        statuses = [node.get("status") for node in listed_nodes]
        if statuses.count("online") >= parties:
            return
        time.sleep(2)
    raise RuntimeError(f"{parties} parties not online within {timeout:g} s: the SuperLink "
                       f"lists {statuses}; party exit codes {[n.poll() for n in nodes]}")


def federation_cell(arm: str, config: RunConfig, files: list[Path], work: Path) -> dict:
    insecure = arm == "insecure"
    federation = keys.init_federation(work / "fed", len(files), ["localhost", "127.0.0.1"],
                                      free_port())
    with deploy.coordinator(federation.folder, insecure=insecure, bind="127.0.0.1") as coord, \
            flower_processes(work / "parties") as parties:
        nodes = []
        for i, data in enumerate(files):
            party = deploy.PartySettings(
                federation.address, None if insecure else federation.ca_cert,
                None if insecure else federation.folder / keys.party_key(i), i, data,
                config.task, work, max_wait=300.0, nodes_on_machine=len(files))
            nodes.append(deploy.start_party(parties, party, f"p{i}"))
        wait_online(coord, len(files), nodes)
        lo_before, started = loopback_bytes(), time.perf_counter()
        record = run_on_flower(config, work / "out", federation=federation.folder,
                               insecure=insecure)
        seconds, lo_bytes = time.perf_counter() - started, loopback_bytes() - lo_before
    return summary_row(arm, record, seconds, lo_bytes)


def inprocess_cell(config: RunConfig, work: Path) -> dict:
    started = time.perf_counter()
    record = run_experiment(config, work / "out")
    return summary_row("in-process", record, time.perf_counter() - started, 0)


def summary_row(arm: str, record: dict, seconds: float, lo_bytes: int) -> dict:
    costs, metrics = record["costs"], record["metrics"]
    return {"arm": arm, "submit_seconds": seconds, "run_seconds": costs["wall_seconds"],
            "accuracy": metrics["accuracy"], "num_test": metrics["num_test"],
            "correct": (record.get("per_row") or {}).get("correct"),
            "payload_bytes": costs["bytes_up"] + costs["bytes_down"],
            "loopback_bytes": lo_bytes}


def run_cells(args) -> list[dict]:
    """Every cell once; a finished cell (a line in `<out>/cells.jsonl`) is read back, so a
    killed script continues where it stopped."""
    args.out.mkdir(parents=True, exist_ok=True)
    done_path = args.out / "cells.jsonl"
    done = [json.loads(line) for line in done_path.read_text().splitlines()
            if line.strip()] if done_path.exists() else []
    rows = []
    for repeat in range(args.repeats):
        for parties in args.parties:
            config = RunConfig(method="ifed-icl", task="sst2", model=args.model, clients=parties,
                               test_size=args.test_size, seed=args.seed, options={
                                   "rounds": args.rounds, "local_epochs": 1,
                                   "demos_per_class": 1, "calibration_per_class": 2})
            arms = ARMS if repeat % 2 == 0 else ARMS[::-1]
            for arm in (*arms, "in-process") if repeat == 0 else arms:
                finished = [r for r in done if (r["arm"], r["parties"], r["repeat"])
                            == (arm, parties, repeat)]
                if finished:
                    rows.append(finished[0])
                    continue
                work = Path(tempfile.mkdtemp(prefix=f"fedtls-{arm}-{parties}-", dir=args.work))
                files = party_files(config, work / "rows")
                try:
                    row = (inprocess_cell(config, work) if arm == "in-process"
                           else federation_cell(arm, config, files, work))
                except Exception:
                    print(f"cell failed; its logs are kept in {work}", flush=True)
                    raise
                shutil.rmtree(work, ignore_errors=True)
                row.update(parties=parties, repeat=repeat, finished_at=time.time())
                rows.append(row)
                with done_path.open("a") as cells:
                    cells.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "correct"}), flush=True)
    return rows


def summarize(rows: list[dict], parties: list[int]) -> dict:
    out = {}
    for n in parties:
        cells = {arm: [r for r in rows if r["parties"] == n and r["arm"] == arm]
                 for arm in (*ARMS, "in-process")}
        ratios = [t["submit_seconds"] / i["submit_seconds"]
                  for t, i in zip(cells["tls"], cells["insecure"], strict=True)]
        answers = {tuple(r["correct"] or []) for arm in cells.values() for r in arm}
        first = cells["in-process"][0]
        correct = round(first["accuracy"] * first["num_test"])
        out[str(n)] = {
            "tls_over_insecure_per_repeat": ratios,
            "tls_over_insecure_median": statistics.median(ratios),
            "same_answers_on_every_row": len(answers) == 1,
            "accuracy": first["accuracy"],
            "accuracy_ci95": list(wilson_interval(correct, first["num_test"])),
            **{f"{arm}_submit_seconds": [r["submit_seconds"] for r in arm_rows]
               for arm, arm_rows in cells.items()},
            **{f"{arm}_run_seconds": [r["run_seconds"] for r in arm_rows]
               for arm, arm_rows in cells.items()},
            "payload_bytes": {arm: arm_rows[0]["payload_bytes"]
                              for arm, arm_rows in cells.items()},
            "loopback_bytes": {arm: [r["loopback_bytes"] for r in arm_rows]
                               for arm, arm_rows in cells.items() if arm != "in-process"},
        }
    return out


def markdown(summary: dict, args) -> str:
    lines = [
        f"# A real federation's price: TLS + node auth vs --insecure vs in-process "
        f"({args.model}, IFed-ICL, sst2)",
        "",
        f"{args.rounds} calibration rounds (plus the vector round), {args.test_size} test rows, "
        f"seed {args.seed}; every party a SuperNode on 127.0.0.1 with its own CSV; "
        f"{args.repeats} repeats, TLS and insecure alternating. `submit s`: `flwr run` to the "
        "record back here (parties already online); `run s`: the run inside the ServerApp. "
        f"Machine: {args.machine_note}",
        "",
        "| parties | arm | submit s (each repeat) | run s | acc % [95 %] | payload B | "
        "loopback B |",
        "|---:|---|---|---|---|---:|---|",
    ]
    for n, s in summary.items():
        for arm in (*ARMS, "in-process"):
            subs = ", ".join(f"{x:.1f}" for x in s[f"{arm}_submit_seconds"])
            runs = ", ".join(f"{x:.1f}" for x in s[f"{arm}_run_seconds"])
            lo = ", ".join(f"{x:,}" for x in s["loopback_bytes"].get(arm, [])) or "—"
            acc = (f"{100 * s['accuracy']:.1f} [{100 * s['accuracy_ci95'][0]:.1f}, "
                   f"{100 * s['accuracy_ci95'][1]:.1f}]")
            lines.append(f"| {n} | {arm} | {subs} | {runs} | {acc} | "
                         f"{s['payload_bytes'][arm]:,} | {lo} |")
    lines += ["", "| parties | TLS / insecure (submit, per repeat) | median | bar ≤ 1.1 | "
              "same answer on every test row |", "|---:|---|---:|---|---|"]
    for n, s in summary.items():
        per = ", ".join(f"{x:.3f}" for x in s["tls_over_insecure_per_repeat"])
        median = s["tls_over_insecure_median"]
        lines.append(f"| {n} | {per} | {median:.3f} | {'met' if median <= 1.1 else 'NOT met'} | "
                     f"{'yes' if s['same_answers_on_every_row'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = output_arguments(argparse.ArgumentParser(description=__doc__), "federation_tls")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--parties", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (keys, logs)")
    parser.add_argument("--machine-note", default="shared with other engineers' jobs")
    parser.add_argument("--name", default="federation_tls", help="the summary files' name")
    args = parser.parse_args()
    rows = run_cells(args)
    summary = summarize(rows, args.parties)
    write_outputs(args.report_dir, args.name, {"cells": rows, "summary": summary},
                  markdown(summary, args), args)


if __name__ == "__main__":
    main()
