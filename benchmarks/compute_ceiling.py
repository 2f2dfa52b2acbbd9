"""How much client batching *can* speed up a round here: training rows/s against batch size.

Issue 22's bars (≥ 3× for IFed-ICL calibration, ≥ 2× for FedAvg-LoRA at 10 clients) assume
the CPU idles between small steps. This measures the ceiling directly: one client's local
training through the method's own code (IFed-ICL `calibrate`, FedAvg-LoRA `client_step`),
one epoch over the same rows, at batch sizes 1…64, timing rows per second (best of
`--repeats`). Batching clients together can at most move a round from the rate at the
method's own batch size (IFed-ICL 2, FedAvg-LoRA 8) to the best rate measured here; that
ratio is the largest speed-up any client batching gives on this machine. One heavy job at a
time: the timings mean nothing beside another torch process.

    nohup .venv/bin/python benchmarks/compute_ceiling.py > benchmarks/results/compute_ceiling.log &
"""

from __future__ import annotations

import argparse
import time

import torch
from common import output_arguments, write_outputs

from fedsteer.data import load_task
from fedsteer.experiment import RunConfig, build_clients
from fedsteer.methods import Environment, make_method
from fedsteer.models import DEFAULT_MODEL, load_model

BATCHES = (1, 2, 4, 8, 16, 32, 64)
OWN_BATCH = {"ifed-icl": 2, "fedavg-lora": 8}  # the methods' defaults (one by one today)


def client_with_rows(lm, task, args):
    """One client holding the whole training split (so every batch size sees `--rows`)."""
    config = RunConfig("ifed-icl", args.task, args.model, clients=1, seed=0)
    env = Environment(task=task.spec, test=task.test[:4], model_name=args.model, _lm=lm)
    (client,) = build_clients(config, task, env, centralized=False)
    return env, client


def ifed_rate(env, client, batch: int, rows: int) -> float:
    """Calibration rows per second: forward + backward to the coefficients, vectors injected."""
    per_class = rows // len(env.task.labels)
    method = make_method("ifed-icl", calibration_per_class=per_class, demos_per_class=2,
                         batch_size=batch, local_epochs=1)
    state = method.initial_state(env)
    attn, mlp = method.extract(client)
    coef = torch.tensor(state["coef"]["coef"].numpy())
    started = time.perf_counter()
    method.calibrate(client, attn, mlp, coef, 1)
    return per_class * len(env.task.labels) / (time.perf_counter() - started)


def lora_rate(env, client, batch: int, rows: int) -> float:
    """LoRA training rows per second: one local epoch over `rows` examples."""
    method = make_method("fedavg-lora", local_examples=rows, batch_size=batch, rounds=1)
    message = method.configure_round(0, method.initial_state(env))
    started = time.perf_counter()
    method.client_step(message, client)
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--repeats", type=int, default=2)
    output_arguments(parser, "compute_ceiling")
    args = parser.parse_args()
    lm, task = load_model(args.model), load_task(args.task)
    env, client = client_with_rows(lm, task, args)
    rates: dict[str, dict[int, float]] = {}
    for name, rate in (("ifed-icl", ifed_rate), ("fedavg-lora", lora_rate)):
        rate(env, client, args.batches[0], args.batches[0] * 2)  # warm up
        rates[name] = {b: max(rate(env, client, b, args.rows) for _ in range(args.repeats))
                       for b in args.batches if b <= args.rows}
        print(name, rates[name], flush=True)
    ceilings = {name: max(r.values()) / r[OWN_BATCH[name]] for name, r in rates.items()}
    write_outputs(args.report_dir, "compute_ceiling", {"rows_per_second": rates,
                                                        "ceiling": ceilings},
                  markdown(rates, ceilings, args), args)


def markdown(rates, ceilings, args) -> str:
    bars = {"ifed-icl": 3.0, "fedavg-lora": 2.0}
    lines = [f"# Training rows per second vs batch size ({args.model}, {args.task}, "
             f"{args.rows} rows, one epoch, best of {args.repeats})", "",
             "| method | " + " | ".join(f"batch {b}" for b in args.batches) +
             " | own batch | ceiling (best ÷ own) | issue 22 bar |",
             "|---|" + "---:|" * (len(args.batches) + 3)]
    for name, r in rates.items():
        cells = [f"{r[b]:.2f}" if b in r else "—" for b in args.batches]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {OWN_BATCH[name]} | {ceilings[name]:.2f}× | ≥ {bars[name]:.0f}× |")
    lines += ["", "Rows per second of local training through the method's own code. Stepping "
              "clients together turns a round of small steps into large ones, so its speed-up "
              "is at most the ceiling column."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
