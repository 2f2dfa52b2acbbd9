"""The in-process runtime: sampling, byte accounting, rejection, checkpoint and resume."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate

from fedsteer.data import Example, TaskSpec
from fedsteer.eval.costs import payload_bytes
from fedsteer.federation import CheckpointMismatch, InProcessRuntime, RuntimeConfig
from fedsteer.methods import Client, Environment, Method, Reply, seeded_rng

DIM = 8


@dataclass
class ToyAverage(Method):
    """Clients nudge a vector by a seeded step; the server FedAvg's the replies (flwr)."""

    name = "toy-average"
    rounds: int = 4
    max_reply_norm = 100.0

    def initial_state(self, env):
        return RecordDict({"global": ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})})

    def configure_round(self, rnd, state):
        if rnd >= self.rounds:
            return None
        return RecordDict({"global": state["global"], "config": ConfigRecord({"round": rnd})})

    def client_step(self, message, client):
        w = message["global"]["w"].numpy()
        step = seeded_rng("toy", client.cid, message["config"]["round"]).normal(size=DIM)
        return RecordDict({"update": ArrayRecord({"w": Array((w + step).astype(np.float32))})})

    def reply_shapes(self, message):
        return {"update.w": (DIM,)}

    def aggregate(self, rnd, state, replies):
        pairs = [([r.content["update"]["w"].numpy()], r.num_examples) for r in replies]
        state["global"] = ArrayRecord({"w": Array(aggregate(pairs)[0].astype(np.float32))})
        return state

    def evaluate(self, state, env):
        return {"accuracy": 0.0, "macro_f1": 0.0}


class Sabotaged(ToyAverage):
    """Client `bad_cid` sends a broken reply; optionally the process is 'killed' mid-run."""

    def __init__(self, bad_cid=-1, reply=None, kill_at_round=None):
        super().__init__()
        self.bad_cid, self.reply, self.kill_at_round = bad_cid, reply, kill_at_round

    def client_step(self, message, client):
        if message["config"]["round"] == self.kill_at_round:
            raise KeyboardInterrupt  # what a kill looks like from inside the loop
        if client.cid == self.bad_cid:
            return self.reply
        return super().client_step(message, client)


def make_clients(n=5):
    spec = TaskSpec(name="toy", labels=("a", "b"), label_words=(" a", " b"),
                    template="{text}:")
    env = Environment(task=spec, test=[], model_name="none")
    data = [Example(text=f"x{i}", label=i % 2) for i in range(3)]
    return env, [Client(cid=i, data=data[: 1 + i % 3], env=env) for i in range(n)]


def final_w(outcome):
    return outcome.state["global"]["w"].numpy()


def test_runs_all_rounds_and_counts_bytes():
    env, clients = make_clients()
    outcome = InProcessRuntime(RuntimeConfig(seed=1)).run(ToyAverage(), clients, env)
    assert len(outcome.rounds) == 4
    first = outcome.rounds[0]
    message = ToyAverage().configure_round(0, ToyAverage().initial_state(env))
    assert first.bytes_down == 5 * payload_bytes(message)
    # each reply carries DIM float32 plus Flower's framing, nothing more
    assert 5 * DIM * 4 < first.bytes_up < 5 * (DIM * 4 + 300)
    assert first.clients == [0, 1, 2, 3, 4] and first.peak_rss_bytes > 0


def test_payload_bytes_grow_with_the_array():
    def payload(n):
        return RecordDict({"a": ArrayRecord({"v": Array(np.zeros(n, np.float32))})})

    # 4 bytes a float32, plus a few bytes of protobuf varints for the longer length/shape
    assert 4000 <= payload_bytes(payload(1000)) - payload_bytes(payload(0)) <= 4008


def test_fraction_samples_a_seeded_subset():
    runtime = InProcessRuntime(RuntimeConfig(fraction=0.4, seed=3))
    picks = runtime.sample_clients(0, 10)
    assert len(picks) == 4 and picks == runtime.sample_clients(0, 10)
    assert any(runtime.sample_clients(r, 10) != picks for r in range(1, 5))


def update(array: Array, **records) -> RecordDict:
    return RecordDict({"update": ArrayRecord({"w": array}), **records})


def raw_array(data: bytes, shape=(DIM,), dtype="float32") -> Array:
    """An Array as a hostile client may send it: its declared dtype and shape, any bytes."""
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def npy_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=True)
    return buffer.getvalue()


#: replies that passed the check and then failed the run (a complex norm, a string mean,
#: an undecodable or pickled array) or were folded as numbers they are not (bool, int)
MALFORMED = {
    "complex64": (update(Array(np.ones(DIM, np.complex64))), "complex64"),
    "complex128": (update(Array(np.ones(DIM, np.complex128))), "complex128"),
    "bool": (update(Array(np.ones(DIM, bool))), "bool"),
    "int32": (update(Array(np.ones(DIM, np.int32))), "int32"),
    "strings": (update(Array(np.array(["x"] * DIM))), "<U1"),
    "object": (update(raw_array(npy_bytes(np.array([None] * DIM, object)), dtype="object")),
               "does not decode"),
    "garbage bytes": (update(raw_array(b"\x93NUMPY not really")), "does not decode"),
    "declared huge": (update(raw_array(b"", shape=(10**12,))), "shape"),
    "NaN metric": (update(Array(np.ones(DIM, np.float32)),
                          metrics=MetricRecord({"loss": float("nan")})), "NaN"),
}


