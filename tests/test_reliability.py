"""Nothing bad gets in, nothing is lost: each case a hostile or careless user found, pinned.

Runtime cases use a toy method on numpy (no model); CLI cases the tiny random model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedsteer.cli import app
from fedsteer.data import DataError, Example, TaskSpec, load_examples, task_from_spec
from fedsteer.federation import InProcessRuntime, RuntimeConfig
from fedsteer.federation.replies import default_weight_limits
from fedsteer.federation.runtime import lower_median
from fedsteer.methods import Client, seeded_rng
from fedsteer.methods.aggregation import RecordMean, RecordsAggregator
from test_federation_runtime import DIM, ToyAverage, final_w, make_clients, npy_bytes, raw_array

runner = CliRunner()


@dataclass
class Unbounded(ToyAverage):
    """A method that declares no norm bound of its own, as every real method does."""

    name = "unbounded"
    max_reply_norm = None
    attacker: int = -1
    attack: str = "none"

    def client_step(self, message, client):
        reply = super().client_step(message, client)
        w = reply["update"]["w"].numpy()
        if client.cid == self.attacker:
            w = {"huge": np.full_like(w, 1e30 / np.sqrt(w.size)), "scaled": w * 1e6,
                 "nan": np.full_like(w, np.nan)}[self.attack]
        reply["update"]["w"] = Array(w.astype(np.float32))
        return reply


def _honest(n=10):
    env, clients = make_clients(n)
    return final_w(InProcessRuntime().run(Unbounded(), [c for c in clients if c.cid != 3], env))


@pytest.mark.parametrize("attack", ["huge", "scaled"])
def test_one_finite_huge_reply_is_rejected_by_the_default_bound(attack):
    env, clients = make_clients(10)
    outcome = InProcessRuntime().run(Unbounded(attacker=3, attack=attack), clients, env)
    rejected = [x for r in outcome.rounds for x in r.rejected]
    assert [x["cid"] for x in rejected] == [3] * 4 and "× median" in rejected[0]["reason"]
    np.testing.assert_allclose(final_w(outcome), _honest(), rtol=1e-6)


def test_the_bound_can_be_switched_off_and_an_absolute_one_set():
    env, clients = make_clients(10)
    off = InProcessRuntime(RuntimeConfig(reply_norm_factor=0)).run(
        Unbounded(attacker=3, attack="scaled"), clients, env)
    assert not any(r.rejected for r in off.rounds)
    absolute = InProcessRuntime(RuntimeConfig(reply_norm_factor=0, max_reply_norm=50.0)).run(
        Unbounded(attacker=3, attack="scaled"), clients, env)
    assert all(r.rejected for r in absolute.rounds)


def test_with_two_replies_the_honest_one_sets_the_scale():
    assert lower_median([1.0, 1e30]) == 1.0
    env, clients = make_clients(2)
    outcome = InProcessRuntime().run(Unbounded(attacker=1, attack="scaled"), clients, env)
    assert all(r.rejected and r.rejected[0]["cid"] == 1 for r in outcome.rounds)


@dataclass
class BrokenAggregate(ToyAverage):
    """The server's own step goes wrong in round 2 (NaN): the state must not take it."""

    name = "broken-aggregate"

    def aggregate(self, rnd, state, replies):
        state = super().aggregate(rnd, state, replies)
        if rnd == 2:
            state["global"] = ArrayRecord({"w": Array(np.full(8, np.nan, np.float32))})
        return state


def test_a_bad_aggregate_keeps_the_previous_state_and_is_logged():
    env, clients = make_clients(5)
    outcome = InProcessRuntime().run(BrokenAggregate(), clients, env)
    assert np.all(np.isfinite(final_w(outcome)))
    assert outcome.rounds[2].rejected == [
        {"cid": "aggregate", "reason": "record 'global' holds NaN or Inf"}]


def _equal_clients(n: int, rows: int = 3, big: int | None = None):
    """`n` clients of `rows` rows each; the last one holds (claims) `big` rows."""
    env, _ = make_clients(1)
    sizes = [rows] * (n - 1) + [big or rows]
    return env, [Client(cid=i, data=[Example("x", 0)] * k, env=env) for i, k in enumerate(sizes)]


@pytest.mark.parametrize("n", [2, 5, 10])
def test_no_client_outweighs_the_rest(n):
    """The old cap, 10 × the median, let one of ≤ 10 equal clients hold over half the
    weight (10 of 19 with ten): now it weighs at most all the others together."""
    env, clients = _equal_clients(n, big=100_000)
    outcome = InProcessRuntime().run(ToyAverage(rounds=1), clients, env)
    (capped,) = outcome.rounds[0].capped
    assert capped == {"cid": n - 1, "claimed": 100_000, "weight": 3 * (n - 1)}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(weights=st.lists(st.integers(1, 10**12), min_size=2, max_size=40))
