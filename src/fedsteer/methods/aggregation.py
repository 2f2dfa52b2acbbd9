"""Server-side aggregation rules, by name, all from Flower's `aggregate` module.

Methods average (or robustly combine) their clients' arrays through `aggregate_arrays`, so
choosing a Byzantine-robust rule is a config string, and no averaging is written by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.server.strategy import aggregate as flwr_aggregate

from fedsteer.methods.base import Reply

Weighted = list[tuple[list[np.ndarray], int]]


def _mean(results: Weighted) -> list[np.ndarray]:
    return flwr_aggregate.aggregate(results)


def _median(results: Weighted) -> list[np.ndarray]:
    return flwr_aggregate.aggregate_median(results)


def _trimmed_mean(results: Weighted, proportion: float = 0.2) -> list[np.ndarray]:
    return flwr_aggregate.aggregate_trimmed_avg(results, proportion)


def _krum(results: Weighted, num_malicious: int = 1) -> list[np.ndarray]:
    return flwr_aggregate.aggregate_krum(results, num_malicious, to_keep=0)


def _bulyan(results: Weighted, num_malicious: int = 1) -> list[np.ndarray]:
    """Needs at least 4·num_malicious + 3 clients (Flower raises otherwise)."""
    return flwr_aggregate.aggregate_bulyan(
        results, num_malicious, flwr_aggregate.aggregate_krum, to_keep=0
    )


RULES: dict[str, Callable[[Weighted], list[np.ndarray]]] = {
    "mean": _mean,
    "median": _median,
    "trimmed-mean": _trimmed_mean,
    "krum": _krum,
    "bulyan": _bulyan,
}


def aggregate_arrays(
    replies: Sequence[Reply], record: str, *, rule: str = "mean", weighted: bool = True
) -> ArrayRecord:
    """Combine the `record` ArrayRecord of every reply, array by array, keeping names.

    `weighted`: weight each client by its number of examples (FedAvg); else equally.
    """
    if not replies:
        raise ValueError(f"no replies to aggregate for {record!r}")
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    names = list(replies[0].content[record].keys())
    results = [
        ([r.content[record][n].numpy() for n in names], r.num_examples if weighted else 1)
        for r in replies
    ]
    combined = RULES[rule](results)
    dtypes = [results[0][0][i].dtype for i in range(len(names))]
    return ArrayRecord(
        {n: Array(np.asarray(a, dtype=d)) for n, a, d in zip(names, combined, dtypes, strict=True)}
    )


def record_train_loss(state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
    """Append the round's mean client loss to `state["train"]["loss"]`.

    Replies without metrics (under client-level DP they are dropped, or under secure
    aggregation only the mean arrives) leave the history as it is.
    """
    losses = [float(r.content["metrics"]["loss"]) for r in replies if "metrics" in r.content]
    if losses:
        history = list(state["train"]["loss"]) if "train" in state else []
        state["train"] = MetricRecord({"loss": [*history, float(np.mean(losses))]})
    return state
