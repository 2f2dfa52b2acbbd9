"""The default runtime: every client simulated in this process, on one shared model.

It samples clients, delivers each round's message, validates and collects replies,
measures what the round cost, and checkpoints after every round so that `resume=True`
continues a killed run to the same result. It knows no method's math: it only calls the
five steps of `fedsteer.methods.base.Method`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from rich.progress import Progress

from fedsteer.eval.costs import RoundCost, payload_bytes, peak_rss_bytes
from fedsteer.federation.checkpoint import atomic_write_json, load_recorddict, save_recorddict
from fedsteer.federation.payloads import InvalidReply, check_reply
from fedsteer.methods.base import Client, Environment, Method, Reply, seeded_rng

log = logging.getLogger(__name__)


@dataclass
class RuntimeConfig:
    fraction: float = 1.0  # share of clients sampled each round
    min_clients: int = 1
    seed: int = 0
    max_rounds: int = 10_000  # a guard against a method that never finishes
    max_reply_norm: float | None = None  # overrides the method's own bound when set


@dataclass
class RunOutcome:
    state: RecordDict
    rounds: list[RoundCost]


class CheckpointMismatch(RuntimeError):
    """A resume was asked of a checkpoint written by a different run configuration."""


class InProcessRuntime:
    def __init__(
        self,
        config: RuntimeConfig | None = None,
        checkpoint_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config or RuntimeConfig()
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    # ------------------------------------------------------------------ run
    def run(
        self,
        method: Method,
        clients: Sequence[Client],
        env: Environment,
        *,
        resume: bool = False,
        fingerprint: dict[str, Any] | None = None,
    ) -> RunOutcome:
        fingerprint = fingerprint or {"method": method.name, "options": method.options()}
        fingerprint = json.loads(json.dumps(fingerprint))  # compare as it reads back
        restored = self._restore(clients, fingerprint) if resume else None
        state, rounds = restored or (method.initial_state(env), [])
        for rnd in range(len(rounds), self.config.max_rounds):
            message = method.configure_round(rnd, state)
            if message is None:
                break
            state, cost = self._run_round(method, rnd, message, state, clients)
            rounds.append(cost)
            self._checkpoint(state, clients, rounds, fingerprint)
        return RunOutcome(state, rounds)

    def sample_clients(self, rnd: int, num_clients: int) -> list[int]:
        """A seeded sample per round: the same clients again when a run resumes."""
        wanted = max(self.config.min_clients, round(self.config.fraction * num_clients))
        wanted = min(wanted, num_clients)
        rng = seeded_rng(self.config.seed, "sample", rnd)
        return sorted(int(c) for c in rng.choice(num_clients, size=wanted, replace=False))

    # --------------------------------------------------------------- rounds
    def _run_round(self, method, rnd, message, state, clients):
        cost = RoundCost(round=rnd)
        down = payload_bytes(message)
        sampled = self.sample_clients(rnd, len(clients))
        task = self._progress_task(f"round {rnd + 1}", len(sampled))
        replies = []
        for cid in sampled:
            reply = self._call_client(method, message, clients[cid], cost, down)
            if reply is not None:
                replies.append(reply)
            if task is not None:
                self.progress.advance(task)
        if sampled and not replies:
            raise RuntimeError(f"round {rnd}: every client failed or was rejected: {cost.rejected}")
        started = time.perf_counter()
        state = method.aggregate(rnd, state, replies)
        cost.server_seconds = time.perf_counter() - started
        cost.peak_rss_bytes = peak_rss_bytes()
        if task is not None:
            self.progress.remove_task(task)
        return state, cost

    def _call_client(self, method, message, client, cost: RoundCost, down: int) -> Reply | None:
        cost.clients.append(client.cid)
        cost.bytes_down += down
        started = time.perf_counter()
        try:
            content = method.client_step(message, client)
        except Exception as error:  # one failing party must not stop the federation
            log.exception("round %d: client %d failed", cost.round, client.cid)
            cost.rejected.append({"cid": client.cid, "reason": f"client failed: {error!r}"})
            return None
        finally:
            cost.client_seconds += time.perf_counter() - started
        try:
            check_reply(content, method.reply_shapes(message), self._max_norm(method))
        except InvalidReply as error:
            log.warning("round %d: rejected client %d: %s", cost.round, client.cid, error)
            cost.rejected.append({"cid": client.cid, "reason": str(error)})
            return None
        cost.bytes_up += payload_bytes(content)
        return Reply(cid=client.cid, content=content, num_examples=len(client.data))

    def _max_norm(self, method: Method) -> float | None:
        return self.config.max_reply_norm or method.max_reply_norm

    def _progress_task(self, label: str, total: int):
        if self.progress is None:
            return None
        return self.progress.add_task(label, total=total)

    # ---------------------------------------------------------- checkpoints
    def _checkpoint(self, state, clients, rounds: list[RoundCost], fingerprint) -> None:
        if self.checkpoint_dir is None:
            return
        root = self.checkpoint_dir
        save_recorddict(state, root / "server")
        for client in clients:
            if len(client.state):
                save_recorddict(client.state, root / "clients" / f"client{client.cid}")
        # progress.json is written last: it is what marks the checkpoint complete.
        atomic_write_json(
            root / "progress.json",
            {"fingerprint": fingerprint, "rounds": [r.to_dict() for r in rounds]},
        )

    def _restore(self, clients, fingerprint):
        progress_file = self.checkpoint_dir / "progress.json" if self.checkpoint_dir else None
        if progress_file is None or not progress_file.exists():
            log.info("no checkpoint to resume from; starting afresh")
            return None
        saved = json.loads(progress_file.read_text())
        if saved["fingerprint"] != fingerprint:
            raise CheckpointMismatch(
                f"{progress_file} was written by {saved['fingerprint']}, not {fingerprint}"
            )
        for client in clients:
            path = self.checkpoint_dir / "clients" / f"client{client.cid}"
            if path.with_suffix(".json").exists():
                client.state = load_recorddict(path)
        rounds = [RoundCost(**r) for r in saved["rounds"]]
        log.info("resuming after round %d from %s", len(rounds), self.checkpoint_dir)
        return load_recorddict(self.checkpoint_dir / "server"), rounds
