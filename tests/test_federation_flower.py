"""fedsteer on Flower: the same ServerApp/ClientApp code, inline (fast) and in Flower's processes.

The fast tests drive the real `serve` (ServerApp main) and `client_app` through an inline
Grid that calls the ClientApp in this process; the slow ones start Flower's simulation and
a localhost deployment and check results equal the in-process runtime's.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedsteer.eval.record import read_result
from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.flower import client_app, from_run_config, launch, serve, to_run_config

IFED = {"rounds": 2, "local_epochs": 1, "demos_per_class": 1, "calibration_per_class": 2}
LORA = {"rounds": 2, "rank": 2, "local_examples": 4, "batch_size": 2}
OPTIONS = {"ifed-icl": IFED, "fedavg-lora": LORA}


def tiny_config(**overrides) -> RunConfig:
    fields = {"method": "ifed-icl", "task": "sst2", "model": "tiny-random", "clients": 3,
              "test_size": 20, "options": dict(IFED)}
    return RunConfig(**{**fields, **overrides})


class InlineGrid:
    """A Flower Grid whose nodes are ClientApp calls in this process.

    `silent` nodes join, then never answer a train message (killed after joining);
    `offline` nodes' train messages get the error the SuperLink writes for a node that
    missed its heartbeats;
    `tamper(node, content)` may rewrite a reply (a hostile client); `crash` nodes raise on
    train messages. Exceptions become
    error replies, as Flower sends them.
    """

    def __init__(self, run_config, partitions: int, silent=(), tamper=None,
                 node_config=None, crash=(), delays=None, offline=()) -> None:
        extra = node_config or {}
        self.contexts = {
            100 + p: Context(run_id=1, node_id=100 + p, state=RecordDict(), run_config=run_config,
                             node_config={"partition-id": p, "num-partitions": partitions,
                                          **extra.get(100 + p, {})})
            for p in range(partitions)
        }
        self.silent, self.tamper, self.sent = set(silent), tamper, []
        self.crash, self.received, self.offline = set(crash), [], set(offline)
        self.delays, self.held = dict(delays or {}), []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Answer at once, but hold each reply back `delays[node]` pulls (a slow node)."""
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message = copy.deepcopy(message)
            message.metadata.__dict__["_message_id"] = message_id  # the SuperLink's job
            for reply in self.send_and_receive([message]):  # none from a silent node
                self.held.append([self.delays.get(message.metadata.dst_node_id, 0), reply])
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        wanted, ready = set(message_ids), []
        for entry in list(self.held):
            if entry[1].metadata.reply_to_message_id not in wanted:
                continue
            if entry[0] <= 0:
                ready.append(entry[1])
                self.held.remove(entry)
            else:
                entry[0] -= 1
        return ready

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            if not message.metadata.message_id:
                message = copy.deepcopy(message)  # each node gets its own copy, as over the wire
            node = message.metadata.dst_node_id
            self.sent.append((node, message.metadata.message_type))
            if node in self.silent and message.metadata.message_type == "train":
                continue
            TaskIdentity.node_id = node
            if node in self.offline and message.metadata.message_type == "train":
                replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE,
                                             reason=NODE_UNAVAILABLE_ERROR_REASON),
                                       reply_to=message))
                continue
            try:
                if node in self.crash and message.metadata.message_type == "train":
                    raise RuntimeError("crashed on purpose")
                reply = client_app(message, self.contexts[node])
            except Exception as error:  # noqa: BLE001 - becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=repr(error)), reply_to=message)
            if self.tamper is not None:
                self.tamper(node, reply.content)
            self.received.append(reply)
            replies.append(reply)
        return replies


@pytest.fixture
def flower_identity():
    """Messages need a run identity, which Flower's processes set for real."""
    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def serve_inline(config, out_dir: Path, save_dir: Path | None = None, round_timeout: float = 5.0,
                 **grid_options) -> tuple[dict, InlineGrid]:
    run_config = to_run_config(config, out_dir=out_dir, round_timeout=round_timeout, node_wait=0.1,
                               save_dir=save_dir)
    grid = InlineGrid(run_config, config.clients, **grid_options)
    serve(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                        run_config=run_config))
    return read_result(out_dir), grid


