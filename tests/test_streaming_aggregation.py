"""Streaming aggregation: each reply folded in as it arrives, equal to holding them all.

The mean rules equal Flower's batch `aggregate` bit for bit; the runtimes hold one reply at
a time (folded on arrival, or spooled to disk while the round-level checks need every
reply), with the same replies rejected and capped as when they held the whole round.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.server.strategy import aggregate as flwr_aggregate

from fedsteer.data import Example
from fedsteer.federation import InProcessRuntime, RuntimeConfig
from fedsteer.federation import replies as replies_module
from fedsteer.federation.replies import ReplySpool
from fedsteer.methods import Client, Reply, seeded_rng
from fedsteer.methods.aggregation import RecordMean, RecordsAggregator, aggregate_arrays
from fedsteer.methods.base import Aggregator, HeldReplies, fold
from fedsteer.methods.fedavg_lora import FedAvgLoRA
from fedsteer.methods.ifed_icl import IFedICL
from test_federation_runtime import DIM, ToyAverage, make_clients

SHAPES = {"a": (4, 3), "b": (5,), "c": (2, 2, 2)}


def reply(cid: int, weight: int, record: str = "adapter", loss: float | None = None) -> Reply:
    rng = np.random.default_rng(cid)
    content = RecordDict({record: ArrayRecord(
        {n: Array(rng.normal(size=s).astype(np.float32)) for n, s in SHAPES.items()})})
    if loss is not None:
        content["metrics"] = MetricRecord({"loss": loss})
    return Reply(cid=cid, content=content, num_examples=weight)


def flower_mean(replies, record: str, weighted: bool = True) -> dict[str, np.ndarray]:
    results = [([r.content[record][n].numpy() for n in SHAPES], r.num_examples if weighted
                else 1) for r in replies]
    return {n: a.astype(np.float32)
            for n, a in zip(SHAPES, flwr_aggregate.aggregate(results), strict=True)}


def assert_same(record: ArrayRecord, expected: dict[str, np.ndarray]) -> None:
    assert list(record) == list(expected)
    for name, value in expected.items():
        got = record[name].numpy()
        assert got.dtype == value.dtype and np.array_equal(got, value), name


@pytest.mark.parametrize("weighted", [True, False])
def test_the_running_mean_is_flowers_mean_bit_for_bit(weighted):
    replies = [reply(cid, weight) for cid, weight in enumerate([3, 1, 40, 7, 7, 2, 19])]
    mean = RecordMean("adapter", weighted=weighted)
    for r in replies:
        mean.add(r)
    assert_same(mean.result(), flower_mean(replies, "adapter", weighted))
    assert_same(aggregate_arrays(replies, "adapter", weighted=weighted),
                flower_mean(replies, "adapter", weighted))


def test_fedavg_lora_streams_its_mean_and_equals_the_batch_formula():
    replies = [reply(cid, weight, loss=0.1 * cid) for cid, weight in enumerate([4, 9, 2, 30])]
    method = FedAvgLoRA()
    aggregator = method.aggregator(0, RecordDict())
    assert not aggregator.holds_replies
    state = fold(aggregator, replies)
    assert_same(state["adapter"], flower_mean(replies, "adapter"))
    assert list(state["train"]["loss"]) == [float(np.mean([0.0, 0.1, 0.2, 0.1 * 3]))]
    batch = method.aggregate(0, RecordDict(), replies)  # the batch form is the same fold
    assert_same(batch["adapter"], flower_mean(replies, "adapter"))


def test_ifed_icl_streams_both_phases():
    method = IFedICL(weighting="uniform")
    vectors = [reply(cid, weight, record="vectors") for cid, weight in enumerate([5, 1, 8])]
    state = fold(method.aggregator(0, RecordDict()), vectors)
    assert_same(state["vectors"], flower_mean(vectors, "vectors", weighted=False))
    coefs = [reply(cid, weight, record="coef", loss=1.0 + cid)
             for cid, weight in enumerate([5, 1, 8])]
    aggregator = method.aggregator(1, state)
    assert not aggregator.holds_replies
    state = fold(aggregator, coefs)
    assert_same(state["coef"], flower_mean(coefs, "coef"))
    assert list(state["train"]["loss"]) == [2.0]


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])
def test_rules_that_need_every_reply_keep_them_and_say_so(rule):
    replies = [reply(cid, 3 + cid) for cid in range(6)]
    aggregator = FedAvgLoRA(rule=rule).aggregator(0, RecordDict())
    assert aggregator.holds_replies
    state = fold(aggregator, replies)
    assert_same(state["adapter"], {n: a.numpy() for n, a in
                                   aggregate_arrays(replies, "adapter", rule=rule).items()})


def test_a_method_with_only_a_batch_aggregate_holds_its_replies():
    aggregator = ToyAverage().aggregator(0, RecordDict())
    assert isinstance(aggregator, HeldReplies) and aggregator.holds_replies


# ------------------------------------------------------------------ runtimes
class CountingMean(Aggregator):
    """The toy's streaming mean, counting the replies folded in so far."""

    def __init__(self, method: StreamingToy, state: RecordDict, weighted: bool = True) -> None:
        self.method = method
        self.inner = RecordsAggregator(state, [RecordMean("update", weighted=weighted)])

    def add(self, reply: Reply) -> None:
        self.method.folds += 1
        self.inner.add(reply)

    def result(self) -> RecordDict:
        state = self.inner.result()
        state["global"] = ArrayRecord({"w": state["update"]["w"]})
        del state["update"]
        return state


