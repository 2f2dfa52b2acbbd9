"""Why peak memory still rises with the clients (issue 20): the longest training batch.

The runtime keeps no reply (streaming aggregation; `federation/replies.py`), yet the recorded
peak RSS of one FedAvg-LoRA round rises from 10 to 1,000 clients
(`results/scale_memory.md`). A client's step holds its batch's activations for the backward
pass, which grow with the batch's longest query; more clients draw more examples, so the
longest one seen grows too. This script reads the recorded scale points and tokenizes
exactly the examples each run's clients trained on (same partition, seeds and sample as
the run), printing the longest query beside the peak. Tokenizer only: seconds.

    .venv/bin/python benchmarks/scale_lengths.py
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import RESULTS, write_outputs
from transformers import AutoTokenizer

from fedsteer.data import load_task
from fedsteer.experiment import RunConfig, build_clients
from fedsteer.methods import make_method
from fedsteer.models.load import model_cache_dir


def longest_queries(points_file, name: str) -> list[dict]:
    recorded = json.loads(points_file.read_text())
    settings = recorded["settings"]
    task = load_task("sst2")
    # the tokenizer the cached model was converted with (cached by any earlier run)
    tokenizer = AutoTokenizer.from_pretrained(model_cache_dir(settings["scale_model"]))
    rows = []
    for point in recorded["scale"]:
        per_client = settings["examples_per_client"]
        method = make_method(point["method"], rounds=1, local_examples=per_client,
                             batch_size=per_client)
        config = RunConfig(point["method"], "sst2", settings["scale_model"],
                           clients=point["clients"], partition="iid")
        longest = [max(len(tokenizer(task.spec.format_query(ex)).input_ids)
                       for ex in method.local_sample(client, 0))
                   for client in build_clients(config, task, None, centralized=False)]
        rows.append({"clients": point["clients"], "peak_rss_gb": point["peak_rss_bytes"] / 1e9,
                     "longest_tokens": max(longest),
                     "median_client_longest_tokens": statistics.median(longest)})
    return rows


def markdown(rows: list[dict], source: str) -> str:
    lines = [f"# Peak memory vs the longest training query ({source})", "",
             "| clients | peak RSS GB | longest training query (tokens) | median client's "
             "longest |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['clients']} | {r['peak_rss_gb']:.2f} | {r['longest_tokens']} | "
              f"{r['median_client_longest_tokens']:.0f} |" for r in rows]
    lines += ["", "A step's activations grow with its batch's longest query; the clients' "
              "typical batch does not change with their number, the longest one drawn does."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="scale_memory", help="a performance.py summary")
    parser.add_argument("--report-dir", default=RESULTS)
    args = parser.parse_args()
    rows = longest_queries(RESULTS / f"{args.points}.json", args.points)
    write_outputs(RESULTS, "scale_lengths", {"rows": rows, "points": args.points},
                  markdown(rows, f"results/{args.points}.md"), args)


if __name__ == "__main__":
    main()
