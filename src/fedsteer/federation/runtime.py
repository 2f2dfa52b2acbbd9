"""What every runtime shares: the round loop, seeded sampling, reply checks, costs, checkpoints.

A runtime knows no method's math: it only calls the five steps of
`fedsteer.methods.base.Method`. Subclasses differ in one thing, how a round's message
reaches the sampled clients and how their answers come back (`_collect`). Each answer goes
to the round's `RoundReplies` as it arrives (`replies.py`: checks, then the method's
aggregator), so no runtime holds a list of a round's replies.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from rich.progress import Progress

from fedsteer.eval.costs import RoundCost, peak_rss_bytes
from fedsteer.federation.checkpoint import (
    CheckpointError,
    atomic_write_json,
    commit_round,
    latest_round,
    load_recorddict,
    save_recorddict,
)
from fedsteer.federation.privacy import CentralDP, CentralLedger, ClientDP, PrivacyLedger
from fedsteer.federation.replies import (  # noqa: F401 - lower_median, reject: re-exported
    ReplyChecks,
    RoundReplies,
    aggregate_problem,
    lower_median,
    reject,
)
from fedsteer.methods.base import Environment, Method, seeded_rng

log = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"


#: rows in one client-batched forward. 8: on 2 CPU cores IFed-ICL calibration is fastest at
#: batch 8 and slower beyond (`benchmarks/results/compute_ceiling.md`), while activation
#: memory grows with the rows (100 clients: 2.3 GB and 137 s at 8 rows, 10.6 GB and 197 s at 64,
#: `benchmarks/results/client_batch_memory.md`)
DEFAULT_CLIENT_BATCH_ROWS = 8


@dataclass
class RuntimeConfig:
    fraction: float = 1.0  # share of clients sampled each round
    #: fixed: exactly round(fraction × N) clients; poisson: each client on its own with
    #: probability `fraction`. Either is drawn from the public seed and recorded, so DP
    #: claims no amplification by it (`federation/privacy.py`)
    sampling: str = "fixed"
    min_clients: int = 1
    seed: int = 0
    max_rounds: int = 10_000  # a guard against a method that never finishes
    max_reply_norm: float | None = None  # absolute bound; overrides the method's own when set
    #: reject a reply any of whose array records has a norm (or distance to the round's
    #: coordinate-wise median) above k × that record's (lower) median over the round's
    #: replies: a huge or sign-flipped reply is left out. 0: off.
    reply_norm_factor: float = 10.0
    #: cap on one reply's aggregation weight (its example count, self-reported on Flower; a
    #: count below 1 is a rejected reply); None: 10 × the round's (lower) median weight and
    #: never more than all the other replies together, so one party cannot outweigh the
    #: rest. An explicit cap replaces that rule (and lets replies fold on arrival).
    max_client_weight: float | None = None
    dp: ClientDP | None = None  # client-level DP on every reply (see privacy.py)
    #: central DP: `dp` is then its client side (clip only) and the server adds the noise
    central_dp: CentralDP | None = None
    eval_every: int = 0  # also evaluate after every k-th round (accuracy per round); 0: never
    #: leave out a client whose step raised anything; by default only what a party's machine
    #: or link causes (ENVIRONMENT_FAULTS) is left out, and a bug fails the run
    tolerate_client_errors: bool = False
    #: clients stepped together in one forward/backward (client-batched simulation, for
    #: methods that can: `Method.client_steps`); None: as many as keep a forward within
    #: `client_batch_rows`; 1: one by one
    client_batch: int | None = None
    #: the memory budget of a batched forward, in rows (activation memory grows with it)
    client_batch_rows: int = DEFAULT_CLIENT_BATCH_ROWS
    #: torch intra-op threads of a process that hosts clients; None: its share of the cores
    #: (`fedsteer.federation.threads`)
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_client_weight is not None and not self.max_client_weight >= 1:
            raise ValueError(f"max_client_weight={self.max_client_weight}: a cap below one "
                             "example would weigh every reply 0")


def client_batch_size(config: RuntimeConfig, method: Method) -> int:
    """How many clients the runtime steps together for `method` (1: one by one)."""
    rows = method.client_step_rows()
    if rows is None:
        if config.client_batch not in (None, 1):
            raise ValueError(f"{method.name} cannot step its clients together: "
                             f"client_batch={config.client_batch} needs 1")
        return 1
    if config.client_batch is None and not method.batches_by_default:
        return 1
    fits = max(config.client_batch_rows // max(rows, 1), 1)
    return fits if config.client_batch is None else min(config.client_batch, fits)


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


SAMPLINGS = ("fixed", "poisson")


def sample_clients(config: RuntimeConfig, rnd: int, num_clients: int) -> list[int]:
    """A seeded sample per round: the same clients in every runtime and after a resume.
    Poisson sampling may pick no client at all (its round then changes nothing)."""
    if config.sampling not in SAMPLINGS:
        raise ValueError(f"sampling {config.sampling!r}: use one of {', '.join(SAMPLINGS)}")
    if config.sampling == "poisson":
        drawn = seeded_rng(config.seed, "poisson", rnd).random(num_clients)
        return [int(c) for c in np.flatnonzero(drawn < config.fraction)]
    wanted = max(config.min_clients, round(config.fraction * num_clients))
    wanted = min(wanted, num_clients)
    rng = seeded_rng(config.seed, "sample", rnd)
    return sorted(int(c) for c in rng.choice(num_clients, size=wanted, replace=False))


#: What one party's machine or link can cause (disk full, out of memory, a dropped link):
#: such a client is left out of the round. Anything else is taken for a bug.
ENVIRONMENT_FAULTS: tuple[type[BaseException], ...] = (OSError, MemoryError, TimeoutError)


def tolerated(error: BaseException, tolerate_all: bool) -> bool:
    return tolerate_all or isinstance(error, ENVIRONMENT_FAULTS)


def message_phase(message: RecordDict) -> str | None:
    """The phase a round's message names in its config (IFed-ICL: extract, calibrate)."""
    config = message["config"] if "config" in message.config_records else {}
    return str(config["phase"]) if "phase" in config else None


