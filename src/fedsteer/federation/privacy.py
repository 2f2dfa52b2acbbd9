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
- A public reference: when the method can compute a reply from public, data-free input
  (`Method.reference_reply`, e.g. IFed-ICL's vectors of the template with an empty input),
  the runtime sends it with the round's message, so what is clipped and noised is each
  reply's deviation from it; the mean is unchanged, the clip (hence the noise) shorter.
- Relative clips (`relative_clips`, κ per record): each row of each array of the record is
  clipped to κ × that row's norm in the reference (public, so the clip reads no private
  data), and its noise is z·√R times its clip (R rows): the record is then one Gaussian
  mechanism of multiplier z, as a record clipped as a whole, with its noise shared out
  like its rows' size (IFed-ICL's first layers' vectors are 100× shorter than its last's).
- Per-record noise (`record_noise`): each record its own multiplier z_i; a round releasing
  records i is one Gaussian mechanism of multiplier 1/(s·√Σ 1/z_i²) (each record scaled by
  its own noise, the joint sensitivity is s·√Σ 1/z_i²): most of ε can go to a record sent
  once (the vectors), little to one sent every round (coefficients).
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
    #: per-record noise multipliers (default `noise_multiplier`)
    record_noise: dict[str, float] = field(default_factory=dict)
    #: κ per record: clip each row to κ × the reference's row norm (`row_clips`)
    relative_clips: dict[str, float] = field(default_factory=dict)

    @property
    def sensitivity(self) -> float:
        """How far one client can move its reply, in units of the clip norm."""
        return SENSITIVITY[self.adjacency]

    def __post_init__(self) -> None:
        check_adjacency(self.adjacency)
        check_dp_numbers(self)

    def noise_for(self, name: str) -> float:
        """The noise multiplier of record `name`."""
        return self.record_noise.get(name, self.noise_multiplier)

    def privatize(self, reply: RecordDict, message: RecordDict, rng: np.random.Generator
                  ) -> RecordDict:
        """The reply as it may leave the client: clipped, noised, metrics dropped."""
        private = RecordDict()
        for name, record in reply.array_records.items():
            reference = message.array_records.get(name)
            private[name] = self._record(record, reference, clips_of(self, name, reference),
                                         self.noise_for(name), rng)
        for name, record in reply.config_records.items():
            private[name] = record
        return private

    @staticmethod
    def _record(record: ArrayRecord, reference: ArrayRecord | None,
                clips: float | dict[str, np.ndarray], z: float, rng: np.random.Generator
                ) -> ArrayRecord:
        """Clip the record's update as one vector (all its arrays; or row by row, to
        `clips` per array), then add noise (`noise_std`)."""
        base, updates, norm = record_update(record, reference)
        out = {}
        for key, u in updates.items():
            if isinstance(clips, dict):  # row by row
                rows = u.reshape(u.shape[0], -1) if u.ndim else u.reshape(1, 1)
                norms = np.linalg.norm(rows, axis=1)
                limit = clips[key].reshape(-1)
                scale = np.where(norms > limit, limit / np.maximum(norms, 1e-300), 1.0)
                clipped = (rows * scale[:, None]).reshape(u.shape)
            else:
                clipped = u * (min(1.0, clips / norm) if norm > 0 else 1.0)
            noise = rng.normal(0.0, 1.0, u.shape) * noise_std(z, clips, key, u.shape)
            out[key] = Array((base[key] + clipped + noise).astype(np.dtype(record[key].dtype)))
        return ArrayRecord(out)


def check_dp_numbers(dp: Any) -> None:
    """Refuse clips, κ or noise multipliers a Gaussian mechanism cannot be built from."""
    if dp.clip <= 0 or any(c <= 0 for c in dp.record_clips.values()):
        raise ValueError(f"dp clip norms must be > 0, got {dp.clip}, {dp.record_clips}")
    if any(k <= 0 for k in dp.relative_clips.values()):
        raise ValueError(f"dp relative clips (κ) must be > 0, got {dp.relative_clips}")
    if dp.noise_multiplier < 0 or any(z < 0 for z in dp.record_noise.values()):
        raise ValueError(f"dp noise multipliers must be >= 0, got {dp.noise_multiplier}, "
                         f"{dp.record_noise}")


def row_clips(reference: ArrayRecord, kappa: float) -> dict[str, np.ndarray]:
    """Per array of a record, the clip of each of its rows: κ × the reference's row norm
    (the reference is public: the clip reads no client's data)."""
    clips = {}
    for key, array in reference.items():
        value = array.numpy().astype(np.float64)
        rows = value.reshape(value.shape[0], -1) if value.ndim else value.reshape(1, 1)
        clips[key] = kappa * np.linalg.norm(rows, axis=1)
    return clips


def clips_of(dp: Any, name: str, reference: ArrayRecord | None
             ) -> float | dict[str, np.ndarray]:
    """Record `name`'s clip: one norm for the whole update, or per row (`row_clips`) when
    the record has a relative clip and the message carries its reference."""
    if name in dp.relative_clips:
        if reference is None:
            raise ValueError(f"record {name!r} has a relative dp clip but the round's message "
                             "carries no reference for it")
        return row_clips(reference, dp.relative_clips[name])
    return dp.record_clips.get(name, dp.clip)


