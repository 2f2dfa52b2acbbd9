"""Asynchronous methods (AsynDBT) on Flower: no round barrier, replies consumed as they arrive.

Each worker's node is pushed its next message (`Grid.push_messages`); the server polls for
replies (`Grid.pull_messages`) and updates as soon as `active` have arrived, unless a
worker has gone `staleness` updates unheard (then it waits for that one), exactly the rule
of the in-process asynchronous runtime. A worker whose reply was used is pushed a message
built from the new state at once. A message unanswered after `timeout` seconds is given up
(logged, counted as rejected) and the worker is pushed a fresh one. At the end every worker
evaluates the result on its own node (personalised demonstrations never leave it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord

from fedsteer.eval.costs import RoundCost, payload_bytes, peak_rss_bytes
from fedsteer.federation.asynchronous import AsyncConfig, overdue_workers, reported_wait
from fedsteer.federation.flower.grid import CLIENT_INFO
from fedsteer.federation.payloads import InvalidReply, check_reply
from fedsteer.federation.runtime import RunOutcome, reject
from fedsteer.methods import AsyncMethod, Environment, Reply

log = logging.getLogger(__name__)

EVALUATE_PHASE = "fedsteer.evaluate"


@dataclass
class _Out:
    cid: int
    issued_at: int
    bytes_down: int
    sent_at: float


class AsyncGridRuntime:
    def __init__(self, grid, node_of: dict[int, int], config: AsyncConfig,
                 timeout: float = 3600.0, poll: float = 0.05) -> None:
        self.grid, self.node_of, self.config = grid, node_of, config
        self.timeout, self.poll = timeout, poll

    def run(self, method: AsyncMethod, clients, env: Environment) -> RunOutcome:
        method.setup(env)
        state = method.initial_state(env)
        cids = list(clients)
        active = min(max(self.config.active, 1), len(cids))
        outstanding: dict[str, _Out] = {}
        for cid in cids:
            self._push(method, state, cid, 0, outstanding)
        last_heard, arrived, rounds = {cid: 0 for cid in cids}, [], []
        while not method.finished(state) and len(rounds) < self.config.max_iterations:
            iteration = len(rounds)
            arrived += self._pull(outstanding)
            overdue = overdue_workers(last_heard, {out.cid for out, _ in arrived}, iteration,
                                      self.config.staleness)
            if len(arrived) < active or overdue:
                time.sleep(self.poll)
                continue
            cost = RoundCost(round=iteration)
            replies = [r for r in (self._accept(method, out, answer, cost)
                                   for out, answer in arrived) if r is not None]
            started = time.perf_counter()
            state = method.server_update(state, replies)
            cost.server_seconds = time.perf_counter() - started
            cost.peak_rss_bytes = max(cost.peak_rss_bytes, peak_rss_bytes())
            rounds.append(cost)
            for out, _ in arrived:
                last_heard[out.cid] = iteration
                if not method.finished(state):
                    self._push(method, state, out.cid, iteration + 1, outstanding)
            arrived = []
        self._evaluate_on_nodes(method, state, cids)
        return RunOutcome(state, rounds)

    # --------------------------------------------------------------- messages
    def _push(self, method, state, cid: int, iteration: int, outstanding) -> None:
        content = method.worker_message(state, cid, iteration)
        message = Message(content=content, dst_node_id=self.node_of[cid],
                          message_type=MessageType.TRAIN, group_id=str(iteration))
        (message_id,) = list(self.grid.push_messages([message]))
        outstanding[message_id] = _Out(cid, iteration, payload_bytes(content), time.monotonic())

    def _pull(self, outstanding: dict[str, _Out]):
        """Replies that came in, and the messages given up on (answer None): the update
        that counts them asks those workers again, as it does every worker it heard from."""
        got = []
        if outstanding:
            for answer in self.grid.pull_messages(list(outstanding)):
                out = outstanding.pop(answer.metadata.reply_to_message_id, None)
                if out is not None:
                    got.append((out, answer))
        now = time.monotonic()
        for message_id, out in list(outstanding.items()):
            if now - out.sent_at > self.timeout:
                del outstanding[message_id]
                got.append((out, None))
        return got

    def _accept(self, method: AsyncMethod, out: _Out, answer: Message | None,
                cost: RoundCost) -> Reply | None:
        cost.clients.append(out.cid)
        cost.bytes_down += out.bytes_down
        reason = None
        if answer is None:
            reason = f"no reply within {self.timeout:g} s"
        elif answer.has_error():
            reason = f"client failed: {answer.error.reason}"
        elif CLIENT_INFO not in answer.content.metric_records:
            reason = f"reply carries no {CLIENT_INFO!r} record"
        if reason is None:
            content = answer.content
            info = content[CLIENT_INFO]
            del content[CLIENT_INFO]
            cost.client_seconds += float(info["seconds"])
            cost.peak_rss_bytes = max(cost.peak_rss_bytes, int(info["peak-rss-bytes"]))
            try:
                check_reply(content)
            except InvalidReply as error:
                reason = str(error)
            reason = reason or method.reply_problem(content)
            cost.client_wait_seconds += reported_wait(content)
        if reason is not None:
            reject(cost, out.cid, reason)
            return None
        cost.bytes_up += payload_bytes(content)
        return Reply(cid=out.cid, content=content, num_examples=int(info["num-examples"]))

    def _evaluate_on_nodes(self, method, state, cids: list[int]) -> None:
        """Each worker scores the result with what only it holds; the metrics come back."""
        final = method.worker_message(state, cids[0], -1)
        final["phase"] = ConfigRecord({"phase": EVALUATE_PHASE})
        messages = [Message(content=final, dst_node_id=self.node_of[cid],
                            message_type=MessageType.EVALUATE) for cid in cids]
        cid_of = {node: cid for cid, node in self.node_of.items()}
        for answer in self.grid.send_and_receive(messages, timeout=self.timeout):
            if answer.has_error():
                log.warning("evaluation failed on node %s: %s", answer.metadata.src_node_id,
                            answer.error.reason)
                continue
            cid = cid_of[answer.metadata.src_node_id]
            state[f"client.{cid}"] = MetricRecord(dict(answer.content["metrics"]))

