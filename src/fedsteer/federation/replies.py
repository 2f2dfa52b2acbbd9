"""One round's replies on their way from the transport to the method's aggregator.

The server holds one reply at a time, whatever the number of clients. Each reply a runtime
offers is checked on arrival (shapes, NaN/Inf, the absolute norm bound, the method's own
checks), and then:

- folded into the method's `Aggregator` at once, when no check still to come needs the
  other replies (outlier screens off, `reply_norm_factor=0`, and an explicit
  `max_client_weight` or a uniform mean, where no weight is capped): nothing of the reply
  is kept but its norms;
- otherwise written to a spool on disk, keeping only scalars in memory. The round-level
  checks need every reply: the outlier screens compare each reply's norms with the round's
  median norm and its distance to the coordinate-wise median with the median distance, and
  the default weight cap needs the round's median and total weight. At `close` they run on
  those scalars
  and on the spooled arrays, read a block of coordinates at a time, and the replies that
  pass are read back one by one, in client order, into the aggregator.

Either way the result equals holding every reply and checking them together (the previous
behaviour): the same replies kept, with the same weights, folded in the same order.
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedsteer.eval.costs import RoundCost, payload_bytes
from fedsteer.federation.payloads import InvalidReply, check_reply, example_count
from fedsteer.federation.privacy import CentralDP, update_norms
from fedsteer.methods.base import Aggregator, Method, Reply

log = logging.getLogger(__name__)

#: values of one block of the distance screen (all replies × a slice of coordinates)
BLOCK_VALUES = 1 << 23  # 64 MB of float64
#: the default weight cap's first part: this many times the round's lower median weight
MEDIAN_WEIGHT_FACTOR = 10


def lower_median(values: Sequence[float]) -> float:
    """The median that is always one of the values (the lower middle for an even count), so
    with two replies the honest one, not their mean, sets the scale."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def record_norms(content: RecordDict) -> dict[str, float]:
    """The L2 norm of each array record of a reply (all its arrays together)."""
    norms = {}
    for name, record in content.array_records.items():
        squared = sum(float(np.sum(np.square(a.numpy(), dtype=np.float64)))
                      for a in record.values())
        norms[name] = math.sqrt(squared)
    return norms


def reject(cost: RoundCost, cid: int, reason: str) -> None:
    """Leave a reply out of the round: logged, and recorded with its reason in the costs."""
    log.warning("round %d: rejected client %d: %s", cost.round, cid, reason)
    cost.rejected.append({"cid": cid, "reason": reason})


def checked(check: Callable[[RecordDict], str | None], content: RecordDict) -> str | None:
    """A method's (or aggregator's) own check of a reply; one that fails on a reply it did
    not foresee (a record missing, a string where it reads a number) rejects that reply,
    not the run."""
    try:
        return check(content)
    except Exception as error:  # noqa: BLE001 - a malformed reply is rejected, not fatal
        return f"reply check failed: {error!r}"


@dataclass
class Kept:
    """What the server keeps of an accepted reply until the round closes: scalars, and the
    reply's slot in the spool (-1: already folded in), never the reply itself."""

    cid: int
    num_examples: int
    norms: dict[str, float]
    array_records: int
    slot: int = -1
    update_norms: dict[str, float] = field(default_factory=dict)  # of updates, per record


