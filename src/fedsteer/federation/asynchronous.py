"""The asynchronous in-process runtime: workers run concurrently, the server never waits for all.

For methods that declare `asynchronous = True` (AsynDBT). Each worker is a thread that
takes the latest message for it, runs its client step and posts the reply. The server
updates as soon as `active` fresh replies have arrived — unless a worker has gone
`staleness` server iterations without being heard from, in which case the server waits
for it (the bounded-staleness rule). `active = number of workers` is the synchronous
baseline (a barrier every iteration). Workers may be given a simulated latency per step,
so stragglers are real; the latency is slept outside any lock, as an API call would be.

Costs are kept per server iteration (a `RoundCost` each): bytes of the messages and
replies, client seconds, which workers were used and how stale each reply was.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import RecordDict

from fedsteer.eval.costs import RoundCost, payload_bytes, peak_rss_bytes
from fedsteer.federation.payloads import InvalidReply, check_reply
from fedsteer.federation.runtime import RunOutcome, reject
from fedsteer.methods.base import WAIT_METRIC, AsyncMethod, Client, Environment, Reply

log = logging.getLogger(__name__)


@dataclass
class AsyncConfig:
    active: int = 1  # fresh replies the server needs before it updates (S)
    staleness: int = 3  # a worker unheard for more server iterations is waited for (τ)
    latency: Sequence[float] = ()  # per-worker simulated seconds per step (default 0)
    max_iterations: int = 10_000
    #: in process: "simulated" (arrival order from a seeded clock, `federation.simulated`) or
    #: "threads" (workers race in real time); Flower runs in real time whatever it says
    schedule: str = "simulated"


def overdue_workers(last_heard: dict[int, int], heard: set[int], iteration: int,
                    staleness: int) -> list[int]:
    """Workers unheard for `staleness` server iterations: the bound τ makes the server wait
    for them (both asynchronous runtimes apply this one rule)."""
    return [cid for cid, last in last_heard.items()
            if iteration - last >= staleness and cid not in heard]


def ready_to_update(replied: Sequence[int], waiting_for: dict[int, int], active: int,
                    iteration: int, staleness: int) -> bool:
    """The one rule every asynchronous runtime updates by: `active` replies are in from
    workers the server still waits for (all of those, if fewer remain), and none of those is
    `staleness` iterations unheard. A worker that died (in process) or whose message timed
    out (on Flower) is not waited for, and its silence never counts as a reply."""
    fresh = sum(1 for cid in replied if cid in waiting_for)
    overdue = overdue_workers(waiting_for, set(replied), iteration, staleness)
    return fresh >= min(active, len(waiting_for)) and not overdue


class WorkerDied(RuntimeError):
    """A worker failed outside its client step (e.g. building its message) and stopped."""


@dataclass
class _Posted:
    cid: int
    content: object
    seconds: float
    issued_at: int  # the server iteration whose state the worker started from
    bytes_down: int
    num_examples: int
    used: bool = False  # set by the server when the reply went into an update
    waited: float = 0.0  # of `seconds`, the simulated latency
    draft_state: object = None  # the worker's state after this step, committed if used


def reported_wait(content: object) -> float:
    """Seconds a reply says its client spent queued (`WAIT_METRIC`), 0 if it says nothing."""
    if isinstance(content, RecordDict) and "metrics" in content.metric_records:
        seconds = content["metrics"].get(WAIT_METRIC, 0.0)
        if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0:
            return float(seconds)
    return 0.0


def step_on_draft(method: AsyncMethod, client: Client, message: RecordDict, issued_at: int,
                  delay: float = 0.0) -> _Posted:
    """One worker step on a copy of the worker's state, as it will be posted: the copy is
    committed (`draft_state`) only if the server uses the reply. A failing step is posted as
    its error, for the server to record."""
    started = time.perf_counter()
    draft = dataclasses.replace(client, state=copy.deepcopy(client.state))
    try:
        time.sleep(delay)  # the straggler's network / API latency (0 on a simulated clock)
        content: object = method.client_step(message, draft)
    except Exception as error:  # noqa: BLE001 - reported to the server, not lost
        log.exception("worker %d failed", client.cid)
        content = error
    return _Posted(client.cid, content, time.perf_counter() - started, issued_at,
                   payload_bytes(message), len(client.data), waited=delay,
                   draft_state=draft.state)


def answered(posted: Sequence[_Posted]) -> list[int]:
    """Workers whose step on a message came back, used or rejected (a worker that died
    outside its step was not working on one)."""
    return [p.cid for p in posted if not isinstance(p.content, WorkerDied)]


def join_workers(workers: Sequence[threading.Thread], warn_every: float = 60.0) -> None:
    """Wait for every worker to finish the step it is in, however long: a thread left
    running inside torch when the interpreter exits aborts the process ("terminate called
    without an active exception"), after the run had succeeded."""
    for worker in workers:
        while worker.is_alive():
            worker.join(timeout=warn_every)
            if worker.is_alive():
                log.warning("waiting for %s to finish its last step", worker.name)


def reply_problem(method: AsyncMethod, content: RecordDict) -> str | None:
    """The method's own check of a reply; a check that fails on a reply it did not foresee
    rejects that reply too, rather than the run."""
    try:
        return method.reply_problem(content)
    except Exception as error:  # noqa: BLE001 - a malformed reply is rejected, not fatal
        return f"reply check failed: {error!r}"


def accept_posted(method: AsyncMethod, posted: _Posted, cost: RoundCost) -> Reply | None:
    """Count a posted reply into the round's costs and check it; marks it `used` if it will
    go into the server's update, None if it is rejected (logged with the reason)."""
    cost.clients.append(posted.cid)
    cost.client_seconds += posted.seconds
    cost.client_wait_seconds += posted.waited + reported_wait(posted.content)
    cost.bytes_down += posted.bytes_down
    if isinstance(posted.content, Exception):
        cost.rejected.append({"cid": posted.cid, "reason": f"client failed: {posted.content!r}"})
        return None
    try:
        check_reply(posted.content)
    except InvalidReply as error:
        reject(cost, posted.cid, str(error))
        return None
    problem = reply_problem(method, posted.content)
    if problem:
        reject(cost, posted.cid, problem)
        return None
    cost.bytes_up += payload_bytes(posted.content)
    posted.used = True
    return Reply(cid=posted.cid, content=posted.content, num_examples=posted.num_examples)


class AsyncInProcessRuntime:
    def __init__(self, config: AsyncConfig | None = None) -> None:
        self.config = config or AsyncConfig()

    def run(self, method: AsyncMethod, clients: Sequence[Client], env: Environment) -> RunOutcome:
        if not isinstance(method, AsyncMethod):
            raise ValueError(f"{method.name} is not an asynchronous method (AsyncMethod)")
        method.setup(env)
        shared = {"state": method.initial_state(env), "iteration": 0}
        lock, stop, inbox = threading.Lock(), threading.Event(), queue.Queue()
        consumed = {c.cid: threading.Event() for c in clients}
        workers = [threading.Thread(target=self._worker, daemon=True,
                                    args=(method, c, shared, lock, inbox, stop, consumed))
                   for c in clients]
        for worker in workers:
            worker.start()
        rounds: list[RoundCost] = []
        last_heard = {c.cid: 0 for c in clients}
        active = min(max(self.config.active, 1), len(clients))
        try:
            for iteration in range(self.config.max_iterations):
                with lock:
                    if method.finished(shared["state"]):
                        break
                posted = self._gather(inbox, active, last_heard, iteration)
                cost = RoundCost(round=iteration)
                replies = [r for r in (accept_posted(method, p, cost) for p in posted) if r]
                started = time.perf_counter()
                with lock:
                    shared["state"] = method.messages_answered(shared["state"], answered(posted))
                    shared["state"] = method.server_update(shared["state"], replies)
                    shared["iteration"] = iteration + 1
                cost.server_seconds = time.perf_counter() - started
                cost.peak_rss_bytes = peak_rss_bytes()
                rounds.append(cost)
                for p in posted:
                    if not isinstance(p.content, WorkerDied):  # the dead are waited for no more
                        last_heard[p.cid] = iteration
                    consumed[p.cid].set()
        finally:
            stop.set()
            for event in consumed.values():
                event.set()
            join_workers(workers)
        return RunOutcome(shared["state"], rounds)

    # ------------------------------------------------------------------ server
    def _gather(self, inbox: queue.Queue, active: int, last_heard: dict[int, int],
                iteration: int) -> list[_Posted]:
        """Block until `active` replies are in and no worker is `staleness` iterations behind.

        A worker that died is no longer waited for (it leaves `last_heard`); its last post
        is still returned, so the round records why it is gone."""
        got: list[_Posted] = []
        while True:
            if ready_to_update([p.cid for p in got], last_heard, active, iteration,
                               self.config.staleness):
                return got
            posted = inbox.get()
            if isinstance(posted.content, WorkerDied):
                last_heard.pop(posted.cid, None)
                if not last_heard:
                    raise RuntimeError("every worker has died; see the log for why")
            got.append(posted)

    # ------------------------------------------------------------------ worker
    def _worker(self, method, client, shared, lock, inbox, stop, consumed) -> None:
        """Run `_work`; if it fails outside a client step, tell the server instead of leaving
        it waiting for a reply that will never come."""
        try:
            self._work(method, client, shared, lock, inbox, stop, consumed)
        except Exception as error:  # noqa: BLE001 - reported to the server, not lost
            log.exception("worker %d died", client.cid)
            inbox.put(_Posted(client.cid, WorkerDied(repr(error)), 0.0, shared["iteration"],
                              0, len(client.data)))

    def _work(self, method, client, shared, lock, inbox, stop, consumed) -> None:
        """Step from the latest state, post the reply, wait until the server has used it."""
        latencies = list(self.config.latency)
        delay = latencies[client.cid] if client.cid < len(latencies) else 0.0
        while not stop.is_set():
            with lock:
                if method.finished(shared["state"]):
                    return
                issued_at = shared["iteration"]
                message = method.worker_message(shared["state"], client.cid, issued_at)
            posted = step_on_draft(method, client, message, issued_at, delay)
            consumed[client.cid].clear()
            inbox.put(posted)
            while not consumed[client.cid].wait(0.05):
                if stop.is_set():
                    break
            if posted.used:  # the server built on this reply: the worker's state moves on
                client.state = posted.draft_state
            # else (rejected, or the run ended first) the step is discarded: evaluation and
            # later steps see the state of the worker's last used reply
