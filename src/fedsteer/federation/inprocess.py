"""The default runtime: every client simulated in this process, on one shared model.

It calls each sampled client's step directly; a client that raises is logged and left
out, and client state is checkpointed beside the server's so a killed run resumes to the
same result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import RecordDict

from fedsteer.eval.costs import RoundCost, payload_bytes
from fedsteer.federation.checkpoint import load_recorddict, save_recorddict
from fedsteer.federation.privacy import privatize_reply
from fedsteer.federation.runtime import (
    RunOutcome,
    Runtime,
    client_batch_size,
    round_label,
    tolerated,
)
from fedsteer.federation.threads import current_threads, thread_budget
from fedsteer.methods.base import Client, Method

log = logging.getLogger(__name__)


class InProcessRuntime(Runtime):
    def run(self, method, clients, env, **options) -> RunOutcome:
        """The round loop, in this one process that hosts every client: torch gets all its
        cores (or the run's `threads`), and its previous count back at the end."""
        with thread_budget(1, self.config.threads):
            return super().run(method, clients, env, **options)

    def _collect(self, method, message, sampled: list[Client], cost: RoundCost) -> None:
        """Each client's reply goes to the round as soon as it is made (`_accept`)."""
        down = payload_bytes(message)
        task = self._progress_task(round_label(method, message, cost.round), len(sampled))
        size = client_batch_size(self.config, method)
        for start in range(0, len(sampled), size):
            group = sampled[start : start + size]
            for client in group:
                cost.clients.append(client.cid)
                cost.bytes_down += down
            contents = (self._step_together(method, message, group, cost) if len(group) > 1
                        else None)
            for client in group:
                content = (contents.pop(client.cid) if contents is not None
                           else self._call_client(method, message, client, cost))
                if content is not None:
                    self._accept(method, message, client.cid, content, len(client.data), cost)
                del content  # folded or spooled: the runtime keeps no reply
                if task is not None:
                    self.progress.advance(task)
        if task is not None:
            self.progress.remove_task(task)

    def _step_together(self, method: Method, message, group: list[Client],
                       cost: RoundCost) -> dict[int, RecordDict] | None:
        """One batched step for the group; each client billed its share of the time by rows.
        None when the method does not batch this message or the batch failed: then each
        client steps alone, so one failing client is told apart from the rest."""
        started = time.perf_counter()
        try:
            batched = method.client_steps(message, group)
        except Exception:
            log.warning("round %d: batched step of clients %s failed; stepping them one by "
                        "one", cost.round, [c.cid for c in group], exc_info=True)
            return None
        if batched is None:
            return None
        elapsed, total = time.perf_counter() - started, max(sum(batched.rows), 1)
        out = {}
        for client, content, rows in zip(group, batched.contents, batched.rows, strict=True):
            share = elapsed * rows / total
            cost.client_seconds += share
            cost.client_compute[client.cid] = share
            cost.client_threads[client.cid] = current_threads()
            out[client.cid] = self._privatize(content, message)
        cost.client_batches.append(len(group))
        return out

    def _call_client(self, method: Method, message, client: Client, cost: RoundCost):
        """One client's step alone: its content, or None when it failed (logged)."""
        started = time.perf_counter()
        try:
            return self._privatize(method.client_step(message, client), message)
        except Exception as error:
            if not tolerated(error, self.config.tolerate_client_errors):
                raise  # a bug in a step must not pass as one party's bad day
            log.exception("round %d: client %d failed", cost.round, client.cid)
            cost.rejected.append({"cid": client.cid, "reason": f"client failed: {error!r}"})
            return None
        finally:
            elapsed = time.perf_counter() - started
            cost.client_seconds += elapsed
            cost.client_compute[client.cid] = elapsed
            cost.client_threads[client.cid] = current_threads()

    def _privatize(self, content: RecordDict, message) -> RecordDict:
        """What leaves the client: its reply under client-level DP when the run asks."""
        return privatize_reply(self.config.dp, content, message)

    def _progress_task(self, label: str, total: int):
        if self.progress is None:
            return None
        return self.progress.add_task(label, total=total)

    def _save_clients(self, clients: list[Client], folder: Path) -> None:
        for client in clients:
            if len(client.state):
                save_recorddict(client.state, self._client_path(client, folder))

    def _restore_clients(self, clients: list[Client], folder: Path) -> None:
        for client in clients:
            path = self._client_path(client, folder)
            if path.with_suffix(".json").exists():
                client.state = load_recorddict(path)

    @staticmethod
    def _client_path(client: Client, folder: Path) -> Path:
        return folder / "clients" / f"client{client.cid}"
