"""The DP audit (issue 41) on our real round path: below the claimed ε with the code's noise;
far above it with the seeded noise the code drew before (the negative control), for the
attacker who holds result.json. `benchmarks/dp_audit.py` runs it at 1,000 trials."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedsteer.federation.dp_audit import (
    Setting,
    audit,
    clopper_pearson,
    epsilon_lower_bound,
    seeded_noise,
)

TRIALS = 120  # per sign: enough for a perfect attacker to show ε ≥ 3 (claimed: 2.2)


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("mode", ["local", "central"])
def test_the_audit_stays_below_the_claim_and_catches_seeded_noise(mode):
    setting = Setting(mode, noise_multiplier=4.0)
    ours = audit(setting, TRIALS)
    assert 2.0 < ours.claimed_epsilon < 2.5
    assert ours.empirical["threshold"] <= ours.claimed_epsilon
    assert ours.empirical["record"] <= ours.claimed_epsilon
    seeded = audit(setting, TRIALS, seeded_noise)
    assert seeded.claimed_epsilon == ours.claimed_epsilon
    assert seeded.empirical["record"] > ours.claimed_epsilon + 0.5  # the bar is broken
    assert seeded.empirical["record"] == pytest.approx(seeded.ceiling)  # the noise hid nothing
    assert seeded.empirical["threshold"] <= seeded.claimed_epsilon  # only the seed breaks it


def test_the_bound_follows_clopper_pearson():
    low, high = clopper_pearson(0, 100)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 100))
    signs = np.array([0] * 100 + [1] * 100)
    perfect = signs.astype(float)
    expected = np.log((0.025 ** (1 / 100) - 1e-5) / (1 - 0.025 ** (1 / 100)))
    assert epsilon_lower_bound(perfect, signs, 0.5, 1e-5) == pytest.approx(expected)
    assert epsilon_lower_bound(np.zeros(200), signs, 0.5, 1e-5) == 0.0  # no information
