"""Performance and scale: the label scorer against a plain forward, and cost vs client count.

1. Throughput (examples/s) on the same sst2 queries and batch size: a plain transformers
   forward (tokenizer padding, full logits, log-softmax at the last position), fedsteer's
   `LabelScorer`, and the scorer with IFed-ICL's 2·L vectors injected. Alternating, best of
   `--repeats`, so slow drift in machine load hits all alike.
2. Scale: IFed-ICL and FedAvg-LoRA with 10, 100 and 1,000 simulated clients on IID
   partitions, each client using `--examples-per-client` of its rows (IFed-ICL: as
   demonstrations and as calibration rows; LoRA: one local batch), one round, each run in
   a fresh process:
   wall time, peak RSS, bytes up per round. The in-process runtime shares one model among all
   clients, so memory should stay flat while time and bytes grow with the client count.
   `--equal-words N`: the scale runs on sst2 rows cut to their first N words (rows shorter
   dropped), so every client's batch is about as long and the client count is the only
   thing that changes (a step's activations grow with its longest query).

    nohup .venv/bin/python benchmarks/performance.py > benchmarks/results/performance.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import output_arguments, run_in_fresh_process, write_outputs  # noqa: E402

from fedsteer.data import load_task  # noqa: E402
from fedsteer.models import DEFAULT_MODEL, load_model  # noqa: E402
from fedsteer.models.hooks import initial_coefficients, inject  # noqa: E402
from fedsteer.models.scoring import LabelScorer  # noqa: E402


def plain_forward(lm, queries: list[str], label_ids: list[int], batch_size: int,
                  last_only: bool = False) -> torch.Tensor:
    """What a user would write with transformers alone: pad left, forward, read the last row
    (`last_only`: ask the model for the last position's logits only, as the scorer does)."""
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    with torch.no_grad():
        for start in range(0, len(queries), batch_size):
            inputs = tokenizer(queries[start:start + batch_size], return_tensors="pt",
                               padding=True)
            extra = {"logits_to_keep": 1} if last_only else {}
            logits = lm.model(**inputs, **extra).logits[:, -1]
            out.append(logits.float().log_softmax(-1)[:, label_ids])
    return torch.cat(out)


def throughput(lm, n: int, batch_size: int, repeats: int) -> dict:
    task = load_task("sst2")
    queries = [task.spec.format_query(ex) for ex in task.test[:n]]
    scorer = LabelScorer(lm, task.spec.label_words, batch_size=batch_size)
    label_ids = scorer.labels.first
    layers, width = lm.num_layers, lm.hidden_size
    attn, mlp = torch.randn(layers, width) * 0.1, torch.randn(layers, width) * 0.1
    coef = initial_coefficients(layers, 0.1, 1.0)

    def injected():
        with inject(lm, attn, mlp, coef):
            scorer.score(queries)

    paths = {"plain transformers forward": lambda: plain_forward(lm, queries, label_ids,
                                                                  batch_size),
             "plain forward, last position only": lambda: plain_forward(
                 lm, queries, label_ids, batch_size, last_only=True),
             "fedsteer LabelScorer": lambda: scorer.score(queries),
             "LabelScorer + IFed-ICL injection": injected}
    checked = queries[:32]
    agreement = float((plain_forward(lm, checked, label_ids, batch_size).argmax(-1)
                       == scorer.score(checked).argmax(-1)).float().mean())
    for fn in paths.values():  # warm-up: first calls pay for allocation, not for the path
        fn()
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            started = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - started)
    plain = min(runs["plain transformers forward"])
    last = min(runs["plain forward, last position only"])
    return {"examples": n, "batch_size": batch_size, "agreement": agreement,
            "agreement_checked": len(checked),
            "paths": {name: {"best_s": min(t), "examples_per_s": n / min(t),
                             "vs_plain": min(t) / plain, "vs_last_only": min(t) / last,
                             "runs_s": t}
                      for name, t in runs.items()}}