def test_run_config_round_trips_every_field(tmp_path):
    config = tiny_config(rounds=None, test_size=None, max_reply_norm=3.5, alpha=0.1,
                         dp_clip=1.0, dp_record_clips={"vectors": 60.0})
    run = from_run_config(to_run_config(config, out_dir=tmp_path, round_timeout=7.0))
    assert run.config == config
    assert run.out_dir == str(tmp_path) and run.round_timeout == 7.0


@pytest.mark.parametrize("method", ["ifed-icl", "fedavg-lora"])
def test_flower_apps_match_the_in_process_runtime(tmp_path, flower_identity, method):
    # one by one in process too, so the two are the same computation bit for bit (batched
    # clients equal these to 1e-5: tests/test_client_batching.py)
    config = tiny_config(method=method, options=dict(OPTIONS[method]), client_batch=1)
    expected = run_experiment(config, tmp_path / "inprocess")
    record, grid = serve_inline(config, tmp_path / "flower")
    assert record["metrics"] == expected["metrics"]
    for key in ("bytes_up", "bytes_down", "num_rounds"):
        assert record["costs"][key] == expected["costs"][key], key
    assert {kind for _, kind in grid.sent} == {"query", "train"}


def test_a_silent_node_is_left_out_and_the_rounds_go_on(tmp_path, flower_identity):
    record, _ = serve_inline(tiny_config(), tmp_path, silent={101}, round_timeout=1.0)
    rounds = record["costs"]["rounds"]
    assert len(rounds) == 3
    for r in rounds:
        assert [x["cid"] for x in r["rejected"]] == [1]
        assert r["rejected"][0]["reason"].startswith("node lost: no reply")


def test_a_node_flower_declares_offline_is_rejected_as_lost_not_as_failed(tmp_path,
                                                                          flower_identity):
    """A killed node may be reported by the SuperLink (missed heartbeats) before our timeout:
    the same verdict, a lost node (was "client failed", which blames client code)."""
    record, _ = serve_inline(tiny_config(), tmp_path, offline={101}, round_timeout=30.0)
    for r in record["costs"]["rounds"]:
        assert [x["cid"] for x in r["rejected"]] == [1]
        assert r["rejected"][0]["reason"].startswith("node lost: Error: Node Unavailable")


def test_a_poisoned_reply_is_rejected_with_its_reason(tmp_path, flower_identity):
    def poison(node, content):
        if node == 102 and "vectors" in content:
            attn = content["vectors"]["attn"].numpy()
            content["vectors"]["attn"] = Array(np.full_like(attn, np.nan))

    record, _ = serve_inline(tiny_config(), tmp_path, tamper=poison)
    first = record["costs"]["rounds"][0]["rejected"]
    assert [x["cid"] for x in first] == [2] and "NaN" in first[0]["reason"]
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0


CLIENT_INFO_LIES = {  # what a hostile ClientApp may put in its own report, and the reason
    "negative count": ({"num-examples": -1000}, "num-examples"),
    "zero count": ({"num-examples": 0}, "num-examples"),
    "fractional count": ({"num-examples": 2.5}, "num-examples"),
    "NaN count": ({"num-examples": math.nan}, "num-examples"),
    "no seconds": ({"seconds": None}, "lacks seconds"),
    "negative seconds": ({"seconds": -1.0}, "not a time"),
}


