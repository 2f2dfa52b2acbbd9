"""fedsteer on Flower: a `ServerApp` and a `ClientApp` that run any method by name.

The methods' messages travel as the Flower `RecordDict`s they already are; the server
side is the same round loop as in-process (`Runtime`), only `_collect` goes through
Flower's `Grid`; the client side calls the same `client_step`. Nothing here knows a
method's math.

A node is one party: it reads `partition-id` (and optionally its own `data-file`) from its
node config and keeps its state in Flower's `context.state` between rounds. The run's
settings come from Flower's run config (`to_run_config` / `from_run_config`), which is how
`flwr run .` and `fedsteer run --runtime flower` both configure it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsteer.data import Task, load_task
from fedsteer.data.loading import load_examples
from fedsteer.eval.costs import RoundCost, payload_bytes, peak_rss_bytes
from fedsteer.experiment import (
    RunConfig,
    build_clients,
    client_dp,
    run_experiment,
    runtime_config,
)
from fedsteer.federation.privacy import privatize_reply
from fedsteer.federation.runtime import Runtime, RuntimeConfig
from fedsteer.methods import Client, Environment, Method, Reply, make_method

log = logging.getLogger(__name__)

#: The record a ClientApp adds to each reply: its example count, compute time and memory.
CLIENT_INFO = "fedsteer.client"
#: Run-config keys beside RunConfig's own fields.
EXTRA_KEYS = {"out-dir": "", "save-dir": "", "data-dir": "", "round-timeout": 3600.0,
              "node-wait": 120.0}


# ------------------------------------------------------------- run config
DICT_FIELDS = {f.name for f in dataclasses.fields(RunConfig) if f.type.startswith("dict")}


def to_run_config(config: RunConfig, **extras: Any) -> dict[str, Any]:
    """A flat TOML-able mapping (Flower run config): None becomes "", dicts become JSON."""
    values: dict[str, Any] = {}
    for name, value in dataclasses.asdict(config).items():
        key = name.replace("_", "-")
        values[key] = json.dumps(value) if isinstance(value, dict) else (
            "" if value is None else value)
    for key, default in EXTRA_KEYS.items():
        value = extras.get(key.replace("-", "_"), default)
        values[key] = "" if value is None else (str(value) if isinstance(value, Path) else value)
    return values


@dataclass
class FlowerRun:
    """What the apps read back from the run config."""

    config: RunConfig
    out_dir: str = ""
    save_dir: str = ""
    data_dir: str = ""
    round_timeout: float = 3600.0
    node_wait: float = 120.0


def from_run_config(values: dict[str, Any]) -> FlowerRun:
    config_args: dict[str, Any] = {}
    for field in dataclasses.fields(RunConfig):
        key = field.name.replace("_", "-")
        if key not in values:
            continue  # the RunConfig default
        raw = values[key]
        if field.name in DICT_FIELDS:
            config_args[field.name] = json.loads(raw) if raw else {}
        else:
            config_args[field.name] = None if raw == "" else raw
    extras = {key.replace("-", "_"): values.get(key, default)
              for key, default in EXTRA_KEYS.items()}
    return FlowerRun(config=RunConfig(**config_args), **extras)


# ------------------------------------------------------------ server side
class GridRuntime(Runtime):
    """The round loop of `Runtime`, with each round's messages sent through a Flower Grid.

    `node_of` maps a client id (its partition) to the Flower node that holds it. A node that
    does not answer within `timeout` seconds, or answers with an error, is logged and left
    out of the round, as a failing client is in-process.
    """

    def __init__(self, grid: Grid, node_of: dict[int, int], config: RuntimeConfig,
                 timeout: float = 3600.0) -> None:
        super().__init__(config)
        self.grid, self.node_of, self.timeout = grid, node_of, timeout

    def _collect(self, method: Method, message: RecordDict, sampled: list[int],
                 cost: RoundCost) -> list[Reply]:
        down = payload_bytes(message)
        outgoing = [
            Message(content=copy.deepcopy(message), dst_node_id=self.node_of[cid],
                    message_type=MessageType.TRAIN, group_id=str(cost.round))
            for cid in sampled
        ]
        cost.clients.extend(sampled)
        cost.bytes_down += down * len(sampled)
        answers = {m.metadata.src_node_id: m for m in
                   self.grid.send_and_receive(outgoing, timeout=self.timeout)}
        replies = []
        for cid in sampled:
            reply = self._receive(method, message, cid, answers.get(self.node_of[cid]), cost)
            if reply is not None:
                replies.append(reply)
        return replies

    def _receive(self, method, message, cid: int, answer: Message | None, cost: RoundCost):
        if answer is None:
            self._reject(cost, cid, f"no reply within {self.timeout:g} s")
            return None
        if answer.has_error():
            self._reject(cost, cid, f"client failed: {answer.error.reason}")
            return None
        content = answer.content
        info = content.metric_records.get(CLIENT_INFO)
        if info is None:
            self._reject(cost, cid, f"reply carries no {CLIENT_INFO!r} record")
            return None
        del content[CLIENT_INFO]
        cost.client_seconds += float(info["seconds"])
        cost.peak_rss_bytes = max(cost.peak_rss_bytes, int(info["peak-rss-bytes"]))
        return self._accept(method, message, cid, content, int(info["num-examples"]), cost)


def discover_nodes(grid: Grid, wanted: int, wait: float) -> dict[int, int]:
    """Ask every node which partition it holds; wait up to `wait` s for `wanted` of them."""
    deadline = time.monotonic() + wait
    while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    queries = [Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
               for node in grid.get_node_ids()]
    node_of: dict[int, int] = {}
    for answer in grid.send_and_receive(queries, timeout=max(wait, 1.0)):
        if not answer.has_error():
            partition = int(answer.content["identity"]["partition-id"])
            node_of.setdefault(partition, answer.metadata.src_node_id)
    missing = sorted(set(range(wanted)) - set(node_of))
    if missing:
        raise RuntimeError(
            f"no Flower node holds partition(s) {missing}; start one supernode per client "
            f"with --node-config 'partition-id=i num-partitions={wanted}'"
        )
    return node_of


server_app = ServerApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    run = from_run_config(dict(context.run_config))
    config = run.config
    task = _task(config.task, run.data_dir)
    method = make_method(config.method, **config.method_options())
    wanted = 1 if method.centralized else config.clients
    node_of = discover_nodes(grid, wanted, run.node_wait) if _has_client_step(method) else {}
    runtime = GridRuntime(grid, node_of, runtime_config(config), timeout=run.round_timeout)
    out_dir = Path(run.out_dir) if run.out_dir else None
    record = run_experiment(config, out_dir, task=task, runtime=runtime,
                            save_dir=Path(run.save_dir) if run.save_dir else None)
    log.info("fedsteer %s on %s: accuracy %.4f", config.method, task.name,
             record["metrics"]["accuracy"])


def _has_client_step(method: Method) -> bool:
    return type(method).client_step is not Method.client_step


# ------------------------------------------------------------ client side
client_app = ClientApp()


@client_app.query()
def identify(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds."""
    identity = ConfigRecord({"partition-id": _partition_id(context)})
    return Message(content=RecordDict({"identity": identity}), reply_to=message)


