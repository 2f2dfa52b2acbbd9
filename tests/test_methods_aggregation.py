"""Aggregation rules come from Flower and keep array names and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from fedsteer.methods import Reply
from fedsteer.methods.aggregation import RULES, aggregate_arrays


def reply(cid, value, n):
    arrays = {"a": Array(np.full(3, value, np.float32)), "b": Array(np.full((2, 2), -value,
                                                                            np.float32))}
    return Reply(cid=cid, content=RecordDict({"upd": ArrayRecord(arrays)}), num_examples=n)


def test_weighted_mean_is_fedavg():
    out = aggregate_arrays([reply(0, 1.0, 1), reply(1, 4.0, 3)], "upd")
    np.testing.assert_allclose(out["a"].numpy(), np.full(3, 3.25))
    np.testing.assert_allclose(out["b"].numpy(), np.full((2, 2), -3.25))
    assert out["a"].numpy().dtype == np.float32 and list(out.keys()) == ["a", "b"]


def test_unweighted_mean():
    out = aggregate_arrays([reply(0, 1.0, 1), reply(1, 4.0, 3)], "upd", weighted=False)
    np.testing.assert_allclose(out["a"].numpy(), np.full(3, 2.5))


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "bulyan"])
def test_robust_rules_resist_one_outlier(rule):
    replies = [reply(i, 1.0 + 0.01 * i, 1) for i in range(6)] + [reply(9, 1e6, 1)]
    out = aggregate_arrays(replies, "upd", rule=rule)
    assert np.all(np.abs(out["a"].numpy() - 1.0) < 0.1), rule


def test_unknown_rule_and_empty_replies():
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        aggregate_arrays([reply(0, 1.0, 1)], "upd", rule="magic")
    with pytest.raises(ValueError, match="no replies"):
        aggregate_arrays([], "upd")
    assert set(RULES) == {"mean", "median", "trimmed-mean", "krum", "bulyan"}
