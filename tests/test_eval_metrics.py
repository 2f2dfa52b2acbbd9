"""Intervals of accuracies that several clients measured on the same rows (issue 41, 7)."""

from __future__ import annotations

import numpy as np

from fedsteer.eval.metrics import (
    accuracy_interval,
    mean_interval,
    recorded_interval,
    summarize_clients,
    wilson_interval,
)


def _clients_on_shared_rows(correct: np.ndarray) -> dict:
    """A record's metrics as `summarize_clients` and the experiment build them: one row of
    0/1 per client, every client on the same test rows."""
    per_client = [{"cid": i, "accuracy": float(row.mean()), "macro_f1": 0.0,
                   "correct": row.astype(int).tolist()} for i, row in enumerate(correct)]
    metrics = summarize_clients(per_client)
    metrics.pop("correct_fraction")
    metrics["num_test"] = correct.shape[1]
    return metrics


def test_workers_on_the_same_rows_get_at_least_wilson_over_those_rows():
    """The README's AsynDBT cell: three workers at 84.0, 84.0, 82.5 % on one set of 200 rows.
    A t-interval over the workers said ±2 points; the 200 rows alone allow ±5."""
    rng = np.random.default_rng(0)
    shared = rng.random(200) < 0.835
    correct = np.stack([shared, shared, shared])
    correct[2, np.flatnonzero(correct[2])[:3]] = False  # the third worker misses 3 more
    metrics = _clients_on_shared_rows(correct)
    low, high = accuracy_interval(metrics)
    wilson_low, wilson_high = wilson_interval(round(metrics["accuracy"] * 200), 200)
    assert low <= wilson_low + 1e-12 and high >= wilson_high - 1e-12
    client_low, client_high = mean_interval([c["accuracy"] for c in metrics["per_client"]])
    assert high - low > 2 * (client_high - client_low)  # the old interval was this narrow


def test_clients_that_disagree_widen_the_interval_past_wilson():
    """The clients' spread still counts (local ICL's clients are a sample of the federation):
    never narrower than the t-interval over them either."""
    rng = np.random.default_rng(1)
    correct = np.stack([rng.random(300) < p for p in (0.55, 0.6, 0.7, 0.75)])
    metrics = _clients_on_shared_rows(correct)
    low, high = accuracy_interval(metrics)
    wilson_low, wilson_high = wilson_interval(round(metrics["accuracy"] * 300), 300)
    client_low, client_high = mean_interval([c["accuracy"] for c in metrics["per_client"]])
    assert low < min(wilson_low, client_low) and high > max(wilson_high, client_high)


def test_identical_workers_are_covered_as_often_as_the_rows_allow():
    """Workers that agree on every row carry the information of one evaluation: over many
    draws of 200 rows, the interval covers the true accuracy about 95 % of the time (a
    t-interval over such workers has width 0 and never does)."""
    rng = np.random.default_rng(2)
    truth, draws, covered = 0.8, 400, 0
    for _ in range(draws):
        shared = rng.random(200) < truth
        low, high = accuracy_interval(_clients_on_shared_rows(np.stack([shared] * 4)))
        covered += low <= truth <= high
    assert covered / draws >= 0.92


def test_an_old_record_with_a_t_interval_over_clients_is_recomputed():
    """Records written before the fix stored the narrow interval; tables re-rendered from
    them must not repeat it."""
    metrics = {"accuracy": 0.835, "num_test": 200, "accuracy_ci95": [0.8135, 0.8565],
               "per_client": [{"accuracy": 0.84}, {"accuracy": 0.84}, {"accuracy": 0.825}]}
    low, high = recorded_interval(metrics)
    wilson_low, wilson_high = wilson_interval(167, 200)
    assert low <= wilson_low and high >= wilson_high
    one_evaluation = {"accuracy": 0.5, "num_test": 10, "accuracy_ci95": [0.1, 0.9]}
    assert recorded_interval(one_evaluation) == (0.1, 0.9)
