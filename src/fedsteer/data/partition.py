"""Split example indices across clients: iid, label-skewed Dirichlet, or pathological shards."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCHEMES = ("iid", "dirichlet", "shards")
MAX_DIRICHLET_TRIES = 1000


def partition(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    scheme: str = "dirichlet",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_per_client: int = 2,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """One sorted int64 index array per client; every index used exactly once.

    Deterministic for a given seed so federated runs are reproducible.
    """
    y = _as_labels(labels)
    _check_args(len(y), num_clients, scheme, alpha, min_per_client, shards_per_client)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(y)), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, num_clients, alpha, min_per_client, rng)
    else:
        parts = _shards(y, num_clients, shards_per_client, min_per_client, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        raise ValueError("labels must be non-negative integers")
    return y.astype(np.int64)


def _check_args(
    n: int, num_clients: int, scheme: str, alpha: float, min_per_client: int, shards: int
) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if min_per_client < 0:
        raise ValueError(f"min_per_client must be >= 0, got {min_per_client}")
    if num_clients > n:
        raise ValueError(f"{num_clients} clients but only {n} examples")
    if num_clients * min_per_client > n:
        raise ValueError(
            f"cannot give {num_clients} clients >= {min_per_client} examples each "
            f"from {n} examples"
        )
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if scheme == "shards":
        if shards < 1:
            raise ValueError(f"shards_per_client must be >= 1, got {shards}")
        if num_clients * shards > n:
            raise ValueError(f"{num_clients * shards} shards but only {n} examples")


def _dirichlet(
    y: np.ndarray, num_clients: int, alpha: float, min_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, split its shuffled indices by proportions ~ Dir(alpha); resample if too small."""
    for _ in range(MAX_DIRICHLET_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                buckets[client].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) >= min_per_client:
            return parts
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left some of {num_clients} clients with fewer than "
        f"{min_per_client} examples in {MAX_DIRICHLET_TRIES} tries; raise alpha, "
        "use fewer clients or lower min_per_client"
    )


def _shards(
    y: np.ndarray, num_clients: int, per_client: int, min_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al.'s scheme: label-sorted shards, a few random ones per client."""
    order = rng.permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]
    shards = np.array_split(order, num_clients * per_client)
    owners = rng.permutation(len(shards)).reshape(num_clients, per_client)
    parts = [np.concatenate([shards[s] for s in row]) for row in owners]
    if min(len(p) for p in parts) < min_per_client:
        raise ValueError(
            f"shards too small: some client got fewer than {min_per_client} examples; "
            "use fewer clients or shards_per_client"
        )
    return parts


def label_counts(
    labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_labels: int
) -> np.ndarray:
    """Per-client label histogram, shape [num_clients, num_labels], to report skew."""
    y = _as_labels(labels)
    if y.size and y.max() >= num_labels:
        raise ValueError(f"label {y.max()} >= num_labels {num_labels}")
    counts = np.zeros((len(parts), num_labels), dtype=np.int64)
    for client, idx in enumerate(parts):
        counts[client] = np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=num_labels)
    return counts
