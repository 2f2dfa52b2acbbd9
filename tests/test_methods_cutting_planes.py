"""Cutting planes: when a cut appears, how its multiplier moves, when it goes, what it adds."""

from __future__ import annotations

import numpy as np

from fedsteer.methods.cutting_planes import CuttingPlanes

Q = np.array([[0.5, 0.5]])
P = np.array([[0.2, 0.3, 0.5]])


def planes_with_one_cut(gap: float = 0.5) -> CuttingPlanes:
    planes = CuttingPlanes(q_size=Q.size, p_size=P.size)
    assert planes.add(gap, np.array([[1.0, -1.0]]), np.array([[0.0, 2.0, 0.0]]), Q, P,
                      epsilon=0.1)
    return planes


def test_a_cut_is_added_only_when_the_gap_exceeds_epsilon():
    planes = CuttingPlanes(q_size=Q.size, p_size=P.size)
    assert not planes.add(0.1, np.ones((1, 2)), np.ones((1, 3)), Q, P, epsilon=0.1)
    assert len(planes) == 0
    assert planes.add(0.3, np.ones((1, 2)), np.ones((1, 3)), Q, P, epsilon=0.1)
    assert len(planes) == 1


def test_a_cut_is_the_linearised_gap_minus_epsilon():
    planes = planes_with_one_cut(gap=0.5)
    assert np.allclose(planes.values(Q, P), [0.4])  # at its own point: h − ε
    q2, p2 = np.array([[0.7, 0.3]]), np.array([[0.2, 0.1, 0.7]])
    expected = 0.5 + (1.0 * 0.2 - 1.0 * -0.2) + 2.0 * -0.2 - 0.1
    assert np.allclose(planes.values(q2, p2), [expected])


def test_multipliers_ascend_on_violation_and_stay_non_negative():
    planes = planes_with_one_cut(gap=0.5)
    planes.update_multipliers(Q, P, lr=0.5)
    assert np.allclose(planes.multipliers, [0.2])  # 0 + 0.5 · 0.4
    slack_q = np.array([[0.0, 1.0]])  # a·q falls by 1: the cut holds with room
    planes.update_multipliers(slack_q, P, lr=0.5)
    assert np.allclose(planes.multipliers, [0.0])  # max(0, 0.2 + 0.5 · (0.4 − 1))


def test_refresh_every_delta_steps_drops_weak_cuts_and_keeps_the_newest():
    planes = planes_with_one_cut()
    planes.add(0.9, np.ones((1, 2)), np.ones((1, 3)), Q, P, epsilon=0.1)
    planes.add(0.9, np.ones((1, 2)), np.ones((1, 3)), Q, P, epsilon=0.1)
    planes.multipliers = np.array([0.0005, 0.5, 0.7])
    planes.steps = 4
    planes.refresh(every=5, gamma=1e-3, limit=10)
    assert len(planes) == 3  # not a refresh step
    planes.steps = 5
    planes.refresh(every=5, gamma=1e-3, limit=1)
    assert len(planes) == 1 and np.allclose(planes.multipliers, [0.7])


def test_penalty_gradients_are_the_multiplier_weighted_sums():
    planes = planes_with_one_cut()
    planes.add(0.9, np.array([[3.0, 0.0]]), np.array([[1.0, 1.0, 1.0]]), Q, P, epsilon=0.1)
    planes.multipliers = np.array([2.0, 0.5])
    on_q, on_p = planes.penalty_gradients(Q.shape, P.shape)
    assert np.allclose(on_q, [[2.0 + 1.5, -2.0]])
    assert np.allclose(on_p, [[0.5, 4.5, 0.5]])


def test_cuts_survive_a_record_round_trip_even_when_empty():
    for planes in (CuttingPlanes(q_size=2, p_size=3), planes_with_one_cut()):
        back = CuttingPlanes.from_record(planes.to_record())
        assert len(back) == len(planes) and back.steps == planes.steps
        assert np.allclose(back.values(Q, P), planes.values(Q, P))