@pytest.mark.parametrize("lie, reason", CLIENT_INFO_LIES.values(), ids=CLIENT_INFO_LIES.keys())
def test_a_client_report_with_a_count_below_one_or_missing_is_rejected(tmp_path, flower_identity,
                                                                         lie, reason):
    """A count ≤ 0 passed (only capped from above) and shifted or NaN'd the weighted mean; a
    report without its seconds failed the run. Now each is a rejected reply."""

    def tamper(node, content):
        if node == 102 and "fedsteer.client" in content:
            info = content["fedsteer.client"]
            for key, value in lie.items():
                if value is None:
                    del info[key]
                else:
                    info[key] = value

    record, _ = serve_inline(tiny_config(), tmp_path, tamper=tamper)
    for r in record["costs"]["rounds"]:
        assert [x["cid"] for x in r["rejected"]] == [2] and reason in r["rejected"][0]["reason"]
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0


def test_a_node_whose_identity_is_not_a_count_is_named_not_a_crash(tmp_path, flower_identity):
    """Its identity's num-examples went through int(): a string failed with a bare
    ValueError; now the node is one of the failures the error names."""

    def tamper(node, content):
        if node == 102 and "identity" in content:
            content["identity"]["num-examples"] = "many"

    with pytest.raises(RuntimeError, match=r"\[2\].*node 102: num-examples 'many' is not a"):
        serve_inline(tiny_config(), tmp_path, tamper=tamper)


def test_asyndbt_on_flower_rejects_a_count_below_one(tmp_path, flower_identity):
    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 3, "demo_candidates": 2,
               "active": 2, "staleness": 2}

    def tamper(node, content):
        if node == 101 and "fedsteer.client" in content:
            content["fedsteer.client"]["num-examples"] = -5

    record, _ = serve_inline(tiny_config(method="asyndbt", options=options), tmp_path,
                             tamper=tamper, round_timeout=60.0)
    rejected = [x for r in record["costs"]["rounds"] for x in r["rejected"]]
    assert rejected and all(x["cid"] == 1 and "num-examples" in x["reason"] for x in rejected)


def test_a_failing_client_becomes_an_error_reply_and_is_logged(tmp_path, flower_identity):
    record, _ = serve_inline(tiny_config(), tmp_path, crash={101})
    for r in record["costs"]["rounds"]:
        assert [x["cid"] for x in r["rejected"]] == [1]
        assert r["rejected"][0]["reason"].startswith("client failed")
        assert "crashed on purpose" in r["rejected"][0]["reason"]


def test_a_node_that_cannot_read_its_data_is_named_at_start(tmp_path, flower_identity):
    missing = tmp_path / "gone.jsonl"
    with pytest.raises(RuntimeError, match="partition.*1.*gone.jsonl"):
        serve_inline(tiny_config(), tmp_path, node_config={101: {"data-file": str(missing)}})


# ------------------------------------------------------------- processes
def flower_pids() -> set[int]:
    names = ("flower-superlink", "flower-supernode", "flwr-serverapp", "flwr-clientapp",
             "flwr-simulation", "flower-superexec")
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(name in cmd for name in names):
            found.add(proc.pid)
    return found


@pytest.fixture
def no_leftover_processes():
    before = flower_pids()
    yield
    deadline = time.monotonic() + 15
    while flower_pids() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not flower_pids() - before, "Flower processes were left running"


def data_dir() -> str:
    from fedsteer import settings

    return str(settings.data_dir())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ifed-icl", "fedavg-lora"])
def test_simulation_equals_in_process(tmp_path, no_leftover_processes, method):
    # one by one in process too, so the two are the same computation bit for bit (batched
    # clients equal these to 1e-5: tests/test_client_batching.py)
    config = tiny_config(method=method, options=dict(OPTIONS[method]), client_batch=1)
    expected = run_experiment(config, tmp_path / "inprocess")
    record = launch.run_on_flower(config, tmp_path / "sim")
    assert record["metrics"] == expected["metrics"]
    assert record["costs"]["bytes_up"] == expected["costs"]["bytes_up"]


