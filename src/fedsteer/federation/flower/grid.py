"""The round loop of the in-process runtime, with each round's messages sent through a Grid.

A runtime only: which method, task and settings run is the ServerApp's business
(`fedsteer.flower.server`)."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedsteer.eval.costs import RoundCost, payload_bytes
from fedsteer.federation.flower.secagg import secure_round
from fedsteer.federation.payloads import InvalidReply, check_reply, example_count
from fedsteer.federation.runtime import Runtime, RuntimeConfig
from fedsteer.methods import Method

log = logging.getLogger(__name__)
#: the metric record a ClientApp adds to each reply: its compute time, wait and memory
CLIENT_INFO = "fedsteer.client"
#: the errors the SuperLink writes itself for a message nobody will answer: its node missed
#: its heartbeats (killed, cut off) or the message expired. The node is lost; no client code
#: failed, and the reason says so whichever comes first, Flower's verdict or our timeout.
LOST_NODE_ERRORS = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                              ErrorCode.REPLY_MESSAGE_UNAVAILABLE})


@dataclass
class ClientInfo:
    """What a ClientApp reports beside its reply (the `CLIENT_INFO` record). The party
    reports it itself, so it is checked like the reply: a missing or absurd value (a count
    below 1, a negative time) is a rejected reply, never a crash of the server."""

    num_examples: int  # its weight in the round's mean
    seconds: float
    peak_rss_bytes: int
    threads: int | None

    @classmethod
    def pop(cls, content: RecordDict) -> ClientInfo:
        """Take the record out of `content` and check it; `InvalidReply` says what is wrong."""
        info = content.metric_records.get(CLIENT_INFO)
        if info is None:
            raise InvalidReply(f"reply carries no {CLIENT_INFO!r} record")
        del content[CLIENT_INFO]
        missing = sorted({"num-examples", "seconds", "peak-rss-bytes"} - set(info))
        if missing:
            raise InvalidReply(f"{CLIENT_INFO!r} lacks {', '.join(missing)}")
        seconds, rss, threads = info["seconds"], info["peak-rss-bytes"], info.get("threads")
        if not (isinstance(seconds, int | float) and 0 <= seconds < math.inf):
            raise InvalidReply(f"{CLIENT_INFO!r} seconds {seconds!r} is not a time")
        if not all(isinstance(v, int) and v >= 0 for v in (rss, threads or 0)):
            raise InvalidReply(f"{CLIENT_INFO!r} peak-rss-bytes {rss!r} or threads "
                               f"{threads!r} is not a count")
        return cls(example_count(info["num-examples"]), float(seconds), rss, threads)


def no_reply_reason(timeout: float) -> str:
    return f"node lost: no reply within {timeout:g} s"


def error_reply_reason(error: Error) -> str:
    """Why an error reply is rejected: a node Flower declared lost, or a client that failed."""
    if error.code in LOST_NODE_ERRORS:
        return f"node lost: {error.reason}"
    return f"client failed: {error.reason}"


class GridRuntime(Runtime):
    """The round loop of `Runtime`, with each round's messages sent through a Flower Grid.

    `node_of` maps a client id (its partition) to the Flower node that holds it. A node that
    does not answer within `timeout` seconds, or answers with an error, is logged and left
    out of the round, as a failing client is in-process.
    """

    def __init__(self, grid: Grid, nodes: dict[int, NodeInfo], config: RuntimeConfig,
                 timeout: float = 3600.0, secure: bool = False, poll: float = 0.2) -> None:
        super().__init__(config)
        self.grid, self.nodes, self.timeout, self.secure = grid, nodes, timeout, secure
        self.node_of = {cid: info.node_id for cid, info in nodes.items()}
        self.poll = poll  # seconds between two pulls of the replies in

    def _collect(self, method: Method, message: RecordDict, sampled: list[int],
                 cost: RoundCost) -> None:
        """Push the round's messages, then pull the replies as they come and hand each to
        the round at once (`Grid.send_and_receive` would hold all of them until the last)."""
        if self.secure:
            return self._collect_secure(method, message, sampled, cost)
        down = payload_bytes(message)
        outgoing = [  # a list: Flower's grids go over the messages more than once
            Message(content=copy.deepcopy(message), dst_node_id=self.node_of[cid],
                    message_type=MessageType.TRAIN, group_id=str(cost.round))
            for cid in sampled
        ]
        cost.clients.extend(sampled)
        cost.bytes_down += down * len(sampled)
        waiting = dict(zip(self.grid.push_messages(outgoing), sampled, strict=True))
        del outgoing
        deadline = time.monotonic() + self.timeout
        while waiting and time.monotonic() < deadline:
            answers = list(self.grid.pull_messages(list(waiting)))
            for answer in answers:
                cid = waiting.pop(answer.metadata.reply_to_message_id, None)
                if cid is not None:
                    self._receive(method, message, cid, answer, cost)
            del answers
            if waiting:
                time.sleep(self.poll)
        for cid in waiting.values():
            self._receive(method, message, cid, None, cost)
        return None

    def _receive(self, method, message, cid: int, answer: Message | None,
                 cost: RoundCost) -> None:
        if answer is None:
            self._reject(cost, cid, no_reply_reason(self.timeout))
            return
        if answer.has_error():
            self._reject(cost, cid, error_reply_reason(answer.error))
            return
        content = answer.content
        try:
            info = ClientInfo.pop(content)
        except InvalidReply as error:
            self._reject(cost, cid, str(error))
            return
        cost.client_seconds += info.seconds
        cost.peak_rss_bytes = max(cost.peak_rss_bytes, info.peak_rss_bytes)
        if info.threads is not None:
            cost.client_threads[cid] = info.threads
        self._accept(method, message, cid, content, info.num_examples, cost)

    def _collect_secure(self, method: Method, message: RecordDict, sampled: list[int],
                        cost: RoundCost) -> None:
        """SecAgg+: one reply holding the (weighted) mean; no single payload is ever seen."""
        # central DP weighs every reply the same (its sensitivity is one clip per client)
        uniform = (method.reply_weighting(message) == "uniform"
                   or self._round.checks.central_dp is not None)
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
            return
        try:
            check_reply(result.mean, method.reply_shapes(message), None)
        except InvalidReply as error:
            self._reject(cost, -1, f"secure mean: {error}")
            return
        self._round.take_mean(result.mean, result.total_weight)


@dataclass
class NodeInfo:
    node_id: int
    num_examples: int


def node_identity(answer: Message) -> tuple[int, NodeInfo]:
    """The partition a node says it holds and its example count; `InvalidReply` if either
    is missing or not a count (the count is SecAgg+'s weight bound)."""
    identity = answer.content.config_records.get("identity")
    if identity is None or "partition-id" not in identity or "num-examples" not in identity:
        raise InvalidReply("its answer carries no identity (partition-id, num-examples)")
    partition = identity["partition-id"]
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise InvalidReply(f"partition-id {partition!r} is not a partition")
    return partition, NodeInfo(answer.metadata.src_node_id,
                               example_count(identity["num-examples"]))


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
        try:
            partition, info = node_identity(answer)
        except InvalidReply as error:  # a node's own words: checked, never a crash
            failures.append(f"node {answer.metadata.src_node_id}: {error}")
            continue
        nodes.setdefault(partition, info)
    missing = sorted(set(range(wanted)) - set(nodes))
    if missing:
        raise RuntimeError(
            f"no Flower node holds partition(s) {missing}; start one supernode per client "
            f"with --node-config 'partition-id=i num-partitions={wanted}'"
            + (f". Nodes that failed: {'; '.join(failures)}" if failures else "")
        )
    return nodes
