"""Client-batched simulation (issue 22): stepping clients together changes cost, never results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsteer.federation import InProcessRuntime, RuntimeConfig
from fedsteer.federation.runtime import client_batch_size
from fedsteer.methods import METHODS
from fedsteer.methods.ifed_icl import IFedICL
from fedsteer.models.hooks import RowGroups, Steering, initial_coefficients, inject, inject_rows
from fedsteer.models.scoring import LabelScorer
from test_methods_ifed_icl import make_clients, make_env, random_vectors
from toy import SPEC

QUERIES = [["Review: great film\nSentiment:", "Review: a long and dull film\nSentiment:"],
           ["Review: awful\nSentiment:"],
           ["Review: witty, lovely and superb\nSentiment:", "Review: fine\nSentiment:",
            "Review: boring\nSentiment:"]]


def _coefficients(lm, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    base = initial_coefficients(lm.num_layers, 0.1, 1.0)
    return [base + 0.3 * torch.randn(base.shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_per_row_injection_equals_injecting_each_group_alone(tiny_lm, noise):
    """Different coefficients (and noise streams) per client in one forward give each
    client's rows exactly what its own forward gives them."""
    scorer = LabelScorer(tiny_lm, SPEC.label_words)
    attn, mlp = (0.1 * v for v in random_vectors(tiny_lm))
    coefs = _coefficients(tiny_lm, len(QUERIES))
    alone = []
    for group, coef in zip(QUERIES, coefs, strict=True):
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad(), inject(tiny_lm, attn, mlp, coef, noise=noise, generator=gen):
            alone.append(scorer.logprobs(group))
    batch = scorer.grouped(QUERIES)
    steering = Steering(torch.stack(coefs), batch.groups,
                        [torch.Generator().manual_seed(7) for _ in QUERIES], noise)
    with torch.no_grad(), inject_rows(tiny_lm, attn, mlp, steering):
        together = scorer.grouped_logprobs(batch)
    assert batch.groups.spans == ((0, 2), (2, 3), (3, 6))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_row_groups_index_rows_by_client():
    groups = RowGroups(((0, 2), (2, 3)), (5, 4))
    assert groups.index.tolist() == [0, 0, 1] and groups.rows == 3


def test_batched_calibration_equals_calibrating_clients_one_by_one(tiny_lm):
    """Losses, coefficients and rows of three clients of different sizes (their batches run
    out at different steps), noise on: batched = sequential to 1e-5."""
    env = make_env(tiny_lm)
    clients = make_clients(env, sizes=(2, 5, 9))
    attn, mlp = (0.1 * v for v in random_vectors(tiny_lm))
    method = IFedICL(local_epochs=3, calibration_per_class=4, noise=0.01)
    start = initial_coefficients(tiny_lm.num_layers, 0.1, 1.0)
    alone = [method.calibrate(c, attn, mlp, start, rnd=1) for c in clients]
    together = method.calibrate_together(clients, attn, mlp, [start] * 3, rnd=1)
    sizes = [rows for _, _, rows in together]
    assert sizes == [3 * 2, 3 * 5, 3 * 8]  # calibration rows per client: data-capped
    for (coef, loss), (coef_b, loss_b, _) in zip(alone, together, strict=True):
        assert not torch.allclose(coef, start)
        torch.testing.assert_close(coef_b, coef, atol=1e-5, rtol=0)
        assert loss_b == pytest.approx(loss, abs=1e-5)


def _run(lm, client_batch, rounds=2):
    env = make_env(lm)
    method = IFedICL(rounds=rounds, local_epochs=2, demos_per_class=2, calibration_per_class=2)
    runtime = InProcessRuntime(RuntimeConfig(client_batch=client_batch))
    return runtime.run(method, make_clients(env, sizes=(4, 6, 8, 3)), env)


def test_a_batched_run_equals_the_one_by_one_run_and_bills_each_client(tiny_lm):
    sequential, batched = _run(tiny_lm, 1), _run(tiny_lm, None)
    np.testing.assert_allclose(batched.state["coef"]["coef"].numpy(),
                               sequential.state["coef"]["coef"].numpy(), atol=1e-5)
    for seq, bat in zip(sequential.rounds, batched.rounds, strict=True):
        assert (bat.bytes_up, bat.bytes_down, bat.clients) == (seq.bytes_up, seq.bytes_down,
                                                              seq.clients)
        assert sorted(bat.client_compute) == [0, 1, 2, 3]
        assert sum(bat.client_compute.values()) == pytest.approx(bat.client_seconds)
    # extraction one by one; each calibration round one batch of all four clients
    assert [r.client_batches for r in batched.rounds] == [[], [4], [4]]
    assert all(r.client_batches == [] for r in sequential.rounds)


def test_the_row_budget_sets_how_many_clients_step_together():
    method = IFedICL(batch_size=2)
    assert client_batch_size(RuntimeConfig(), method) == 32  # 64 rows / 2 a client
    assert client_batch_size(RuntimeConfig(client_batch_rows=6), method) == 3
    assert client_batch_size(RuntimeConfig(client_batch=100, client_batch_rows=6), method) == 3
    assert client_batch_size(RuntimeConfig(client_batch=1), method) == 1
    icl = METHODS["local-icl"]()
    assert client_batch_size(RuntimeConfig(), icl) == 1
    with pytest.raises(ValueError, match="cannot step its clients together"):
        client_batch_size(RuntimeConfig(client_batch=4), icl)


def test_a_batch_that_fails_is_stepped_one_by_one_so_the_failing_client_is_named(tiny_lm):
    class OneBadClient(IFedICL):
        def client_step(self, message, client):
            if client.cid == 2 and message["config"]["phase"] == "calibrate":
                raise OSError("disk full")
            return super().client_step(message, client)

        def client_steps(self, message, clients):
            if any(c.cid == 2 for c in clients) and message["config"]["phase"] == "calibrate":
                raise OSError("disk full")
            return super().client_steps(message, clients)

    env = make_env(tiny_lm)
    method = OneBadClient(rounds=1, local_epochs=1, demos_per_class=2, calibration_per_class=2)
    outcome = InProcessRuntime(RuntimeConfig(client_batch_rows=4)).run(
        method, make_clients(env, sizes=(4, 6, 8, 3)), env)
    calibrate = outcome.rounds[1]
    assert [r["cid"] for r in calibrate.rejected] == [2]
    assert calibrate.client_batches == [2]  # clients 0+1 batched; 2+3 fell back one by one
