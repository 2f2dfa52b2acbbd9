"""Client-level DP: clipping, noise, the accountant's ε, and the run record."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.federation.privacy import ClientDP, epsilon_for, noise_for_epsilon


def record(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def test_an_update_is_clipped_relative_to_the_global_array():
    message = RecordDict({"coef": record(c=[1.0, 1.0])})
    reply = RecordDict({"coef": record(c=[4.0, 5.0]), "metrics": MetricRecord({"loss": 0.3})})
    dp = ClientDP(clip=1.0, noise_multiplier=0.0)
    out = dp.privatize(reply, message, np.random.default_rng(0))
    sent = out["coef"]["c"].numpy()
    np.testing.assert_allclose(sent, [1.6, 1.8], rtol=1e-6)  # 1 + (3, 4) / 5
    assert "metrics" not in out  # numbers outside array records would leak unprotected


def test_an_array_without_a_global_counterpart_is_clipped_as_it_is():
    reply = RecordDict({"vectors": record(a=[3.0, 0.0], b=[0.0, 4.0])})  # joint norm 5
    out = ClientDP(clip=2.5, noise_multiplier=0.0).privatize(reply, RecordDict(),
                                                             np.random.default_rng(0))
    np.testing.assert_allclose(out["vectors"]["a"].numpy(), [1.5, 0.0])
    np.testing.assert_allclose(out["vectors"]["b"].numpy(), [0.0, 2.0])


def test_a_record_may_have_its_own_clip_norm():
    reply = RecordDict({"vectors": record(a=[30.0, 40.0]), "coef": record(c=[3.0, 4.0])})
    dp = ClientDP(clip=1.0, noise_multiplier=0.0, record_clips={"vectors": 10.0})
    out = dp.privatize(reply, RecordDict(), np.random.default_rng(0))
    np.testing.assert_allclose(out["vectors"]["a"].numpy(), [6.0, 8.0])
    np.testing.assert_allclose(out["coef"]["c"].numpy(), [0.6, 0.8])


def test_noise_has_the_promised_scale():
    reply = RecordDict({"v": record(x=np.zeros(20000))})
    out = ClientDP(clip=0.5, noise_multiplier=2.0).privatize(reply, RecordDict(),
                                                             np.random.default_rng(1))
    assert out["v"]["x"].numpy().std() == pytest.approx(1.0, rel=0.03)


def test_epsilon_matches_dp_accounting_directly():
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(1.1), 10)
    assert epsilon_for([1.1] * 10, 1e-5) == pytest.approx(reference.get_epsilon(1e-5))
    assert epsilon_for([0.0], 1e-5) == math.inf


def test_noise_for_epsilon_spends_the_target():
    for target in (1.0, 8.0):
        z = noise_for_epsilon(target, 1e-5, rounds=4)  # replace-one: z/2 per round
        assert epsilon_for([z / 2] * 4, 1e-5) == pytest.approx(target, rel=1e-2)
    assert noise_for_epsilon(math.inf, 1e-5, 4) == 0.0
    with pytest.raises(ValueError, match="use replace-one"):
        noise_for_epsilon(8.0, 1e-5, rounds=4, adjacency="add-remove")


def test_a_dp_run_records_its_epsilon(tmp_path):
    options = {"rounds": 2, "local_epochs": 1, "demos_per_class": 1, "calibration_per_class": 2}
    config = RunConfig(method="ifed-icl", model="tiny-random", clients=3, test_size=10,
                       dp_clip=1.0, dp_noise=1.0, options=options)
    privacy = run_experiment(config, tmp_path)["privacy"]
    # Three rounds (vectors, then coefficients twice), one array record per reply each.
    assert privacy["rounds_accounted"] == 3
    # replace-one adjacency: sensitivity 2·clip, so each round is a Gaussian of z/2 = 0.5
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(0.5), 3)
    assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))
    assert privacy["adjacency"] == "replace-one"


@pytest.mark.parametrize("mode, secagg", [("local", False), ("local", True), ("central", False)])
def test_add_remove_adjacency_is_refused(tmp_path, mode, secagg):
    """Issue 41: the record names who took part and the mean divides by them, so one
    client's presence is no secret; add/remove (sensitivity clip) understated ε, also
    with --secagg, where it was accepted."""
    with pytest.raises(ValueError, match="dp adjacency 'add-remove': use replace-one"):
        ClientDP(clip=1.0, noise_multiplier=1.0, adjacency="add-remove")
    config = RunConfig(method="ifed-icl", model="tiny-random", clients=3, test_size=10,
                       dp_clip=1.0, dp_noise=1.0, dp_adjacency="add-remove", dp_mode=mode,
                       secagg=secagg)
    with pytest.raises(ValueError, match="dp adjacency 'add-remove': use replace-one"):
        run_experiment(config, tmp_path)


@pytest.mark.parametrize("method", ["local-icl", "bdpl"])
def test_dp_is_refused_for_a_method_that_reports_through_metrics(tmp_path, method):
    config = RunConfig(method=method, model="tiny-random", clients=3, test_size=10, dp_clip=1.0)
    with pytest.raises(ValueError, match=f"{method} reports through metrics.*fedavg-lora"):
        run_experiment(config, tmp_path)
    assert not (tmp_path / "result.json").exists()
