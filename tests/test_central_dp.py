"""Central DP (issue 20): clients clip, the server adds noise once to the mean; ε (checked
against `dp_accounting` directly) is spent over the rounds that ran, replace-one and with
no amplification by the public sample (issue 41)."""

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
from fedsteer.federation.privacy import CentralDP, CentralLedger, noise_for_target
from fedsteer.federation.runtime import sample_clients
from fedsteer.methods import Method, seeded_rng
from fedsteer.methods.aggregation import aggregate_arrays
from test_federation_runtime import make_clients

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
    assert privacy["mode"] == "central" and privacy["adjacency"] == "replace-one"
    # issue 41: the mean of m published replies moves by 2·clip/m when one client's data is
    # swapped; add/remove (z = 4 as it stands) understated ε
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(4.0 / 2))
    assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))


def test_without_dp_the_same_round_is_the_plain_mean():
    """The control: the noise above comes from central DP, not from the toy."""
    outcome, mean = run_round(noise_multiplier=0.0)
    np.testing.assert_allclose(outcome.state["w"]["w"].numpy(), mean, atol=1e-6)
    assert outcome.privacy["epsilon"] == math.inf


def test_a_sampled_ledger_claims_no_amplification():
    """Issue 41: a fixed-size sample of m of N is drawn from the public seed and recorded,
    so amplification by sampling does not hold: each round is a Gaussian of z/(2√k)
    (replace-one, k records), whoever was drawn (it was accounted as sampling without
    replacement, about 1/9 of this ε)."""
    ledger = CentralLedger(CentralDP(clip=1.0, noise_multiplier=2.0), population=100)
    for _ in range(5):
        ledger.record_round(array_records=2, sampled=10)
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(2.0 / math.sqrt(2) / 2), 5)
    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(1e-5))
    assert ledger.summary()["adjacency"] == "replace-one"
    assert ledger.summary()["amplification"].startswith("none")


def test_a_central_dp_run_records_its_epsilon(tmp_path):
    options = {"rounds": 2, "local_epochs": 1, "demos_per_class": 1, "calibration_per_class": 2}
    config = RunConfig(method="ifed-icl", model="tiny-random", clients=3, test_size=10,
                       dp_clip=1.0, dp_noise=1.0, dp_mode="central", options=options)
    privacy = run_experiment(config, tmp_path)["privacy"]
    assert privacy["mode"] == "central" and privacy["rounds_accounted"] == 3
    reference = rdp.RdpAccountant()  # replace-one: z/2 per round
    reference.compose(dp_accounting.GaussianDpEvent(0.5), 3)
    assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))


@pytest.mark.parametrize("settings, message", [
    ({"dp_mode": "global"}, "dp mode 'global'"),
])
def test_central_dp_settings_are_checked(tmp_path, settings, message):
    """Refused before any work."""
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


# ------------------------------------------------------------- Poisson sampling
@dataclass
class ShapedSteps(Steps):
    """`Steps` that declares its reply's shape (what the fixed denominator needs)."""

    def reply_shapes(self, message):
        return {"w.w": (WIDE,)}


def poisson_round(population: int, rate: float, noise_multiplier: float = 0.0):
    env, clients = make_clients(population)
    dp = CentralDP(clip=1.0, noise_multiplier=noise_multiplier)
    config = RuntimeConfig(fraction=rate, sampling="poisson", dp=dp.client_side(),
                           central_dp=dp, reply_norm_factor=0, max_client_weight=1)
    runtime = InProcessRuntime(config)
    return runtime.run(ShapedSteps(), clients, env), runtime.sample_clients(0, population)


def test_poisson_sampling_draws_each_client_on_its_own_and_is_seeded():
    config = RuntimeConfig(fraction=0.1, sampling="poisson", seed=3)
    sizes = [len(sample_clients(config, rnd, 1000)) for rnd in range(50)]
    assert len(set(sizes)) > 5  # not a fixed size
    assert np.mean(sizes) == pytest.approx(100, rel=0.05)
    assert sample_clients(config, 7, 1000) == sample_clients(config, 7, 1000)
    with pytest.raises(ValueError, match="sampling 'bernoulli'"):
        sample_clients(RuntimeConfig(sampling="bernoulli"), 0, 10)


