"""Server-side aggregation rules, by name: the mean folded in as replies arrive, the robust
rules from Flower's `aggregate` module.

Methods combine their clients' arrays through these, so choosing a Byzantine-robust rule is
a config string. The mean (FedAvg) is a running weighted sum that keeps no reply: it does
Flower's `aggregate` arithmetic, in the same order, one reply at a time, so it equals
Flower's bit for bit (tests/test_streaming_aggregation.py). The robust rules (median,
trimmed mean, Krum, Bulyan) need every reply at once: they keep each reply's arrays of the
record until the round's end, and say so (`holds_replies`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.server.strategy import aggregate as flwr_aggregate

from fedsteer.methods.base import Aggregator, Reply

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


class RecordMean:
    """The (weighted) mean of one record's arrays, one reply at a time: Flower's `aggregate`
    (each array times the weight, summed left to right, divided by the total weight) with
    the sum kept running, so no reply is held. Array names come from the first reply."""

    holds_replies = False

    def __init__(self, record: str, weighted: bool = True) -> None:
        self.record, self.weighted = record, weighted
        self.names: list[str] = []
        self.sums: list[np.ndarray] = []
        self.dtypes: list[np.dtype] = []
        self.total = 0

    def add(self, reply: Reply) -> None:
        arrays, weight = reply.content[self.record], reply.num_examples if self.weighted else 1
        if not self.names:
            self.names = list(arrays.keys())
            self.sums = [arrays[n].numpy() * weight for n in self.names]
            self.dtypes = [a.dtype for a in self.sums]
        else:
            for total, name in zip(self.sums, self.names, strict=True):
                np.add(total, arrays[name].numpy() * weight, out=total)
        self.total += weight

    def result(self) -> ArrayRecord:
        if not self.names:
            raise ValueError(f"no replies to aggregate for {self.record!r}")
        return _record(self.names, [s / self.total for s in self.sums], self.dtypes)


class RecordRule:
    """A rule over one record that needs every reply at once (median, trimmed mean, Krum,
    Bulyan): it keeps each reply's arrays of the record (not the rest of the reply) until
    `result`, so its memory grows with the clients."""

    holds_replies = True

    def __init__(self, record: str, rule: str, weighted: bool = True) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
        self.record, self.rule, self.weighted = record, rule, weighted
        self.names: list[str] = []
        self.results: Weighted = []

    def add(self, reply: Reply) -> None:
        arrays = reply.content[self.record]
        self.names = self.names or list(arrays.keys())
        self.results.append(([arrays[n].numpy() for n in self.names],
                             reply.num_examples if self.weighted else 1))

    def result(self) -> ArrayRecord:
        if not self.results:
            raise ValueError(f"no replies to aggregate for {self.record!r}")
        dtypes = [a.dtype for a in self.results[0][0]]
        return _record(self.names, RULES[self.rule](self.results), dtypes)


def _record(names: list[str], arrays, dtypes) -> ArrayRecord:
    return ArrayRecord({n: Array(np.asarray(a, dtype=d))
                        for n, a, d in zip(names, arrays, dtypes, strict=True)})


def record_combiner(record: str, rule: str = "mean",
                    weighted: bool = True) -> RecordMean | RecordRule:
    """How one record is combined: the running mean, or a rule that keeps the replies."""
    return RecordMean(record, weighted) if rule == "mean" else RecordRule(record, rule, weighted)


def aggregate_arrays(
    replies: Sequence[Reply], record: str, *, rule: str = "mean", weighted: bool = True
) -> ArrayRecord:
    """Combine the `record` ArrayRecord of every reply, array by array, keeping names.

    `weighted`: weight each client by its number of examples (FedAvg); else equally.
    """
    combiner = record_combiner(record, rule, weighted)
    for reply in replies:
        combiner.add(reply)
    return combiner.result()


class RecordsAggregator(Aggregator):
    """A round's new state from its replies: each named record combined (`record_combiner`),
    the mean client loss appended when asked (as `record_train_loss`), then the method's own
    last step on the state (`finish`, e.g. FedPT's distillation). Streams unless a record's
    rule needs every reply."""

    def __init__(self, state: RecordDict, combiners: Sequence[RecordMean | RecordRule],
                 losses: bool = False,
                 finish: Callable[[RecordDict], RecordDict] | None = None) -> None:
        self.state, self.combiners, self.finish = state, list(combiners), finish
        self.losses: list[float] | None = [] if losses else None
        self.holds_replies = any(c.holds_replies for c in self.combiners)

    def reply_problem(self, content: RecordDict) -> str | None:
        """Each combined record must be an array record; a reply's metrics, when the round
        averages the clients' loss, must hold one finite `loss`."""
        for combiner in self.combiners:
            if combiner.record not in content.array_records:
                return f"no array record {combiner.record!r}"
        if self.losses is not None and "metrics" in content:
            metrics = content.metric_records.get("metrics")
            loss = metrics.get("loss") if metrics is not None else None
            if not isinstance(loss, int | float) or not math.isfinite(loss):
                return f"its metrics hold no finite 'loss' (found {loss!r})"
        return None

    def add(self, reply: Reply) -> None:
        for combiner in self.combiners:
            combiner.add(reply)
        if self.losses is not None and "metrics" in reply.content:
            self.losses.append(float(reply.content["metrics"]["loss"]))

    def result(self) -> RecordDict:
        state = self.state
        for combiner in self.combiners:
            state[combiner.record] = combiner.result()
        if self.losses is not None:
            state = _append_loss(state, self.losses)
        return self.finish(state) if self.finish is not None else state


def record_train_loss(state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
    """Append the round's mean client loss to `state["train"]["loss"]`.

    Replies without metrics (under client-level DP they are dropped, or under secure
    aggregation only the mean arrives) leave the history as it is.
    """
    losses = [float(r.content["metrics"]["loss"]) for r in replies if "metrics" in r.content]
    return _append_loss(state, losses)


def _append_loss(state: RecordDict, losses: list[float]) -> RecordDict:
    if losses:
        history = list(state["train"]["loss"]) if "train" in state else []
        state["train"] = MetricRecord({"loss": [*history, float(np.mean(losses))]})
    return state
