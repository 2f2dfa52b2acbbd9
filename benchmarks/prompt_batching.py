"""A prompt step's sampled prompts scored together vs one at a time (BDPL, AsynDBT).

Each policy-gradient step of BDPL and of an AsynDBT worker scores I sampled prompts on the
same mini-batch: I different prefixes before the same queries. The local black box can
score them one prefix at a time (each prefix encoded once, its queries continuing from
its cache) or together (`LocalBlackBox.batch_prefixes`, the default: every distinct
prefix in one forward, then all the rows in forwards of similar length, each from its
own prefix's cache). This times one party's step through the method's own code, both
ways, on the same seed, and checks they learn the same prompt and pay the same bill.

Budgets: BDPL with its defaults (M = 10 words from N = 200, I = 20 samples, mini-batch
16) for `--bdpl-steps` steps; an AsynDBT worker with `benchmarks/asyndbt.py`'s sizes
(M = 5 from N = 50, V = 4 demonstrations per class, I = 4, mini-batch 4) for
`--dbt-steps` steps in one message. Each arm runs `--repeats` times, alternating, best
kept. One heavy job at a time: the timings mean nothing beside another torch process.

    nohup .venv/bin/python benchmarks/prompt_batching.py \
        > benchmarks/results/prompt_batching.log 2>&1 &
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import output_arguments, write_outputs

from fedsteer.blackbox import LocalBlackBox
from fedsteer.data import load_task
from fedsteer.experiment import RunConfig, build_clients, transfer_rows
from fedsteer.methods import Environment, make_method
from fedsteer.models import DEFAULT_MODEL, load_model

DBT_SIZES = {"prompt_length": 5, "candidates": 50, "demo_candidates": 4, "samples": 4,
             "batch_size": 4, "shots_per_class": 16}


def timed_step(method_name: str, options: dict, together: bool, lm, task, args) -> dict:
    """One party's training step on a fresh black box (no cache carried between arms)."""
    test = task.test[:4]  # not scored: a step only trains
    env = Environment(task=task.spec, test=test, model_name=args.model, _lm=lm,
                      transfer=transfer_rows(task, test))  # AsynDBT's vocabulary source
    box = LocalBlackBox(lm, batch_size=args.batch_size, batch_prefixes=together)
    env._others["local"] = box
    method = make_method(method_name, **options)
    config = RunConfig(method_name, args.task, args.model, clients=args.clients, seed=0)
    client = build_clients(config, task, env, centralized=method.centralized)[0]
    message = (method.configure_round(0, method.initial_state(env)) if method_name == "bdpl"
               else method.worker_message(method.initial_state(env), client.cid, 0))
    started = time.perf_counter()
    reply = method.client_step(message, client)
    seconds = time.perf_counter() - started
    probs = reply["prompt"]["probs" if method_name == "bdpl" else "p"].numpy()
    return {"seconds": seconds, "usage": box.usage.to_dict(), "probs": probs,
            "loss": float(reply["metrics"]["loss"])}


def compare(method_name: str, options: dict, lm, task, args) -> dict:
    """Both arms, alternating; the best time of each and how far their results are apart."""
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for together in ((False, True) if repeat % 2 == 0 else (True, False)):
            runs[together].append(timed_step(method_name, options, together, lm, task, args))
            print(method_name, "together" if together else "in turn",
                  f"{runs[together][-1]['seconds']:.1f} s", flush=True)
    alone, batched = runs[False][0], runs[True][0]
    best = {arm: min(r["seconds"] for r in rs) for arm, rs in runs.items()}
    rows = alone["usage"]["calls"] + alone["usage"]["cache_hits"]
    return {"method": method_name, "options": options, "rows_scored": rows,
            "in_turn_seconds": best[False], "together_seconds": best[True],
            "all_seconds": {"in_turn": [r["seconds"] for r in runs[False]],
                            "together": [r["seconds"] for r in runs[True]]},
            "speedup": best[False] / best[True],
            "same_bill": alone["usage"] == batched["usage"], "usage": alone["usage"],
            "largest_prompt_difference": float(np.max(np.abs(alone["probs"] - batched["probs"]))),
            "loss_difference": abs(alone["loss"] - batched["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--clients", type=int, default=4, help="AsynDBT's workers (one steps)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="rows in one scoring forward (the run's --batch-size)")
    parser.add_argument("--bdpl-steps", type=int, default=5)
    parser.add_argument("--dbt-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    output_arguments(parser, "prompt_batching")
    args = parser.parse_args()
    lm, task = load_model(args.model), load_task(args.task)
    started = time.perf_counter()
    cells = [("bdpl", {"steps_per_round": args.bdpl_steps}),
             ("asyndbt", {**DBT_SIZES, "steps_per_round": args.dbt_steps,
                          "cutting_planes": False})]
    rows = [compare(name, options, lm, task, args) for name, options in cells]
    for row in rows:
        print(row, flush=True)
    write_outputs(args.report_dir, "prompt_batching",
                  {"rows": rows, "wall_seconds": time.perf_counter() - started},
                  markdown(rows, args), args)


def markdown(rows: list[dict], args) -> str:
    lines = [f"# A prompt step's sampled prompts: together vs one at a time ({args.model}, "
             f"{args.task})", "",
             "| method | step budget | rows scored | one prefix at a time (s) | together (s) | "
             "speed-up | same bill | largest prompt difference |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        budget = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(f"| {r['method']} | {budget} | {r['rows_scored']} | "
                     f"{r['in_turn_seconds']:.1f} | {r['together_seconds']:.1f} | "
                     f"{r['speedup']:.2f}× | {'yes' if r['same_bill'] else 'NO'} | "
                     f"{r['largest_prompt_difference']:.1e} |")
    lines += ["", f"Seconds: one party's `client_step`, best of {args.repeats} alternating "
              f"runs, scoring forwards of up to {args.batch_size} rows. Rows scored: every "
              "sampled prompt × its mini-batch (API calls + cache hits). Same bill: calls, "
              "prompt tokens, completion tokens and cache hits all equal."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