@client_app.train()
def step(message: Message, context: Context) -> Message:
    """One client step of the run's method on this node's own data."""
    started = time.perf_counter()
    run = from_run_config(dict(context.run_config))
    host = _host(run)
    client = host.client(_partition_id(context), context.node_config.get("data-file"))
    client.state = context.state
    content = host.method.client_step(message.content, client)
    _keep_state(context.state, client.state)
    content = privatize_reply(client_dp(run.config), content, message.content,
                              seed=run.config.seed, rnd=int(message.metadata.group_id or 0),
                              cid=client.cid)
    content[CLIENT_INFO] = MetricRecord({
        "num-examples": len(client.data),
        "seconds": time.perf_counter() - started,
        "peak-rss-bytes": peak_rss_bytes(),
    })
    return Message(content=content, reply_to=message)


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


def _host(run: FlowerRun) -> _Host:
    """One host per run configuration per process: a simulation actor loads the model once."""
    key = json.dumps(dataclasses.asdict(run), sort_keys=True, default=str)
    if key not in _HOSTS:
        config = run.config
        task = _task(config.task, run.data_dir)
        env = Environment(task=task.spec, test=[], model_name=config.model, seed=config.seed,
                          batch_size=config.batch_size)
        _HOSTS.clear()  # a new run: let the previous one's model go
        _HOSTS[key] = _Host(run, task, make_method(config.method, **config.method_options()), env)
    return _HOSTS[key]


def _task(name: str, data_dir: str) -> Task:
    return load_task(name, Path(data_dir) if data_dir else None)