def scale_point(method: str, clients: int, args, data_dir: Path | None = None) -> dict:
    per_class = max(args.examples_per_client // 2, 1)  # sst2 has 2 classes
    options = ({"rounds": 1, "local_epochs": 1, "demos_per_class": per_class,
                "calibration_per_class": per_class} if method == "ifed-icl"
               else {"rounds": 1, "local_examples": args.examples_per_client,
                     "batch_size": args.examples_per_client})
    config = {"method": method, "task": "sst2", "model": args.scale_model, "clients": clients,
              "partition": "iid", "test_size": args.scale_test_size, "options": options}
    out = args.out / f"{method}-clients{clients}"
    env = dict(os.environ)
    if data_dir is not None:
        env["FEDSTEER_DATA_DIR"] = str(data_dir)
    point = {"method": method, "clients": clients, **run_in_fresh_process(config, out, env)}
    print("scale:", json.dumps(point), flush=True)
    return point


def equal_length_sst2(out: Path, words: int) -> Path:
    """A data dir whose `sst2` holds the built-in rows of at least `words` words, cut to
    their first `words` (same labels, same source otherwise)."""
    root = out / f"sst2-{words}-words"
    task = load_task("sst2")
    meta = {"name": "sst2", "labels": list(task.spec.labels), "splits": {},
            "source": f"built-in sst2, rows cut to their first {words} words"}
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", task.train), ("test", task.test)):
        kept = [{"text": " ".join(ex.text.split()[:words]), "label": ex.label}
                for ex in rows if len(ex.text.split()) >= words]
        meta["splits"][split] = len(kept)
        (root / "sst2" / f"{split}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in kept))
    (root / "sst2" / "meta.json").write_text(json.dumps(meta, indent=1))
    return root


def plot(points: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    panels = (("wall_seconds", "wall time (s)"), ("peak_rss_bytes", "peak RSS (GB)"),
              ("bytes_up_per_round", "bytes up per round"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method in sorted({p["method"] for p in points}):
            mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["clients"])
            scale = 1e9 if key == "peak_rss_bytes" else 1
            ax.plot([p["clients"] for p in mine], [p[key] / scale for p in mine], "o-",
                    label=method)
        ax.set(xscale="log", xlabel="clients", ylabel=label)
        if key == "peak_rss_bytes":
            ax.set_ylim(bottom=0)  # flat or not, seen from zero
        else:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Cost growth with the number of simulated clients (in-process runtime)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(speed: dict | None, points: list[dict], args) -> str:
    lines = [f"# Performance: {args.model} scorer, {args.scale_model} at scale", ""]
    if speed is not None:
        lines += throughput_lines(speed, args)
    rows = (f"sst2 rows cut to {args.equal_words} words" if args.equal_words
            else "sst2 rows as they are")
    lines += [f"## Scale (IID, {args.examples_per_client} examples per client, one round, "
              f"{args.scale_test_size} test rows, {rows}, fresh process each)", "",
              "| method | clients | wall s | peak RSS GB | bytes up/round | client s |",
              "|---|---:|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {p['method']} | {p['clients']} | {p['wall_seconds']:.0f} | "
                     f"{p['peak_rss_bytes'] / 1e9:.2f} | {p['bytes_up_per_round']:.0f} | "
                     f"{p['client_seconds']:.0f} |")
    for method in sorted({p["method"] for p in points}):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["clients"])
        if len(mine) > 1:
            ratio = mine[-1]["peak_rss_bytes"] / mine[0]["peak_rss_bytes"]
            lines.append(f"\n{method}: peak RSS at {mine[-1]['clients']} clients is "
                         f"{ratio:.2f}× that at {mine[0]['clients']} (issue 20's bar: ≤ 1.2×).")
    return "\n".join(lines) + "\n"


def throughput_lines(speed: dict, args) -> list[str]:
    lines = [f"## Scoring throughput ({speed['examples']} sst2 queries, batch "
             f"{speed['batch_size']}, best of {args.repeats})", "",
             "| path | examples/s | time vs plain forward | vs last-position forward |",
             "|---|---:|---:|---:|"]
    for name, p in speed["paths"].items():
        lines.append(f"| {name} | {p['examples_per_s']:.1f} | {p['vs_plain']:.3f}× | "
                     f"{p['vs_last_only']:.3f}× |")
    lines += ["", f"Predictions of the plain forward and the scorer agree on "
              f"{100 * speed['agreement']:.0f} % of {speed['agreement_checked']} queries. The "
              "plain forward computes logits at every position, as `model(**inputs)` does; "
              "the scorer asks for the last position only (`logits_to_keep=1`).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale-model", default="smollm2-135m")
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=["ifed-icl", "fedavg-lora"])
    parser.add_argument("--examples-per-client", type=int, default=4)
    parser.add_argument("--scale-test-size", type=int, default=50)
    parser.add_argument("--equal-words", type=int, default=0,
                        help="scale on sst2 rows cut to this many words (0: as they are)")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="only the scale part (e.g. memory vs clients)")
    parser.add_argument("--name", default="performance",
                        help="summary files <report-dir>/<name>.{md,json,_scale.png}")
    output_arguments(parser, "performance")
    args = parser.parse_args()
    started = time.time()
    speed = None
    if not args.skip_throughput:
        speed = throughput(load_model(args.model), args.examples, args.batch_size, args.repeats)
        print("throughput:", json.dumps(speed), flush=True)
    data_dir = equal_length_sst2(args.out, args.equal_words) if args.equal_words else None
    points = [scale_point(m, c, args, data_dir) for m in args.methods for c in args.clients]
    args.report_dir.mkdir(parents=True, exist_ok=True)
    plot(points, args.report_dir / f"{args.name}_scale.png")
    summary = {"throughput": speed, "scale": points, "wall_seconds": time.time() - started}
    write_outputs(args.report_dir, args.name, summary, markdown(speed, points, args), args)


if __name__ == "__main__":
    main()
