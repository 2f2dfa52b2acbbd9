"""Cost accounting: bytes from the serialized payloads, wall time, peak memory.

Bytes are those of Flower's own wire format (the protobuf of a `RecordDict`), so what the
in-process runtime reports is what the Flower runtime would send.
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto


def payload_bytes(content: RecordDict) -> int:
    """Size of `content` as Flower serializes it for the wire."""
    return recorddict_to_proto(content).ByteSize()


PROC = Path("/proc/self")


def reset_peak_rss() -> bool:
    """Start a new peak, so each of the runs a bench makes in one process reports its own
    (Linux's clear_refs). Elsewhere, or if refused, the peak stays the process's so far."""
    try:
        (PROC / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident memory since the last `reset_peak_rss` (Linux: VmHWM), else since the
    process started (ru_maxrss: Linux reports KiB, macOS bytes)."""
    try:
        status = (PROC / "status").read_text()
    except OSError:
        status = ""
    if match := re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE):
        return int(match.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class RoundCost:
    """What one round cost; the result record keeps one per round."""

    round: int
    clients: list[int] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    client_seconds: float = 0.0
    #: each client's compute seconds (in a client-batched step, its share of the batch's
    #: time by rows)
    client_compute: dict[int, float] = field(default_factory=dict)
    client_batches: list[int] = field(default_factory=list)  # clients per batched step
    #: torch intra-op threads each client's step ran with (its process's thread budget)
    client_threads: dict[int, int] = field(default_factory=dict)
    server_seconds: float = 0.0
    peak_rss_bytes: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    capped: list[dict[str, Any]] = field(default_factory=list)  # weights cut to the cap
    phase: str | None = None  # what the round did, when a method names it (IFed-ICL: extract)
    #: of client_seconds, the time clients waited (simulated latency, a shared model's lock)
    client_wait_seconds: float = 0.0
    simulated_time: float | None = None  # the simulated clock at this update (async runs)
    array_records: int = 0  # per reply: what a DP accountant composes for the round
    record_names: list[str] = field(default_factory=list)  # which records (per-record noise)
    #: per record, the median L2 norm of the accepted replies' updates (what DP's clip
    #: bounds: a reply minus the global record it updates): a guide to choosing `--dp-clip`
    update_norms: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None  # the global model's test accuracy after this round, when
    eval_seconds: float = 0.0  # the run evaluates every round (`eval_every`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_costs(rounds: list[RoundCost]) -> dict[str, Any]:
    """Totals and per-round means for the result record's `costs` block."""
    n = max(len(rounds), 1)
    up = sum(r.bytes_up for r in rounds)
    down = sum(r.bytes_down for r in rounds)
    return {
        "bytes_up": up,
        "bytes_down": down,
        "bytes_up_per_round": up / n if rounds else 0,
        "bytes_down_per_round": down / n if rounds else 0,
        "client_seconds": sum(r.client_seconds for r in rounds),
        "client_wait_seconds": sum(r.client_wait_seconds for r in rounds),
        "client_compute_seconds": sum(r.client_seconds - r.client_wait_seconds for r in rounds),
        "phases": bytes_by_phase(rounds),
        "server_seconds": sum(r.server_seconds for r in rounds),
        "peak_rss_bytes": max([peak_rss_bytes(), *(r.peak_rss_bytes for r in rounds)]),
        "num_rounds": len(rounds),
        "rejected": sum(len(r.rejected) for r in rounds),
        "rounds": [r.to_dict() for r in rounds],
    }


def bytes_by_phase(rounds: list[RoundCost]) -> dict[str, dict[str, float]]:
    """Bytes per round of each named phase: IFed-ICL's one-off extraction and its small
    calibration rounds, apart (their mean per round describes neither)."""
    phases: dict[str, dict[str, float]] = {}
    for r in rounds:
        if r.phase:
            p = phases.setdefault(r.phase, {"rounds": 0, "bytes_up": 0, "bytes_down": 0})
            p["rounds"] += 1
            p["bytes_up"] += r.bytes_up
            p["bytes_down"] += r.bytes_down
    for p in phases.values():
        p["bytes_up_per_round"] = p["bytes_up"] / p["rounds"]
        p["bytes_down_per_round"] = p["bytes_down"] / p["rounds"]
    return phases


def round_accuracy(costs: dict[str, Any]) -> list[float]:
    """A record's accuracy after each round, if every round was evaluated (`eval_every=1`)."""
    curve = [r.get("accuracy") for r in costs.get("rounds", [])]
    return curve if curve and all(a is not None for a in curve) else []
