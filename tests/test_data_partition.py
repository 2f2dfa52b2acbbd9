"""Client partitions: exact cover, determinism, skew that tracks alpha, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedsteer.data import label_counts, partition

LABELS = np.repeat(np.arange(4), 250)  # 1000 examples, 4 balanced classes


def _mean_entropy(parts: list[np.ndarray], labels: np.ndarray = LABELS) -> float:
    counts = label_counts(labels, parts, 4).astype(float)
    probs = counts / counts.sum(axis=1, keepdims=True)
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return float(-(probs * logs).sum(axis=1).mean())


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_exact_cover_sorted_int64(scheme: str) -> None:
    parts = partition(LABELS, 10, scheme, seed=3)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_deterministic_per_seed(scheme: str) -> None:
    first = partition(LABELS, 8, scheme, seed=1)
    again = partition(list(LABELS), 8, scheme, seed=1)
    other = partition(LABELS, 8, scheme, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_min_per_client_respected() -> None:
    for seed in range(5):
        parts = partition(LABELS, 10, "dirichlet", alpha=0.1, seed=seed, min_per_client=5)
        assert min(len(p) for p in parts) >= 5


def test_dirichlet_skew_tracks_alpha() -> None:
    skewed = np.mean([_mean_entropy(partition(LABELS, 10, alpha=0.1, seed=s)) for s in range(3)])
    flat = np.mean([_mean_entropy(partition(LABELS, 10, alpha=100, seed=s)) for s in range(3)])
    iid = _mean_entropy(partition(LABELS, 10, "iid"))
    assert skewed < 0.6 * flat
    assert flat > 0.95 * np.log(4) and iid > 0.95 * np.log(4)


def test_shards_limit_labels_per_client() -> None:
    parts = partition(LABELS, 10, "shards", shards_per_client=2, seed=0)
    counts = label_counts(LABELS, parts, 4)
    # 20 shards of 50 over label-sorted data: each shard holds one label, so <= 2 per client.
    assert ((counts > 0).sum(axis=1) <= 2).all()
    assert [len(p) for p in parts] == [100] * 10


def test_label_counts_shape_and_total() -> None:
    parts = partition(LABELS, 5, "iid")
    counts = label_counts(LABELS, parts, 4)
    assert counts.shape == (5, 4) and counts.sum() == len(LABELS)
    assert counts.sum(axis=0).tolist() == [250] * 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients must be >= 1"),
        ({"num_clients": 2000}, "2000 clients but only 1000 examples"),
        ({"num_clients": 600, "min_per_client": 2}, "cannot give 600 clients"),
        ({"num_clients": 4, "alpha": 0.0}, "alpha must be > 0"),
        ({"num_clients": 4, "scheme": "zipf"}, "unknown scheme 'zipf'"),
        ({"num_clients": 4, "scheme": "shards", "shards_per_client": 0}, "shards_per_client"),
        ({"num_clients": 400, "scheme": "shards", "shards_per_client": 3}, "1200 shards"),
        ({"num_clients": 200, "alpha": 0.01, "min_per_client": 4}, "raise alpha"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(LABELS, **kwargs)


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match="non-negative integers"):
        partition([0.5, 1.0, 2.0], 1)
    with pytest.raises(ValueError, match="1-D"):
        partition(np.zeros((2, 2), dtype=int), 1)