@dataclass
class StreamingToy(ToyAverage):
    """ToyAverage with a streaming mean, watching how many replies are alive at each step."""

    name = "streaming-toy"

    def __post_init__(self) -> None:
        self.alive: list[weakref.ref] = []  # to every reply made
        self.peak_alive, self.folds, self.folded_at_step = 0, 0, []

    def client_step(self, message, client):
        self.peak_alive = max(self.peak_alive, sum(r() is not None for r in self.alive))
        self.folded_at_step.append(self.folds)
        content = super().client_step(message, client)
        self.alive.append(weakref.ref(content))
        return content

    def aggregator(self, rnd, state):
        self.folds = 0
        return CountingMean(self, state)


class HeldToy(StreamingToy):
    """The same replies aggregated the old way: every reply held, Flower's batch mean."""

    name = "held-toy"

    def aggregator(self, rnd, state):
        return HeldReplies(lambda replies: self.aggregate(rnd, state, replies))


class Hostile(StreamingToy):
    """Honest clients move the same way; client 5 sends a huge update (the norm screen),
    client 3 the honest update negated (the distance screen)."""

    name = "hostile-toy"
    max_reply_norm = None  # let the round's screens, not the absolute bound, find them

    def client_step(self, message, client):
        content = super().client_step(message, client)
        w = message["global"]["w"].numpy()
        step = seeded_rng("hostile", client.cid, message["config"]["round"]).normal(size=DIM)
        update = w + 1.0 + 0.01 * step
        update = update * 1e4 if client.cid == 5 else -update if client.cid == 3 else update
        content["update"] = ArrayRecord({"w": Array(update.astype(np.float32))})
        return content


class HostileHeld(Hostile):
    name = "hostile-held"

    def aggregator(self, rnd, state):
        return HeldReplies(lambda replies: self.aggregate(rnd, state, replies))


class UniformToy(StreamingToy):
    """The streaming toy with an unweighted mean, as IFed-ICL's first round."""

    name = "uniform-toy"

    def reply_weighting(self, message):
        return "uniform"

    def aggregator(self, rnd, state):
        self.folds = 0
        return CountingMean(self, state, weighted=False)


def clients_with_a_big_one(n=7):
    env, clients = make_clients(n)
    clients[4] = Client(cid=4, data=[Example("x", 0)] * 500, env=env)  # over 10 × median
    return env, clients


@pytest.mark.parametrize("config", [
    RuntimeConfig(seed=2),  # screens on, cap 10 × median: spooled until the round closes
    RuntimeConfig(seed=2, reply_norm_factor=0, max_client_weight=20),  # folded on arrival
])
def test_the_runtime_holds_one_reply_at_a_time(config):
    env, clients = clients_with_a_big_one()
    method, held = StreamingToy(rounds=2), HeldToy(rounds=2)
    outcome = InProcessRuntime(config).run(method, clients, env)
    InProcessRuntime(config).run(held, clients, env)
    direct = config.reply_norm_factor == 0
    assert method.peak_alive == 0  # each reply gone before the next client steps
    # the control: a rule that needs every reply keeps all earlier ones alive (once folding
    # starts; while the round's checks wait, replies wait on disk whatever the rule)
    assert held.peak_alive == (6 if direct else 0)
    # folded as each arrives, or all at the round's close once the checks had every reply
    assert method.folded_at_step == ([*range(7)] * 2 if direct else [0] * 14)
    assert all([c["cid"] for c in r.capped] == [4] for r in outcome.rounds)


