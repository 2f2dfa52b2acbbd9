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
- Adjacency: two federations that differ in one client's whole dataset (replace-one).
  Replacing a client can move its clipped update from any point of the clip ball to any
  other: sensitivity 2·clip, and each round is accounted as a Gaussian mechanism of noise
  multiplier z/(2√k). Add/remove is not offered: the record publishes who took part in
  each round and the population, so one client's presence is no secret to protect.
- No amplification by sampling: the sample is drawn from the run's public seed and
  recorded (`rounds[i].clients`), so every round that released anything is accounted as if
  every client took part.
- The noise is drawn from OS entropy (`noise_rng`), never from the run's seed: noise that
  anyone holding the record could regenerate would protect no one. A DP run is therefore
  not reproducible, by design.
- ε at δ comes from Google's `dp_accounting` (Rényi DP), composed over the rounds that
  actually ran; `noise_for_epsilon` calibrates z for a target ε with the same library.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord, RecordDict

#: adjacency -> L2 sensitivity of one client's clipped reply, in units of its clip norm
#: (add/remove is not offered: the record names who took part, see the module docstring)
SENSITIVITY = {"replace-one": 2.0}
#: what the record says of where the noise comes from and of sampling
NOISE_SOURCE = ("OS entropy (secrets.randbits), not the run's seed: no one can regenerate "
                "it from the record, and a DP run is not reproducible")
NO_AMPLIFICATION = ("none claimed: the sample is drawn from the public seed and recorded, "
                    "so each round is accounted as if every client took part")


def check_adjacency(adjacency: str) -> None:
    """Refuse an adjacency ε cannot be claimed under (see the module docstring)."""
    if adjacency not in SENSITIVITY:
        raise ValueError(f"dp adjacency {adjacency!r}: use replace-one (the record names who "
                         "took part and how many, so add/remove would protect nothing)")


def noise_rng() -> np.random.Generator:
    """The generator every DP noise draw comes from, seeded from OS entropy per draw site:
    noise regenerable from the record's seed would protect no one."""
    return np.random.default_rng(secrets.randbits(128))


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
    adjacency: str = "replace-one"  # the only one offered (see the module docstring)

    @property
    def sensitivity(self) -> float:
        """How far one client can move its reply, in units of the clip norm."""
        return SENSITIVITY[self.adjacency]

    def __post_init__(self) -> None:
        check_adjacency(self.adjacency)
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


def privatize_reply(dp: ClientDP | None, reply: RecordDict, message: RecordDict
                    ) -> RecordDict:
    """What every runtime does to a reply on the client's side before it is sent (its noise
    from `noise_rng`: OS entropy, never the run's seed)."""
    if dp is None:
        return reply
    return dp.privatize(reply, message, noise_rng())


@dataclass
class PrivacyLedger:
    """The run's privacy spending: one Gaussian event per round, composed by `dp_accounting`."""

    dp: ClientDP
    noise_multipliers: list[float] = field(default_factory=list)

    def record_round(self, array_records: int, sampled: int = 0) -> None:
        """One round's release (`sampled` is unused: each client noises its own reply, and
        a round no reply reached released nothing)."""
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
                "noise_source": NOISE_SOURCE, "amplification": NO_AMPLIFICATION,
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
    exactly ε at δ under `adjacency` (replace-one; one array record per reply)."""
    check_adjacency(adjacency)
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
    replies — which is why the method's rule must be that mean (a robust rule could drop
    the noised reply; `experiment.check_settings` refuses one). In process the server sees
    each clipped reply (it is trusted; the guarantee holds against everyone who sees the
    results); on Flower with `--secagg` it sees only SecAgg+'s mean of the clipped replies,
    and the noise, σ = z·clip/m, joins that mean. The noise comes from `noise_rng`.

    Accounted as `ClientDP` is: replace-one adjacency (the mean of m replies, m public,
    moves by at most 2·clip/m when one client's data is swapped, so each round is a Gaussian
    of noise multiplier z/(2√k)), no amplification by sampling (the sample is public), over
    the rounds that released anything. The server's outlier screens are off and the record
    holds no statistic of the clipped replies (`ReplyChecks`): the clip bounds every reply.
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
        sensitivity, hence ε, rests on it), or None. The reason names no norm: the record
        holds no exact statistic of a client's data."""
        for name, norm in norms.items():
            clip = self.record_clips.get(name, self.clip)
            if norm > clip * (1 + slack):
                return f"record {name!r} update exceeds the DP clip {clip:g}"
        return None

    def noised(self, reply: RecordDict, replies: int = 1,
               rng: np.random.Generator | None = None) -> RecordDict:
        """`reply` — one client's, or the mean of `replies` that SecAgg+ handed over — with
        the round's noise added to each array record, σ = z·clip/`replies` (Flower's
        `compute_stdv`): one reply folded into a mean of m carries σ = z·clip/m to it too.
        The noise is drawn from `rng`, by default `noise_rng()` (OS entropy)."""
        from flwr.supercore.differential_privacy import compute_stdv

        rng = rng if rng is not None else noise_rng()
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
    """Central DP's spending: one Gaussian release per round that folded any reply, replace-one
    (z/(2√k) for k array records), no amplification by the public sample."""

    dp: CentralDP
    population: int
    #: per round released: z/(2√k) (k array records, each with its own clip)
    noise_multipliers: list[float] = field(default_factory=list)

    def record_round(self, array_records: int, sampled: int) -> None:
        """A round no reply reached (a Poisson draw of nobody) released nothing: no noise,
        nothing spent."""
        if array_records and sampled:
            self.noise_multipliers.append(
                self.dp.noise_multiplier / (SENSITIVITY["replace-one"] * math.sqrt(array_records)))

    def epsilon(self) -> float:
        return epsilon_for(self.noise_multipliers, self.dp.delta)

    def summary(self) -> dict[str, Any]:
        """The result record's `privacy` block."""
        return {"mode": "central", "epsilon": self.epsilon(), "delta": self.dp.delta,
                "clip": self.dp.clip, "record_clips": self.dp.record_clips,
                "noise_multiplier": self.dp.noise_multiplier,
                "adjacency": "replace-one", "sensitivity_in_clips": SENSITIVITY["replace-one"],
                "noise_source": NOISE_SOURCE, "amplification": NO_AMPLIFICATION,
                "outlier_screens": "off: the clip bounds every reply, and the record holds no "
                                   "statistic of the clipped replies",
                "population": self.population, "rounds_accounted": len(self.noise_multipliers)}


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