def test_central_dp_with_poisson_divides_by_the_replies_that_came():
    """The sample is public (recorded), so its size is no secret: the mean divides by the m
    replies, and replace-one bounds its move by 2·clip/m (issue 41: no fixed q·N)."""
    outcome, sampled = poisson_round(population=20, rate=0.5)
    assert sampled and len(sampled) != 10  # this seed's draw is not the expected 10
    clipped = [seeded_rng("steps", c).normal(size=WIDE) for c in sampled]
    expected = np.mean([v / np.linalg.norm(v) for v in clipped], axis=0)
    np.testing.assert_allclose(outcome.state["w"]["w"].numpy(), expected, atol=1e-6)


def test_a_poisson_run_is_accounted_without_amplification():
    """Issue 41: the Poisson draw comes from the public seed and is recorded, so each round
    that released anything is a full Gaussian of z/2 (it was Poisson-amplified, add/remove:
    about a twentieth of this ε)."""
    outcome, sampled = poisson_round(population=20, rate=0.5, noise_multiplier=1.5)
    assert sampled
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(1.5 / 2))
    assert outcome.privacy["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))
    assert outcome.privacy["adjacency"] == "replace-one"


def test_noise_is_calibrated_on_the_ledger_that_records_it():
    def ledger_for(z):
        return CentralLedger(CentralDP(clip=1.0, noise_multiplier=z), population=1000)

    z = noise_for_target(4.0, ledger_for, rounds=5, sampled=100)
    ledger = ledger_for(z)
    for _ in range(5):
        ledger.record_round(1, 100)
    assert ledger.epsilon() == pytest.approx(4.0, rel=1e-3)
    assert noise_for_target(math.inf, ledger_for, rounds=5) == 0.0


def test_each_round_records_the_median_update_norm_a_clip_is_chosen_by():
    """Without DP; under central DP the record keeps no statistic of the clipped replies
    (issue 41: it kept their exact median norm)."""
    env, clients = make_clients(4)
    plain = InProcessRuntime(RuntimeConfig(reply_norm_factor=0, max_client_weight=1))
    assert plain.run(Steps(), clients, env).rounds[0].update_norms == {"w": pytest.approx(3.0)}
    outcome, _ = run_round(noise_multiplier=0.0)  # clipped to 1 by the clients
    assert outcome.rounds[0].update_norms == {}


def test_a_poisson_draw_of_nobody_keeps_the_state():
    env, clients = make_clients(3)
    config = RuntimeConfig(fraction=0.01, sampling="poisson", reply_norm_factor=0,
                           max_client_weight=1)
    runtime = InProcessRuntime(config)
    assert runtime.sample_clients(0, 3) == []
    outcome = runtime.run(ShapedSteps(), clients, env)
    assert outcome.rounds[0].clients == []
    assert not outcome.state["w"]["w"].numpy().any()


def test_a_method_that_takes_every_client_is_not_accounted_as_poisson_sampled():
    """IFed-ICL-like methods ignore `fraction`: every client answers every round, so no
    amplification may be claimed (the ledger took the rate regardless: ε understated)."""

    @dataclass
    class EverySteps(ShapedSteps):
        every_client = True

    env, clients = make_clients(10)
    dp = CentralDP(clip=1.0, noise_multiplier=2.0)
    config = RuntimeConfig(fraction=0.1, sampling="poisson", dp=dp.client_side(),
                           central_dp=dp, reply_norm_factor=0, max_client_weight=1)
    outcome = InProcessRuntime(config).run(EverySteps(), clients, env)
    assert outcome.rounds[0].clients == list(range(10))
    assert outcome.privacy["amplification"].startswith("none")
    reference = rdp.RdpAccountant()  # replace-one: z/2
    reference.compose(dp_accounting.GaussianDpEvent(2.0 / 2))
    assert outcome.privacy["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))
