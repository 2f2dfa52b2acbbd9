"""Plots a person would rather look at than read: accuracy beside bytes, per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsteer.eval.report import human_bytes  # noqa: E402


def plot_comparison(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Left: accuracy per method (per-client dots where clients evaluated on their own).
    Right: bytes uploaded per round (log scale): what each point of accuracy costs."""
    names = [r["method"] for r in records]
    accuracy = [100 * r["metrics"]["accuracy"] for r in records]
    upload = [r["costs"]["bytes_up_per_round"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bars = left.bar(names, accuracy, color="#4C72B0", alpha=0.85)
    for i, rec in enumerate(records):
        clients = rec["metrics"].get("per_client") or []
        left.scatter([i] * len(clients), [100 * c["accuracy"] for c in clients],
                     color="black", s=12, zorder=3, label="a client" if i == 0 else None)
    left.bar_label(bars, fmt="%.1f")
    left.set_ylabel("accuracy (%)")
    left.set_ylim(0, 100)
    left.set_title("accuracy")
    sent = right.bar(names, [max(u, 1) for u in upload], color="#DD8452")
    right.bar_label(sent, labels=[human_bytes(u) if u else "nothing" for u in upload])
    right.set_yscale("log")
    right.set_ylim(1, max([*upload, 10]) * 20)
    right.set_ylabel("bytes up per round")
    right.set_title("communication")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