class ReplySpool:
    """Replies waiting on disk for the round's checks: one file of raw array bytes each; how
    to rebuild a reply (array names, dtypes, shapes, offsets; its small non-array records)
    stays in memory."""

    def __init__(self, root: Path | None = None) -> None:
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".replies-", dir=root))
        self.layouts: list[dict[str, Any]] = []

    def put(self, content: RecordDict) -> int:
        slot, layout, offset = len(self.layouts), {}, 0
        with (self.dir / f"{slot}.bin").open("wb") as out:
            for key, record in content.items():
                if not isinstance(record, ArrayRecord):
                    layout[key] = record
                    continue
                entries = []
                for name, array in record.items():
                    value = np.ascontiguousarray(array.numpy())
                    out.write(value.tobytes())
                    entries.append((name, value.dtype, value.shape, offset))
                    offset += value.nbytes
                layout[key] = entries
        self.layouts.append(layout)
        return slot

    def load(self, slot: int) -> RecordDict:
        data, content = (self.dir / f"{slot}.bin").read_bytes(), RecordDict()
        for key, part in self.layouts[slot].items():
            if not isinstance(part, list):
                content[key] = part
                continue
            content[key] = ArrayRecord({
                name: Array(np.frombuffer(data, dtype, math.prod(shape), offset).reshape(shape))
                for name, dtype, shape, offset in part})
        return content

    def lengths(self, slot: int) -> dict[str, int]:
        """Values of each array record holding arrays (the flat vector the screen compares)."""
        return {key: sum(math.prod(shape) for _, _, shape, _ in part)
                for key, part in self.layouts[slot].items() if isinstance(part, list) and part}

    def segment(self, slot: int, record: str, start: int, stop: int) -> np.ndarray:
        """Values `start:stop` of a record's arrays, flattened and joined, as float64."""
        parts, position = [], 0
        with (self.dir / f"{slot}.bin").open("rb") as data:
            for _, dtype, shape, offset in self.layouts[slot][record]:
                size = math.prod(shape)
                low, high = max(start, position), min(stop, position + size)
                if low < high:
                    data.seek(offset + (low - position) * dtype.itemsize)
                    chunk = data.read((high - low) * dtype.itemsize)
                    parts.append(np.frombuffer(chunk, dtype).astype(np.float64))
                position += size
        return np.concatenate(parts) if parts else np.zeros(0)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def spooled_distances(kept: list[Kept], spool: ReplySpool) -> list[dict[str, float]]:
    """Each reply's L2 distance to the coordinate-wise median of the replies, per record held
    by all, a block of coordinates at a time (one block: the same arithmetic as at once)."""
    names = set.intersection(*(set(spool.lengths(k.slot)) for k in kept))
    squares = [dict.fromkeys(names, 0.0) for _ in kept]
    step = max(1, BLOCK_VALUES // len(kept))
    for name in sorted(names):
        for start in range(0, spool.lengths(kept[0].slot)[name], step):
            block = np.stack([spool.segment(k.slot, name, start, start + step) for k in kept])
            for square, row in zip(squares, block - np.median(block, axis=0), strict=True):
                square[name] += float(row.dot(row))
    return [{name: math.sqrt(v) for name, v in square.items()} for square in squares]


def keep_within(kept: list[Kept], values: list[dict[str, float]], factor: float,
                cost: RoundCost, what: str) -> list[Kept]:
    """Drop each reply with a record's value above `factor` × that record's lower median."""
    scale = {name: lower_median([v[name] for v in values if name in v])
             for name in set().union(*values)}
    out = []
    for entry, value in zip(kept, values, strict=True):
        over = [f"{name} {what} {x:.4g} > {factor:g} × median {scale[name]:.4g}"
                for name, x in value.items() if x > factor * scale[name] and x > 1e-12]
        if over:
            reject(cost, entry.cid, "; ".join(over))
        else:
            out.append(entry)
    return out


def screen_outliers(kept: list[Kept], factor: float, cost: RoundCost,
                    spool: ReplySpool | None) -> list[Kept]:
    """Drop replies with a record that is `factor` times larger than the round's typical one
    (its norm against the lower median norm) or `factor` times farther from the others (its
    distance to the coordinate-wise median against the lower median distance): a huge reply,
    and one of honest size pointing elsewhere (a sign flip), are left out (how much weight a
    reply that passes may carry: `cap_weights`)."""
    if not factor or len(kept) < 2:
        return kept
    kept = keep_within(kept, [k.norms for k in kept], factor, cost, "norm")
    if len(kept) < 3 or spool is None:  # with two, the median distance cannot tell who is odd
        return kept
    return keep_within(kept, spooled_distances(kept, spool), factor, cost,
                       "distance to the median")


def default_weight_limits(weights: Sequence[int]) -> list[int]:
    """Each reply's weight limit when no cap is given: 10 × the round's lower median weight,
    and no more than all the other replies together (as so capped). A claim moves neither
    its own limit nor the median (while a majority is honest), so one party cannot outweigh
    the rest: it holds at most half the total weight, and among many at most 10 × the
    median (10/109 of a round with 99 equal others). Only the largest reply can exceed
    half, so it alone is cut to the rest. One reply alone is the mean, whatever it weighs."""
    if len(weights) < 2:
        return list(weights)
    median_cap = MEDIAN_WEIGHT_FACTOR * lower_median(weights)
    median_capped = [min(w, median_cap) for w in weights]
    total = sum(median_capped)
    return [min(w, total - w) for w in median_capped]


def cap_weights(kept: list[Kept], cap: float | None, cost: RoundCost) -> list[Kept]:
    """No reply weighs more than `cap` examples, or by default than `default_weight_limits`
    (10 × the round's lower median weight, and than all the other replies together)."""
    if not kept:
        return kept
    limits = ([cap] * len(kept) if cap is not None
              else default_weight_limits([k.num_examples for k in kept]))
    for entry, limit in zip(kept, limits, strict=True):
        if entry.num_examples > limit:
            log.warning("round %d: client %s claims %d examples; weighed as %d",
                        cost.round, entry.cid, entry.num_examples, int(limit))
            cost.capped.append({"cid": entry.cid, "claimed": entry.num_examples,
                                "weight": int(limit)})
            entry.num_examples = int(limit)
    return kept


class RoundReplies:
    """The replies of one round: checked as they come (`offer`), folded into the method's
    aggregator at once or spooled until the round-level checks (`close`), then the new state
    (`result`). See the module's docstring for which, and why the result is the same."""

    def __init__(self, method: Method, message: RecordDict, aggregator: Aggregator,
                 cost: RoundCost, settings: ReplyChecks) -> None:
        self.method, self.message, self.aggregator = method, message, aggregator
        self.cost, self.checks = cost, settings
        self.kept: list[Kept] = []
        self.spool: ReplySpool | None = None
        self.fold_seconds = 0.0
        self.noised = False  # central DP's noise has joined the sum
        self.weighted = method.reply_weighting(message) == "examples"
        #: every check decided reply by reply: fold on arrival, keep nothing (the default
        #: cap needs the round's median and total weight, but only where weights count)
        self.direct = not settings.factor and (settings.max_weight is not None
                                               or not self.weighted)

    def offer(self, cid: int, content: Any, num_examples: int) -> bool:
        """Check a reply before the server may use it; a bad one is logged and left out."""
        try:
            num_examples = example_count(num_examples)  # its weight, as the client claims
            check_reply(content, self.method.reply_shapes(self.message), self.checks.max_norm)
        except InvalidReply as error:
            reject(self.cost, cid, str(error))
            return False
        problem = (checked(self.method.reply_problem, content)
                   or checked(self.aggregator.reply_problem, content))
        if problem:
            reject(self.cost, cid, problem)
            return False
        norms = update_norms(content, self.message)  # the clip check's and the record's
        if self.checks.central_dp is not None:
            problem = self.checks.central_dp.clip_problem(content, self.message)
        if problem:
            reject(self.cost, cid, problem)
            return False
        self.cost.bytes_up += payload_bytes(content)
        central = self.checks.central_dp is not None
        weight = 1 if central else num_examples  # uniform: DP's sensitivity
        # under central DP the record keeps no statistic of a clipped (un-noised) reply
        self.take(Reply(cid=cid, content=content, num_examples=weight), None if central else norms)
        return True

    def take_mean(self, mean: RecordDict, replies: int) -> None:
        """The one mean of a secure round (SecAgg+: no single reply is ever seen). Under
        central DP the clients clipped before masking; the mean must be within the clip too
        (slack for SecAgg+'s quantization), and the round's noise, σ = z·clip/m, joins it."""
        dp = self.checks.central_dp
        if dp is not None:
            problem = dp.clip_problem(mean, self.message, slack=1e-2)
            if problem:
                reject(self.cost, -1, f"secure mean: {problem}")
                return
            self.noised = True
            mean = dp.noised(mean, replies, message=self.message)  # OS entropy, not the seed
        self.take(Reply(cid=-1, content=mean, num_examples=replies))

    def take(self, reply: Reply, update_norms: dict[str, float] | None = None) -> None:
        """A reply that passed its own checks (or the one mean of a secure round)."""
        entry = Kept(reply.cid, reply.num_examples, record_norms(reply.content),
                     len(reply.content.array_records), update_norms=update_norms or {})
        self.kept.append(entry)
        if self.direct:
            (entry,) = self._capped([entry])
            self._fold(Reply(reply.cid, reply.content, entry.num_examples))
        else:
            self.spool = self.spool or ReplySpool(self.checks.spool_root)
            entry.slot = self.spool.put(reply.content)
        # A RecordDict's `array_records` view is a reference cycle that keeps the reply alive
        # until the next full collection; collect the young ones now, so the reply goes as
        # soon as its sender drops it (about a millisecond)
        gc.collect(1)

    def _capped(self, kept: list[Kept]) -> list[Kept]:
        """The weight cap, where weights count: a uniform mean ignores the claimed sizes,
        and capping them would report a cut that never happened."""
        return cap_weights(kept, self.checks.max_weight, self.cost) if self.weighted else kept

    def close(self) -> list[dict[str, float]]:
        """Run the round-level checks and fold what passes; the record norms of every reply
        folded in (the bounds the new state is held to)."""
        if not self.direct:
            kept = sorted(self.kept, key=lambda k: k.cid)  # client order, in every runtime
            kept = screen_outliers(kept, self.checks.factor, self.cost, self.spool)
            self.kept = self._capped(kept)
            for entry in self.kept:
                self._fold(Reply(entry.cid, self.spool.load(entry.slot), entry.num_examples))
            self.discard()
        self.cost.array_records = max((k.array_records for k in self.kept), default=0)
        self.cost.record_names = sorted({n for k in self.kept for n in k.norms})
        self.cost.update_norms = {
            name: float(np.median([k.update_norms[name] for k in self.kept
                                   if name in k.update_norms]))
            for name in sorted({n for k in self.kept for n in k.update_norms})}
        return [k.norms for k in self.kept]

    def result(self) -> RecordDict:
        return self.aggregator.result()

    def discard(self) -> None:
        """Remove the spool (also when the round failed half way)."""
        if self.spool is not None:
            self.spool.close()

    def _fold(self, reply: Reply) -> None:
        started = time.perf_counter()
        if self.checks.central_dp is not None and not self.noised:
            self.noised = True  # once per round: the mean then carries σ = z·clip/m
            reply = Reply(reply.cid, self.checks.central_dp.noised(reply.content,
                                                                   message=self.message),
                          reply.num_examples)
        self.aggregator.add(reply)
        self.fold_seconds += time.perf_counter() - started


@dataclass
class ReplyChecks:
    """The settings of a round's reply checks (from the runtime's config)."""

    max_norm: float | None  # absolute bound on a reply's norm (the run's, else the method's)
    factor: float  # outlier screens: k × the round's median; 0: off
    #: cap on a reply's weight; None: `default_weight_limits` (10 × the round's median,
    #: and no more than the other replies together)
    max_weight: float | None
    spool_root: Path | None = None  # where spooled replies wait (None: the system's temp)
    #: central DP: every reply weighs 1 and the round's noise (OS entropy) joins the first
    #: reply folded; the runtime turns the screens off (the clip bounds every reply)
    central_dp: CentralDP | None = None


def aggregate_problem(state: RecordDict, norms: Sequence[dict[str, float]],
                      max_norm: float | None, factor: float) -> str | None:
    """Why a new global state must not replace the old one (NaN/Inf, or a record beyond the
    bound its replies — whose record `norms` are given — were held to), or None."""
    bounds = {}
    if factor and norms:
        for name in set().union(*norms):
            bounds[name] = factor * lower_median([n[name] for n in norms if name in n])
    for name, norm in record_norms(state).items():
        if not math.isfinite(norm):
            return f"record {name!r} holds NaN or Inf"
        limits = [b for b in (bounds.get(name), max_norm) if b is not None]
        if limits and norm > min(limits) * (1 + 1e-6):
            return f"record {name!r} norm {norm:.4g} exceeds {min(limits):.4g}"
    return None
