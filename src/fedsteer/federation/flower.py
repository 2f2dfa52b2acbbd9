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
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
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
from fedsteer.federation.payloads import InvalidReply, check_reply
from fedsteer.federation.privacy import privatize_reply
from fedsteer.federation.runtime import Runtime, RuntimeConfig
from fedsteer.federation.secagg import (
    MESSAGE_KEY,
    UNIFORM_KEY,
    SecureAggregationUnsupported,
    decode_message,
    is_secure_message,
    reply_to_fitres,
    secure_round,
)
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

    def __init__(self, grid: Grid, nodes: dict[int, NodeInfo], config: RuntimeConfig,
                 timeout: float = 3600.0, secure: bool = False) -> None:
        super().__init__(config)
        self.grid, self.nodes, self.timeout, self.secure = grid, nodes, timeout, secure
        self.node_of = {cid: info.node_id for cid, info in nodes.items()}

    def _collect(self, method: Method, message: RecordDict, sampled: list[int],
                 cost: RoundCost) -> list[Reply]:
        if self.secure:
            return self._collect_secure(method, message, sampled, cost)
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

    def _collect_secure(self, method: Method, message: RecordDict, sampled: list[int],
                        cost: RoundCost) -> list[Reply]:
        """SecAgg+: one reply holding the (weighted) mean; no single payload is ever seen."""
        uniform = method.secure_weighting(message) == "uniform"
        result = secure_round(
            self.grid, cost.round, message, method.reply_shapes(message),
            [self.node_of[cid] for cid in sampled], uniform,
            max(self.nodes[cid].num_examples for cid in sampled), self.timeout,
        )
        cost.clients.extend(sampled)
        cost.bytes_down += result.bytes_down
        cost.bytes_up += result.bytes_up
        cid_of = {node: cid for cid, node in self.node_of.items()}
        for info in result.answered.values():
            cost.client_seconds += float(info.get("seconds", 0.0))
            cost.peak_rss_bytes = max(cost.peak_rss_bytes, int(info.get("peak-rss-bytes", 0)))
        for cid in sorted(set(sampled) - {cid_of[n] for n in result.answered}):
            self._reject(cost, cid, "dropped out of secure aggregation")
        if result.mean is None:
            return []
        try:
            check_reply(result.mean, method.reply_shapes(message), None)
        except InvalidReply as error:
            self._reject(cost, -1, f"secure mean: {error}")
            return []
        return [Reply(cid=-1, content=result.mean, num_examples=result.total_weight)]


@dataclass
class NodeInfo:
    node_id: int
    num_examples: int


def discover_nodes(grid: Grid, wanted: int, wait: float) -> dict[int, NodeInfo]:
    """Ask every node which partition it holds; wait up to `wait` s for `wanted` of them."""
    deadline = time.monotonic() + wait
    while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    queries = [Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
               for node in grid.get_node_ids()]
    nodes: dict[int, NodeInfo] = {}
    failures = []
    for answer in grid.send_and_receive(queries, timeout=max(wait, 1.0)):
        if answer.has_error():
            failures.append(f"node {answer.metadata.src_node_id}: {answer.error.reason}")
            continue
        identity = answer.content["identity"]
        nodes.setdefault(int(identity["partition-id"]), NodeInfo(
            answer.metadata.src_node_id, int(identity["num-examples"])))
    missing = sorted(set(range(wanted)) - set(nodes))
    if missing:
        raise RuntimeError(
            f"no Flower node holds partition(s) {missing}; start one supernode per client "
            f"with --node-config 'partition-id=i num-partitions={wanted}'"
            + (f". Nodes that failed: {'; '.join(failures)}" if failures else "")
        )
    return nodes


server_app = ServerApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    run = from_run_config(dict(context.run_config))
    config = run.config
    task = _task(config.task, run.data_dir)
    method = make_method(config.method, **config.method_options())
    if config.secagg and not method.secure_mean:
        raise SecureAggregationUnsupported(
            f"{method.name} does not aggregate by a mean; secure aggregation would change it")
    wanted = 1 if method.centralized else config.clients
    nodes = discover_nodes(grid, wanted, run.node_wait) if _has_client_step(method) else {}
    runtime = GridRuntime(grid, nodes, runtime_config(config), timeout=run.round_timeout,
                          secure=config.secagg)
    out_dir = Path(run.out_dir) if run.out_dir else None
    record = run_experiment(config, out_dir, task=task, runtime=runtime,
                            save_dir=Path(run.save_dir) if run.save_dir else None)
    log.info("fedsteer %s on %s: accuracy %.4f", config.method, task.name,
             record["metrics"]["accuracy"])


def _has_client_step(method: Method) -> bool:
    return type(method).client_step is not Method.client_step


# ------------------------------------------------------------ client side
def identify(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds, and how many examples."""
    run = from_run_config(dict(context.run_config))
    client = _host(run).client(_partition_id(context), context.node_config.get("data-file"))
    identity = ConfigRecord({"partition-id": client.cid, "num-examples": len(client.data)})
    return Message(content=RecordDict({"identity": identity}), reply_to=message)


def step(message: Message, context: Context) -> Message:
    """One client step of the run's method on this node's own data."""
    started = time.perf_counter()
    run = from_run_config(dict(context.run_config))
    host = _host(run)
    secure = is_secure_message(message.content)
    method_message = _unwrap(message.content) if secure else message.content
    client = host.client(_partition_id(context), context.node_config.get("data-file"))
    client.state = context.state
    content = host.method.client_step(method_message, client)
    _keep_state(context.state, client.state)
    content = privatize_reply(client_dp(run.config), content, method_message,
                              seed=run.config.seed, rnd=int(message.metadata.group_id or 0),
                              cid=client.cid)
    info = {"num-examples": len(client.data), "seconds": time.perf_counter() - started,
            "peak-rss-bytes": peak_rss_bytes()}
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


client_app = ClientApp(mods=[secagg_when_asked])
client_app.query()(identify)
client_app.train()(step)


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