def test_under_the_default_cap_no_reply_outweighs_the_others(weights):
    """Whatever the claims: each weight only cut, none above 10 × the lower median, and none
    above all the others together."""
    limits = default_weight_limits(weights)
    weighed = [min(w, limit) for w, limit in zip(weights, limits, strict=True)]
    median = sorted(weights)[(len(weights) - 1) // 2]
    assert all(1 <= x <= min(w, 10 * median) for x, w in zip(weighed, weights, strict=True))
    assert all(2 * x <= sum(weighed) for x in weighed)


def test_among_many_no_client_weighs_more_than_ten_times_the_median():
    env, clients = _equal_clients(30, big=100_000)
    outcome = InProcessRuntime().run(ToyAverage(rounds=1), clients, env)
    assert outcome.rounds[0].capped == [{"cid": 29, "claimed": 100_000, "weight": 30}]


def test_an_explicit_cap_is_the_cap():
    env, clients = _equal_clients(2, big=100_000)
    outcome = InProcessRuntime(RuntimeConfig(max_client_weight=50)).run(
        ToyAverage(rounds=1), clients, env)
    assert outcome.rounds[0].capped == [{"cid": 1, "claimed": 100_000, "weight": 50}]


def test_a_cap_below_one_example_is_refused():
    """int(0.5) weighed every reply 0: the mean of nothing, NaN, every round refused."""
    with pytest.raises(ValueError, match="max_client_weight=0.5"):
        RuntimeConfig(max_client_weight=0.5)


class SelfReported(InProcessRuntime):
    """Clients report their own example counts, as on Flower; `claims` are the lies."""

    def __init__(self, claims: dict, config: RuntimeConfig | None = None) -> None:
        super().__init__(config)
        self.claims = claims

    def _accept(self, method, message, cid, content, num_examples, cost):
        claimed = self.claims.get(cid, num_examples)
        return super()._accept(method, message, cid, content, claimed, cost)


def _honest_total(n=10, without=3):
    _, clients = make_clients(n)
    return sum(len(c.data) for c in clients if c.cid != without)


@pytest.mark.parametrize("claim", [0, -1, -_honest_total(), 0.5, 2.5, float("nan"),
                                   float("inf"), -float("inf"), True, "7", None, 2**60])
@pytest.mark.parametrize("screens", [True, False])
def test_a_weight_below_one_or_not_a_count_is_a_rejected_reply(claim, screens):
    """A cap bounds a weight from above only: -1 shifted the mean by the honest total times
    its update, minus the total made it NaN and lost the round; a string failed the run."""
    env, clients = make_clients(10)
    config = RuntimeConfig() if screens else RuntimeConfig(reply_norm_factor=0,
                                                           max_client_weight=100)
    outcome = SelfReported({3: claim}, config).run(Unbounded(), clients, env)
    for cost in outcome.rounds:
        assert [x["cid"] for x in cost.rejected] == [3], cost.rejected
        assert "num-examples" in cost.rejected[0]["reason"]
    np.testing.assert_allclose(final_w(outcome), _honest(), rtol=1e-6)


class UniformAverage(ToyAverage):
    """The unweighted mean IFed-ICL's vectors use: a claimed size weighs nothing."""

    def reply_weighting(self, message):
        return "uniform"

    def aggregate(self, rnd, state, replies):
        mean = np.mean([r.content["update"]["w"].numpy() for r in replies], axis=0)
        state["global"] = ArrayRecord({"w": Array(mean.astype(np.float32))})
        return state


@pytest.mark.parametrize("max_weight", [None, 3])
def test_a_uniform_mean_caps_no_weight(caplog, max_weight):
    """An honest client holding 15x the median under a skewed partition was logged as
    'capped' in IFed-ICL's unweighted round, a cut that never happened."""
    env, clients = make_clients(5)
    clients[4] = Client(cid=4, data=[Example("x", 0)] * 100_000, env=env)
    runtime = InProcessRuntime(RuntimeConfig(max_client_weight=max_weight))
    outcome = runtime.run(UniformAverage(rounds=1), clients, env)
    assert outcome.rounds[0].capped == [] and "weighed as" not in caplog.text
    assert sorted(outcome.rounds[0].clients) == [0, 1, 2, 3, 4]


# --- data oddities -----------------------------------------------------------------------


def test_a_csv_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text,label,label\nhello,0,1\n")
    with pytest.raises(DataError, match=r"x\.csv, line 1, field 'label'.*twice"):
        load_examples(path, ("a", "b"), pair=False, max_chars=100)


def test_duplicate_label_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="label names must differ; twice: \\['a'\\]"):
        TaskSpec("t", ("a", "a"), (" x", " y"), "{text}:")