@pytest.mark.parametrize("reply, reason", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_reply_is_rejected_and_the_round_goes_on(reply, reason):
    env, clients = make_clients()
    outcome = InProcessRuntime().run(Sabotaged(bad_cid=2, reply=reply), clients, env)
    for cost in outcome.rounds:
        assert [r["cid"] for r in cost.rejected] == [2]
        assert reason in cost.rejected[0]["reason"]
    healthy = InProcessRuntime().run(ToyAverage(), [c for c in clients if c.cid != 2], env)
    np.testing.assert_array_equal(final_w(outcome), final_w(healthy))


@pytest.mark.parametrize(
    "reply, reason",
    [
        (RecordDict({"update": ArrayRecord({"w": Array(np.full(DIM, np.nan, np.float32))})}),
         "NaN"),
        (RecordDict({"update": ArrayRecord({"w": Array(np.zeros(DIM + 1, np.float32))})}),
         "shape"),
        (RecordDict({"update": ArrayRecord({"w": Array(np.full(DIM, 1e3, np.float32))})}),
         "norm"),
        ("not a record", "not a RecordDict"),
    ],
)
def test_bad_reply_is_rejected_and_round_goes_on(reply, reason, caplog):
    env, clients = make_clients()
    outcome = InProcessRuntime().run(Sabotaged(bad_cid=2, reply=reply), clients, env)
    for cost in outcome.rounds:
        assert [r["cid"] for r in cost.rejected] == [2]
        assert reason in cost.rejected[0]["reason"]
    assert np.all(np.isfinite(final_w(outcome)))
    assert "rejected client 2" in caplog.text
    # the rejected client's view never reached the average
    healthy = InProcessRuntime().run(ToyAverage(), [c for c in clients if c.cid != 2], env)
    assert outcome.rounds[0].bytes_up < healthy.rounds[0].bytes_up * 5 / 4 + 1


class Crashing(ToyAverage):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def client_step(self, message, client):
        if client.cid == 0:
            raise self.error
        return super().client_step(message, client)


def test_a_client_whose_machine_fails_is_logged_and_skipped(caplog):
    env, clients = make_clients()
    outcome = InProcessRuntime().run(Crashing(OSError(28, "disk full")), clients, env)
    assert "disk full" in outcome.rounds[0].rejected[0]["reason"]
    assert len(outcome.rounds) == 4


def test_a_bug_in_a_client_step_fails_the_run_unless_tolerated():
    env, clients = make_clients()
    bug = TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")
    with pytest.raises(TypeError, match="unsupported operand"):
        InProcessRuntime().run(Crashing(bug), clients, env)
    tolerant = InProcessRuntime(RuntimeConfig(tolerate_client_errors=True))
    outcome = tolerant.run(Crashing(bug), clients, env)
    assert all("TypeError" in r.rejected[0]["reason"] for r in outcome.rounds)


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    env, clients = make_clients()
    expected = final_w(InProcessRuntime().run(ToyAverage(), clients, env))

    runtime = InProcessRuntime(checkpoint_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runtime.run(Sabotaged(kill_at_round=2), clients, env)
    assert (tmp_path / "round-0002" / "progress.json").exists()

    resumed = runtime.run(ToyAverage(), clients, env, resume=True,
                          fingerprint={"method": "toy-average", "options": {"rounds": 4}})
    assert [c.round for c in resumed.rounds] == [0, 1, 2, 3]
    np.testing.assert_array_equal(final_w(resumed), expected)


def test_resume_refuses_a_different_run(tmp_path):
    env, clients = make_clients()
    runtime = InProcessRuntime(checkpoint_dir=tmp_path)
    runtime.run(ToyAverage(rounds=1), clients, env)
    with pytest.raises(CheckpointMismatch):
        runtime.run(ToyAverage(rounds=3), clients, env, resume=True)


def test_reply_dataclass_fields():
    assert Reply(cid=1, content=RecordDict(), num_examples=3).num_examples == 3


@dataclass
class Scored(ToyAverage):
    """Accuracy is the first weight's sign; every evaluation is counted."""

    evaluations: int = 0

    def evaluate(self, state, env):
        self.evaluations += 1
        return {"accuracy": float(state["global"]["w"].numpy()[0] > 0), "macro_f1": 0.0}


@pytest.mark.parametrize("every, expected", [(1, [True] * 4), (2, [False, True] * 2),
                                             (3, [False, False, True, False])])
def test_eval_every_records_accuracy_after_those_rounds(every, expected):
    env, clients = make_clients()
    method = Scored()
    outcome = InProcessRuntime(RuntimeConfig(eval_every=every)).run(method, clients, env)
    assert [r.accuracy is not None for r in outcome.rounds] == expected
    assert method.evaluations == sum(expected)
    # the final state's metrics come along only when its last round was the one evaluated
    assert (outcome.metrics is not None) == expected[-1]
    if expected[-1]:
        assert outcome.metrics["accuracy"] == outcome.rounds[-1].accuracy


def test_a_round_is_labelled_with_method_phase_and_round_of_planned():
    from flwr.app import ConfigRecord, RecordDict

    from fedsteer.federation.runtime import round_label
    from fedsteer.methods import make_method

    ifed = make_method("ifed-icl", rounds=3)
    message = RecordDict({"config": ConfigRecord({"phase": "calibrate", "round": 2})})
    assert round_label(ifed, message, 2) == "ifed-icl · calibrate · round 3/4 · clients"
    lora = make_method("fedavg-lora", rounds=2)
    assert round_label(lora, RecordDict(), 0) == "fedavg-lora · round 1/2 · clients"
