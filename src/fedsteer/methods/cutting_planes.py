"""Cutting planes (ADBO, Jiao et al. 2023): a polyhedral stand-in for the lower level's optimality.

A bilevel problem asks the upper variable `q` to be good *given* that the lower variable `p`
is optimal for it. ADBO replaces that optimality with `h(q, p) ≤ ε` for a gap function `h`,
and `h` with a growing set of linear cuts, each the first-order expansion of `h` at a point
(q_l, p_l) where the gap was too large:

    h_l + a_l·(q − q_l) + b_l·(p − p_l) − ε ≤ 0        (a_l = ∇_q h, b_l = ∇_p h there)

Each cut carries a multiplier λ_l ≥ 0 (projected dual ascent on the cut's value); the primal
updates gain Σ_l λ_l a_l (upper) and Σ_l λ_l b_l (lower). A cut is added when the gap at the
current point exceeds ε, and every δ steps the set is refreshed: cuts whose multiplier fell
below γ are dropped, and at most `limit` of the newest are kept.

The arrays are kept flat; callers pass and get back arrays of their own shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord


@dataclass
class CuttingPlanes:
    q_size: int
    p_size: int
    # None until __post_init__ sizes them from q_size and p_size
    a: np.ndarray = field(default=None)  # type: ignore[assignment]  # (L, q_size): ∇_q h
    b: np.ndarray = field(default=None)  # (L, p_size): ∇_p h
    c: np.ndarray = field(default=None)  # (L,): so that a cut's value is a·q + b·p + c
    multipliers: np.ndarray = field(default=None)  # (L,): λ ≥ 0
    steps: int = 0  # updates seen, for the refresh every δ

    def __post_init__(self) -> None:
        if self.a is None:
            self.a = np.zeros((0, self.q_size))
            self.b = np.zeros((0, self.p_size))
            self.c = np.zeros(0)
            self.multipliers = np.zeros(0)

    def __len__(self) -> int:
        return len(self.c)

    def values(self, q: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Each cut's value at (q, p); positive means the cut is violated."""
        return self.a @ q.ravel() + self.b @ p.ravel() + self.c

    def add(self, gap: float, grad_q: np.ndarray, grad_p: np.ndarray, q: np.ndarray,
            p: np.ndarray, epsilon: float) -> bool:
        """Cut at (q, p) if the gap there exceeds ε; True when a cut was added."""
        if gap <= epsilon:
            return False
        a, b = grad_q.ravel(), grad_p.ravel()
        self.a = np.vstack([self.a, a])
        self.b = np.vstack([self.b, b])
        self.c = np.append(self.c, gap - epsilon - a @ q.ravel() - b @ p.ravel())
        self.multipliers = np.append(self.multipliers, 0.0)
        return True

    def update_multipliers(self, q: np.ndarray, p: np.ndarray, lr: float) -> None:
        """λ ← max(0, λ + η·value): a violated cut gains weight, a slack one loses it."""
        self.multipliers = np.maximum(0.0, self.multipliers + lr * self.values(q, p))
        self.steps += 1

    def refresh(self, every: int, gamma: float, limit: int) -> None:
        """Every δ steps: drop cuts with λ < γ, then keep the newest `limit`."""
        if every <= 0 or self.steps % every:
            return
        keep = np.flatnonzero(self.multipliers >= gamma)[-limit:] if limit > 0 else []
        self.a, self.b, self.c = self.a[keep], self.b[keep], self.c[keep]
        self.multipliers = self.multipliers[keep]

    def penalty_gradients(self, q_shape, p_shape) -> tuple[np.ndarray, np.ndarray]:
        """(Σ λ_l a_l, Σ λ_l b_l), shaped like q and p: what the cuts add to each update."""
        return ((self.multipliers @ self.a).reshape(q_shape),
                (self.multipliers @ self.b).reshape(p_shape))

    # ------------------------------------------------------------ persistence
    def to_record(self) -> ArrayRecord:
        return ArrayRecord({
            "a": Array(self.a), "b": Array(self.b), "c": Array(self.c),
            "multipliers": Array(self.multipliers),
            "steps": Array(np.array([self.steps], dtype=np.int64)),
        })

    @classmethod
    def from_record(cls, record: ArrayRecord) -> CuttingPlanes:
        a, b = record["a"].numpy(), record["b"].numpy()
        return cls(q_size=a.shape[1], p_size=b.shape[1], a=a, b=b, c=record["c"].numpy(),
                   multipliers=record["multipliers"].numpy(),
                   steps=int(record["steps"].numpy()[0]))