@pytest.mark.slow
def test_asyndbt_runs_asynchronously_in_flower_simulation(tmp_path, no_leftover_processes):
    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 4, "demo_candidates": 2,
               "active": 2}
    record = launch.run_on_flower(tiny_config(method="asyndbt", options=options),
                                  tmp_path / "sim")
    assert record["costs"]["num_rounds"] == 4
    assert all(len(r["clients"]) >= 2 for r in record["costs"]["rounds"])
    assert len(record["metrics"]["per_client"]) == 3


@pytest.mark.slow
def test_secure_aggregation_in_flower_simulation(tmp_path, no_leftover_processes):
    expected = run_experiment(tiny_config(), tmp_path / "inprocess")
    record = launch.run_on_flower(tiny_config(secagg=True), tmp_path / "sim")
    assert record["metrics"]["accuracy"] == expected["metrics"]["accuracy"]
    assert record["metrics"]["lam_attn_mean"] == pytest.approx(
        expected["metrics"]["lam_attn_mean"], abs=1e-4)
    assert record["costs"]["bytes_up"] > expected["costs"]["bytes_up"]  # the protocol's cost


@pytest.mark.slow
def test_localhost_deployment_runs_two_rounds_and_stops_everything(tmp_path, no_leftover_processes):
    # extract + 1 calibration; one by one in process too: the same computation bit for bit
    config = tiny_config(clients=2, options={**IFED, "rounds": 1}, client_batch=1)
    expected = run_experiment(config, tmp_path / "inprocess")
    started = time.monotonic()
    record = launch.run_on_flower(config, tmp_path / "deploy", deployment=True)
    assert record["costs"]["num_rounds"] == 2
    assert record["metrics"] == expected["metrics"]
    assert time.monotonic() - started < 300


@pytest.mark.slow
def test_a_supernode_killed_mid_round_does_not_hang_the_server(tmp_path, no_leftover_processes):
    config = tiny_config(options={**IFED, "rounds": 1})
    run_config = to_run_config(config, out_dir=tmp_path / "out", data_dir=data_dir(),
                               round_timeout=20.0)
    work = tmp_path / "flower"
    app_dir = launch.write_app(work / "app", run_config)
    with launch.flower_processes(work) as processes:
        port = launch.start_superlink(processes, simulation=False)
        nodes = [launch.start_supernode(processes, port, {"partition-id": p, "num-partitions": 3})
                 for p in range(3)]
        victim, victim_log = nodes[1], work / "supernode1.log"

        def kill_when_busy():  # kill node 1 as soon as it receives its first train message
            if victim.poll() is None and "Receiving: train" in victim_log.read_text():
                os.killpg(victim.pid, 9)

        launch.submit(processes, app_dir, None, timeout=300, on_wait=kill_when_busy)
    record = read_result(tmp_path / "out")
    rejected = [x for r in record["costs"]["rounds"] for x in r["rejected"]]
    assert rejected and {x["cid"] for x in rejected} == {1}
    # our timeout or the SuperLink's missed-heartbeat verdict, whichever comes first
    assert all(x["reason"].startswith("node lost: ") for x in rejected), rejected
    assert record["metrics"]["num_clients"] == 3
    assert json.loads(json.dumps(record))  # a complete, readable record


