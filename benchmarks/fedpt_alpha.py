"""FedPT's proxy strength α, swept after the fact on the states `benchmarks/fedpt.py` trained.

The proxy is s_large + α·(s_small_tuned − s_small_base); α only enters at scoring time, so
one pass of each model over the test rows gives every α. Reads each task's seed-0 FedPT
cell's last checkpoint (the round checkpoints stay on the machine that ran the script), so
run it where fedpt.py ran. α is chosen here on the test rows themselves: a diagnosis of how
much α matters, not a tuned result.

    .venv/bin/python benchmarks/fedpt_alpha.py
"""

from __future__ import annotations

import argparse
import time

from common import output_arguments, write_outputs

from fedsteer.data import load_task
from fedsteer.eval.metrics import classification_metrics
from fedsteer.eval.record import read_result
from fedsteer.experiment import evaluation_rows
from fedsteer.federation.checkpoint import latest_round, load_recorddict
from fedsteer.methods import Environment, make_method
from fedsteer.models import load_model
from fedsteer.models.proxy import proxy_logprobs

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def sweep(cell_dir, small, task_name: str, alphas) -> dict[float, float]:
    record = read_result(cell_dir)
    config = record["config"]
    task = load_task(task_name)
    test = evaluation_rows(task, config["test_size"], config["test_seed"])
    env = Environment(task=task.spec, test=test, model_name=config["model"], _lm=small)
    method = make_method("fedpt", **config["method_options"])
    folder = latest_round(cell_dir / "checkpoint")
    if folder is None:  # recorded before checkpoints became round folders
        folder = cell_dir / "checkpoint"
    state = load_recorddict(folder / "server")
    queries = [task.spec.format_query(ex) for ex in test]
    truth = [ex.label for ex in test]
    label_ids = env.scorer().labels.first
    large = method.large_scores(env).next_token_logprobs(queries)
    tuned, base = method.small_pair(env, state["fedavg_adapter"], queries)
    vocab = method.vocabulary(env)
    accuracy = {}
    for alpha in alphas:
        predicted = proxy_logprobs(large, tuned, base, alpha, vocab)[:, label_ids].argmax(-1)
        accuracy[alpha] = classification_metrics(truth, predicted.tolist(),
                                                 len(task.labels))["accuracy"]
    recorded = record["metrics"]["accuracy"]
    if abs(accuracy.get(method.alpha, recorded) - recorded) > 1e-9:
        raise RuntimeError(f"{cell_dir}: α = {method.alpha} gives {accuracy[method.alpha]}, "
                           f"the run recorded {recorded}: not the state that run evaluated")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "trec"])
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    output_arguments(parser, "fedpt")
    args = parser.parse_args()
    started = time.time()
    small = load_model(args.small)
    rows = {}
    for task in args.tasks:
        cell_dir = args.out / args.small / task / "fedpt-seed0"
        rows[task] = sweep(cell_dir, small, task, args.alphas)
        print(task, rows[task], flush=True)
    lines = ["# FedPT: accuracy of the proxy-tuned large model vs α (seed 0, after the fact)", "",
             "α chosen on the test rows: a diagnosis, not a tuned result. α = 0 is the large "
             "model zero-shot; α = 1 is what the benchmark ran.", "",
             "| task | " + " | ".join(f"α = {a:g}" for a in args.alphas) + " |",
             "|---|" + "---:|" * len(args.alphas)]
    for task, accuracy in rows.items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * accuracy[a]:.1f}" for a in args.alphas)
                     + " |")
    summary = {"rows": {t: {str(a): v for a, v in r.items()} for t, r in rows.items()},
               "wall_seconds": time.time() - started}
    write_outputs(args.report_dir, "fedpt_alpha", summary, "\n".join(lines) + "\n", args)


if __name__ == "__main__":
    main()