@pytest.mark.parametrize("block", [replies_module.BLOCK_VALUES, 8])
def test_streaming_rejects_caps_and_averages_as_holding_every_reply(monkeypatch, block):
    monkeypatch.setattr(replies_module, "BLOCK_VALUES", block)  # 8: a coordinate a block
    env, clients = clients_with_a_big_one()
    streamed, held = (InProcessRuntime(RuntimeConfig(seed=1)).run(method, clients, env)
                      for method in (Hostile(rounds=3), HostileHeld(rounds=3)))
    for a, b in zip(streamed.rounds, held.rounds, strict=True):
        assert a.rejected == b.rejected and a.capped == b.capped
        assert [x["cid"] for x in a.rejected] == [5, 3]  # the norm screen, then the distance
        assert [x["cid"] for x in a.capped] == [4]
    assert np.array_equal(streamed.state["global"]["w"].numpy(),
                          held.state["global"]["w"].numpy())


def test_folded_on_arrival_equals_holding_every_reply():
    env, clients = clients_with_a_big_one()
    config = RuntimeConfig(seed=1, reply_norm_factor=0, max_client_weight=20)
    streamed, held = (InProcessRuntime(config).run(m, clients, env)
                      for m in (StreamingToy(rounds=3), HeldToy(rounds=3)))
    assert [r.capped for r in streamed.rounds] == [r.capped for r in held.rounds]
    assert np.array_equal(streamed.state["global"]["w"].numpy(),
                          held.state["global"]["w"].numpy())


def test_a_uniform_round_folds_on_arrival_under_the_default_cap():
    """The default cap (10 × the round's median weight) needs every reply only where the
    mean weighs them; with the screens off a uniform round spools nothing."""
    env, clients = clients_with_a_big_one()
    method = UniformToy(rounds=2)
    outcome = InProcessRuntime(RuntimeConfig(seed=1, reply_norm_factor=0)).run(
        method, clients, env)
    assert method.peak_alive == 0 and method.folded_at_step == [*range(7)] * 2
    assert all(r.capped == [] for r in outcome.rounds)


def test_the_spool_gives_back_each_reply_as_it_was(tmp_path):
    rng = seeded_rng("spool")
    content = RecordDict({
        "update": ArrayRecord({"w": Array(rng.normal(size=(3, 4)).astype(np.float32)),
                               "i": Array(np.arange(5, dtype=np.int64)),
                               "h": Array(rng.normal(size=7).astype(np.float16))}),
        "metrics": MetricRecord({"loss": 0.25}),
        "config": ConfigRecord({"phase": "x"}),
        "empty": ArrayRecord(),
    })
    spool = ReplySpool(tmp_path)
    slot = spool.put(content)
    back = spool.load(slot)
    assert list(back) == list(content)
    for name, array in content["update"].items():
        got = back["update"][name].numpy()
        assert got.dtype == array.numpy().dtype and np.array_equal(got, array.numpy())
    assert float(back["metrics"]["loss"]) == 0.25 and back["config"]["phase"] == "x"
    flat = np.concatenate([a.numpy().astype(np.float64).ravel()
                           for a in content["update"].values()])
    assert spool.lengths(slot) == {"update": flat.size}
    for start, stop in [(0, flat.size), (2, 14), (11, 13), (19, 40)]:
        assert np.array_equal(spool.segment(slot, "update", start, stop), flat[start:stop])
    spool.close()
    assert not spool.dir.exists()


def test_a_failed_round_leaves_no_spool_behind(tmp_path):
    env, clients = make_clients(4)

    class Broken(CountingMean):
        def result(self):
            raise RuntimeError("server bug")

    class BrokenToy(StreamingToy):
        def aggregator(self, rnd, state):
            return Broken(self, state)

    with pytest.raises(RuntimeError, match="server bug"):
        InProcessRuntime(RuntimeConfig(), checkpoint_dir=tmp_path).run(
            BrokenToy(rounds=1), clients, env)
    assert not list(tmp_path.glob(".replies-*"))


def test_weights_capped_on_arrival_use_the_explicit_cap():
    env, clients = clients_with_a_big_one(5)
    outcome = InProcessRuntime(RuntimeConfig(reply_norm_factor=0, max_client_weight=3)).run(
        StreamingToy(rounds=1), clients, env)
    assert outcome.rounds[0].capped == [{"cid": 4, "claimed": 500, "weight": 3}]
    assert outcome.state["global"]["w"].shape == (DIM,)
