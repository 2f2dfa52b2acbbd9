"""Issue 41, tried from outside: an attacker holding the run's record cannot regenerate the
noise, a robust rule cannot drop it, the record holds no exact statistic of the clipped
replies, and a round that reached nobody releases (and spends) nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.federation import InProcessRuntime, RuntimeConfig
from fedsteer.federation.privacy import CentralDP, ClientDP
from fedsteer.federation.runtime import sample_clients
from fedsteer.methods import seeded_rng
from test_central_dp import WIDE, ShapedSteps, Steps, run_round
from test_federation_runtime import make_clients

SEED = 7  # in the record's config


def clipped_step(cid: int) -> np.ndarray:
    """What `Steps` client `cid` sends (norm 3), clipped to norm 1."""
    step = seeded_rng("steps", cid).normal(size=WIDE)
    return step / np.linalg.norm(step)


def test_local_dp_noise_cannot_be_regenerated_from_the_record():
    """The record holds the seed, the round and the client; the noise was
    `seeded_rng(seed, "dp", round, cid)`, so subtracting it gave back the clipped update."""
    env, clients = make_clients(1)
    dp = ClientDP(clip=1.0, noise_multiplier=1.0)
    config = RuntimeConfig(seed=SEED, dp=dp, reply_norm_factor=0, max_client_weight=1)
    outcome = InProcessRuntime(config).run(Steps(), clients, env)
    released = outcome.state["w"]["w"].numpy().astype(np.float64)
    regenerated = seeded_rng(SEED, "dp", 0, 0).normal(0.0, 1.0, WIDE)
    attack = released - regenerated
    assert np.abs(attack - clipped_step(0)).max() > 0.5  # was equal to 1e-6
    assert "OS entropy" in outcome.privacy["noise_source"]
    again = InProcessRuntime(config).run(Steps(), clients, env).state["w"]["w"].numpy()
    assert not np.allclose(again, released)  # a DP run is not reproducible, by design


def test_central_dp_noise_cannot_be_regenerated_from_the_record():
    """Central noise was `seeded_rng(seed, "central-dp", round)` on the first reply folded:
    anyone with the record un-noised the release."""
    outcome, mean = run_round(noise_multiplier=4.0)  # seed 0, 8 clients
    released = outcome.state["w"]["w"].numpy().astype(np.float64)
    regenerated = seeded_rng(0, "central-dp", 0).normal(0.0, 4.0, WIDE) / 8
    assert np.abs(released - regenerated - mean).max() > 0.5  # was equal to 1e-6
    assert "OS entropy" in outcome.privacy["noise_source"]


@pytest.mark.parametrize("rule", ["median", "krum", "trimmed-mean"])
@pytest.mark.parametrize("settings, flag", [
    ({"dp_clip": 1.0, "dp_noise": 1.0, "dp_mode": "central"}, "--dp-mode central"),
    ({"secagg": True}, "--secagg"),
])
def test_a_robust_rule_is_refused_where_only_a_mean_is_sound(tmp_path, rule, settings, flag):
    """Central DP's noise joins one reply of the mean (a robust rule may drop it); SecAgg+
    reveals only the mean (the rule was silently replaced by it). Refused by name, before
    any work."""
    config = RunConfig(method="fedavg-lora", model="tiny-random", clients=3, test_size=10,
                       options={"rule": rule, "rounds": 1}, **settings)
    with pytest.raises(ValueError, match=f"{flag}: fedavg-lora with rule={rule} does not"):
        run_experiment(config, tmp_path)
    assert not (tmp_path / "result.json").exists()


def test_flower_refuses_a_robust_rule_with_secagg_before_starting(tmp_path, monkeypatch):
    from fedsteer.flower import launch

    started = []
    monkeypatch.setattr(launch, "simulate", lambda *a, **k: started.append(1))
    config = RunConfig(method="fedavg-lora", model="tiny-random", clients=3, secagg=True,
                       options={"rule": "krum", "rounds": 1})
    with pytest.raises(ValueError, match="--secagg: fedavg-lora with rule=krum does not"):
        launch.run_on_flower(config, tmp_path / "out")
    assert not started


def test_central_dp_screens_nothing_by_private_norms_and_records_no_norm():
    """The outlier screen chose replies by their exact, un-noised norms (an honest client
    with a larger update than the rest was dropped, outside the accounted mechanism), and the
    record kept the median norm; under central DP the clip bounds every reply instead."""

    class Uneven(Steps):
        def client_step(self, message, client):  # client 0 moves 100× farther than the rest
            reply = super().client_step(message, client)
            scale = 1.0 if client.cid == 0 else 0.01
            reply["w"]["w"] = type(reply["w"]["w"])(reply["w"]["w"].numpy() * scale / 3)
            return reply

    env, clients = make_clients(4)
    dp = CentralDP(clip=1.0, noise_multiplier=0.0)
    config = RuntimeConfig(dp=dp.client_side(), central_dp=dp, reply_norm_factor=10,
                           max_client_weight=1)
    outcome = InProcessRuntime(config).run(Uneven(), clients, env)
    assert outcome.rounds[0].rejected == []
    expected = np.mean([clipped_step(c) * (1.0 if c == 0 else 0.01) for c in range(4)], axis=0)
    np.testing.assert_allclose(outcome.state["w"]["w"].numpy(), expected, atol=1e-6)
    assert outcome.rounds[0].update_norms == {}
    assert outcome.privacy["outlier_screens"].startswith("off")


def test_an_unclipped_reply_is_rejected_without_its_norm_in_the_record():
    env, clients = make_clients(4)
    config = RuntimeConfig(dp=CentralDP(clip=5.0, noise_multiplier=0.0).client_side(),
                           central_dp=CentralDP(clip=1.0, noise_multiplier=1.0),
                           reply_norm_factor=0, max_client_weight=1)
    with pytest.raises(RuntimeError, match="every client failed") as failure:
        InProcessRuntime(config).run(Steps(), clients, env)  # norm 3 > the server's clip 1
    reasons = str(failure.value)
    assert "exceeds the DP clip 1" in reasons
    assert not re.search(r"norm \d", reasons)  # was "update norm 3 exceeds ..."


def test_a_poisson_round_of_nobody_releases_and_spends_nothing():
    """It released N(0, (z·clip)²) — not z·clip/(q·N) — on an unchanged state, and spent ε."""
    seed = next(s for s in range(1000)
                if not sample_clients(RuntimeConfig(fraction=0.02, sampling="poisson",
                                                    seed=s), 0, 100))
    env, clients = make_clients(100)
    dp = CentralDP(clip=1.0, noise_multiplier=1.0)
    config = RuntimeConfig(fraction=0.02, sampling="poisson", seed=seed, dp=dp.client_side(),
                           central_dp=dp, reply_norm_factor=0, max_client_weight=1)
    outcome = InProcessRuntime(config).run(ShapedSteps(), clients, env)
    assert outcome.rounds[0].clients == []
    assert not outcome.state["w"]["w"].numpy().any()
    assert outcome.privacy["rounds_accounted"] == 0 and outcome.privacy["epsilon"] == 0.0