def test_a_server_app_exception_in_the_flwr_log_is_found():
    log_text = ("INFO : Start `flwr-serverapp` process\nERROR : ServerApp raised an exception\n"
                "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                "RuntimeError: no Flower node holds partition(s) [1]\nERROR : Exit Code: 201\n")
    assert launch.app_failure(log_text) == "RuntimeError: no Flower node holds partition(s) [1]"
    assert launch.app_failure("INFO : run finished\n") is None


def test_a_simulation_exception_is_found_too_and_the_first_error_is_named(tmp_path):
    """The simulation engine logs "Simulation raised an exception" (was missed: exit 0)."""
    log_text = ("ERROR : Simulation raised an exception\nTraceback (most recent call last):\n"
                "DataError: /x/sst2/meta.json: task 'sst2' not found\n"
                "RuntimeError: Simulation failed\n")
    assert launch.app_failure(log_text) == "DataError: /x/sst2/meta.json: task 'sst2' not found"
    (tmp_path / "flwr-run.log").write_text("INFO : ok\n")
    (tmp_path / "superlink.log").write_text(log_text)
    assert launch.first_failure(tmp_path) == (
        tmp_path / "superlink.log", "DataError: /x/sst2/meta.json: task 'sst2' not found")


def test_a_missing_task_fails_before_any_flower_process_starts(tmp_path, monkeypatch):
    from fedsteer import settings
    from fedsteer.data import DataError

    monkeypatch.setenv(settings.DATA_DIR_ENV, str(tmp_path / "empty"))
    started = []
    monkeypatch.setattr(launch, "simulate", lambda *a, **k: started.append(1))
    with pytest.raises(DataError, match="empty/sst2"):
        launch.run_on_flower(tiny_config(), tmp_path / "out")
    assert not started


def test_client_level_dp_is_the_same_on_flower_as_in_process(tmp_path, flower_identity):
    """The clip is the same on both runtimes (clip only: equal results); with noise, the same
    accounting. Noisy runs cannot be compared for equality: the noise comes from OS entropy,
    and a DP run is not reproducible by design (issue 41)."""
    clip_only = tiny_config(dp_clip=1.0, dp_noise=0.0, client_batch=1)
    expected = run_experiment(clip_only, tmp_path / "inprocess")
    record, _ = serve_inline(clip_only, tmp_path / "flower")
    assert record["metrics"] == expected["metrics"]
    noisy = tiny_config(dp_clip=1.0, dp_noise=0.5, client_batch=1)
    expected = run_experiment(noisy, tmp_path / "inprocess-noisy")
    record, _ = serve_inline(noisy, tmp_path / "flower-noisy")
    assert record["privacy"] == expected["privacy"] and 0 < record["privacy"]["epsilon"] < 1e9


def test_the_dp_reference_and_relative_clips_are_the_same_on_flower_as_in_process(
        tmp_path, flower_identity):
    """Issue 41's public reference travels in the round's message through the Grid, and a
    node clips each row of its deviation from it as an in-process client does: clip only,
    equal results, the same ledger (reference, each record's z, κ)."""
    dp = {"dp_clip": 1.0, "dp_noise": 0.0, "dp_mode": "central", "client_batch": 1,
          "dp_relative_clips": {"vectors": 0.25}, "dp_record_noise": {"coef": 0.0}}
    expected = run_experiment(tiny_config(**dp), tmp_path / "inprocess")
    record, _ = serve_inline(tiny_config(**dp), tmp_path / "flower")
    assert expected["privacy"]["references"]["vectors"]["round"] == 0
    assert record["privacy"] == expected["privacy"]
    assert record["metrics"] == expected["metrics"]


def test_the_repository_flower_app_lists_every_run_config_key():
    import tomllib

    app = tomllib.loads((Path(__file__).parents[1] / "flower" / "pyproject.toml").read_text())
    flwr = app["tool"]["flwr"]["app"]
    assert flwr["components"] == launch.APP_COMPONENTS
    assert app["project"]["dependencies"] == []  # Flower would uv-sync them (CUDA torch)
    assert set(flwr["config"]) == set(to_run_config(RunConfig("ifed-icl")))
    from_run_config(flwr["config"])  # and it reads back


def test_a_nodes_own_dtype_and_device_reach_its_model_load(tmp_path, flower_identity,
                                                           monkeypatch):
    """Issue 43: a node's config may run its model its own way (`dtype`, `device` in its
    node config, e.g. bf16 on its GPU): that is what its model is loaded with, even where
    another node of the same run shares its process with the run's own settings."""
    import fedsteer.models as models

    loads, real = [], models.load_placed

    def recording(name, **kw):
        lm = real(name, **kw)
        loads.append((kw["dtype"], kw["device"], str(next(lm.model.parameters()).dtype)))
        return lm

    monkeypatch.setattr(models, "load_placed", recording)
    record, grid = serve_inline(tiny_config(rounds=1, client_batch=1), tmp_path / "out",
                                node_config={101: {"dtype": "bfloat16", "device": "cpu"}})
    assert ("bfloat16", "cpu", "torch.bfloat16") in loads
    assert ("float32", "auto", "torch.float32") in loads  # the other nodes: the run's own
    assert not [r for r in grid.received if r.has_error()]
    assert record["metrics"]["num_clients"] == 3


def test_secure_aggregation_equals_plain_and_hides_every_payload(tmp_path, flower_identity):
    plain = run_experiment(tiny_config(), tmp_path / "plain")
    record, grid = serve_inline(tiny_config(secagg=True), tmp_path / "secure")
    for key in ("lam_attn_mean", "beta_attn_mean", "lam_mlp_mean", "beta_mlp_mean"):
        assert record["metrics"][key] == pytest.approx(plain["metrics"][key], abs=1e-4), key
    _assert_nothing_but_protocol_reached_the_server(grid)
    assert all(r["rejected"] == [] for r in record["costs"]["rounds"])
    assert record["metrics"]["accuracy"] == plain["metrics"]["accuracy"]


def test_secure_aggregation_of_lora_adapters(tmp_path, flower_identity):
    config = tiny_config(method="fedavg-lora", options=dict(LORA))
    run_experiment(config, tmp_path / "plain", save_dir=tmp_path / "plain-adapter")
    secure = RunConfig(**{**config.__dict__, "secagg": True})
    _, grid = serve_inline(secure, tmp_path / "secure", save_dir=tmp_path / "secure-adapter")
    _assert_nothing_but_protocol_reached_the_server(grid)
    plain_w, secure_w = (load_file(str(tmp_path / d / "adapter_model.safetensors"))
                         for d in ("plain-adapter", "secure-adapter"))
    for key, value in plain_w.items():
        np.testing.assert_allclose(secure_w[key], value, atol=1e-4)


def test_central_dp_inside_secure_aggregation(tmp_path, flower_identity):
    """Issue 20: clients clip, SecAgg+ hands the server only the mean, and the noise joins
    that mean: with no noise the run equals in-process central DP (uniform weights), with
    noise it moves, is accounted, and no single update ever reaches the server."""
    dp = {"dp_clip": 100.0, "dp_mode": "central", "dp_record_clips": {"coef": 5.0}}
    plain = run_experiment(tiny_config(dp_noise=0.0, **dp), tmp_path / "plain")
    quiet, grid = serve_inline(tiny_config(secagg=True, dp_noise=0.0, **dp), tmp_path / "quiet")
    _assert_nothing_but_protocol_reached_the_server(grid)
    assert all(r["rejected"] == [] for r in quiet["costs"]["rounds"])
    for key in ("lam_attn_mean", "beta_attn_mean", "lam_mlp_mean", "beta_mlp_mean"):
        assert quiet["metrics"][key] == pytest.approx(plain["metrics"][key], abs=1e-4), key
    noisy, grid = serve_inline(tiny_config(secagg=True, dp_noise=1.0, **dp), tmp_path / "noisy")
    _assert_nothing_but_protocol_reached_the_server(grid)
    assert noisy["privacy"]["mode"] == "central" and noisy["privacy"]["epsilon"] < math.inf
    assert noisy["metrics"]["lam_attn_mean"] != pytest.approx(
        quiet["metrics"]["lam_attn_mean"], abs=1e-3)


def _assert_nothing_but_protocol_reached_the_server(grid) -> None:
    payloads = [name for reply in grid.received for name in reply.content.array_records
                if len(reply.content[name])]
    assert payloads == []


def test_secure_aggregation_refuses_a_method_that_is_not_a_mean(tmp_path, flower_identity):
    with pytest.raises(ValueError, match="local-icl does not aggregate by a mean"):
        serve_inline(tiny_config(method="local-icl", secagg=True), tmp_path)


def test_asyndbt_on_flower_consumes_replies_as_they_arrive(tmp_path, flower_identity):
    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 6, "demo_candidates": 2,
               "active": 1, "staleness": 3}
    config = tiny_config(method="asyndbt", options=options)
    # node of worker 2 lags 4 s; the timeout is far beyond, so waiting would show
    record, grid = serve_inline(config, tmp_path, delays={102: 4}, round_timeout=60.0)
    rounds = record["costs"]["rounds"]
    assert len(rounds) == 6 and all(not r["rejected"] for r in rounds)
    used = [r["clients"] for r in rounds]
    assert any(2 not in cids for cids in used)  # the server did not wait for the slow one
    slow = [i for i, cids in enumerate(used) if 2 in cids]
    assert slow and max(np.diff([-1, *slow])) <= 4  # ... beyond the staleness bound
    assert {c["cid"] for c in record["metrics"]["per_client"]} == {0, 1, 2}
    assert ("evaluate" in {kind for _, kind in grid.sent})


