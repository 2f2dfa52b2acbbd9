"""Classification metrics, from scikit-learn rather than by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest, wilcoxon
from scipy.stats import t as t_dist
from sklearn.metrics import accuracy_score, f1_score


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 over *all* labels (a label never predicted scores F1 = 0), and
    each row's correctness (`correct`, 0/1 in row order) for paired tests between methods."""
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=list(range(num_labels)), average="macro",
                     zero_division=0)
        ),
        "correct": [int(t == p) for t, p in zip(y_true, y_pred, strict=True)],
    }


def summarize_clients(per_client: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, spread and the list itself when each client evaluated on its own."""
    if len(per_client) == 1:
        return {k: v for k, v in per_client[0].items() if k != "cid"}
    out: dict[str, Any] = {}
    rows = [c["correct"] for c in per_client if "correct" in c]
    if rows and len(rows) == len(per_client) and len({len(r) for r in rows}) == 1:
        # every client scored the same rows: the share of clients right on each row, so two
        # records can still be compared row by row (`paired_fraction_test`)
        out["correct_fraction"] = np.mean(np.asarray(rows, dtype=float), axis=0).tolist()
    per_client = [{k: v for k, v in c.items() if k != "correct"} for c in per_client]
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


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of independent values (seeds, clients)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    half = t_dist.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(
        len(values))
    return float(values.mean() - half), float(values.mean() + half)


def accuracy_interval(metrics: dict[str, Any]) -> tuple[float, float]:
    """95 % interval of a record's accuracy: Wilson over its rows for one evaluation.

    Where several clients scored the *same* rows (local ICL and AsynDBT: every client scores
    the server's test rows) the accuracy is the mean over rows of each row's share of
    clients right, and two things were sampled: the rows and the clients. A t-interval over
    the clients alone treats their accuracies as independent draws, but they share every
    row's difficulty: three workers on 200 rows got ±2 points where the rows alone allow ±5.
    So the interval is Wilson over the rows (a share lies in [0, 1], so its variance is at
    most p(1 − p), Wilson's; it needs no random resampling and is the interval one
    evaluation on those rows gets), widened in quadrature by the t half-width over the
    clients (crossed rows × clients: the variance of the mean is about σ²_rows/n +
    σ²_clients/m). It is never narrower than either alone.
    """
    n = int(metrics["num_test"])
    low, high = wilson_interval(round(metrics["accuracy"] * n), n)
    if "per_client" not in metrics:
        return low, high
    clients = [c["accuracy"] for c in metrics["per_client"]]
    client_low, client_high = mean_interval(clients)
    spread = (client_high - client_low) / 2
    accuracy = float(metrics["accuracy"])
    return (max(0.0, accuracy - float(np.hypot(accuracy - low, spread))),
            min(1.0, accuracy + float(np.hypot(high - accuracy, spread))))


def recorded_interval(metrics: dict[str, Any]) -> tuple[float, float] | None:
    """A record's 95 % interval: the one it stored, else computed from what it has (older
    records); None for a record too sparse to say (no rows, no clients). Clients' records
    are always recomputed: before issue 41 they stored a t-interval over the clients alone,
    which ignored that every client scored the same rows (`accuracy_interval`)."""
    if "per_client" in metrics and "num_test" in metrics:
        return accuracy_interval(metrics)
    if metrics.get("accuracy_ci95"):
        return tuple(metrics["accuracy_ci95"])
    if "num_test" in metrics:
        return accuracy_interval(metrics)
    return None


def paired_fraction_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Wilcoxon signed-rank test of two records scored on the same rows where each row's
    score is a share of clients right (`correct_fraction`): (mean difference a − b,
    two-sided p). Rows where both agree say nothing."""
    if len(a) != len(b):
        raise ValueError(f"paired test on {len(a)} vs {len(b)} rows")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if not np.any(diff):
        return 0.0, 1.0
    return float(diff.mean()), float(wilcoxon(diff, zero_method="wilcox").pvalue)


def mcnemar_exact(a_correct: Sequence[int], b_correct: Sequence[int]) -> tuple[int, int, float]:
    """Exact McNemar test of two methods scored on the same rows: (rows only `a` gets right,
    rows only `b` gets right, two-sided p). Rows both get right or wrong say nothing."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired test on {len(a_correct)} vs {len(b_correct)} rows")
    only_a = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if y and not x)
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
