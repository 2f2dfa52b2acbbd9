"""`fedsteer serve` measured (issue 18): exactness per artifact kind, throughput, faults.

1. Artifacts: one small federated run per kind on sst2 saves it (`run --save`): IFed-ICL
   steering, FedAvg-LoRA adapter, a BDPL prompt, a FedPT proxy pair (small: the 12-layer
   emulator of the base; large: the base). Budgets are small on purpose: this measures
   serving, not the methods.
2. Exactness: `fedsteer serve --artifact ...` in its own process; each artifact's label
   scores on `--rows` test rows through the official `openai` SDK (the black box AsynDBT
   uses: `/v1/completions`, max_tokens 1, top-20 log-probs) against `score_artifact`
   offline on the same rows: identical labels; log-probs within 1e-4 where the label's
   first token is among the top 20 (a label outside gets the floor; counted).
3. Throughput of label scoring: the offline `LabelScorer` (batch 16) examples/s, then HTTP
   at concurrency 1, 8, 32 (one prompt per request, a bounded pool of client threads),
   requests/s and p50/p95 latency; then mixed traffic over 3 artifacts at concurrency 32,
   each answer checked against its artifact's offline label.
4. Faults: malformed JSON, a 5 MB body, over-limit parameters, a wrong key, a client that
   leaves mid-request, 200 concurrent requests against a cap of 32: the status each got,
   the server's RSS before and after, and whether it still answers. Issues 42/44 added: a
   JSON array as the body, NaN / 1e999 numbers, five stop strings, a seed past int64, an
   echo with log-probs past --max-echo-tokens, and streams vs whole answers for stops cut
   from an answer (a stream must add up to the whole answer).

    nohup .venv/bin/python benchmarks/serve.py > benchmarks/results/serve.log 2>&1 &
    nohup .venv/bin/python benchmarks/serve.py --faults-only > \
        benchmarks/results/serve_faults.log 2>&1 &   # 4. alone → serve_faults.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from common import output_arguments, write_outputs

from fedsteer.artifacts import score_artifact
from fedsteer.blackbox import score_label_words
from fedsteer.data import load_task
from fedsteer.experiment import RunConfig, evaluation_rows, run_experiment
from fedsteer.models import DEFAULT_MODEL, load_model
from fedsteer.models.scoring import LabelScorer

KEY_VARIABLE, KEY = "FEDSTEER_BENCH_KEY", "bench-key"
TOP = 20  # top-k log-probs asked for label scoring (the black-box client's default)
RUNS = {  # kind -> (method, options, run settings)
    "steering": ("ifed-icl", {"local_epochs": 1}, {"rounds": 1}),
    "lora": ("fedavg-lora", {"local_examples": 16}, {"rounds": 1}),
    "prompt": ("bdpl", {"steps_per_round": 4, "samples": 4, "prompt_length": 5,
                        "candidates": 50}, {"rounds": 1}),
    "proxy": ("fedpt", {"local_examples": 16, "distill_examples": 16}, {"rounds": 1}),
}


def make_artifacts(args, out: Path) -> dict[str, Path]:
    """kind -> a saved artifact (an existing one is reused: delete it to re-make)."""
    saved = {}
    for kind, (method, options, settings) in RUNS.items():
        directory = out / "artifacts" / kind
        if not (directory / "provenance.json").exists():
            model = (f"emulator:{args.emulator_layers}:{args.model}" if kind == "proxy"
                     else args.model)
            if kind == "proxy":
                options = {**options, "large": args.model}
            config = RunConfig(method, "sst2", model, clients=3, test_size=50,
                               options=options, **settings)
            started = time.perf_counter()
            run_experiment(config, out / "runs" / kind, save_dir=directory)
            print(f"{kind}: {method} saved in {time.perf_counter() - started:.0f} s", flush=True)
        saved[kind] = directory
    return saved


class Served:
    """`fedsteer serve` as a user starts it, in its own process (stopped on exit)."""

    def __init__(self, args, artifacts: dict[str, Path], **flags) -> None:
        self.port = _free_port()
        command = [sys.executable, "-m", "fedsteer.cli", "serve", "--model", args.model,
                   "--port", str(self.port), "--max-logprobs", str(args.top)]
        for name, directory in artifacts.items():
            command += ["--artifact", f"{name}={directory}"]
        for flag, value in flags.items():
            command += [f"--{flag.replace('_', '-')}", str(value)]
        self.process = subprocess.Popen(command, start_new_session=True,
                                        env={**os.environ, KEY_VARIABLE: KEY})
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Served:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("fedsteer serve exited")
            try:
                httpx.get(f"{self.url}/models", headers=self.headers, timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(1)
        raise RuntimeError("fedsteer serve did not come up")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def __exit__(self, *exc) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------- exactness
def exactness(args, served: Served, artifacts: dict[str, Path], task) -> dict[str, dict]:
    from openai import OpenAI

    client = OpenAI(base_url=served.url, api_key=KEY)
    words = task.spec.label_words
    rows = {}
    for kind, directory in artifacts.items():
        offline = score_artifact(directory, task, None, args.rows, 0, 16)
        queries = [task.spec.format_query(ex) for ex in offline.test]
        tops = []
        for start in range(0, len(queries), 8):
            response = client.completions.create(model=kind, prompt=queries[start:start + 8],
                                                 max_tokens=1, logprobs=args.top)
            tops += [c.logprobs.top_logprobs[0] for c in sorted(response.choices,
                                                                 key=lambda c: c.index)]
        online = np.stack([score_label_words(top, words) for top in tops])
        floor = np.array([[score == min(top.values()) - 1.0 for score in row]
                          for row, top in zip(online, tops, strict=True)])
        truth = [ex.label for ex in offline.test]
        rows[kind] = {
            "rows": len(queries),
            "same_labels": int((online.argmax(1) == offline.scores.argmax(1)).sum()),
            "max_abs_logprob_diff": float(np.abs(online - offline.scores)[~floor].max(
                initial=0.0)),
            "labels_outside_top": int(floor.sum()),
            "accuracy_offline": offline.metrics()["accuracy"],
            "accuracy_served": float(np.mean(online.argmax(1) == truth)),
            "offline_labels": offline.scores.argmax(1).tolist()}
        shown = {k: v for k, v in rows[kind].items() if k != "offline_labels"}
        print(f"exactness {kind}: {shown}", flush=True)
    return rows


# -------------------------------------------------------------- throughput
def label_request(client: httpx.Client, url: str, model: str, prompt: str, top: int
                  ) -> tuple[float, dict]:
    started = time.perf_counter()
    response = client.post(f"{url}/completions", headers={
        "Authorization": f"Bearer {KEY}"}, json={
        "model": model, "prompt": prompt, "max_tokens": 1, "logprobs": top})
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def load(url: str, requests: list[tuple[str, str]], concurrency: int, top: int) -> dict:
    """All `requests` (model, prompt) through `concurrency` client threads sharing one pooled
    HTTP client, as an SDK client does (a fresh connection per request cost the generator
    enough CPU to slow the server it shares the 2 cores with by a fifth)."""
    client = httpx.Client(limits=httpx.Limits(max_connections=concurrency), timeout=120)
    started = time.perf_counter()
    with client, ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: label_request(client, url, *r, top), requests))
    elapsed = time.perf_counter() - started
    latencies = sorted(t for t, _ in results)
    return {"concurrency": concurrency, "requests": len(requests),
            "requests_per_s": len(requests) / elapsed,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
            "answers": [body for _, body in results]}


def offline_rate(args, queries: list[str], task) -> float:
    lm = load_model(args.model)
    scorer = LabelScorer(lm, task.spec.label_words, batch_size=16)
    scorer.score(queries[:16])  # warm-up
    started = time.perf_counter()
    scorer.score(queries)
    rate = len(queries) / (time.perf_counter() - started)
    del lm, scorer
    return rate


def label_of(body: dict, label_words) -> int:
    top = body["choices"][0]["logprobs"]["top_logprobs"][0]
    return int(score_label_words(top, label_words).argmax())


def throughput(args, served: Served, artifacts: dict[str, Path], task, exact: dict) -> dict:
    queries = [task.spec.format_query(ex) for ex in evaluation_rows(task, args.rows, 0)]
    base = args.model
    result = {"offline_examples_per_s": offline_rate(args, queries, task), "http": []}
    for concurrency in (1, 8, 32):
        measured = load(served.url, [(base, q) for q in queries], concurrency, args.top)
        measured.pop("answers")
        result["http"].append(measured)
        print(f"throughput: {measured}", flush=True)
    mixed_names = ["steering", "lora", "prompt"]
    requests = [(name, q) for q in queries for name in mixed_names]
    measured = load(served.url, requests, 32, args.top)
    wrong = sum(label_of(body, task.spec.label_words)
                != exact[name]["offline_labels"][i // len(mixed_names)]
                for i, ((name, _), body) in enumerate(zip(requests, measured.pop("answers"),
                                                          strict=True)))
    result["mixed"] = {**measured, "artifacts": mixed_names, "labels_differing": wrong}
    print(f"mixed: {result['mixed']}", flush=True)
    return result


# ------------------------------------------------------------------ faults
def faults(served: Served, model: str) -> list[dict]:
    url, auth = served.url, served.headers
    rss_before = served.rss()

    def post(body=None, content=None, headers=None, timeout=60.0) -> int:
        return httpx.post(f"{url}/completions", json=body, content=content,
                          headers=auth if headers is None else headers,
                          timeout=timeout).status_code

    ok = {"model": model, "prompt": "Review: fine\nSentiment:", "max_tokens": 1}
    cases = [
        ("malformed JSON", lambda: post(content=b'{"model": ')),
        ("5 MB body", lambda: post(content=b"x" * 5_000_000)),
        ("max_tokens = 10**9", lambda: post({**ok, "max_tokens": 10**9})),
        ("n = 99", lambda: post({**ok, "n": 99})),
        ("logprobs = 50", lambda: post({**ok, "logprobs": 50})),
        ("prompt of 20,000 tokens", lambda: post({**ok, "prompt": "word " * 20_000})),
        ("prompt = []", lambda: post({**ok, "prompt": []})),
        ("model = gpt-4", lambda: post({**ok, "model": "gpt-4"})),
        ("no key", lambda: post(ok, headers={})),
        ("wrong key", lambda: post(ok, headers={"Authorization": "Bearer wrong"})),
        ("client leaves mid-request", lambda: _leaves(post, ok)),
        ("body = a JSON array", lambda: post(content=b'[{"model": "x", "prompt": "y"}]')),
        ("temperature = NaN", lambda: post(content=_with(ok, "temperature", "NaN"))),
        ("max_tokens = 1e999", lambda: post(content=_with(ok, "max_tokens", "1e999"))),
        ("stop = 5 strings", lambda: post({**ok, "stop": list("abcde")})),
        ("seed = 2**64", lambda: post({**ok, "seed": 2**64, "temperature": 1})),
        ("echo + logprobs, 8 × 4 × 1,000 tokens", lambda: post(
            {**ok, "prompt": ["word " * 1000] * 8, "n": 4, "echo": True, "logprobs": 1,
             "max_tokens": 0})),
        ("streams vs whole answers, 12 stops cut from an answer",
         lambda: _stop_streams(url, auth, model)),
    ]
    table = [{"case": name, "status": str(run())} for name, run in cases]
    statuses = _flood(url, auth, ok)
    table.append({"case": "200 concurrent, cap 32", "status": ", ".join(
        f"{count}× {status}" for status, count in sorted(statuses.items()))})
    started = time.perf_counter()
    after = post(ok)
    table.append({"case": "an ordinary request afterwards",
                  "status": f"{after} in {time.perf_counter() - started:.2f} s"})
    for row in table:
        print(f"fault: {row}", flush=True)
    return [*table, {"case": "server RSS before → after",
                     "status": f"{rss_before / 2**30:.2f} → {served.rss() / 2**30:.2f} GiB"}]


def _leaves(post, ok: dict) -> str:
    try:
        post({**ok, "max_tokens": 200}, timeout=0.5)
    except httpx.TimeoutException:
        return "left after 0.5 s"
    return "answered before the client left"


def _with(body: dict, field: str, literal: str) -> bytes:
    """`body` as JSON with `field` set to a literal JSON itself has no word for."""
    return (json.dumps(body)[:-1] + f', "{field}": {literal}}}').encode()


def _stop_streams(url: str, auth: dict, model: str) -> str:
    """Stops cut from a greedy answer at every third character: each stream must add up to
    its whole answer (issue 44: streams sent the start of a stop string spanning tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=auth["Authorization"].split()[-1])
    ask = {"model": model, "prompt": "The capital of France is", "max_tokens": 24,
           "temperature": 0}
    full = client.completions.create(**ask).choices[0].text
    stops = sorted({full[i : i + 3] for i in range(0, len(full) - 3, 3)})[:12]
    equal = 0
    for stop in stops:
        whole = client.completions.create(**ask, stop=[stop]).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            **ask, stop=[stop], stream=True))
        equal += whole == streamed == full[: full.index(stop)]
    return f"{equal} / {len(stops)} equal"


