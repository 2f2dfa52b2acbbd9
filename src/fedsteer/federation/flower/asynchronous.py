"""Asynchronous methods (AsynDBT) on Flower: no round barrier, replies consumed as they arrive.

Each worker's node is pushed its next message (`Grid.push_messages`); the server polls for
replies (`Grid.pull_messages`) and updates by the in-process runtime's own rule
(`ready_to_update`): `active` replies in, and no worker it waits for `staleness` updates
unheard. A worker whose reply was used is pushed a message built from the new state at
once. A message unanswered after `timeout` seconds is given up (counted as rejected at the
next update) and the worker is asked again at once; until it answers it is not waited for,
and its silence is never counted as a reply — as a worker that died is treated in process.
At the end every worker evaluates the result on its own node (personalised demonstrations
never leave it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord

from fedsteer.eval.costs import RoundCost, payload_bytes, peak_rss_bytes
from fedsteer.federation.asynchronous import (
    AsyncConfig,
    ready_to_update,
    reply_problem,
    reported_wait,
)
from fedsteer.federation.flower.grid import ClientInfo, error_reply_reason, no_reply_reason
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
        last_heard, silent = {cid: 0 for cid in cids}, set()
        arrived, given_up, rounds = [], [], []
        while not method.finished(state) and len(rounds) < self.config.max_iterations:
            iteration = len(rounds)
            for out, answer in self._pull(outstanding):
                if answer is None:  # given up: asked again now, not waited for meanwhile
                    silent.add(out.cid)
                    given_up.append(out)
                    self._push(method, state, out.cid, iteration, outstanding)
                else:
                    silent.discard(out.cid)
                    arrived.append((out, answer))
            waiting = {c: heard for c, heard in last_heard.items() if c not in silent}
            if not waiting:
                raise RuntimeError(f"every worker's message went unanswered for "
                                   f"{self.timeout:g} s; see the nodes' logs")
            if not ready_to_update([out.cid for out, _ in arrived], waiting, active, iteration,
                                   self.config.staleness):
                time.sleep(self.poll)
                continue
            state = self._update(method, state, iteration, arrived, given_up, rounds)
            for out, _ in arrived:
                last_heard[out.cid] = iteration
                if not method.finished(state):
                    self._push(method, state, out.cid, iteration + 1, outstanding)
            arrived, given_up = [], []
        if rounds:  # given up after the last update: recorded (and billed) with it
            self._give_up(given_up, rounds[-1])
            state = method.messages_answered(state, [out.cid for out in given_up])
        self._evaluate_on_nodes(method, state, cids)
        return RunOutcome(state, rounds)

    def _update(self, method: AsyncMethod, state, iteration: int, arrived, given_up,
                rounds: list[RoundCost]):
        """One server update on the replies in; the messages given up since are recorded."""
        cost = RoundCost(round=iteration)
        self._give_up(given_up, cost)
        replies = [r for r in (self._accept(method, out, answer, cost)
                               for out, answer in arrived) if r is not None]
        started = time.perf_counter()
        state = method.messages_answered(
            state, [out.cid for out, _ in arrived] + [out.cid for out in given_up])
        state = method.server_update(state, replies)
        cost.server_seconds = time.perf_counter() - started
        cost.peak_rss_bytes = max(cost.peak_rss_bytes, peak_rss_bytes())
        rounds.append(cost)
        return state

    def _give_up(self, given_up: list[_Out], cost: RoundCost) -> None:
        """Messages unanswered in time, rejected in an update's record."""
        for out in given_up:
            cost.clients.append(out.cid)
            cost.bytes_down += out.bytes_down
            reject(cost, out.cid, no_reply_reason(self.timeout))

    # --------------------------------------------------------------- messages
    def _push(self, method, state, cid: int, iteration: int, outstanding) -> None:
        content = method.worker_message(state, cid, iteration)
        message = Message(content=content, dst_node_id=self.node_of[cid],
                          message_type=MessageType.TRAIN, group_id=str(iteration))
        (message_id,) = list(self.grid.push_messages([message]))
        outstanding[message_id] = _Out(cid, iteration, payload_bytes(content), time.monotonic())

    def _pull(self, outstanding: dict[str, _Out]):
        """Replies that came in, and the messages given up on (answer None)."""
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

    def _accept(self, method: AsyncMethod, out: _Out, answer: Message,
                cost: RoundCost) -> Reply | None:
        cost.clients.append(out.cid)
        cost.bytes_down += out.bytes_down
        reason = None
        if answer.has_error():
            reason = error_reply_reason(answer.error)
        else:
            content = answer.content
            try:
                info = ClientInfo.pop(content)  # checked: a count below 1 is refused too
                cost.client_seconds += info.seconds
                cost.peak_rss_bytes = max(cost.peak_rss_bytes, info.peak_rss_bytes)
                check_reply(content)
            except InvalidReply as error:
                reason = str(error)
            reason = reason or reply_problem(method, content)
            cost.client_wait_seconds += reported_wait(content)
        if reason is not None:
            reject(cost, out.cid, reason)
            return None
        cost.bytes_up += payload_bytes(content)
        return Reply(cid=out.cid, content=content, num_examples=info.num_examples)

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

