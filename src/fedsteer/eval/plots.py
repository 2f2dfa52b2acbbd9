"""Plots a person would rather look at than read: accuracy beside bytes, per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedsteer.eval.costs import round_accuracy  # noqa: E402
from fedsteer.eval.report import human_bytes  # noqa: E402


def plot_comparison(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Left: accuracy per method (per-client dots where clients evaluated on their own).
    Middle: bytes uploaded per round (log scale): what each point of accuracy costs.
    Right, when runs evaluated every round (`--eval-every 1`): accuracy per round."""
    names = [r["method"] for r in records]
    accuracy = [100 * r["metrics"]["accuracy"] for r in records]
    upload = [r["costs"]["bytes_up_per_round"] for r in records]
    curves = {r["method"]: round_accuracy(r["costs"]) for r in records}
    curves = {name: curve for name, curve in curves.items() if curve}
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(15 if curves else 10, 4))
    left, right = axes[0], axes[1]
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
    if curves:
        _plot_rounds(axes[2], curves)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_rounds(axis, curves: dict[str, list[float]]) -> None:
    for name, curve in curves.items():
        axis.plot(range(1, len(curve) + 1), [100 * a for a in curve], "o-", label=name)
    axis.set(xlabel="round", ylabel="accuracy (%)", title="accuracy per round")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(fontsize=8)