def test_a_spec_cannot_reach_outside_its_folder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jsonl").write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "spec").mkdir()
    spec = {"name": "t", "labels": ["a", "b"], "train": "../elsewhere/x.jsonl",
            "test": "../elsewhere/x.jsonl"}
    with pytest.raises(DataError, match="field 'train'.*leaves the spec's folder"):
        task_from_spec(spec, tmp_path / "spec" / "t.yaml")
    absolute = {**spec, "train": str(tmp_path / "elsewhere" / "x.jsonl"),
                "test": str(tmp_path / "elsewhere" / "x.jsonl")}
    assert task_from_spec(absolute, tmp_path / "spec" / "t.yaml").train


def test_a_one_class_test_set_warns_in_the_record_and_the_table(tmp_path, tiny_lm):
    for name in ("train", "test"):
        label = "b" if name == "test" else None
        rows = [{"text": f"t{i}", "label": label or "ab"[i % 2]} for i in range(8)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "zero-shot", "--model", "tiny-random", "--clients", "2",
                                 "--train",
                                 str(tmp_path / "train.jsonl"), "--test",
                                 str(tmp_path / "test.jsonl"), "--labels", "a,b", "--out",
                                 str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    assert record["warnings"] == ["the 8 test rows hold 1 of 2 labels (none of a): macro-F1 "
                                  "counts those labels as 0"]
    assert "warning: the 8 test rows hold 1 of 2 labels" in " ".join(result.output.split())


# --- the command line ---------------------------------------------------------------------


def _fails_cleanly(args, *needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


@pytest.mark.parametrize("flag, value", [("--fraction", "-3"), ("--fraction", "1.5"),
                                         ("--test-size", "-1"), ("--clients", "0"),
                                         ("--batch-size", "0"), ("--rounds", "0"),
                                         ("--max-client-weight", "0.5")])
def test_out_of_range_numbers_are_refused_by_name(flag, value):
    _fails_cleanly(["run", "zero-shot", "--model", "tiny-random", flag, value], flag)


@pytest.mark.parametrize("option, expected", [
    ("rank=abc", "option rank of fedavg-lora expects int"),
    ("lr=abc", "option lr of fedavg-lora expects float"),
])
def test_method_options_are_type_checked_before_anything_runs(option, expected):
    _fails_cleanly(["run", "fedavg-lora", "--model", "tiny-random", "-o", option], expected)


def test_resume_refuses_flags_that_differ_from_the_recorded_run(tmp_path, tiny_lm):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "zero-shot", "--task", "trec", "--model", "tiny-random",
                                 "--clients", "3", "--test-size", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    _fails_cleanly(["run", "--resume", str(out), "--task", "sst2"],
                   "task: recorded 'trec'", "asked 'sst2'")
    _fails_cleanly(["run", "--resume", str(out), "--clients", "5"],
                   "clients: recorded 3", "asked 5")
    _fails_cleanly(["run", "ifed-icl", "--resume", str(out)],
                   "records methods ['zero-shot'], asked ['ifed-icl']")
    same = runner.invoke(app, ["run", "--resume", str(out), "--clients", "3"])
    assert same.exit_code == 0, same.output  # asking for what was recorded is fine


def test_a_damaged_checkpoint_is_one_line_and_debug_shows_the_traceback(tmp_path, tiny_lm):
    out = tmp_path / "run"
    args = ["run", "ifed-icl", "--model", "tiny-random", "--clients", "2", "--test-size", "4",
            "-o", "demos_per_class=1", "-o", "calibration_per_class=1", "--rounds", "1"]
    assert runner.invoke(app, [*args, "--out", str(out)]).exit_code == 0
    (out / "result.json").unlink()  # as if killed after its last round
    server = sorted((out / "checkpoint").glob("round-*"))[-1] / "server.safetensors"
    server.write_bytes(server.read_bytes()[:10])
    _fails_cleanly(["run", "--resume", str(out)], str(server), "the previous complete round")
    debug = runner.invoke(app, ["--debug", "run", "--resume", str(out)])
    assert debug.exit_code != 0 and debug.exception is not None  # the traceback is kept


def test_an_unknown_model_offline_fails_at_once_with_the_known_names(monkeypatch):
    from fedsteer.models import UnknownModelError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(UnknownModelError, match="qwen2.5-coder-0.5b.*local folder"):
        load_model("no-such-org/no-such-model")
    assert time.monotonic() - started < 5


def test_an_unknown_model_without_network_fails_at_once(monkeypatch):
    from fedsteer.models import UnknownModelError, load_model
    from fedsteer.models import load as load_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(load_module, "_offline", lambda: False)
    monkeypatch.setattr(load_module, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UnknownModelError, match="cannot be reached"):
        load_model("no-such-org/no-such-model")


def test_a_truncated_result_json_is_named(tmp_path):
    from fedsteer.eval.record import read_result

    (tmp_path / "result.json").write_text('{"method": ')
    with pytest.raises(ValueError, match=r"result\.json: not readable JSON"):
        read_result(tmp_path)


@pytest.mark.parametrize("per_class, expected", [(True, 6), (False, 1)])
def test_icl_shows_shots_per_class_so_every_trec_label_appears(tmp_path, tiny_lm, per_class,
                                                              expected):
    from fedsteer.experiment import RunConfig, run_experiment

    config = RunConfig(method="central-icl", task="trec", model="tiny-random", shots=1,
                       test_size=6, options={"per_class": per_class})
    record = run_experiment(config, tmp_path, lm=tiny_lm)
    assert record["metrics"]["demonstrations"] == expected
    assert record["config"]["method_options"]["per_class"] is per_class


@pytest.mark.parametrize("metrics, reason", [
    ({"accuracy": 0.5, "macro_f1": 0.5, "correct": [1, 2]}, "0/1"),
    ({"accuracy": 0.5, "macro_f1": 0.5, "correct": []}, "0/1"),
    ({"accuracy": 1.0, "macro_f1": 0.5, "correct": [1, 0]}, "share of rows"),
    ({"accuracy": 0.5, "macro_f1": 1.5, "correct": [1, 0]}, "macro-F1"),
])
def test_a_local_icl_score_that_is_not_one_is_rejected(metrics, reason):
    from flwr.app import MetricRecord

    from fedsteer.methods import make_method

    method = make_method("local-icl")
    assert reason in method.reply_problem(RecordDict({"metrics": MetricRecord(metrics)}))
    honest = {"accuracy": 0.5, "macro_f1": 0.5, "correct": [1, 0], "num_demos": 2}
    assert method.reply_problem(RecordDict({"metrics": MetricRecord(honest)})) is None


def test_a_local_icl_score_of_another_length_than_the_test_set_is_rejected():
    """Every client scores the same test rows; a reply of another length is refused on
    arrival instead of breaking the round's per-row record at evaluation."""
    from flwr.app import MetricRecord

    from fedsteer.data import Example
    from fedsteer.methods import Environment, make_method
    from toy import SPEC

    method = make_method("local-icl")
    method.setup(Environment(task=SPEC, test=[Example("a", 0), Example("b", 1)],
                             model_name="none"))
    short = {"accuracy": 1.0, "macro_f1": 1.0, "correct": [1], "num_demos": 2}
    assert "1 per-row results for 2 test rows" in method.reply_problem(
        RecordDict({"metrics": MetricRecord(short)}))
    honest = {"accuracy": 0.5, "macro_f1": 0.5, "correct": [1, 0], "num_demos": 2}
    assert method.reply_problem(RecordDict({"metrics": MetricRecord(honest)})) is None


@dataclass
class Drifting(ToyAverage):
    """Replies share a large common part (the global model) plus a small local change, as a
    full-parameter reply does; the attacker sends its honest reply sign-flipped."""

    name = "drifting"
    max_reply_norm = None
    attacker: int = -1

    def initial_state(self, env):
        return RecordDict({"global": ArrayRecord({"w": Array(np.full(8, 10.0, np.float32))})})

    def client_step(self, message, client):
        w = message["global"]["w"].numpy()
        step = 0.1 * seeded_rng("drift", client.cid, message["config"]["round"]).normal(size=8)
        reply = (w + step) * (-1 if client.cid == self.attacker else 1)
        return RecordDict({"update": ArrayRecord({"w": Array(reply.astype(np.float32))})})


def test_a_sign_flipped_reply_of_honest_size_is_rejected_by_its_distance():
    env, clients = make_clients(10)
    outcome = InProcessRuntime().run(Drifting(attacker=3), clients, env)
    rejected = [x for r in outcome.rounds for x in r.rejected]
    assert [x["cid"] for x in rejected] == [3] * 4
    assert "distance to the median" in rejected[0]["reason"]
    honest = InProcessRuntime().run(Drifting(), [c for c in clients if c.cid != 3], env)
    np.testing.assert_allclose(final_w(outcome), final_w(honest), rtol=1e-6)


# --- hostile replies, generated -----------------------------------------------------------

DTYPES = ["float16", "float32", "float64", "longdouble", "int8", "int64", "uint16", "bool",
          "complex64", "complex128", "<U2", "S3", "datetime64[s]", "object"]
SHAPES = [(DIM,), (DIM + 1,), (2, DIM // 2), (), (0,), (1, DIM)]


@st.composite
def hostile_array(draw) -> Array:
    shape = draw(st.sampled_from(SHAPES))
    if draw(st.booleans()):  # any bytes under any declared dtype, shape and serialization
        return Array(dtype=draw(st.sampled_from(DTYPES)),
                     shape=tuple(draw(st.lists(st.integers(-1, 10**13), max_size=3))),
                     stype=draw(st.sampled_from(["numpy.ndarray", "torch", ""])),
                     data=draw(st.binary(max_size=96) | st.just(npy_bytes(np.zeros(shape)))))
    size = int(np.prod(shape))
    values = np.array(draw(st.lists(st.floats(width=32) | st.sampled_from([0.0, 1e38]),
                                    min_size=size, max_size=size)), dtype=np.float64)
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    with np.errstate(all="ignore"):
        value = (values.astype(str) if dtype.kind in "US" else values).reshape(shape)
        value = value.astype(dtype)
    if dtype.kind == "O":
        return raw_array(npy_bytes(value), shape, "object")
    return Array(value)


NUMBER = st.floats() | st.integers(-2**63, 2**63 - 1)
METRIC = NUMBER | st.lists(st.floats(), max_size=3) | st.lists(st.integers(0, 9), max_size=3)
CONFIG = st.text(max_size=4) | st.binary(max_size=4) | st.booleans() | NUMBER


@st.composite
def hostile_reply(draw) -> RecordDict:
    """Records named as a reply's (and not), of every kind, holding anything Flower carries."""
    honest = ArrayRecord({"w": Array(np.full(DIM, 0.5, np.float32))})
    records = {"update": honest} if draw(st.booleans()) else {}
    names = st.sampled_from(["update", "metrics", "global", "x"])
    for name in draw(st.lists(names, unique=True, max_size=3)):
        keys = st.lists(st.sampled_from(["w", "loss", "v"]), unique=True, min_size=1,
                        max_size=2)
        kind = draw(st.sampled_from(["array", "metric", "config"]))
        if kind == "array":
            records[name] = ArrayRecord({k: draw(hostile_array()) for k in draw(keys)})
        elif kind == "metric":
            records[name] = MetricRecord({k: draw(METRIC) for k in draw(keys)})
        else:
            records[name] = ConfigRecord({k: draw(CONFIG) for k in draw(keys)})
    return RecordDict(records)


@dataclass
class LossAverage(Unbounded):
    """The toy averaged as FedAvg-LoRA and IFed-ICL's calibration are: a running mean of
    the `update` record plus the mean of the replies' `metrics.loss`."""

    name = "loss-average"
    reply = None  # the hostile client's reply (set on the instance; not an option)

    def client_step(self, message, client):
        if client.cid == 2:
            return self.reply
        reply = super().client_step(message, client)
        reply["metrics"] = MetricRecord({"loss": float(client.cid)})
        return reply

    def aggregator(self, rnd, state):
        def promote(new):
            new["global"] = new["update"]
            del new["update"]
            return new

        return RecordsAggregator(state, [RecordMean("update")], losses=True, finish=promote)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))
@given(reply=hostile_reply(),
                  claim=NUMBER | st.booleans() | st.text(max_size=3) | st.none(),
                  screens=st.booleans())
def test_a_hostile_reply_is_rejected_or_accepted_never_an_exception(reply, claim, screens):
    env, clients = make_clients(4)
    config = RuntimeConfig() if screens else RuntimeConfig(reply_norm_factor=0,
                                                           max_client_weight=100)
    method = LossAverage(rounds=1)
    method.reply = reply
    outcome = SelfReported({2: claim}, config).run(method, clients, env)
    assert np.all(np.isfinite(final_w(outcome)))
    assert all(np.isfinite(outcome.state["train"]["loss"]))
    rejected = [x["cid"] for x in outcome.rounds[0].rejected]
    assert rejected in ([], [2])
