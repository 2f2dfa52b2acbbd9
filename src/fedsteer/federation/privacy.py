"""Client-level differential privacy on every payload, with a library's accountant.

Each client clips what it sends and adds Gaussian noise before the reply leaves it, so
the guarantee holds against the server too (no trusted aggregator). The unit of privacy
is one client's whole dataset.

- The *update* is what is clipped: an array the round's message also carries (e.g. the
  global coefficients) is sent as `global + noisy(clip(local - global))`; an array with no
  global counterpart (e.g. context vectors) is clipped as it is.
- Each array record is clipped to L2 norm `clip` and gets N(0, (z·clip)²) noise on every
  coordinate, so a reply with k array records is a Gaussian mechanism of noise multiplier
  z/√k; numbers in metric records are dropped (they would leak unprotected).
- Adjacency: two federations that differ in one client's whole dataset (replace-one). The
  server sees each client's reply, so replacing a client can move its clipped update from
  any point of the clip ball to any other: sensitivity 2·clip, and each round is accounted as
  a Gaussian mechanism of noise multiplier z/(2√k). Add/remove adjacency (sensitivity clip,
  z/√k) holds only when the server sees no more than the sum (SecAgg+), and is refused
  otherwise. The record states which was used (`privacy.adjacency`).
- ε at δ comes from Google's `dp_accounting` (Rényi DP), composed over the rounds that
  actually ran; `noise_for_epsilon` calibrates z for a target ε with the same library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord, RecordDict

#: adjacency -> L2 sensitivity of one client's clipped reply, in units of its clip norm
SENSITIVITY = {"replace-one": 2.0, "add-remove": 1.0}


@dataclass
class ClientDP:
    """Clip each array record of a reply to `clip`, add noise of std `noise_multiplier·clip`.

    `record_clips` sets the bound of named records apart (IFed-ICL's context vectors have
    a norm near 60 on qwen2.5-coder-0.5b, a round's coefficient update nearer 1).
    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    record_clips: dict[str, float] = field(default_factory=dict)
    adjacency: str = "replace-one"  # or "add-remove" (only when the server sees just the sum)

    @property
    def sensitivity(self) -> float:
        """How far one client can move its reply, in units of the clip norm."""
        return SENSITIVITY[self.adjacency]

    def __post_init__(self) -> None:
        if self.adjacency not in SENSITIVITY:
            raise ValueError(f"dp adjacency {self.adjacency!r}: use one of {list(SENSITIVITY)}")
        if self.clip <= 0 or any(c <= 0 for c in self.record_clips.values()):
            raise ValueError(f"dp clip norms must be > 0, got {self.clip}, {self.record_clips}")
        if self.noise_multiplier < 0:
            raise ValueError(f"dp noise multiplier must be >= 0, got {self.noise_multiplier}")

    def privatize(self, reply: RecordDict, message: RecordDict, rng: np.random.Generator
                  ) -> RecordDict:
        """The reply as it may leave the client: clipped, noised, metrics dropped."""
        private = RecordDict()
        for name, record in reply.array_records.items():
            clip = self.record_clips.get(name, self.clip)
            private[name] = self._record(record, message.array_records.get(name), clip, rng)
        for name, record in reply.config_records.items():
            private[name] = record
        return private

    def _record(self, record: ArrayRecord, reference: ArrayRecord | None, clip: float,
                rng: np.random.Generator) -> ArrayRecord:
        """Clip the record's update as one vector (all its arrays), then add noise."""
        base, updates, norm = record_update(record, reference)
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        sigma = self.noise_multiplier * clip
        return ArrayRecord({
            key: Array((base[key] + u * scale + rng.normal(0.0, sigma, u.shape))
                       .astype(np.dtype(record[key].dtype)))
            for key, u in updates.items()
        })


def record_update(record: ArrayRecord, reference: ArrayRecord | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """What a reply record changes: the global arrays it updates (zeros where the message
    has none), the update per array (float64), and the update's L2 norm over all arrays —
    what clipping bounds, on the client and when the server checks it."""
    arrays = {key: array.numpy() for key, array in record.items()}
    base = {key: global_array(reference, key, value.shape) for key, value in arrays.items()}
    updates = {key: arrays[key].astype(np.float64) - base[key] for key in arrays}
    return base, updates, math.sqrt(sum(float(np.sum(u * u)) for u in updates.values()))


def update_norms(reply: RecordDict, message: RecordDict) -> dict[str, float]:
    """Per array record of a reply, the L2 norm of its update (`record_update`)."""
    return {name: record_update(record, message.array_records.get(name))[2]
            for name, record in reply.array_records.items()}


def global_array(reference: ArrayRecord | None, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The global array a reply's array of `shape` updates (float64), or zeros when the
    message has none like it."""
    if reference is not None and key in reference:
        ref = reference[key].numpy()
        if tuple(ref.shape) == tuple(shape):
            return ref.astype(np.float64)
    return np.zeros(shape, np.float64)


def privatize_reply(dp: ClientDP | None, reply: RecordDict, message: RecordDict, *,
                    seed: int, rnd: int, cid: int) -> RecordDict:
    """What every runtime does to a reply on the client's side before it is sent."""
    if dp is None:
        return reply
    from fedsteer.methods.base import seeded_rng

    return dp.privatize(reply, message, seeded_rng(seed, "dp", rnd, cid))


@dataclass
class PrivacyLedger:
    """The run's privacy spending: one Gaussian event per round, composed by `dp_accounting`."""

    dp: ClientDP
    noise_multipliers: list[float] = field(default_factory=list)

    def record_round(self, array_records: int, sampled: int = 0) -> None:
        """One round's release (`sampled` is unused: each client noises its own reply)."""
        if array_records:  # k records, each its own clip: one mechanism of z/(s·√k)
            self.noise_multipliers.append(
                self.dp.noise_multiplier / (self.dp.sensitivity * math.sqrt(array_records)))

    def epsilon(self) -> float:
        return epsilon_for(self.noise_multipliers, self.dp.delta)

    def summary(self) -> dict[str, float | int]:
        """The result record's `privacy` block."""
        return {"mode": "local", "epsilon": self.epsilon(), "delta": self.dp.delta,
                "clip": self.dp.clip,
                "record_clips": self.dp.record_clips,
                "noise_multiplier": self.dp.noise_multiplier,
                "adjacency": self.dp.adjacency, "sensitivity_in_clips": self.dp.sensitivity,
                "rounds_accounted": len(self.noise_multipliers)}


def epsilon_for(noise_multipliers: list[float], delta: float) -> float:
    """ε at δ of the composition of Gaussian mechanisms with these noise multipliers."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) == 0:
        return math.inf
    accountant = rdp.RdpAccountant()
    for z in noise_multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(epsilon: float, delta: float, rounds: int,
                      adjacency: str = "replace-one") -> float:
    """The noise multiplier z (in units of the clip) whose `rounds`-fold composition spends
    exactly ε at δ under `adjacency` (one array record per reply)."""
    if math.isinf(epsilon):
        return 0.0
    return SENSITIVITY[adjacency] * float(dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda z: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds),
        epsilon, delta,
    ))


# ------------------------------------------------------------------ central DP
@dataclass
class CentralDP:
    """Central DP: clients clip (no noise), the server adds Gaussian noise once to the mean.

    Flower's fixed-clipping recipe (`DifferentialPrivacyClientSideFixedClipping` with
    `fixedclipping_mod`): each client clips its update to `clip` (per array record; the
    update of a record the message also carries, as `ClientDP` does), every reply weighs the
    same, and the server adds N(0, σ²) with σ = `compute_stdv(z, clip, m)` = z·clip/m to the
    mean of the m replies. Here the noise N(0, (z·clip)²) joins the running sum with the
    first reply folded, which is the same distribution on the mean and needs no list of the
    replies. In process the server sees each clipped reply (it is trusted; the guarantee
    holds against everyone who sees the results); on Flower with `--secagg` it sees only
    SecAgg+'s mean of the clipped replies, and the noise, σ = z·clip/m, joins that mean.

    Accounted with Flower's RDP accountant (Google's `dp_accounting` underneath) over the
    rounds that ran, in the three pairs it supports: all clients each round → no
    amplification, add-or-remove-one adjacency (sensitivity clip); `--sampling poisson` at
    rate q → Poisson amplification, add-or-remove-one, and the mean divides by q·N (not by
    who came, which would reveal it); a fixed-size sample of m of N → sampling without
    replacement, replace-one adjacency (sensitivity 2·clip).
    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    record_clips: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.clip <= 0 or any(c <= 0 for c in self.record_clips.values()):
            raise ValueError(f"dp clip norms must be > 0, got {self.clip}, {self.record_clips}")
        if self.noise_multiplier < 0:
            raise ValueError(f"dp noise multiplier must be >= 0, got {self.noise_multiplier}")

    def client_side(self) -> ClientDP:
        """What each client does: clip, add nothing (the server's noise is the mechanism)."""
        return ClientDP(self.clip, 0.0, self.delta, self.record_clips)

    def unclipped(self, norms: dict[str, float], slack: float = 1e-4) -> str | None:
        """Why a reply (or a secure mean of clipped replies), whose records' update norms
        are `norms` (`update_norms`), is not clipped as promised (the server checks: its
        sensitivity, hence ε, rests on it), or None."""
        for name, norm in norms.items():
            clip = self.record_clips.get(name, self.clip)
            if norm > clip * (1 + slack):
                return f"record {name!r} update norm {norm:.4g} exceeds the DP clip {clip:g}"
        return None

    def noised(self, reply: RecordDict, rng: np.random.Generator, replies: int = 1
               ) -> RecordDict:
        """`reply` — one client's, or the mean of `replies` that SecAgg+ handed over — with
        the round's noise added to each array record, σ = z·clip/`replies` (Flower's
        `compute_stdv`): one reply folded into a mean of m carries σ = z·clip/m to it too."""
        from flwr.supercore.differential_privacy import compute_stdv

        noisy = RecordDict()
        for name, record in reply.items():
            if isinstance(record, ArrayRecord):
                sigma = compute_stdv(self.noise_multiplier,
                                     self.record_clips.get(name, self.clip), replies)
                record = ArrayRecord({k: Array((a.numpy() + rng.normal(0.0, sigma, a.shape))
                                               .astype(a.numpy().dtype))
                                      for k, a in record.items()})
            noisy[name] = record
        return noisy


@dataclass
class CentralLedger:
    """Central DP's spending: one sampled Gaussian release per round, Flower's accountant."""

    dp: CentralDP
    population: int
    #: Poisson sampling's rate (`--sampling poisson`); None: a fixed-size sample, or everyone
    poisson_rate: float | None = None
    #: per round: z/√k (k array records, each with its own clip) and the clients sampled
    releases: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.poisson_rate is not None:
            expected = self.poisson_rate * self.population
            if abs(expected - round(expected)) > 1e-9 or round(expected) < 1:
                raise ValueError(
                    f"Poisson sampling at fraction {self.poisson_rate:g} of {self.population} "
                    "clients: fraction × clients must be a whole number ≥ 1 (the accountant's "
                    "expected sample size)")

    def record_round(self, array_records: int, sampled: int) -> None:
        if self.poisson_rate is not None:  # a release every round, whoever the draw picked
            sampled = round(self.poisson_rate * self.population)
        if array_records and sampled:
            self.releases.append((self.dp.noise_multiplier / math.sqrt(array_records),
                                  min(sampled, self.population)))

    @property
    def sampling(self) -> str:
        if self.poisson_rate is not None:
            return "poisson"
        return "none" if all(m >= self.population for _, m in self.releases) else "fixed"

    @property
    def sensitivity(self) -> float:
        """In clips: a client added or removed moves the sum by clip, one replaced by 2·clip.
        Fixed-size samples are accounted under replacement, the rest under add/remove."""
        return 2.0 if self.sampling == "fixed" else 1.0

    def epsilon(self) -> float:
        if not self.releases:
            return 0.0
        if min(z for z, _ in self.releases) == 0:
            return math.inf
        return float(self._accountant().get_epsilon(self.dp.delta))

    def _accountant(self):
        from flwr.supercore.privacy_accounting import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        method, relation = {
            "none": (SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE),
            "poisson": (SamplingMethod.POISSON, NeighboringRelation.ADD_OR_REMOVE_ONE),
            "fixed": (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE),
        }[self.sampling]
        accountant = RdpAccountant(PrivacyConfig(self.dp.delta, self.population, relation,
                                                 method))
        for z, sampled in self.releases:
            accountant.compose(GaussianPrivacyEvent(z / self.sensitivity, sampled,
                                                    self.population))
        return accountant

    def summary(self) -> dict[str, Any]:
        """The result record's `privacy` block."""
        return {"mode": "central", "epsilon": self.epsilon(), "delta": self.dp.delta,
                "clip": self.dp.clip, "record_clips": self.dp.record_clips,
                "noise_multiplier": self.dp.noise_multiplier,
                "adjacency": "replace-one" if self.sampling == "fixed" else "add-remove",
                "sensitivity_in_clips": self.sensitivity,
                "sampling": self._sampling_note(),
                "population": self.population, "rounds_accounted": len(self.releases)}

    def _sampling_note(self) -> str:
        if self.poisson_rate is not None:
            return f"poisson, rate {self.poisson_rate:g}"
        return {"none": "none (every client)",
                "fixed": "fixed size, without replacement"}[self.sampling]


def noise_for_target(epsilon: float, ledger_for: Any, rounds: int, array_records: int = 1,
                     sampled: int | None = None) -> float:
    """The noise multiplier z at which `ledger_for(z)`, after `rounds` releases of
    `sampled` clients (None: all), spends ε — found by bisection on the ledger itself, so
    calibration and the record can never disagree."""
    if math.isinf(epsilon):
        return 0.0

    def spent(z: float) -> float:
        ledger = ledger_for(z)
        for _ in range(rounds):
            ledger.record_round(array_records, sampled or ledger.population)
        return ledger.epsilon()

    low, high = 1e-3, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) > epsilon else (low, middle)
    return high
