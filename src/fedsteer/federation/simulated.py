"""The asynchronous runtime on a simulated clock: the same asynchrony, the same result twice.

With threads racing for real (`federation/asynchronous.py`), which replies the server takes
first depends on the machine, so two runs of one seed differ. Here each worker's step takes
a simulated time drawn from the seed (uniform in ±50 % around its `latency`, 1 s by default),
and the server takes replies in the order of their simulated arrival — waiting, in real
time, for the one whose turn it is. Workers still compute concurrently; only the order of
arrival is decided by the clock, so a run is reproducible from its seed.

The rules are those of the threaded runtime: an update after `active` fresh replies, a
worker unheard for `staleness` iterations waited for, a worker's state committed only when
the server used its reply, rejected replies logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

from fedsteer.eval.costs import RoundCost, peak_rss_bytes
from fedsteer.federation.asynchronous import (
    AsyncConfig,
    WorkerDied,
    _Posted,
    accept_posted,
    answered,
    join_workers,
    ready_to_update,
    step_on_draft,
)
from fedsteer.federation.runtime import RunOutcome
from fedsteer.methods.base import AsyncMethod, Client, Environment, seeded_rng

log = logging.getLogger(__name__)
_STOP = object()


class SimulatedClockRuntime:
    def __init__(self, config: AsyncConfig | None = None, seed: int = 0) -> None:
        self.config = config or AsyncConfig()
        self.seed = seed

    def step_time(self, cid: int, step: int) -> float:
        """Simulated seconds of worker `cid`'s `step`-th local round, drawn from the seed."""
        latencies = list(self.config.latency)
        mean = latencies[cid] if cid < len(latencies) and latencies[cid] > 0 else 1.0
        return mean * float(seeded_rng(self.seed, "step-time", cid, step).uniform(0.5, 1.5))

    def run(self, method: AsyncMethod, clients: Sequence[Client], env: Environment) -> RunOutcome:
        method.setup(env)
        state = method.initial_state(env)
        inboxes = {c.cid: queue.Queue() for c in clients}
        outboxes = {c.cid: queue.Queue() for c in clients}
        workers = [threading.Thread(target=self._worker, daemon=True,
                                    args=(method, c, inboxes[c.cid], outboxes[c.cid]))
                   for c in clients]
        for worker in workers:
            worker.start()
        by_cid = {c.cid: c for c in clients}
        steps = dict.fromkeys(by_cid, 0)
        arrival = {cid: self.step_time(cid, 0) for cid in by_cid}
        for cid in by_cid:
            inboxes[cid].put(method.worker_message(state, cid, 0))
        rounds, last_heard, clock = [], dict.fromkeys(by_cid, 0), 0.0
        active = min(max(self.config.active, 1), len(clients))
        try:
            for iteration in range(self.config.max_iterations):
                if method.finished(state):
                    break
                batch = self._gather(outboxes, arrival, last_heard, iteration, active)
                clock = max([clock, *(arrival[p.cid] for p in batch)])
                cost = RoundCost(round=iteration, simulated_time=clock)
                replies = [r for r in (accept_posted(method, p, cost) for p in batch) if r]
                started = time.perf_counter()
                state = method.messages_answered(state, answered(batch))
                state = method.server_update(state, replies)
                cost.server_seconds = time.perf_counter() - started
                cost.peak_rss_bytes = peak_rss_bytes()
                rounds.append(cost)
                # the run's last update: no worker starts a step whose reply nobody will use
                over = method.finished(state) or iteration + 1 >= self.config.max_iterations
                for posted in batch:
                    if isinstance(posted.content, WorkerDied):
                        last_heard.pop(posted.cid, None)
                        continue
                    last_heard[posted.cid] = iteration
                    if posted.used:
                        by_cid[posted.cid].state = posted.draft_state
                    steps[posted.cid] += 1
                    arrival[posted.cid] = clock + self.step_time(posted.cid, steps[posted.cid])
                    if not over:
                        inboxes[posted.cid].put(method.worker_message(state, posted.cid,
                                                                      iteration + 1))
        finally:
            for inbox in inboxes.values():
                inbox.put(_STOP)
            join_workers(workers)
        return RunOutcome(state, rounds)

    def _gather(self, outboxes, arrival, last_heard, iteration, active) -> list[_Posted]:
        """Replies in simulated arrival order (ties: the lower worker id) until `active` are
        in and no worker is `staleness` iterations behind."""
        got: list[_Posted] = []
        while True:
            heard = {p.cid for p in got}
            replied = [p.cid for p in got if not isinstance(p.content, WorkerDied)]
            if ready_to_update(replied, last_heard, active, iteration, self.config.staleness):
                return got
            waiting = [cid for cid in last_heard if cid not in heard]
            if not waiting:
                if not last_heard:
                    raise RuntimeError("every worker has died; see the log for why")
                return got
            cid = min(waiting, key=lambda c: (arrival[c], c))
            got.append(outboxes[cid].get())

    @staticmethod
    def _worker(method: AsyncMethod, client: Client, inbox: queue.Queue, outbox: queue.Queue):
        """Step on each message as it comes; the server decides when a reply counts. A worker
        that fails outside its step says so, so the server stops waiting for it."""
        issued_at = 0
        try:
            while (message := inbox.get()) is not _STOP:
                issued_at = int(message["config"]["iteration"]) if "config" in message else 0
                outbox.put(step_on_draft(method, client, message, issued_at))
        except Exception as error:  # noqa: BLE001 - reported to the server, not lost
            log.exception("worker %d died", client.cid)
            outbox.put(_Posted(client.cid, WorkerDied(repr(error)), 0.0, issued_at, 0,
                               len(client.data)))
