"""Classification metrics, from scikit-learn rather than by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 over *all* labels (a label never predicted scores F1 = 0)."""
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=list(range(num_labels)), average="macro",
                     zero_division=0)
        ),
    }


def summarize_clients(per_client: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, spread and the list itself when each client evaluated on its own."""
    if len(per_client) == 1:
        return {k: v for k, v in per_client[0].items() if k != "cid"}
    out: dict[str, Any] = {}
    for key in ("accuracy", "macro_f1"):
        values = np.array([c[key] for c in per_client], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std())
        out[f"{key}_min"] = float(values.min())
        out[f"{key}_max"] = float(values.max())
    out["per_client"] = list(per_client)
    return out


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of `correct` out of `total` rows."""
    if total < 1:
        raise ValueError("an interval needs at least one row")
    ci = binomtest(int(correct), int(total)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)
