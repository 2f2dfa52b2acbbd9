"""Client-batched simulation: one training round, clients stepped together vs one by one.

For IFed-ICL (a calibration round) and FedAvg-LoRA (a round), with 10 and 100 clients on
the default model and sst2 (Dirichlet α = 0.5): the same round run twice through the
in-process runtime, `client_batch=1` (one by one) and the default (as many clients as the
row budget allows, in forwards of similar width), timing the round's client compute and
comparing the states it leaves (the largest absolute difference of any coefficient / adapter
weight). `--one-forward` also times every client of a step in one forward (the batching
before forwards were split by width); `--methods`, `--task`, `--model` pick the cells.

Budgets: IFed-ICL calibrates with its defaults (5 examples per class, batch 2) for
`--ifed-epochs` local epochs (10, the paper's, at 10 clients; 2 at 100 clients to keep the
one-by-one arm within minutes: the rows per step, hence the speed-up, do not depend on it);
FedAvg-LoRA its defaults (32 examples a round, batch 8, 1 epoch). One heavy job at a time:
the timings mean nothing beside another torch process.

    nohup .venv/bin/python benchmarks/client_batching.py \
        > benchmarks/results/client_batching.log 2>&1 &
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import output_arguments, write_outputs

from fedsteer.data import load_task
from fedsteer.experiment import RunConfig, build_clients
from fedsteer.federation import InProcessRuntime, RuntimeConfig
from fedsteer.federation.runtime import client_batch_size
from fedsteer.methods import Environment, local_training, make_method
from fedsteer.models import DEFAULT_MODEL, load_model


def timed_round(method_name: str, options: dict, clients: int, client_batch: int | None,
                lm, task, args) -> dict:
    """One run up to the measured round; its client compute and the state it leaves."""
    config = RunConfig(method_name, args.task, args.model, clients=clients, seed=0)
    method = make_method(method_name, **options)
    env = Environment(task=task.spec, test=task.test[:4], model_name=args.model, _lm=lm)
    parties = build_clients(config, task, env, centralized=False)
    runtime = InProcessRuntime(RuntimeConfig(client_batch=client_batch))
    if client_batch != 1:  # as many as the row budget allows, whatever the method's default
        runtime.config.client_batch = client_batch_size(RuntimeConfig(client_batch=10**6),
                                                        method)
    started = time.perf_counter()
    outcome = runtime.run(method, parties, env)
    measured = outcome.rounds[-1]  # IFed-ICL: the calibration round after extraction
    record = "coef" if method_name == "ifed-icl" else "adapter"
    state = {k: v.numpy() for k, v in outcome.state[record].items()}
    return {"client_seconds": measured.client_seconds, "run_seconds": time.perf_counter() - started,
            "client_batches": measured.client_batches,
            "batch_size": client_batch_size(runtime.config, method), "state": state}


def one_forward_round(method_name: str, options: dict, clients: int, lm, task, args) -> float:
    """The batched round with every client of a step in one forward (any padding pays)."""
    kept = local_training.FORWARD_OVERHEAD_TOKENS
    local_training.FORWARD_OVERHEAD_TOKENS = 10**9
    try:
        return timed_round(method_name, options, clients, None, lm, task, args)["client_seconds"]
    finally:
        local_training.FORWARD_OVERHEAD_TOKENS = kept


def largest_difference(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--ifed-epochs", nargs="+", type=int, default=[10, 2],
                        help="IFed-ICL local epochs, one per --clients entry")
    parser.add_argument("--methods", nargs="+", default=["ifed-icl", "fedavg-lora"],
                        choices=["ifed-icl", "fedavg-lora"])
    parser.add_argument("--one-forward", action="store_true",
                        help="also time batching as it was before width-split forwards: "
                             "every client of a step in one forward, padded to the longest")
    output_arguments(parser, "client_batching")
    args = parser.parse_args()
    lm, task = load_model(args.model), load_task(args.task)
    rows, started = [], time.perf_counter()
    for clients, epochs in zip(args.clients, args.ifed_epochs, strict=True):
        budgets = {"ifed-icl": {"rounds": 1, "local_epochs": epochs}, "fedavg-lora": {"rounds": 1}}
        for method in args.methods:
            options = budgets[method]
            alone = timed_round(method, options, clients, 1, lm, task, args)
            together = timed_round(method, options, clients, None, lm, task, args)
            row = {"method": method, "clients": clients, "options": options,
                   "one_by_one_seconds": alone["client_seconds"],
                   "batched_seconds": together["client_seconds"],
                   "speedup": alone["client_seconds"] / together["client_seconds"],
                   "clients_per_batch": together["batch_size"],
                   "batches": together["client_batches"],
                   "largest_state_difference": largest_difference(alone["state"],
                                                                  together["state"])}
            if args.one_forward:
                row["one_forward_seconds"] = one_forward_round(method, options, clients, lm,
                                                               task, args)
            rows.append(row)
            print(row, flush=True)
    text = markdown(rows, args)
    write_outputs(args.report_dir, "client_batching",
                  {"rows": rows, "wall_seconds": time.perf_counter() - started}, text, args)


def markdown(rows: list[dict], args) -> str:
    one_forward = any("one_forward_seconds" in r for r in rows)
    extra = ("one forward a step (s) | ", "---:|") if one_forward else ("", "")
    lines = [f"# Client-batched simulation ({args.model}, {args.task}, one round)", "",
             "| method | clients | local budget | one by one (s) | " + extra[0]
             + "batched (s) | speed-up | clients per batched step | largest state difference |",
             "|---|---:|---|---:|" + extra[1] + "---:|---:|---:|---:|"]
    for r in rows:
        budget = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "rounds")
        shared = f"{r['one_forward_seconds']:.1f} | " if one_forward else ""
        lines.append(f"| {r['method']} | {r['clients']} | {budget or 'defaults'} | "
                     f"{r['one_by_one_seconds']:.1f} | {shared}{r['batched_seconds']:.1f} | "
                     f"{r['speedup']:.2f}× | {' + '.join(map(str, r['batches']))} | "
                     f"{r['largest_state_difference']:.1e} |")
    lines += ["", "Seconds: the round's client compute as the runtime records it (in process, "
              "clients run in turn, so it is the round's client wall time). Batched: a step's "
              "clients in forwards of similar width (`local_training.forward_chunks`)"
              + ("; one forward a step: all of them in one, padded to the longest (the batching "
                 "before that split)" if one_forward else "")
              + ". Bars (issue 22): ≥ 3× for IFed-ICL calibration and ≥ 2× for FedAvg-LoRA at "
              "10 clients."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
