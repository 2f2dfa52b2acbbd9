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


def _spy_forwards(monkeypatch) -> list[tuple[int, int, tuple[int, ...]]]:
    """Record each client-batched forward's rows, width and its groups' own widths."""
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    original = LabelScorer.grouped_logprobs

    def spy(self, batch):
        seen.append((*batch.ids.shape, batch.groups.widths))
        return original(self, batch)

    monkeypatch.setattr(LabelScorer, "grouped_logprobs", spy)
    return seen


@pytest.mark.parametrize("overhead", [None, 0, 10**9])
def test_batched_calibration_equals_calibrating_clients_one_by_one(tiny_lm, monkeypatch,
                                                                   overhead):
    """Losses, coefficients and rows of three clients of different sizes (their batches run
    out at different steps), noise on: batched = sequential to 1e-5, however a step is split
    into forwards — by width (default), one width a forward (0) or all in one (10⁹)."""
    from fedsteer.methods import local_training

    if overhead is not None:
        monkeypatch.setattr(local_training, "FORWARD_OVERHEAD_TOKENS", overhead)
    env = make_env(tiny_lm)
    clients = make_clients(env, sizes=(2, 5, 9))
    attn, mlp = (0.1 * v for v in random_vectors(tiny_lm))
    method = IFedICL(local_epochs=3, calibration_per_class=4, noise=0.01)
    start = initial_coefficients(tiny_lm.num_layers, 0.1, 1.0)
    alone = [method.calibrate(c, attn, mlp, start, rnd=1) for c in clients]
    seen = _spy_forwards(monkeypatch)
    together = method.calibrate_together(clients, attn, mlp, [start] * 3, rnd=1)
    sizes = [rows for _, _, rows in together]
    assert sizes == [3 * 2, 3 * 5, 3 * 8]  # calibration rows per client: data-capped
    if overhead is not None:
        mixed = [len(set(group_widths)) > 1 for _, _, group_widths in seen]
        assert any(mixed) == (overhead > 0) and len(seen) >= 3 * 4  # the 8-row client's steps
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
    assert client_batch_size(RuntimeConfig(), method) == 4  # 8 rows / 2 a client
    assert client_batch_size(RuntimeConfig(client_batch_rows=6), method) == 3
    assert client_batch_size(RuntimeConfig(client_batch=100, client_batch_rows=6), method) == 3
    assert client_batch_size(RuntimeConfig(client_batch=1), method) == 1
    lora = METHODS["fedavg-lora"](batch_size=8)  # measured slower batched: on request only
    assert client_batch_size(RuntimeConfig(), lora) == 1
    assert client_batch_size(RuntimeConfig(client_batch=4), lora) == 1  # 8 rows: one client
    assert client_batch_size(RuntimeConfig(client_batch=4, client_batch_rows=32), lora) == 4
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


# ----------------------------------------------------------------------------- LoRA
def _lora_setup(lm, sizes=(4, 7, 12)):
    from flwr.app import ConfigRecord, RecordDict

    from fedsteer.methods.fedavg_lora import FedAvgLoRA

    env = make_env(lm)
    method = FedAvgLoRA(rank=4, local_epochs=2, batch_size=3, lr=5e-3, local_examples=10)
    state = method.initial_state(env)
    message = RecordDict({"adapter": state["adapter"], "config": ConfigRecord({"round": 0})})
    return method, message, make_clients(env, sizes=sizes)


