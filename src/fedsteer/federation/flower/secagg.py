"""Secure aggregation on Flower: the server learns the mean of the replies, never one reply.

Flower's `SecAggPlusWorkflow` (server) and `secaggplus_mod` (client) run the SecAgg+
protocol over *legacy* FitIns/FitRes messages. This module is the bridge, and only that:

- the round's method message travels serialized inside `FitIns.config` (Flower's own
  protobuf), the client decodes it and calls the method's usual `client_step`;
- the reply's arrays go out as `FitRes.parameters` in a fixed order (the method's
  `reply_shapes`), weighted by the example count or uniformly, as the method asks;
- the workflow hands back the (weighted) mean, which the method's `aggregate` receives as
  one reply holding the mean: exact for every method whose aggregate is a (weighted) mean
  (`Method.secure_mean`), which is why other methods refuse `secagg`.

What is lost by construction: the server cannot check one client's payload (shape, NaN,
norm), so a hostile client can skew the mean; the mean itself is checked. SecAgg+ also
quantizes each value to [-clipping_range, clipping_range] (error ~1e-5 at 2^22 levels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from fedsteer.eval.costs import payload_bytes

log = logging.getLogger(__name__)

MESSAGE_KEY = "fedsteer.message"
UNIFORM_KEY = "fedsteer.uniform"


class SecureAggregationUnsupported(ValueError):
    """The method's aggregate is not a (weighted) mean, or it declares no reply shapes."""


# ------------------------------------------------------------------ wire format
def encode_message(message: RecordDict) -> bytes:
    return recorddict_to_proto(message).SerializeToString()


def decode_message(blob: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(blob)
    return recorddict_from_proto(proto)


def is_secure_message(content: RecordDict) -> bool:
    return "fitins.config" in content.config_records and MESSAGE_KEY in content["fitins.config"]


def layout(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The fixed order of `"record.array"` keys in the summed vector."""
    return sorted(shapes)


def reply_to_fitres(reply: RecordDict, shapes: dict[str, tuple[int, ...]], weight: int,
                    metrics: dict[str, float]) -> FitRes:
    """Client side: the reply's arrays in layout order, for `secaggplus_mod` to mask."""
    arrays = []
    for key in layout(shapes):
        record, name = key.split(".", 1)
        value = reply[record][name].numpy()
        if tuple(value.shape) != tuple(shapes[key]):
            raise ValueError(f"array {key!r} has shape {value.shape}, expected {shapes[key]}")
        arrays.append(value.astype(np.float64))
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)


def mean_to_recorddict(arrays: list[np.ndarray], shapes: dict[str, tuple[int, ...]]
                       ) -> RecordDict:
    content = RecordDict()
    for key, value in zip(layout(shapes), arrays, strict=True):
        record, name = key.split(".", 1)
        if record not in content:
            content[record] = ArrayRecord()
        content[record][name] = Array(np.asarray(value, np.float32).reshape(shapes[key]))
    return content


# ------------------------------------------------------------------ server side
@dataclass
class _OneRound(Strategy):
    """The legacy Strategy the workflow drives: it only hands out FitIns and keeps the mean."""

    fitins: dict[int, FitIns]
    grid: Any
    run_id: int
    mean: list[np.ndarray] | None = None
    results: list[tuple[Any, FitRes]] = field(default_factory=list)

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, self.run_id), ins)
                for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        if results:  # every FitRes carries the same unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.results = list(results)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class CountingGrid:
    """A Grid that counts the payload bytes of every message of the protocol."""

    def __init__(self, grid) -> None:
        self.grid, self.bytes_down, self.bytes_up = grid, 0, 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.bytes_down += sum(payload_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += sum(payload_bytes(r.content) for r in replies if r.has_content())
        return replies


@dataclass
class SecureRound:
    """What one secure round produced: the mean (or None) and each node's FitRes metrics."""

    mean: RecordDict | None
    total_weight: int
    answered: dict[int, dict[str, Any]]
    bytes_down: int
    bytes_up: int


def secure_round(grid, rnd: int, message: RecordDict, shapes: dict[str, tuple[int, ...]] | None,
                 nodes: list[int], uniform: bool, max_weight: int, timeout: float | None
                 ) -> SecureRound:
    """Run SecAgg+ for one round over `nodes`; the server sees only the mean.

    `max_weight` is the largest weight a client will send (1 for a uniform mean): SecAgg+
    quantizes each client's share `weight / max_weight`, so a loose bound costs precision.
    """
    if not shapes:
        raise SecureAggregationUnsupported("secure aggregation needs the method's reply_shapes")
    config = {MESSAGE_KEY: encode_message(message), UNIFORM_KEY: uniform}
    fitins = {node: FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), dict(config))
              for node in nodes}
    counting = CountingGrid(grid)
    strategy = _OneRound(fitins, counting, run_id=0)
    legacy = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1), strategy=strategy,
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5,
                                  max_weight=1.0 if uniform else float(max_weight),
                                  timeout=timeout)
    workflow(counting, legacy)
    answered = {proxy.node_id: dict(res.metrics) for proxy, res in strategy.results}
    total = sum(int(res.num_examples) for _, res in strategy.results)
    mean = mean_to_recorddict(strategy.mean, shapes) if strategy.mean is not None else None
    return SecureRound(mean, total, answered, counting.bytes_down, counting.bytes_up)