def _flood(url: str, auth: dict, ok: dict) -> dict[int, int]:
    def one(_: int) -> int:
        return httpx.post(f"{url}/completions", json={**ok, "max_tokens": 8}, headers=auth,
                          timeout=120).status_code

    with ThreadPoolExecutor(200) as pool:
        codes = list(pool.map(one, range(200)))
    return {code: codes.count(code) for code in set(codes)}


# ------------------------------------------------------------------ report
def report(args, exact: dict, speed: dict, fault_rows: list[dict]) -> str:
    lines = [f"# `fedsteer serve` ({args.model}, sst2, {args.rows} test rows)", "",
             "Exactness: each artifact's label scores through `fedsteer serve` + the `openai` "
             f"SDK (top-{args.top} log-probs, as the black-box client reads them) vs "
             "`score_artifact` offline on the same rows.", "",
             f"| kind | rows | same label | max abs Δ log-prob (labels in the top {args.top}) | "
             f"label scores outside the top {args.top} | acc offline | acc served |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, row in exact.items():
        lines.append(f"| {kind} | {row['rows']} | {row['same_labels']} | "
                     f"{row['max_abs_logprob_diff']:.1e} | {row['labels_outside_top']} | "
                     f"{100 * row['accuracy_offline']:.1f} | "
                     f"{100 * row['accuracy_served']:.1f} |")
    offline = speed["offline_examples_per_s"]
    lines += ["", f"Throughput of label scoring (base model, one prompt per request, "
              f"max_tokens 1, top-{args.top} log-probs; client threads sharing one pooled HTTP "
              f"client, on the same 2 cores). "
              f"Offline `LabelScorer` (batch 16): {offline:.2f} examples/s.", "",
              "| concurrency | requests | requests/s | × offline | p50 s | p95 s |",
              "|---:|---:|---:|---:|---:|---:|"]
    for row in [*speed["http"], speed["mixed"]]:
        label = (f"{row['concurrency']} (mixed: {', '.join(row['artifacts'])})"
                 if "artifacts" in row else str(row["concurrency"]))
        lines.append(f"| {label} | {row['requests']} | {row['requests_per_s']:.2f} | "
                     f"{row['requests_per_s'] / offline:.2f} | {row['p50_s']:.2f} | "
                     f"{row['p95_s']:.2f} |")
    at32 = speed["http"][-1]["requests_per_s"] / offline
    lines += ["", f"Bar (issue 18): at 32 concurrent clients ≥ 0.7× offline — "
              f"{'met' if at32 >= 0.7 else 'NOT met'} ({at32:.2f}×). Mixed traffic: "
              f"{speed['mixed']['labels_differing']} of {speed['mixed']['requests']} answers "
              "differ from their artifact's offline label.", "",
              "Faults (server with --api-key-env, --max-concurrent 32, defaults otherwise):", "",
              "| case | answer |", "|---|---|"]
    lines += [f"| {row['case']} | {row['status']} |" for row in fault_rows]
    return "\n".join(lines) + "\n"


def fault_report(args, fault_rows: list[dict]) -> str:
    lines = [f"# `fedsteer serve` faults ({args.model}, base model only)", "",
             "The server in its own process with --api-key-env, --max-concurrent 32 and "
             "defaults otherwise; the clients beside it on the same cores. Not machine-alone: "
             "other work may have shared the cores, so read the times as loose.", "",
             "| case | answer |", "|---|---|"]
    lines += [f"| {row['case']} | {row['status']} |" for row in fault_rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--top", type=int, default=TOP, help="top-k log-probs per answer")
    parser.add_argument("--emulator-layers", type=int, default=12,
                        help="depth of FedPT's small model (the base's emulator)")
    parser.add_argument("--faults-only", action="store_true",
                        help="only 4. (faults) on the base model → serve_faults.{md,json}")
    args = output_arguments(parser, "serve").parse_args()
    started = time.perf_counter()
    if args.faults_only:
        with Served(args, {}, api_key_env=KEY_VARIABLE) as served:
            fault_rows = faults(served, args.model)
        text = fault_report(args, fault_rows)
        text += f"\nTotal wall time: {(time.perf_counter() - started) / 60:.1f} min.\n"
        name = "serve_faults" + ("" if args.model == DEFAULT_MODEL else f"_{args.model}")
        write_outputs(args.report_dir, name, {"faults": fault_rows}, text, args)
        return
    task = load_task("sst2")
    artifacts = make_artifacts(args, args.out)
    with Served(args, artifacts, api_key_env=KEY_VARIABLE) as served:
        exact = exactness(args, served, artifacts, task)
        speed = throughput(args, served, artifacts, task, exact)
        fault_rows = faults(served, args.model)
    text = report(args, exact, speed, fault_rows)
    text += f"\nTotal wall time: {(time.perf_counter() - started) / 60:.1f} min.\n"
    write_outputs(args.report_dir, "serve", {"exactness": exact, "throughput": speed,
                                             "faults": fault_rows}, text, args)


if __name__ == "__main__":
    main()