def test_per_row_lora_equals_each_clients_peft_adapter(tiny_lm):
    from fedsteer.models.lora import (
        RowAdapters,
        lora_adapter,
        lora_config,
        per_row_lora,
        trainable_adapter,
    )

    config = lora_config(4, 8.0, ("q_proj", "v_proj"))
    scorer = LabelScorer(tiny_lm, SPEC.label_words)
    adapters = []
    for seed in range(len(QUERIES)):
        with lora_adapter(tiny_lm, config, seed=seed) as peft_model:
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # B starts at zero: give each adapter an effect
                    torch.nn.init.normal_(param, std=0.5, generator=torch.Generator()
                                          .manual_seed(seed))
            from fedsteer.models.lora import adapter_weights

            adapters.append(adapter_weights(peft_model))
    alone = []
    for group, weights in zip(QUERIES, adapters, strict=True):
        with torch.no_grad(), lora_adapter(tiny_lm, config, weights):
            alone.append(scorer.logprobs(group))
    batch = scorer.grouped(QUERIES)
    rows = RowAdapters([trainable_adapter(w) for w in adapters], [0, 1, 2], batch.groups)
    with torch.no_grad(), per_row_lora(tiny_lm, config, rows):
        together = scorer.grouped_logprobs(batch)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0][0], alone[1][0])  # the adapters do differ


