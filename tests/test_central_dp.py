"""Central DP (issue 20): clients clip, the server adds noise once to the mean, Flower's
accountant (checked against `dp_accounting` directly) spends ε over the rounds that ran."""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.federation import InProcessRuntime, RuntimeConfig
from fedsteer.federation.privacy import CentralDP, CentralLedger
from fedsteer.methods import Method, seeded_rng
from fedsteer.methods.aggregation import aggregate_arrays
from test_federation_runtime import make_clients

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE = dp_accounting.NeighboringRelation.REPLACE_ONE
WIDE = 20_000  # coordinates: enough to read the noise's std off one round


@dataclass
class Steps(Method):
    """Each client sends a seeded vector of norm 3 (clipped to 1 by central DP's clients);
    the server takes the unweighted mean, one record per reply."""

    name = "steps"
    max_reply_norm = None

    def initial_state(self, env):
        return RecordDict({"w": ArrayRecord({"w": Array(np.zeros(WIDE, np.float32))})})

    def configure_round(self, rnd, state):
        return None if rnd else RecordDict({"config": ConfigRecord({"round": rnd})})

    def client_step(self, message, client):
        step = seeded_rng("steps", client.cid).normal(size=WIDE)
        return RecordDict({"w": ArrayRecord({"w": Array(
            (3 * step / np.linalg.norm(step)).astype(np.float32))})})

    def aggregate(self, rnd, state, replies):
        state["w"] = aggregate_arrays(replies, "w")
        return state

    def evaluate(self, state, env):
        return {"accuracy": 0.0, "macro_f1": 0.0}


def run_round(noise_multiplier: float):
    """One round of 8 clients under central DP (clip 1); the outcome and the noiseless mean."""
    env, clients = make_clients(8)
    dp = CentralDP(clip=1.0, noise_multiplier=noise_multiplier)
    config = RuntimeConfig(dp=dp.client_side(), central_dp=dp, reply_norm_factor=0,
                           max_client_weight=1)
    outcome = InProcessRuntime(config).run(Steps(), clients, env)
    clipped = [seeded_rng("steps", c.cid).normal(size=WIDE) for c in clients]
    return outcome, np.mean([v / np.linalg.norm(v) for v in clipped], axis=0)  # norm 3 → 1


def test_the_server_adds_noise_once_with_sigma_z_clip_over_m():
    outcome, mean = run_round(noise_multiplier=4.0)
    noise = outcome.state["w"]["w"].numpy() - mean
    assert np.std(noise) == pytest.approx(4.0 * 1.0 / 8, rel=0.03)  # Flower's compute_stdv
    privacy = outcome.privacy
    assert privacy["mode"] == "central" and privacy["adjacency"] == "add-remove"
    reference = rdp.RdpAccountant(neighboring_relation=ADD_REMOVE)
    reference.compose(dp_accounting.GaussianDpEvent(4.0))
    assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))


def test_without_dp_the_same_round_is_the_plain_mean():
    """The control: the noise above comes from central DP, not from the toy."""
    outcome, mean = run_round(noise_multiplier=0.0)
    np.testing.assert_allclose(outcome.state["w"]["w"].numpy(), mean, atol=1e-6)
    assert outcome.privacy["epsilon"] == math.inf


def test_a_sampled_ledger_matches_dp_accounting_directly():
    """A fixed-size sample of m of N: sampling without replacement, replace-one (the
    sensitivity 2·clip), each reply's k records folded into z/(2√k)."""
    ledger = CentralLedger(CentralDP(clip=1.0, noise_multiplier=2.0), population=100)
    for _ in range(5):
        ledger.record_round(array_records=2, sampled=10)
    reference = rdp.RdpAccountant(neighboring_relation=REPLACE)
    reference.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(2.0 / math.sqrt(2) / 2)), 5)
    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(1e-5))
    assert ledger.summary()["adjacency"] == "replace-one"
    every = CentralLedger(CentralDP(clip=1.0, noise_multiplier=2.0), population=100)
    every.record_round(array_records=1, sampled=100)
    assert every.epsilon() > ledger.epsilon() / 5  # one unsampled round vs 5 sampled


def test_a_central_dp_run_records_its_epsilon(tmp_path):
    options = {"rounds": 2, "local_epochs": 1, "demos_per_class": 1, "calibration_per_class": 2}
    config = RunConfig(method="ifed-icl", model="tiny-random", clients=3, test_size=10,
                       dp_clip=1.0, dp_noise=1.0, dp_mode="central", options=options)
    privacy = run_experiment(config, tmp_path)["privacy"]
    assert privacy["mode"] == "central" and privacy["rounds_accounted"] == 3
    reference = rdp.RdpAccountant(neighboring_relation=ADD_REMOVE)
    reference.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))


@pytest.mark.parametrize("settings, message", [
    ({"dp_mode": "central", "secagg": True}, "central DP with --secagg is not built yet"),
    ({"dp_mode": "global"}, "dp mode 'global'"),
])
def test_central_dp_settings_are_checked(tmp_path, settings, message):
    """Refused before any work (SecAgg+ would need the noise inside the secure mean)."""
    config = RunConfig(method="ifed-icl", model="tiny-random", clients=3, test_size=10,
                       dp_clip=1.0, dp_noise=1.0, **settings)
    with pytest.raises(ValueError, match=message):
        run_experiment(config, tmp_path)


def test_a_reply_beyond_the_clip_is_rejected_by_the_server():
    """The server checks what clients promise: ε rests on every reply within the clip."""
    env, clients = make_clients(4)
    dp = CentralDP(clip=1.0, noise_multiplier=0.0)
    config = RuntimeConfig(dp=CentralDP(clip=5.0, noise_multiplier=0.0).client_side(),
                           central_dp=dp, reply_norm_factor=0, max_client_weight=1)
    with pytest.raises(RuntimeError, match="every client failed or was rejected"):
        InProcessRuntime(config).run(Steps(), clients, env)  # norm 3 > the server's clip 1
