"""What every runtime shares: the round loop, seeded sampling, reply checks, costs, checkpoints.

A runtime knows no method's math: it only calls the five steps of
`fedsteer.methods.base.Method`. Subclasses differ in one thing, how a round's message
reaches the sampled clients and how their answers come back (`_collect`).
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from rich.progress import Progress

from fedsteer.eval.costs import RoundCost, payload_bytes, peak_rss_bytes
from fedsteer.federation.checkpoint import atomic_write_json, load_recorddict, save_recorddict
from fedsteer.federation.payloads import InvalidReply, check_reply
from fedsteer.federation.privacy import ClientDP, PrivacyLedger
from fedsteer.methods.base import Environment, Method, Reply, seeded_rng

log = logging.getLogger(__name__)


@dataclass
class RuntimeConfig:
    fraction: float = 1.0  # share of clients sampled each round
    min_clients: int = 1
    seed: int = 0
    max_rounds: int = 10_000  # a guard against a method that never finishes
    max_reply_norm: float | None = None  # overrides the method's own bound when set
    dp: ClientDP | None = None  # client-level DP on every reply (see privacy.py)
    eval_every: int = 0  # also evaluate after every k-th round (accuracy per round); 0: never


@dataclass
class RunOutcome:
    state: RecordDict
    rounds: list[RoundCost]
    privacy: dict[str, Any] | None = None  # epsilon, delta... when DP was on
    #: the final state's metrics when its last round was evaluated (`eval_every`): no need to
    #: evaluate the same state again
    metrics: dict[str, Any] | None = None


class CheckpointMismatch(RuntimeError):
    """A resume was asked of a checkpoint written by a different run configuration."""


def sample_clients(config: RuntimeConfig, rnd: int, num_clients: int) -> list[int]:
    """A seeded sample per round: the same clients in every runtime and after a resume."""
    wanted = max(config.min_clients, round(config.fraction * num_clients))
    wanted = min(wanted, num_clients)
    rng = seeded_rng(config.seed, "sample", rnd)
    return sorted(int(c) for c in rng.choice(num_clients, size=wanted, replace=False))


def round_label(method: Method, message: RecordDict, rnd: int) -> str:
    """What a progress line says of a round: "ifed-icl · calibrate · round 2/3 · clients"."""
    planned = method.planned_rounds()
    config = message["config"] if "config" in message.config_records else {}
    phase = f" · {config['phase']}" if "phase" in config else ""
    of = f"/{planned}" if planned else ""
    return f"{method.name}{phase} · round {rnd + 1}{of} · clients"


def reject(cost: RoundCost, cid: int, reason: str) -> None:
    """Leave a reply out of the round: logged, and recorded with its reason in the costs."""
    log.warning("round %d: rejected client %d: %s", cost.round, cid, reason)
    cost.rejected.append({"cid": cid, "reason": reason})


class Runtime(ABC):
    """The round loop; `clients` are whatever a subclass addresses them by, indexed by cid."""

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        checkpoint_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config or RuntimeConfig()
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    def run(
        self,
        method: Method,
        clients: Sequence[Any],
        env: Environment,
        *,
        resume: bool = False,
        fingerprint: dict[str, Any] | None = None,
    ) -> RunOutcome:
        fingerprint = fingerprint or {"method": method.name, "options": method.options()}
        fingerprint = json.loads(json.dumps(fingerprint))  # compare as it reads back
        if method.every_client and self.config.fraction < 1:
            log.warning("%s needs every client in every round; ignoring fraction=%g",
                        method.name, self.config.fraction)
        method.setup(env)
        restored = self._restore(clients, fingerprint) if resume else None
        state, rounds = restored or (method.initial_state(env), [])
        ledger = PrivacyLedger(self.config.dp) if self.config.dp else None
        for cost in rounds if ledger else ():  # a resumed run has spent these already
            ledger.record_round(cost.array_records)
        metrics = None
        for rnd in range(len(rounds), self.config.max_rounds):
            message = method.configure_round(rnd, state)
            if message is None:
                break
            state, cost = self._run_round(method, rnd, message, state, clients)
            metrics = None
            if self.config.eval_every and (rnd + 1) % self.config.eval_every == 0:
                metrics = self._evaluate_round(method, state, env, cost)
            if ledger:
                ledger.record_round(cost.array_records)
            rounds.append(cost)
            self._checkpoint(state, clients, rounds, fingerprint)
        return RunOutcome(state, rounds, ledger.summary() if ledger else None, metrics)

    def sample_clients(self, rnd: int, num_clients: int) -> list[int]:
        return sample_clients(self.config, rnd, num_clients)

    @abstractmethod
    def _collect(
        self, method: Method, message: RecordDict, sampled: list[Any], cost: RoundCost
    ) -> list[Reply]:
        """Deliver `message` to the sampled clients; return the replies that passed `_accept`."""

    # --------------------------------------------------------------- rounds
    @staticmethod
    def _evaluate_round(method: Method, state: RecordDict, env: Environment,
                        cost: RoundCost) -> dict[str, Any]:
        """The global model's metrics after this round (its accuracy: the per-round curve)."""
        started = time.perf_counter()
        metrics = method.evaluate(state, env)
        cost.accuracy = float(metrics["accuracy"])
        cost.eval_seconds = time.perf_counter() - started
        return metrics

    def _run_round(self, method, rnd, message, state, clients):
        cost = RoundCost(round=rnd)
        chosen = (range(len(clients)) if method.every_client
                  else self.sample_clients(rnd, len(clients)))
        sampled = [clients[cid] for cid in chosen]
        replies = self._collect(method, message, sampled, cost)
        cost.array_records = max((len(r.content.array_records) for r in replies), default=0)
        if sampled and not replies:
            raise RuntimeError(f"round {rnd}: every client failed or was rejected: {cost.rejected}")
        started = time.perf_counter()
        state = method.aggregate(rnd, state, replies)
        cost.server_seconds = time.perf_counter() - started
        cost.peak_rss_bytes = max(cost.peak_rss_bytes, peak_rss_bytes())
        return state, cost

    def _accept(
        self, method: Method, message: RecordDict, cid: int, content: Any,
        num_examples: int, cost: RoundCost,
    ) -> Reply | None:
        """Check a reply before the server may see it; a bad one is logged and left out."""
        try:
            check_reply(content, method.reply_shapes(message), self._max_norm(method))
        except InvalidReply as error:
            self._reject(cost, cid, str(error))
            return None
        cost.bytes_up += payload_bytes(content)
        return Reply(cid=cid, content=content, num_examples=num_examples)

    @staticmethod
    def _reject(cost: RoundCost, cid: int, reason: str) -> None:
        reject(cost, cid, reason)

    def _max_norm(self, method: Method) -> float | None:
        return self.config.max_reply_norm or method.max_reply_norm

    # ---------------------------------------------------------- checkpoints
    def _checkpoint(self, state, clients, rounds: list[RoundCost], fingerprint) -> None:
        if self.checkpoint_dir is None:
            return
        save_recorddict(state, self.checkpoint_dir / "server")
        self._save_clients(clients)
        # progress.json is written last: it is what marks the checkpoint complete.
        atomic_write_json(
            self.checkpoint_dir / "progress.json",
            {"fingerprint": fingerprint, "rounds": [r.to_dict() for r in rounds]},
        )

    def _save_clients(self, clients) -> None:  # noqa: B027 - optional hook
        """Client state lives with the clients; runtimes that host them save it here."""

    def _restore_clients(self, clients) -> None:  # noqa: B027 - optional hook
        """Counterpart of `_save_clients`."""

    def _restore(self, clients, fingerprint):
        progress_file = self.checkpoint_dir / "progress.json" if self.checkpoint_dir else None
        if progress_file is None or not progress_file.exists():
            log.debug("no checkpoint to resume from; starting afresh")
            return None
        saved = json.loads(progress_file.read_text())
        if saved["fingerprint"] != fingerprint:
            raise CheckpointMismatch(
                f"{progress_file} was written by {saved['fingerprint']}, not {fingerprint}"
            )
        self._restore_clients(clients)
        rounds = [RoundCost(**r) for r in saved["rounds"]]
        log.info("resuming after round %d from %s", len(rounds), self.checkpoint_dir)
        return load_recorddict(self.checkpoint_dir / "server"), rounds
