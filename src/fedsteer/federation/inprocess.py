"""The default runtime: every client simulated in this process, on one shared model.

It calls each sampled client's step directly; a client that raises is logged and left
out, and client state is checkpointed beside the server's so a killed run resumes to the
same result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedsteer.eval.costs import RoundCost, payload_bytes
from fedsteer.federation.checkpoint import load_recorddict, save_recorddict
from fedsteer.federation.privacy import privatize_reply
from fedsteer.federation.runtime import Runtime, round_label, tolerated
from fedsteer.methods.base import Client, Method, Reply

log = logging.getLogger(__name__)


class InProcessRuntime(Runtime):
    def _collect(self, method, message, sampled: list[Client], cost: RoundCost) -> list[Reply]:
        down = payload_bytes(message)
        task = self._progress_task(round_label(method, message, cost.round), len(sampled))
        replies = []
        for client in sampled:
            cost.clients.append(client.cid)
            cost.bytes_down += down
            reply = self._call_client(method, message, client, cost)
            if reply is not None:
                replies.append(reply)
            if task is not None:
                self.progress.advance(task)
        if task is not None:
            self.progress.remove_task(task)
        return replies

    def _call_client(self, method: Method, message, client: Client, cost: RoundCost):
        started = time.perf_counter()
        try:
            content = privatize_reply(self.config.dp, method.client_step(message, client),
                                      message, seed=self.config.seed, rnd=cost.round,
                                      cid=client.cid)
        except Exception as error:
            if not tolerated(error, self.config.tolerate_client_errors):
                raise  # a bug in a step must not pass as one party's bad day
            log.exception("round %d: client %d failed", cost.round, client.cid)
            cost.rejected.append({"cid": client.cid, "reason": f"client failed: {error!r}"})
            return None
        finally:
            cost.client_seconds += time.perf_counter() - started
        return self._accept(method, message, client.cid, content, len(client.data), cost)

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
