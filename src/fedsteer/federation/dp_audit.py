"""A black-box audit of our DP: the real round path against a canary, ε bounded from below.

The standard audit of a Gaussian mechanism (Jagielski et al. 2020; Nasr et al. 2021): run one
round of N clients through `InProcessRuntime` — its reply checks, the client's clip and noise
(`privatize_reply`), the server's clip check and noise (`RoundReplies`) and the ledger that
writes `privacy.epsilon` — on plain arrays (no model). One canary client's update is +clip
or −clip along axis 0 (the two datasets replace-one adjacency compares); every other
client's update is fixed and known. Over many trials with fresh noise, an attacker guesses
the canary's sign from what it observes:

- `threshold`: the released value on axis 0 (local DP: the canary's reply as the server
  gets it; central DP: the released mean), against a threshold;
- `record`: knows everything in result.json too — the seed, the sampled clients, the other
  clients' updates — and subtracts what the seed would regenerate of the noise (what the
  code before issue 41 drew), then thresholds.

Each attacker's threshold is chosen on a calibration split of the trials and scored on the
rest; its true/false positive rates, bounded by Clopper–Pearson at 95 % each, give the
empirical lower bound ε ≥ log((TPR − δ) / FPR) (and the same for the negatives). The bar:
below the ε the run records. `noise_source` swaps in another noise generator (the old
seeded one as a negative control) without changing anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from scipy.stats import beta

from fedsteer.data import Example, TaskSpec
from fedsteer.federation import privacy
from fedsteer.federation.inprocess import InProcessRuntime
from fedsteer.federation.privacy import CentralDP, ClientDP
from fedsteer.federation.runtime import RuntimeConfig, sample_clients
from fedsteer.methods.aggregation import aggregate_arrays
from fedsteer.methods.base import Client, Environment, Method, seeded_rng

CANARY = 0  # the canary's client id


@dataclass
class Setting:
    """One audited configuration: local or central DP, a sampled fraction of N clients."""

    mode: str  # "local" or "central"
    clients: int = 10
    fraction: float = 1.0
    noise_multiplier: float = 4.0
    clip: float = 1.0
    dims: int = 4
    delta: float = 1e-5

    @property
    def label(self) -> str:
        sampled = "every client" if self.fraction >= 1 else f"fixed {self.fraction:g} sample"
        return f"{self.mode}, {self.clients} clients, {sampled}"


@dataclass
class CanaryRound(Method):
    """One round: each client sends the global array plus its own update; the server's
    aggregate is the mean (the rule central DP's noise argument needs)."""

    name = "dp-audit"
    updates: np.ndarray = field(default_factory=lambda: np.zeros((1, 1)))

    def initial_state(self, env: Environment) -> RecordDict:
        zeros = np.zeros(self.updates.shape[1], np.float32)
        return RecordDict({"w": ArrayRecord({"w": Array(zeros)})})

    def configure_round(self, rnd: int, state: RecordDict) -> RecordDict | None:
        return None if rnd else RecordDict({"w": state["w"], "config": ConfigRecord({"r": rnd})})

    def reply_shapes(self, message: RecordDict) -> dict[str, tuple[int, ...]]:
        return {"w.w": (self.updates.shape[1],)}

    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        sent = message["w"]["w"].numpy() + self.updates[client.cid]
        return RecordDict({"w": ArrayRecord({"w": Array(sent.astype(np.float32))})})

    def aggregate(self, rnd: int, state: RecordDict, replies) -> RecordDict:
        state["w"] = aggregate_arrays(replies, "w")
        return state

    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        return {"accuracy": 0.0, "macro_f1": 0.0}


class ServerView(InProcessRuntime):
    """The in-process runtime, also keeping the canary's reply as the server received it
    (what local DP's guarantee is against)."""

    canary_reply: np.ndarray | None = None

    def _accept(self, method, message, cid, content, num_examples, cost) -> bool:
        if cid == CANARY:
            self.canary_reply = content["w"]["w"].numpy().astype(np.float64)
        return super()._accept(method, message, cid, content, num_examples, cost)


def other_updates(setting: Setting) -> np.ndarray:
    """The non-canary clients' updates (fixed, known to the attacker), within the clip."""
    rng = np.random.default_rng(41)
    updates = rng.normal(size=(setting.clients, setting.dims))
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    return updates / norms * setting.clip * rng.uniform(0.2, 0.9, (setting.clients, 1))


def runtime_config(setting: Setting, seed: int) -> RuntimeConfig:
    """The runtime's defaults (screens, weight cap) with the setting's DP and sampling."""
    if setting.mode == "local":
        dp = ClientDP(setting.clip, setting.noise_multiplier, setting.delta)
        return RuntimeConfig(fraction=setting.fraction, seed=seed, dp=dp)
    central = CentralDP(setting.clip, setting.noise_multiplier, setting.delta)
    return RuntimeConfig(fraction=setting.fraction, seed=seed, dp=central.client_side(),
                         central_dp=central)


#: (setting, seed, sampled clients) -> the generator each DP noise draw takes, in order
NoiseSource = Callable[[Setting, int, list[int]], Callable[[], np.random.Generator]]


def seeded_noise(setting: Setting, seed: int, sampled: list[int]
                 ) -> Callable[[], np.random.Generator]:
    """The code before issue 41: local noise from `seeded_rng(seed, "dp", round, cid)` per
    client in sampling order, central noise from `seeded_rng(seed, "central-dp", round)`
    (a fresh one at each draw: the clients' noiseless clip draws nothing from it)."""
    if setting.mode == "central":
        return lambda: seeded_rng(seed, "central-dp", 0)
    streams: Iterator[np.random.Generator] = iter(
        [seeded_rng(seed, "dp", 0, cid) for cid in sampled])
    return lambda: next(streams)


@contextmanager
def noise_from(source: NoiseSource | None, setting: Setting, seed: int, sampled: list[int]):
    """Run with the DP noise drawn from `source` (None: the code's own, `noise_rng`)."""
    if source is None:
        yield
        return
    with mock.patch.object(privacy, "noise_rng", source(setting, seed, sampled)):
        yield


ATTACKERS = ("threshold", "record")


@dataclass
class Trial:
    sign: int  # the canary's update: +clip (1) or -clip (0) along axis 0
    scores: dict[str, float]  # per attacker: larger means "+clip"
    claimed_epsilon: float
    took_part: bool = True  # the canary was sampled (the record says so)


def run_trial(setting: Setting, sign: int, seed: int, source: NoiseSource | None) -> Trial:
    """One round with the canary at `sign`, and what each attacker scores from it."""
    updates = other_updates(setting)
    updates[CANARY] = 0.0
    updates[CANARY, 0] = setting.clip if sign else -setting.clip
    env = Environment(task=TaskSpec(name="audit", labels=("a", "b"), label_words=(" a", " b"),
                                    template="{text}:"), test=[], model_name="none")
    clients = [Client(cid=c, data=[Example(text="x", label=0)], env=env)
               for c in range(setting.clients)]
    config = runtime_config(setting, seed)
    sampled = sample_clients(config, 0, setting.clients)
    runtime = ServerView(config)
    with noise_from(source, setting, seed, sampled):
        outcome = runtime.run(CanaryRound(updates=updates), clients, env,
                              fingerprint={"method": "dp-audit"})
    recorded = outcome.rounds[0].clients  # what the record tells the second attacker
    claimed = float(outcome.privacy["epsilon"])
    if CANARY not in recorded:  # the canary took no part: nothing of it to see
        return Trial(sign, dict.fromkeys(ATTACKERS, 0.0), claimed, took_part=False)
    sigma = setting.noise_multiplier * setting.clip
    if setting.mode == "local":  # the server sees the canary's reply
        seen = float(runtime.canary_reply[0])
        guess = seeded_rng(seed, "dp", 0, CANARY).normal(0.0, sigma, setting.dims)[0]
        return Trial(sign, {"threshold": seen, "record": seen - guess}, claimed)
    released = float(outcome.state["w"]["w"].numpy()[0])  # everyone sees the mean
    others = sum(updates[c, 0] for c in recorded if c != CANARY)
    guess = seeded_rng(seed, "central-dp", 0).normal(0.0, sigma, setting.dims)[0]
    return Trial(sign, {"threshold": released,
                        "record": released * len(recorded) - others - guess}, claimed)


def clopper_pearson(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact binomial interval, `alpha` in all (two-sided)."""
    low = float(beta.ppf(alpha / 2, successes, trials - successes + 1)) if successes else 0.0
    high = (float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
            if successes < trials else 1.0)
    return low, high


def epsilon_lower_bound(scores: np.ndarray, signs: np.ndarray, threshold: float,
                        delta: float) -> float:
    """ε that (ε, δ)-DP must have for this threshold's error rates, at 95 % (CP bounds)."""
    guess = scores > threshold
    positives, negatives = signs == 1, signs == 0
    tp, fp = int(np.sum(guess & positives)), int(np.sum(guess & negatives))
    tpr_low, _ = clopper_pearson(tp, int(positives.sum()))
    _, fpr_high = clopper_pearson(fp, int(negatives.sum()))
    tnr_low, _ = clopper_pearson(int(negatives.sum()) - fp, int(negatives.sum()))
    _, fnr_high = clopper_pearson(int(positives.sum()) - tp, int(positives.sum()))
    bounds = [math.log((t - delta) / f) for t, f in ((tpr_low, fpr_high), (tnr_low, fnr_high))
              if t > delta and f > 0]
    return max([0.0, *bounds])


def best_threshold(scores: np.ndarray, signs: np.ndarray, delta: float) -> float:
    """The threshold (among the scores' quantiles) with the largest point-estimate ε."""
    def point(threshold: float) -> float:
        guess = scores > threshold
        tpr = (np.sum(guess & (signs == 1)) + 0.5) / (np.sum(signs == 1) + 1)
        fpr = (np.sum(guess & (signs == 0)) + 0.5) / (np.sum(signs == 0) + 1)
        return max(math.log(max(tpr - delta, 1e-12) / fpr),
                   math.log(max(1 - fpr - delta, 1e-12) / (1 - tpr)))

    candidates = np.unique(np.quantile(scores, np.linspace(0.01, 0.99, 99)))
    return float(max(candidates, key=point))


@dataclass
class AuditResult:
    setting: Setting
    trials: int
    claimed_epsilon: float
    empirical: dict[str, float]  # attacker -> ε lower bound
    #: what a perfect attacker would show on these trials (right on every trial the canary
    #: took part in): the most this many trials can reveal
    ceiling: float = math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.setting.label, "mode": self.setting.mode,
                "clients": self.setting.clients, "fraction": self.setting.fraction,
                "noise_multiplier": self.setting.noise_multiplier, "clip": self.setting.clip,
                "delta": self.setting.delta, "trials_per_sign": self.trials,
                "claimed_epsilon": self.claimed_epsilon, "empirical_epsilon_lower": self.empirical,
                "ceiling_of_these_trials": self.ceiling}


def audit(setting: Setting, trials: int, source: NoiseSource | None = None,
          calibration: float = 0.3) -> AuditResult:
    """`trials` rounds with the canary at +clip and as many at -clip, a fresh seed (and, with
    the code's own noise, fresh noise) each; each attacker's ε lower bound."""
    rows = [run_trial(setting, sign, seed=2 * t + sign, source=source)
            for t in range(trials) for sign in (0, 1)]
    signs = np.array([r.sign for r in rows])
    split = int(len(rows) * calibration)
    empirical = {}
    for attacker in ATTACKERS:
        scores = np.array([r.scores[attacker] for r in rows])
        threshold = best_threshold(scores[:split], signs[:split], setting.delta)
        empirical[attacker] = epsilon_lower_bound(scores[split:], signs[split:], threshold,
                                                  setting.delta)
    perfect = np.array([float(r.sign and r.took_part) for r in rows])
    ceiling = epsilon_lower_bound(perfect[split:], signs[split:], 0.5, setting.delta)
    claimed = {r.claimed_epsilon for r in rows}
    return AuditResult(setting, trials, max(claimed), empirical, ceiling)
