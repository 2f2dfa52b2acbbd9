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
        arrays = {key: array.numpy() for key, array in record.items()}
        base = {key: _reference(reference, key, value) for key, value in arrays.items()}
        updates = {key: arrays[key].astype(np.float64) - base[key] for key in arrays}
        norm = math.sqrt(sum(float(np.sum(u * u)) for u in updates.values()))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        sigma = self.noise_multiplier * clip
        return ArrayRecord({
            key: Array((base[key] + u * scale + rng.normal(0.0, sigma, u.shape))
                       .astype(arrays[key].dtype))
            for key, u in updates.items()
        })


def _reference(reference: ArrayRecord | None, key: str, value: np.ndarray) -> np.ndarray:
    """The global array this reply updates, or zeros when the message has none like it."""
    if reference is not None and key in reference:
        ref = reference[key].numpy()
        if ref.shape == value.shape:
            return ref.astype(np.float64)
    return np.zeros(value.shape, np.float64)


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

    def record_round(self, array_records: int) -> None:
        if array_records:  # k records, each its own clip: one mechanism of z/(s·√k)
            self.noise_multipliers.append(
                self.dp.noise_multiplier / (self.dp.sensitivity * math.sqrt(array_records)))

    def epsilon(self) -> float:
        return epsilon_for(self.noise_multipliers, self.dp.delta)

    def summary(self) -> dict[str, float | int]:
        """The result record's `privacy` block."""
        return {"epsilon": self.epsilon(), "delta": self.dp.delta, "clip": self.dp.clip,
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
