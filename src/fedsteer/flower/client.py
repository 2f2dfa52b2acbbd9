"""The ClientApp: one node, one party; it runs the method's client step on its own data."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedsteer.data import Task, load_task
from fedsteer.data.loading import load_examples
from fedsteer.eval.costs import peak_rss_bytes
from fedsteer.experiment import build_clients, client_dp, evaluation_rows
from fedsteer.federation.flower.grid import CLIENT_INFO
from fedsteer.federation.flower.secagg import (
    MESSAGE_KEY,
    UNIFORM_KEY,
    decode_message,
    is_secure_message,
    reply_to_fitres,
)
from fedsteer.federation.privacy import privatize_reply
from fedsteer.federation.threads import apply_threads, client_processes
from fedsteer.flower.config import FlowerRun, from_run_config, load_run_task
from fedsteer.methods import Client, Environment, Method, make_method

#: node-config key: this party's own copy of the task (a built-in name or a spec file)
NODE_TASK = "task"


def identify(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds, and how many examples."""
    run = from_run_config(dict(context.run_config))
    host = _host(run, context)
    client = host.client(_partition_id(context), context.node_config.get("data-file"))
    identity = ConfigRecord({"partition-id": client.cid, "num-examples": len(client.data)})
    return Message(content=RecordDict({"identity": identity}), reply_to=message)


def step(message: Message, context: Context) -> Message:
    """One client step of the run's method on this node's own data."""
    started = time.perf_counter()
    run = from_run_config(dict(context.run_config))
    threads = _budget_threads(run, context)
    host = _host(run, context)
    secure = is_secure_message(message.content)
    method_message = _unwrap(message.content) if secure else message.content
    client = host.client(_partition_id(context), context.node_config.get("data-file"))
    client.state = context.state
    content = host.method.client_step(method_message, client)
    _keep_state(context.state, client.state)
    content = privatize_reply(client_dp(run.config), content, method_message)
    info = {"num-examples": len(client.data), "seconds": time.perf_counter() - started,
            "peak-rss-bytes": peak_rss_bytes(), "threads": threads}
    if secure:
        uniform = bool(message.content["fitins.config"][UNIFORM_KEY])
        fitres = reply_to_fitres(content, host.method.reply_shapes(method_message),
                                 1 if uniform else len(client.data), info)
        return Message(content=fitres_to_recorddict(fitres, False), reply_to=message)
    content[CLIENT_INFO] = MetricRecord(info)
    return Message(content=content, reply_to=message)


def _unwrap(content: RecordDict) -> RecordDict:
    return decode_message(content["fitins.config"][MESSAGE_KEY])


def secagg_when_asked(message: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod for the protocol's messages; others pass straight through."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def evaluate(message: Message, context: Context) -> Message:
    """The run's result scored on this node with what only it holds (AsynDBT's demos)."""
    run = from_run_config(dict(context.run_config))
    _budget_threads(run, context)
    host = _host(run, context)
    client = host.client(_partition_id(context), context.node_config.get("data-file"))
    client.state = context.state
    metrics = host.method.evaluate_client(message.content, client)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


client_app = ClientApp(mods=[secagg_when_asked])
client_app.query()(identify)
client_app.train()(step)
client_app.evaluate()(evaluate)


def _budget_threads(run: FlowerRun, context: Context) -> int:
    """This client process's share of the cores (a simulation actor's, or one of the
    SuperNodes on this machine), or the run's `threads`: set before the model runs."""
    return apply_threads(client_processes(context.node_config), run.config.threads)


def _keep_state(kept: RecordDict, new: RecordDict) -> None:
    """Flower persists `context.state` itself; a method that replaced it is copied back."""
    if new is not kept:
        for key in list(kept):
            del kept[key]
        for key, record in new.items():
            kept[key] = record


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this node has no 'partition-id' in its node config")
    return int(context.node_config["partition-id"])


@dataclass
class _Host:
    """What one client process keeps between messages: task, method and the loaded model."""

    run: FlowerRun
    task: Task
    method: Method
    env: Environment

    @cached_property
    def partitions(self) -> list[Client]:
        """Every client of the run's seeded partition (cheap); this node takes its own."""
        return build_clients(self.run.config, self.task, self.env, self.method.centralized)

    def client(self, partition_id: int, data_file: str | None) -> Client:
        if data_file:
            spec = self.task.spec
            data = load_examples(Path(data_file), spec.labels, pair=spec.is_pair, max_chars=2000)
            return Client(cid=partition_id, data=data, env=self.env)
        clients = self.partitions
        if partition_id >= len(clients):
            raise ValueError(f"partition-id {partition_id} but the run has {len(clients)} clients")
        return clients[partition_id]


_HOSTS: dict[str, _Host] = {}


def _host(run: FlowerRun, context: Context) -> _Host:
    """One host per run configuration and node placement per process: a simulation actor
    loads the model once.

    A party of a federation names its own copy of the task in its node config (`task`): the
    run's `task` is a path on the submitter's machine. A node may run its model its own way
    (`dtype`, `device`: its GPU): node config wins, and nodes of one run that share a
    process but not a placement get a host each."""
    config = run.config
    own_task = str(context.node_config.get(NODE_TASK, ""))
    dtype = str(context.node_config.get("dtype", config.dtype))
    device = str(context.node_config.get("device", config.device))
    key = json.dumps([dataclasses.asdict(run), own_task, dtype, device], sort_keys=True,
                     default=str)
    if key not in _HOSTS:
        task = load_task(own_task) if own_task else load_run_task(config.task, run.data_dir)
        # the run's evaluation rows too: asynchronous methods evaluate on the nodes
        test = evaluation_rows(task, config.test_size, config.test_seed)
        env = Environment(task=task.spec, test=test, model_name=config.model, seed=config.seed,
                          batch_size=config.batch_size, dtype=dtype, device=device)
        for old in [k for k, host in _HOSTS.items() if host.run != run]:
            del _HOSTS[old]  # a new run: let the previous one's model go
        _HOSTS[key] = _Host(run, task, make_method(config.method, **config.method_options()), env)
    return _HOSTS[key]
