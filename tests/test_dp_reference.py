"""DP that keeps IFed-ICL useful (issue 41): a public reference, relative row clips, and
per-record noise budgets composed on the ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from typer.testing import CliRunner

from fedsteer.cli import app as cli
from fedsteer.eval.record import RESULT_FILE, read_result
from fedsteer.federation import InProcessRuntime, RuntimeConfig
from fedsteer.federation.privacy import (
    CentralDP,
    CentralLedger,
    ClientDP,
    PrivacyLedger,
    epsilon_for,
    noise_for_target,
)
from fedsteer.methods import Client, Environment
from fedsteer.methods.ifed_icl import EXTRACT, IFedICL
from toy import SPEC, Example, examples


def make_env(lm, test_size: int = 6, start: int = 100) -> Environment:
    return Environment(task=SPEC, test=examples(test_size, start), model_name="tiny", _lm=lm,
                       batch_size=4)


def make_clients(env, offset: int = 0, sizes=(4, 6, 8)) -> list[Client]:
    return [Client(cid=i, data=examples(n, 10 * i + offset), env=env)
            for i, n in enumerate(sizes)]


def method(**overrides) -> IFedICL:
    return IFedICL(**{**dict(rounds=1, local_epochs=1, demos_per_class=2,
                             calibration_per_class=2), **overrides})


def rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def row_clipped(u: np.ndarray, clips: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows(u), axis=1)
    return u * np.minimum(1.0, clips / np.maximum(norms, 1e-300))[:, None]


# ------------------------------------------------------------- the public reference
def extraction_message(m: IFedICL, env: Environment) -> RecordDict:
    return m.configure_round(0, m.initial_state(env))


def test_the_reference_is_the_template_with_an_empty_input_and_reads_no_data(tiny_lm):
    m = method()
    env, other = make_env(tiny_lm), make_env(tiny_lm, test_size=9, start=300)
    reference = m.reference_reply(extraction_message(m, env), env)["vectors"]
    empty = [SPEC.format_demo(Example("", label)) + SPEC.demo_separator
             for label in range(len(SPEC.labels))]
    attn, mlp = m.extract_texts(env, empty)
    np.testing.assert_allclose(reference["attn"].numpy(), attn.numpy(), atol=1e-6)
    np.testing.assert_allclose(reference["mlp"].numpy(), mlp.numpy(), atol=1e-6)
    # other test rows (the server's only rows) change nothing
    again = m.reference_reply(extraction_message(m, other), other)["vectors"]
    np.testing.assert_array_equal(again["attn"].numpy(), reference["attn"].numpy())
    # calibration rounds have none (their reference is the global coefficients)
    state = m.initial_state(env)
    state["vectors"] = reference
    assert m.reference_reply(m.configure_round(1, state), env) is None


class Recording(IFedICL):
    """Keeps the vectors each client was sent in the extraction round."""

    seen: list = []

    def client_step(self, message, client):
        if message["config"]["phase"] == EXTRACT:
            Recording.seen.append(message["vectors"]["attn"].numpy().copy()
                                  if "vectors" in message else None)
        return super().client_step(message, client)


def central(kappa: float = 0.5, z: float = 0.0) -> CentralDP:
    return CentralDP(clip=10.0, noise_multiplier=z, relative_clips={"vectors": kappa})


def test_under_dp_the_extraction_message_carries_the_same_reference_whatever_the_data(tiny_lm):
    env, dp = make_env(tiny_lm), central()
    sent = []
    for offset in (0, 500):  # two federations holding different data
        Recording.seen = []
        config = RuntimeConfig(dp=dp.client_side(), central_dp=dp)
        outcome = InProcessRuntime(config).run(
            Recording(rounds=1, local_epochs=1, demos_per_class=2, calibration_per_class=2),
            make_clients(env, offset), env)
        assert len(Recording.seen) == 3 and all(s is not None for s in Recording.seen)
        sent.append(Recording.seen[0])
        assert outcome.privacy["references"]["vectors"]["round"] == 0
    np.testing.assert_array_equal(sent[0], sent[1])
    m = method()
    public = m.reference_reply(extraction_message(m, env), env)["vectors"]["attn"].numpy()
    np.testing.assert_array_equal(sent[0], public)


def test_without_dp_the_message_carries_no_reference(tiny_lm):
    env = make_env(tiny_lm)
    Recording.seen = []
    InProcessRuntime().run(Recording(rounds=1, local_epochs=1, demos_per_class=2,
                                     calibration_per_class=2), make_clients(env), env)
    assert Recording.seen == [None, None, None]


def test_central_dp_clips_each_row_of_the_deviation_from_the_reference(tiny_lm):
    """The released vectors are reference + mean of row-clipped deviations (noise 0 here),
    not the mean of the vectors clipped as a whole."""
    env, kappa = make_env(tiny_lm), 0.05
    m, dp = method(), central(kappa)
    clients = make_clients(env)
    reference = m.reference_reply(extraction_message(m, env), env)["vectors"]
    expected = {}
    for key in ("attn", "mlp"):
        ref = reference[key].numpy().astype(np.float64)
        clips = kappa * np.linalg.norm(rows(ref), axis=1)
        deviations = [row_clipped(v.double().numpy()[...] - ref, clips)
                      for v in (dict(zip(("attn", "mlp"), m.extract(c), strict=True))[key]
                                for c in clients)]
        expected[key] = ref + np.mean(deviations, axis=0)
        assert not np.allclose(expected[key], np.mean(
            [dict(zip(("attn", "mlp"), m.extract(c), strict=True))[key].numpy()
             for c in clients], axis=0), atol=1e-3)  # κ binds: the clip changes the mean
    config = RuntimeConfig(dp=dp.client_side(), central_dp=dp)
    state = InProcessRuntime(config).run(m, clients, env).state
    for key in ("attn", "mlp"):
        np.testing.assert_allclose(state["vectors"][key].numpy(), expected[key], atol=1e-4)


# ------------------------------------------------------------- relative clips, noise
def reference_record() -> ArrayRecord:
    ref = np.zeros((2, 4000), np.float32)
    ref[0, 0], ref[1, 0] = 1.0, 100.0  # rows whose norms differ 100-fold
    return ArrayRecord({"a": Array(ref)})


def test_client_dp_clips_rows_to_kappa_times_the_reference_rows_and_noises_in_proportion():
    ref = reference_record()
    message = RecordDict({"v": ref})
    update = np.ones((2, 4000)) * 10.0  # far beyond both rows' clips
    reply = RecordDict({"v": ArrayRecord({"a": Array((ref["a"].numpy() + update)
                                                     .astype(np.float32))})})
    kappa = 0.5
    clipped = ClientDP(clip=1.0, noise_multiplier=0.0, relative_clips={"v": kappa}).privatize(
        reply, message, np.random.default_rng(0))["v"]["a"].numpy() - ref["a"].numpy()
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), [0.5, 50.0], rtol=1e-5)
    z = 2.0
    noisy = ClientDP(clip=1.0, noise_multiplier=z, relative_clips={"v": kappa}).privatize(
        reply, message, np.random.default_rng(1))["v"]["a"].numpy() - ref["a"].numpy()
    noise = noisy - clipped
    # each row's noise std: z·√R·clip_row (R = 2 rows), so the record is a Gaussian of z
    np.testing.assert_allclose(noise.std(axis=1), z * math.sqrt(2) * np.array([0.5, 50.0]),
                               rtol=0.05)


def test_central_noise_is_per_row_over_m_and_a_row_over_its_clip_is_refused():
    ref = reference_record()
    message = RecordDict({"config": ConfigRecord({}), "v": ref})
    dp = CentralDP(clip=1.0, noise_multiplier=3.0, relative_clips={"v": 0.5})
    mean = RecordDict({"v": ArrayRecord({"a": Array(ref["a"].numpy().copy())})})
    noise = (dp.noised(mean, replies=10, rng=np.random.default_rng(2), message=message)
             ["v"]["a"].numpy() - ref["a"].numpy())
    np.testing.assert_allclose(noise.std(axis=1), 3.0 * math.sqrt(2) * np.array([0.5, 50]) / 10,
                               rtol=0.05)
    # row 0 one unit beyond its clip 0.5, the whole update far below the record's 50.0025
    bad = ref["a"].numpy().copy()
    bad[0, 1] = 1.0
    reply = RecordDict({"v": ArrayRecord({"a": Array(bad)})})
    assert "exceeds its DP clip" in dp.clip_problem(reply, message)
    bad[0, 1] = 0.4
    reply = RecordDict({"v": ArrayRecord({"a": Array(bad)})})
    assert dp.clip_problem(reply, message) is None


# ------------------------------------------------------------- per-record budgets
@pytest.mark.parametrize("ledger_kind", ["central", "local"])
def test_the_ledger_composes_each_records_own_noise(ledger_kind):
    z_vectors, z_coef = 1.5, 4.5
    if ledger_kind == "central":
        dp = CentralDP(clip=1.0, noise_multiplier=z_vectors, record_noise={"coef": z_coef})
        ledger = CentralLedger(dp, population=100)
    else:
        dp = ClientDP(clip=1.0, noise_multiplier=z_vectors, record_noise={"coef": z_coef})
        ledger = PrivacyLedger(dp)
    ledger.record_round(1, 100, ["vectors"])
    ledger.record_round(1, 100, ["coef"])
    ledger.record_round(1, 100, ["coef"])
    expected = epsilon_for([z_vectors / 2, z_coef / 2, z_coef / 2], 1e-5)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    # a Gaussian's RDP adds as 1/σ²: the same ε as one Gaussian of 1/√Σ(1/σ_i²)
    single = 1 / math.sqrt((2 / z_vectors) ** 2 + 2 * (2 / z_coef) ** 2)
    assert ledger.epsilon() == pytest.approx(epsilon_for([single], 1e-5), rel=1e-3)
    summary = ledger.summary()
    assert summary["record_noise"] == {"coef": z_coef, "vectors": z_vectors}
    assert summary["epsilon_per_record"]["vectors"] == pytest.approx(
        epsilon_for([z_vectors / 2], 1e-5))
    assert summary["epsilon_per_record"]["coef"] == pytest.approx(
        epsilon_for([z_coef / 2] * 2, 1e-5))
    # one round releasing both records is one Gaussian of 1/(2·√(1/z1² + 1/z2²))
    both = CentralLedger(CentralDP(clip=1.0, noise_multiplier=z_vectors,
                                   record_noise={"coef": z_coef}), 100)
    both.record_round(2, 100, ["coef", "vectors"])
    assert both.noise_multipliers == [pytest.approx(
        1 / (2 * math.sqrt(1 / z_vectors**2 + 1 / z_coef**2)))]


def test_noise_for_target_calibrates_per_record_budgets_on_the_ledger():
    def ledger_for(z):
        return CentralLedger(CentralDP(clip=1.0, noise_multiplier=z,
                                       record_noise={"vectors": z, "coef": 3 * z}), 1000)

    releases = [["vectors"], ["coef"]]
    z = noise_for_target(8.0, ledger_for, len(releases), releases=releases)
    ledger = ledger_for(z)
    for names in releases:
        ledger.record_round(1, 1000, names)
    assert ledger.epsilon() == pytest.approx(8.0, abs=1e-3)
    # all of ε on one record at the same z would be less noise than two equal releases
    equal = noise_for_target(8.0, lambda s: CentralLedger(CentralDP(1.0, s), 1000), 2)
    assert z < equal


def test_local_dp_runs_on_the_reference_and_records_each_records_budget(tiny_lm):
    env = make_env(tiny_lm)
    dp = ClientDP(clip=1.0, noise_multiplier=2.0, record_noise={"coef": 6.0},
                  relative_clips={"vectors": 0.25})
    outcome = InProcessRuntime(RuntimeConfig(dp=dp)).run(method(), make_clients(env), env)
    privacy = outcome.privacy
    assert privacy["references"]["vectors"]["round"] == 0
    assert privacy["record_noise"] == {"coef": 6.0, "vectors": 2.0}
    assert privacy["epsilon"] == pytest.approx(epsilon_for([1.0, 3.0], 1e-5))
    assert all(not r.rejected for r in outcome.rounds)


def test_the_cli_sets_each_records_noise_and_relative_clips(tmp_path):
    """`fedsteer run` reaches what the privacy benchmark recorded (per-record z, κ row
    clips on the public reference), not only the Python API."""
    result = CliRunner().invoke(cli, [
        "run", "ifed-icl", "--model", "tiny-random", "--clients", "3", "--test-size", "6",
        "-o", "rounds=2", "-o", "local_epochs=1", "--dp-mode", "central", "--dp-clip", "1",
        "--dp-noise", "2", "--dp-noise-record", "coef=6", "--dp-clip-relative", "vectors=0.25",
        "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    privacy = read_result(next(tmp_path.rglob(RESULT_FILE)).parent)["privacy"]
    assert privacy["record_noise"] == {"coef": 6.0, "vectors": 2.0}
    assert privacy["relative_clips"] == {"vectors": 0.25}
    assert privacy["references"]["vectors"]["round"] == 0


def test_a_malformed_record_flag_names_itself():
    result = CliRunner().invoke(cli, ["run", "ifed-icl", "--model", "tiny-random",
                                      "--dp-clip", "1", "--dp-noise-record", "coef"])
    assert result.exit_code == 2 and "--dp-noise-record" in result.output


@pytest.mark.parametrize("ledger_kind", ["central", "local"])
def test_the_ledger_names_a_per_record_setting_no_release_carried(ledger_kind):
    """`coefficients=4` when the record is `coef`: the run used the default z for `coef`
    (the accounting stays true), but the user asked for something that never happened."""
    settings = dict(clip=1.0, noise_multiplier=2.0, record_noise={"coefficients": 4.0},
                    relative_clips={"vector": 0.25}, record_clips={"coef": 0.5})
    ledger = (CentralLedger(CentralDP(**settings), population=10) if ledger_kind == "central"
              else PrivacyLedger(ClientDP(**settings)))
    ledger.record_round(1, 10, ["vectors"])
    ledger.record_round(1, 10, ["coef"])
    unused = ledger.summary()["unused_settings"]
    assert len(unused) == 2
    assert any("--dp-noise-record" in u and "'coefficients'" in u for u in unused)
    assert any("--dp-clip-relative" in u and "'vector'" in u for u in unused)
    assert all("coef, vectors" in u for u in unused)  # what the run did release


def test_a_run_warns_of_a_record_name_the_method_never_released(tmp_path):
    result = CliRunner().invoke(cli, [
        "run", "ifed-icl", "--model", "tiny-random", "--clients", "3", "--test-size", "6",
        "-o", "rounds=2", "-o", "local_epochs=1", "--dp-mode", "central", "--dp-clip", "1",
        "--dp-noise", "2", "--dp-noise-record", "coefficients=6", "--out", str(tmp_path)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = read_result(next(tmp_path.rglob(RESULT_FILE)).parent)
    assert record["privacy"]["record_noise"] == {"coef": 2.0, "vectors": 2.0}
    assert any("'coefficients'" in w for w in record["warnings"])
    assert "coefficients" in result.output  # said on the console too, not only filed