def test_batched_lora_training_equals_training_clients_one_by_one(tiny_lm):
    """Three clients with 4, 7 and 10 examples a round (their batches run out at different
    steps): adapters and losses batched = one by one, to 1e-5."""
    method, message, clients = _lora_setup(tiny_lm)
    alone = [method.client_step(message, c) for c in clients]
    together = method.client_steps(message, clients)
    assert together.rows == [2 * 4, 2 * 7, 2 * 10]
    for one, both in zip(alone, together.contents, strict=True):
        for key in one["adapter"]:
            np.testing.assert_allclose(both["adapter"][key].numpy(),
                                       one["adapter"][key].numpy(), atol=1e-5, rtol=0)
        assert both["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], abs=1e-5)
    moved = [np.abs(alone[0]["adapter"][k].numpy() - message["adapter"][k].numpy()).max()
             for k in message["adapter"]]
    assert max(moved) > 1e-3


def test_a_batched_lora_run_keeps_to_the_row_budget(tiny_lm, monkeypatch):
    """budget 7 rows, 3 rows a client step: two clients a forward, never more."""
    from fedsteer.methods.fedavg_lora import FedAvgLoRA

    env = make_env(tiny_lm)
    method = FedAvgLoRA(rank=2, rounds=1, batch_size=3, local_examples=6)
    seen = _spy_forwards(monkeypatch)
    outcome = InProcessRuntime(RuntimeConfig(client_batch=8, client_batch_rows=7)).run(
        method, make_clients(env, sizes=(6, 6, 6, 6, 6)), env)
    rows = [r for r, _, _ in seen]
    assert outcome.rounds[0].client_batches == [2, 2]  # the fifth client alone, unbatched
    assert max(rows) <= 7 and 6 in rows


def test_a_run_resumes_and_a_record_is_reused_under_other_batching_or_threads(tmp_path):
    """Client batching and threads choose how a run executes, never what it computes: a
    checkpoint or a finished record written under one setting serves another. (Changing the
    row budget's default once made every recorded benchmark cell refuse to be reused.)"""
    import dataclasses

    from fedsteer.bench import reuse_finished
    from fedsteer.experiment import RunConfig, run_experiment

    config = RunConfig("ifed-icl", "sst2", "tiny-random", clients=3, rounds=2, test_size=6,
                       client_batch_rows=64, threads=1, options={"local_epochs": 1})
    first = run_experiment(config, tmp_path)
    other = dataclasses.replace(config, client_batch=1, client_batch_rows=8, threads=None)
    assert reuse_finished(tmp_path, other)["metrics"] == first["metrics"]
    resumed = run_experiment(other, tmp_path, resume=True)  # from the finished checkpoint
    assert resumed["metrics"]["accuracy"] == first["metrics"]["accuracy"]
    assert resumed["costs"]["num_rounds"] == first["costs"]["num_rounds"]


def test_forward_chunks_split_only_where_padding_costs_more_than_a_forward():
    from fedsteer.methods.local_training import forward_chunks

    assert forward_chunks([30, 30, 30], [2, 2, 2], overhead=16) == [[0, 1, 2]]
    # a 200-token client would pad the two 10-token clients' 4 rows by 760 tokens
    assert forward_chunks([200, 10, 12], [2, 2, 2], overhead=16) == [[1, 2], [0]]
    assert forward_chunks([200, 10, 12], [2, 2, 2], overhead=10**9) == [[0, 1, 2]]
    assert forward_chunks([200, 10, 12], [2, 2, 2], overhead=0) == [[1], [2], [0]]
    assert forward_chunks([], [], overhead=16) == []


def test_selected_groups_are_the_forward_those_groups_get_alone(tiny_lm):
    scorer = LabelScorer(tiny_lm, SPEC.label_words)
    whole = scorer.grouped(QUERIES)
    for members in ([0, 2], [1], [2, 0, 1]):
        alone, part = scorer.grouped([QUERIES[g] for g in members]), whole.select(members)
        assert part.groups == alone.groups
        assert torch.equal(part.ids, alone.ids) and torch.equal(part.mask, alone.mask)


def test_a_long_client_does_not_pad_the_short_clients_rows(tiny_lm, monkeypatch):
    """Three clients step together; one's queries are ~60 tokens longer. The short two share
    a forward, the long one has its own: no row is padded to the long client's width."""
    from fedsteer.methods.local_training import LocalRun, train_together

    long = "Review: " + "a very long and winding film " * 12 + "\nSentiment:"
    texts = [["Review: great\nSentiment:", "Review: awful\nSentiment:"],
             ["Review: fine\nSentiment:", "Review: dull\nSentiment:"], [long, long]]
    scale = [torch.nn.Parameter(torch.ones(())) for _ in texts]
    scorer = LabelScorer(tiny_lm, SPEC.label_words)

    def run(k: int) -> LocalRun:
        def loss(logp, rows):
            return -(scale[k] * logp[:, 0]).mean()
        return LocalRun(texts[k], None, [[0, 1]], torch.optim.SGD([scale[k]], lr=0.1), loss=loss)

    seen = _spy_forwards(monkeypatch)
    train_together([run(k) for k in range(3)], scorer, lambda active, groups: None)
    widths = scorer.grouped(texts).groups.widths
    assert sorted(seen) == sorted([(4, max(widths[:2]), widths[:2]), (2, widths[2], widths[2:])])
    assert all(s.grad is not None for s in scale)


@pytest.mark.parametrize("method", ["bdpl", "asyndbt"])
def test_a_prompt_step_scoring_its_sampled_prompts_together_equals_one_at_a_time(
        tmp_path, monkeypatch, method):
    """BDPL's and AsynDBT's I sampled prompts are a batch of different prefixes: scored in
    shared forwards, the run learns the same prompt and pays the same bill."""
    import json

    from fedsteer.experiment import RunConfig, run_experiment

    options = {"prompt_length": 2, "candidates": 6, "samples": 4, "shots_per_class": 2,
               "batch_size": 3, "steps_per_round": 2, "lr": 0.05}
    if method == "asyndbt":  # the simulated clock: the same worker order in both runs
        options |= {"iterations": 3, "demo_candidates": 2, "active": 1,
                    "latency": [0.5, 1.0, 2.0]}
    config = RunConfig(method, "sst2", "tiny-random", clients=3, test_size=6, options=options)

    def run(name: str) -> tuple[dict, dict]:
        record = run_experiment(config, tmp_path / name, save_dir=tmp_path / name / "saved")
        prompt = json.loads((tmp_path / name / "saved" / "prompt.json").read_text())
        return record["metrics"], prompt

    together, prompt_together = run("together")
    calls = []
    monkeypatch.setattr(LabelScorer, "score_prefixed", lambda self, requests: (
        calls.append(len(requests)),
        [self.score(queries, prefix=prefix) for prefix, queries in requests])[1])
    in_turn, prompt_in_turn = run("in-turn")
    assert max(calls) == 4  # the step's prompts reached the box together, here asked in turn
    assert together == in_turn  # accuracy, the learned prompt, every call and token billed
    np.testing.assert_allclose(prompt_together["probs"], prompt_in_turn["probs"], atol=1e-5)
