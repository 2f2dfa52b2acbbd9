"""Memory and time of IFed-ICL's client-batched calibration against the row budget.

100 clients on smollm2-135m, sst2 IID, 2 demonstrations and 2 calibration queries per class,
one calibration round of 1 epoch, 50 test rows; each row budget in a fresh process, peak
RSS read from VmHWM (the process's own). Chose the default `client_batch_rows`.

    nohup .venv/bin/python benchmarks/client_batch_memory.py \
        > benchmarks/results/client_batch_memory.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, run_in_fresh_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "client_batch_memory")
    args = parser.parse_args()
    points = []
    for rows in args.rows:
        config = {"method": "ifed-icl", "task": "sst2", "model": "smollm2-135m",
                  "clients": args.clients, "partition": "iid", "test_size": 50,
                  "client_batch_rows": rows,
                  "options": {"rounds": 1, "local_epochs": 1, "demos_per_class": 2,
                              "calibration_per_class": 2}}
        point = {"rows": rows, "clients": args.clients,
                 **run_in_fresh_process(config, args.out / f"rows{rows}")}
        points.append(point)
        print(json.dumps(point), flush=True)
    lines = [f"# IFed-ICL client-batched calibration vs the row budget ({args.clients} clients, "
             "smollm2-135m, sst2, fresh process each, VmHWM)", "",
             "| rows per batched forward | clients per forward | wall s | peak RSS GB | accuracy |",
             "|---:|---:|---:|---:|---:|"]
    for p in points:
        widest = max(p["client_batches"] or [1])
        lines.append(f"| {p['rows']} | {widest} | {p['wall_seconds']:.0f} | "
                     f"{p['peak_rss_bytes'] / 1e9:.2f} | {p['accuracy']:.3f} |")
    (RESULTS / "client_batch_memory.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "client_batch_memory.json").write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