def noise_std(z: float, clips: float | dict[str, np.ndarray], key: str,
              shape: tuple[int, ...]) -> float | np.ndarray:
    """The std of the noise on array `key` of a record clipped to `clips`: z·clip for a
    whole-record clip; per row, z·√R·clip_row (R rows in the record), so the record is one
    Gaussian of multiplier z whatever the rows' clips (each row scaled by its noise has
    sensitivity 2·clip_row/(z·√R·clip_row), √R rows of it: 2/z)."""
    if not isinstance(clips, dict):
        return z * clips
    rows = sum(c.size for c in clips.values())
    std = z * math.sqrt(rows) * clips[key]
    return std.reshape((-1,) + (1,) * (len(shape) - 1)) if len(shape) else std.reshape(())


def row_problem(clips: dict[str, np.ndarray], updates: dict[str, np.ndarray], slack: float
                ) -> bool:
    """True when a row of an update exceeds its clip (`row_clips`)."""
    for key, u in updates.items():
        rows = u.reshape(u.shape[0], -1) if u.ndim else u.reshape(1, 1)
        if np.any(np.linalg.norm(rows, axis=1) > clips[key].reshape(-1) * (1 + slack) + 1e-12):
            return True
    return False


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
    #: per record: the multiplier of each of its releases (z_i/s)
    per_record: dict[str, list[float]] = field(default_factory=dict)
    #: per record sent with a public reference: what the reference was
    references: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record_round(self, array_records: int, sampled: int = 0,
                     names: list[str] | None = None) -> None:
        """One round's release (`sampled` is unused: each client noises its own reply, and
        a round no reply reached released nothing)."""
        if array_records:
            self.noise_multipliers.append(round_multiplier(self, array_records, names))

    def epsilon(self) -> float:
        return epsilon_for(self.noise_multipliers, self.dp.delta)

    def summary(self) -> dict[str, float | int]:
        """The result record's `privacy` block."""
        return {"mode": "local", "epsilon": self.epsilon(), "delta": self.dp.delta,
                "clip": self.dp.clip,
                "record_clips": self.dp.record_clips,
                "noise_multiplier": self.dp.noise_multiplier,
                **per_record_summary(self),
                "adjacency": self.dp.adjacency, "sensitivity_in_clips": self.dp.sensitivity,
                "noise_source": NOISE_SOURCE, "amplification": NO_AMPLIFICATION,
                "rounds_accounted": len(self.noise_multipliers)}


def round_multiplier(ledger: Any, array_records: int, names: list[str] | None) -> float:
    """One round's Gaussian multiplier: records i, each its own clip and noise z_i, make
    one mechanism of 1/(s·√Σ 1/z_i²) (z/(s·√k) when all share z; s = 2, replace-one).
    Without names (an older record), k records of the common z. Each record's own
    multiplier z_i/s joins `ledger.per_record`."""
    dp, s = ledger.dp, SENSITIVITY["replace-one"]
    zs = ([dp.noise_for(name) for name in names] if names
          else [dp.noise_multiplier] * array_records)
    for name, z in zip(names or [], zs, strict=False):
        ledger.per_record.setdefault(name, []).append(z / s)
    if min(zs) == 0:
        return 0.0
    return 1.0 / (s * math.sqrt(sum(1.0 / z**2 for z in zs)))


def per_record_summary(ledger: Any) -> dict[str, Any]:
    """What the privacy block says of each record: its noise multiplier, relative clip (κ),
    the ε its releases alone spend, and the public reference it was sent with."""
    dp = ledger.dp
    return {"record_noise": {name: dp.noise_for(name) for name in sorted(ledger.per_record)},
            "relative_clips": dp.relative_clips,
            "epsilon_per_record": {name: epsilon_for(zs, dp.delta)
                                   for name, zs in sorted(ledger.per_record.items())},
            "references": ledger.references,
            "unused_settings": unused_settings(dp, ledger.per_record)}


#: each per-record setting and the flag that sets it (`RunConfig.dp_record_noise`, …)
PER_RECORD_FLAGS = {"record_noise": "--dp-noise-record", "relative_clips": "--dp-clip-relative",
                    "record_clips": "--dp-clip-record"}