def test_asyndbt_on_flower_asks_a_silent_worker_again_once_per_timeout(tmp_path, flower_identity):
    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 5, "demo_candidates": 2,
               "active": 1, "staleness": 2}
    config = tiny_config(method="asyndbt", options=options)
    record, grid = serve_inline(config, tmp_path, silent={101}, round_timeout=0.5)
    given_up = sum(1 for r in record["costs"]["rounds"] for rej in r["rejected"]
                   if rej["cid"] == 1)
    asked = sum(1 for node, kind in grid.sent if node == 101 and kind == "train")
    assert given_up >= 1
    assert asked <= given_up + 1  # one message in flight at a time, never two


def test_asyndbt_on_flower_never_counts_a_timeout_as_a_reply(tmp_path, flower_identity):
    """active=2, node 101 silent, 100 and 102 answering after 8 and 16 polls: the second
    update falls when 101's first message times out (1.5 s), between 100's and 102's second
    replies. It must still wait for two real replies (the in-process rule), not take the
    timeout as one of them."""
    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 4, "demo_candidates": 2,
               "active": 2, "staleness": 2}
    config = tiny_config(method="asyndbt", options=options)
    record, _ = serve_inline(config, tmp_path, silent={101}, delays={100: 8, 102: 16},
                             round_timeout=1.5)
    rounds = record["costs"]["rounds"]
    assert any(rej["cid"] == 1 for r in rounds for rej in r["rejected"])
    for r in rounds:
        rejected = {rej["cid"] for rej in r["rejected"]}
        assert len([c for c in r["clients"] if c not in rejected]) >= 2, r