def round_label(method: Method, message: RecordDict, rnd: int) -> str:
    """What a progress line says of a round: "ifed-icl · calibrate · round 2/3 · clients"."""
    planned, phase = method.planned_rounds(), message_phase(message)
    phase = f" · {phase}" if phase else ""
    of = f"/{planned}" if planned else ""
    return f"{method.name}{phase} · round {rnd + 1}{of} · clients"


def with_reference(method: Method, message: RecordDict, env: Environment, rnd: int,
                   ledger: PrivacyLedger | CentralLedger) -> RecordDict:
    """Under DP, the round's message with the method's public reference reply
    (`Method.reference_reply`: computed here, on the server, from data-free input, before
    any client of the round is asked) for each record the message does not carry already:
    clients then clip and noise their deviation from it. The ledger notes what was sent."""
    reference = method.reference_reply(message, env)
    for name, record in (reference.array_records.items() if reference else ()):
        if name not in message.array_records:
            message[name] = record
            ledger.references[name] = {
                "round": rnd, "source": f"{method.name}.reference_reply: public, data-free "
                                        "input, computed by the server before the round",
                "norm": math.sqrt(sum(float(np.sum(np.square(a.numpy(), dtype=np.float64)))
                                      for a in record.values()))}
    return message


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
        self._round: RoundReplies | None = None  # the round under way

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
        ledger = self._ledger(method, len(clients))
        for cost in rounds if ledger else ():  # a resumed run has spent these already
            ledger.record_round(cost.array_records, len(cost.clients), cost.record_names)
        metrics = None
        for rnd in range(len(rounds), self.config.max_rounds):
            message = method.configure_round(rnd, state)
            if message is None:
                break
            if ledger:
                message = with_reference(method, message, env, rnd, ledger)
            state, cost = self._run_round(method, rnd, message, state, clients)
            metrics = None
            if self.config.eval_every and (rnd + 1) % self.config.eval_every == 0:
                metrics = self._evaluate_round(method, state, env, cost)
            if ledger:
                ledger.record_round(cost.array_records, len(cost.clients), cost.record_names)
            rounds.append(cost)
            self._checkpoint(state, clients, rounds, fingerprint)
        return RunOutcome(state, rounds, ledger.summary() if ledger else None, metrics)

    def _ledger(self, method: Method, population: int
                ) -> PrivacyLedger | CentralLedger | None:
        if self.config.central_dp is not None:
            return CentralLedger(self.config.central_dp, population)
        return PrivacyLedger(self.config.dp) if self.config.dp else None

    def sample_clients(self, rnd: int, num_clients: int) -> list[int]:
        return sample_clients(self.config, rnd, num_clients)

    @abstractmethod
    def _collect(
        self, method: Method, message: RecordDict, sampled: list[Any], cost: RoundCost
    ) -> None:
        """Deliver `message` to the sampled clients; hand each answer to `_accept` as it
        comes (the round folds or spools it: no list of the round's replies is kept)."""

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
        cost = RoundCost(round=rnd, phase=message_phase(message))
        chosen = (range(len(clients)) if method.every_client
                  else self.sample_clients(rnd, len(clients)))
        sampled = [clients[cid] for cid in chosen]
        previous = copy.deepcopy(state)  # the aggregator may change the state in place
        self._round = RoundReplies(method, message, method.aggregator(rnd, state), cost,
                                   self._reply_checks(method))
        try:
            self._collect(method, message, sampled, cost)
            started = time.perf_counter()
            norms = self._round.close()
            if sampled and not norms:
                raise RuntimeError(
                    f"round {rnd}: every client failed or was rejected: {cost.rejected}")
            if sampled:
                candidate = self._round.result()
            else:  # a Poisson draw of nobody: nothing released, nothing spent
                log.info("round %d: no client sampled; the state stays", rnd)
                candidate = previous
        finally:
            self._round.discard()
        # Central DP's noise is meant to move the mean beyond its replies' norms; each reply
        # was held to the clip instead, so the new state is checked for NaN/Inf only
        central = self.config.central_dp is not None
        problem = aggregate_problem(candidate, norms, None if central else self._max_norm(method),
                                    0.0 if central else self.config.reply_norm_factor)
        if problem:
            log.warning("round %d: aggregate refused, previous state kept: %s", rnd, problem)
            cost.rejected.append({"cid": "aggregate", "reason": problem})
            candidate = previous
        cost.server_seconds = time.perf_counter() - started + self._round.fold_seconds
        cost.peak_rss_bytes = max(cost.peak_rss_bytes, peak_rss_bytes())
        return candidate, cost

    def _reply_checks(self, method: Method) -> ReplyChecks:
        """Under central DP the server's norm bound and outlier screens are off: they would
        choose replies by their private, un-noised norms outside the accounted mechanism,
        while the clip check (`CentralDP.unclipped`) bounds every reply already."""
        central = self.config.central_dp is not None
        return ReplyChecks(max_norm=None if central else self._max_norm(method),
                           factor=0.0 if central else self.config.reply_norm_factor,
                           max_weight=self.config.max_client_weight,
                           spool_root=self.checkpoint_dir,
                           central_dp=self.config.central_dp)

    def _accept(
        self, method: Method, message: RecordDict, cid: int, content: Any,
        num_examples: int, cost: RoundCost,
    ) -> bool:
        """Hand a reply to the round: checked before the server may use it (a bad one is
        logged and left out), then folded in or spooled; the runtime keeps no reference."""
        return self._round.offer(cid, content, num_examples)

    @staticmethod
    def _reject(cost: RoundCost, cid: int, reason: str) -> None:
        reject(cost, cid, reason)

    def _max_norm(self, method: Method) -> float | None:
        return self.config.max_reply_norm or method.max_reply_norm

    # ---------------------------------------------------------- checkpoints
    def _checkpoint(self, state, clients, rounds: list[RoundCost], fingerprint) -> None:
        """The server's state, the clients' and the progress so far, as one committed unit."""
        if self.checkpoint_dir is None:
            return

        def write(folder: Path) -> None:
            save_recorddict(state, folder / "server")
            self._save_clients(clients, folder)
            atomic_write_json(folder / PROGRESS_FILE,
                              {"fingerprint": fingerprint, "rounds": [r.to_dict() for r in rounds]})

        commit_round(self.checkpoint_dir, len(rounds), write)

    def _save_clients(self, clients, folder: Path) -> None:  # noqa: B027 - optional hook
        """Client state lives with the clients; runtimes that host them save it in `folder`."""

    def _restore_clients(self, clients, folder: Path) -> None:  # noqa: B027 - optional hook
        """Counterpart of `_save_clients`."""

    def _restore(self, clients, fingerprint):
        folder = latest_round(self.checkpoint_dir) if self.checkpoint_dir else None
        if folder is None:
            if self.checkpoint_dir and (self.checkpoint_dir / PROGRESS_FILE).exists():
                raise CheckpointError(
                    f"{self.checkpoint_dir} was written by an older fedsteer (no round folders); "
                    "remove it to start the run afresh")
            log.debug("no checkpoint to resume from; starting afresh")
            return None
        progress_file = folder / PROGRESS_FILE
        try:
            saved = json.loads(progress_file.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{progress_file}: unreadable ({err})") from None
        if saved["fingerprint"] != fingerprint:
            raise CheckpointMismatch(
                f"{progress_file} was written by {saved['fingerprint']}, not {fingerprint}"
            )
        self._restore_clients(clients, folder)
        rounds = [RoundCost(**r) for r in saved["rounds"]]
        log.info("resuming after round %d from %s", len(rounds), folder)
        return load_recorddict(folder / "server"), rounds