def unused_settings(dp: Any, released: Any) -> list[str]:
    """Per-record settings that name a record no round released (`coefficients=4` where the
    record is `coef`): the run used the common setting for it. The accounting stays true to
    what ran, but what was asked for never happened, so the record says so."""
    released = sorted(released)
    unused = []
    for setting, flag in PER_RECORD_FLAGS.items():
        for name in sorted(set(getattr(dp, setting)) - set(released)):
            unused.append(f"{flag} {name!r}: no round released a record of that name (this "
                          f"run released {', '.join(released) or 'none'}); it was not used")
    return unused


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
    record_noise: dict[str, float] = field(default_factory=dict)  # as `ClientDP`'s
    relative_clips: dict[str, float] = field(default_factory=dict)  # as `ClientDP`'s

    def __post_init__(self) -> None:
        check_dp_numbers(self)

    def noise_for(self, name: str) -> float:
        """The noise multiplier of record `name`."""
        return self.record_noise.get(name, self.noise_multiplier)

    def client_side(self) -> ClientDP:
        """What each client does: clip, add nothing (the server's noise is the mechanism)."""
        return ClientDP(self.clip, 0.0, self.delta, self.record_clips,
                        relative_clips=self.relative_clips)

    def unclipped(self, norms: dict[str, float], slack: float = 1e-4) -> str | None:
        """Why a reply (or a secure mean of clipped replies), whose records' update norms
        are `norms` (`update_norms`), is not clipped as promised (the server checks: its
        sensitivity, hence ε, rests on it), or None. The reason names no norm: the record
        holds no exact statistic of a client's data. Records clipped row by row are
        checked by `clip_problem`."""
        for name, norm in norms.items():
            if name in self.relative_clips:
                continue
            clip = self.record_clips.get(name, self.clip)
            if norm > clip * (1 + slack):
                return f"record {name!r} update exceeds the DP clip {clip:g}"
        return None

    def clip_problem(self, reply: RecordDict, message: RecordDict, slack: float = 1e-4
                     ) -> str | None:
        """`unclipped` for a reply to `message`, rows of relative-clip records included."""
        problem = self.unclipped(update_norms(reply, message), slack)
        for name, record in reply.array_records.items():
            if problem is None and name in self.relative_clips:
                reference = message.array_records.get(name)
                _, updates, _ = record_update(record, reference)
                if row_problem(clips_of(self, name, reference), updates, slack):
                    problem = (f"record {name!r} update exceeds its DP clip (κ = "
                               f"{self.relative_clips[name]:g} × the reference's rows)")
        return problem

    def noised(self, reply: RecordDict, replies: int = 1,
               rng: np.random.Generator | None = None,
               message: RecordDict | None = None) -> RecordDict:
        """`reply` — one client's, or the mean of `replies` that SecAgg+ handed over — with
        the round's noise added to each array record, σ = z·clip/`replies` (Flower's
        `compute_stdv`): one reply folded into a mean of m carries σ = z·clip/m to it too
        (row by row for a relative-clip record, whose reference `message` carries).
        The noise is drawn from `rng`, by default `noise_rng()` (OS entropy)."""
        rng = rng if rng is not None else noise_rng()
        noisy = RecordDict()
        for name, record in reply.items():
            if isinstance(record, ArrayRecord):
                reference = (message.array_records.get(name) if message is not None else None)
                clips = clips_of(self, name, reference)
                z = self.noise_for(name)
                record = ArrayRecord({
                    k: Array((a.numpy() + rng.normal(0.0, 1.0, a.shape)
                              * noise_std(z, clips, k, a.shape) / replies)
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
    #: per round released: z/(2√k) (k array records, each with its own clip;
    #: `round_multiplier` when records have their own z)
    noise_multipliers: list[float] = field(default_factory=list)
    per_record: dict[str, list[float]] = field(default_factory=dict)  # as `PrivacyLedger`'s
    references: dict[str, dict[str, Any]] = field(default_factory=dict)  # as `PrivacyLedger`'s

    def record_round(self, array_records: int, sampled: int,
                     names: list[str] | None = None) -> None:
        """A round no reply reached (a Poisson draw of nobody) released nothing: no noise,
        nothing spent."""
        if array_records and sampled:
            self.noise_multipliers.append(round_multiplier(self, array_records, names))

    def epsilon(self) -> float:
        return epsilon_for(self.noise_multipliers, self.dp.delta)

    def summary(self) -> dict[str, Any]:
        """The result record's `privacy` block."""
        return {"mode": "central", "epsilon": self.epsilon(), "delta": self.dp.delta,
                "clip": self.dp.clip, "record_clips": self.dp.record_clips,
                "noise_multiplier": self.dp.noise_multiplier,
                **per_record_summary(self),
                "adjacency": "replace-one", "sensitivity_in_clips": SENSITIVITY["replace-one"],
                "noise_source": NOISE_SOURCE, "amplification": NO_AMPLIFICATION,
                "outlier_screens": "off: the clip bounds every reply, and the record holds no "
                                   "statistic of the clipped replies",
                "population": self.population, "rounds_accounted": len(self.noise_multipliers)}


def noise_for_target(epsilon: float, ledger_for: Any, rounds: int, array_records: int = 1,
                     sampled: int | None = None,
                     releases: list[list[str]] | None = None) -> float:
    """The noise multiplier z at which `ledger_for(z)`, after `rounds` releases of
    `sampled` clients (None: all), spends ε — found by bisection on the ledger itself, so
    calibration and the record can never disagree. `releases` names each round's records
    instead (for per-record noise: `ledger_for` then sets each record's z from z)."""
    if math.isinf(epsilon):
        return 0.0

    def spent(z: float) -> float:
        ledger = ledger_for(z)
        for names in releases or [None] * rounds:
            ledger.record_round(len(names) if names else array_records,
                                sampled or ledger.population, names)
        return ledger.epsilon()

    low, high = 1e-3, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) > epsilon else (low, middle)
    return high
