"""The baselines every paper compares against: zero-shot, local ICL and central ICL.

* `zero-shot`: the frozen model on the bare query; no federation at all.
* `local-icl`: each client prompts with `shots` demonstrations from its *own* partition
  only (private, but skewed under non-IID data); we report the mean and spread over the
  clients that evaluated (all, or a seeded sample with the runtime's `fraction`).
* `central-icl`: the same with demonstrations from the pooled data (one client holding
  everything): the non-private reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsteer.data import Example
from fedsteer.eval.metrics import classification_metrics, summarize_clients
from fedsteer.methods.base import Client, Environment, Method, Reply, seeded_rng


def select_demonstrations(
    examples: Sequence[Example], shots: int, rng: np.random.Generator
) -> list[Example]:
    """`shots` examples, spread over the labels the holder has (round-robin), in random order.

    Balanced demonstrations are the usual ICL practice; a client that lacks a label
    simply cannot show it, which is exactly local ICL's handicap under skew.
    """
    by_label: dict[int, list[int]] = {}
    for i in rng.permutation(len(examples)):
        by_label.setdefault(examples[i].label, []).append(int(i))
    queues = [by_label[label] for label in sorted(by_label)]
    chosen: list[int] = []
    while len(chosen) < min(shots, len(examples)):
        for queue in queues:
            if queue and len(chosen) < shots:
                chosen.append(queue.pop())
    return [examples[i] for i in rng.permutation(chosen)]


def evaluate_prompting(env: Environment, prefix: str = "") -> dict[str, float]:
    """Score the evaluation set with `prefix` before each query; accuracy and macro-F1."""
    queries = [env.task.format_query(ex) for ex in env.test]
    with scoring_progress(env, len(queries)) as advance:
        scores = env.scorer().score(queries, prefix=prefix, on_batch=advance)
    predictions = scores.argmax(-1).tolist()
    truth = [ex.label for ex in env.test]
    return classification_metrics(truth, predictions, len(env.task.labels))


@contextmanager
def scoring_progress(env: Environment, total: int) -> Iterator[Callable[[int], None] | None]:
    """A transient bar over the queries being scored, when the run shows progress."""
    if env.progress is None:
        yield None
        return
    task = env.progress.add_task(f"scoring {total} queries", total=total)  # phase: evaluation
    try:
        yield lambda n: env.progress.advance(task, n)
    finally:
        env.progress.remove_task(task)


@dataclass
class ZeroShot(Method):
    name = "zero-shot"

    def configure_round(self, rnd: int, state: RecordDict) -> RecordDict | None:
        return None

    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        return evaluate_prompting(env)


@dataclass
class LocalICL(Method):
    """One round: every sampled client evaluates with its own demonstrations."""

    name = "local-icl"
    shots: int = 4
    seed: int = 0
    #: `shots` per class, as IFed-ICL counts its demonstrations (a holder lacking a label
    #: shows more of the others, up to shots × labels); False: `shots` in all
    per_class: bool = True

    def planned_rounds(self) -> int:
        return 1

    def configure_round(self, rnd: int, state: RecordDict) -> RecordDict | None:
        if rnd > 0:
            return None
        return RecordDict({"config": ConfigRecord({"phase": "evaluate", "shots": self.shots})})

    def _total(self, message: RecordDict, client: Client) -> int:
        shots = int(message["config"]["shots"])
        return shots * len(client.env.task.labels) if self.per_class else shots

    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        rng = seeded_rng(self.seed, "demos", client.cid)
        demos = select_demonstrations(client.data, self._total(message, client), rng)
        metrics = evaluate_prompting(client.env, client.env.task.demo_prefix(demos))
        # `correct` is the client's score on the server's public test rows (no training data),
        # sent so the record can be paired row by row with other methods
        return RecordDict({"metrics": MetricRecord({**metrics, "num_demos": len(demos)})})

    def setup(self, env: Environment) -> None:
        """The number of test rows every client scores, so a reply of another length is
        refused on arrival (it could not be paired, and would break the round's record)."""
        self._test_rows = len(env.test) or None

    def reply_problem(self, content: RecordDict) -> str | None:
        """A score must be one: 0/1 per row, one per test row, and its accuracy the share
        of rows right."""
        metrics = content["metrics"]
        correct = list(metrics.get("correct", []))
        if not correct or any(x not in (0, 1) for x in correct):
            return "per-row correctness must be a non-empty list of 0/1"
        expected = getattr(self, "_test_rows", None)
        if expected is not None and len(correct) != expected:
            return f"{len(correct)} per-row results for {expected} test rows"
        if abs(float(metrics["accuracy"]) - sum(correct) / len(correct)) > 1e-9:
            return "accuracy is not the share of rows marked correct"
        if not 0.0 <= float(metrics["macro_f1"]) <= 1.0:
            return "macro-F1 outside [0, 1]"
        return None

    def aggregate(self, rnd: int, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        columns = {"cid": [r.cid for r in replies]}
        for key in ("accuracy", "macro_f1", "num_demos"):
            columns[key] = [float(r.content["metrics"][key]) for r in replies]
        state["clients"] = MetricRecord(columns)
        # every client's per-row results, end to end in reply order (for paired tests)
        state["rows"] = MetricRecord({"correct": [
            int(x) for r in replies for x in r.content["metrics"]["correct"]]})
        return state

    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        if "clients" not in state:
            raise RuntimeError(f"{self.name}: no client reported an evaluation")
        cols = state["clients"]
        rows = [
            {"cid": int(c), "accuracy": a, "macro_f1": f}
            for c, a, f in zip(cols["cid"], cols["accuracy"], cols["macro_f1"], strict=True)
        ]
        if "rows" in state:
            for row, correct in zip(rows, split_evenly(state["rows"]["correct"], len(rows)),
                                    strict=True):
                row["correct"] = correct
        metrics = summarize_clients(rows)
        demos = [int(d) for d in cols["num_demos"]] if "num_demos" in cols else []
        if demos:  # the budget each client spent in context, for the tables
            metrics["demonstrations"] = demos[0] if len(demos) == 1 else {
                "mean": sum(demos) / len(demos), "min": min(demos), "max": max(demos)}
        return metrics


def split_evenly(flat: Sequence[int], parts: int) -> list[list[int]]:
    """`flat` cut into `parts` equal runs (each client scored the same test rows)."""
    size, rest = divmod(len(flat), parts)
    if rest:
        raise ValueError(f"{len(flat)} per-row results do not split over {parts} clients")
    return [[int(x) for x in flat[i * size:(i + 1) * size]] for i in range(parts)]


@dataclass
class CentralICL(LocalICL):
    """Local ICL run by a single client that holds the pooled data."""

    name = "central-icl"
    centralized = True