@pytest.fixture
def ray_cluster(tmp_path):
    """A single-node Ray cluster started as a user would start its head node (`ray start
    --head`): the stand-in for a multi-node cluster, whose other nodes would join it."""
    import subprocess
    import sys
    import tempfile

    ray = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="rc")  # Ray's socket paths must stay short
    port = launch.free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2",
                    f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"127.0.0.1:{port}", Path(temp)
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.slow
def test_simulation_runs_on_a_ray_cluster_named_by_ray_address(tmp_path, ray_cluster,
                                                             monkeypatch):
    """Issue 20: `RAY_ADDRESS=<head>:<port> fedsteer run --runtime flower` runs Flower's
    simulation on that cluster (Ray's own variable, passed through to the engine): the
    ClientApp actors are the cluster's, and the result is the in-process one."""
    address, temp = ray_cluster
    config = tiny_config(method="ifed-icl", client_batch=1)
    expected = run_experiment(config, tmp_path / "inprocess")
    monkeypatch.setenv("RAY_ADDRESS", address)
    record = launch.run_on_flower(config, tmp_path / "sim")
    assert record["metrics"]["accuracy"] == expected["metrics"]["accuracy"]
    actor_logs = [p for p in temp.glob("session_*/logs/worker-*")
                  if "ClientAppActor" in p.read_text(errors="replace")]
    assert actor_logs, f"no ClientApp actor ran on the cluster at {address}"
