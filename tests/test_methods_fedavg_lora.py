"""FedAvg-LoRA: adapters through peft on the shared model, FedAvg through Flower, artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, RecordDict
from safetensors.numpy import load_file

from fedsteer.eval.costs import payload_bytes
from fedsteer.federation import InProcessRuntime
from fedsteer.methods import Client, Environment, Reply, make_method
from fedsteer.methods.fedavg_lora import FedAvgLoRA, adapter_record
from fedsteer.models.lora import lora_adapter
from toy import SPEC, examples


def make_env(lm) -> Environment:
    return Environment(task=SPEC, test=examples(6, 100), model_name="tiny", _lm=lm, batch_size=4)


def make_clients(env, sizes=(4, 6, 8)) -> list[Client]:
    return [Client(cid=i, data=examples(n, 10 * i), env=env) for i, n in enumerate(sizes)]


def small(**overrides) -> FedAvgLoRA:
    return FedAvgLoRA(**{"rank": 2, "rounds": 2, "local_examples": 4, "batch_size": 2,
                         "lr": 1e-2, **overrides})


def logits(lm, text="Review: a film\nSentiment:"):
    with torch.no_grad():
        return lm.model(torch.tensor([lm.tokenizer(text)["input_ids"]])).logits


def test_the_adapter_is_removed_after_each_step(tiny_lm):
    before = logits(tiny_lm)
    method = small()
    env = make_env(tiny_lm)
    state = method.initial_state(env)
    weights = {k: np.random.default_rng(0).normal(size=v.numpy().shape).astype(np.float32)
               for k, v in state["adapter"].items()}
    with lora_adapter(tiny_lm, method.config, weights):
        assert not torch.allclose(logits(tiny_lm), before)  # the adapter is live
    assert torch.equal(logits(tiny_lm), before)  # and gone: other methods see the plain model
    assert not any("lora" in name for name, _ in tiny_lm.model.named_modules())


def test_a_fresh_adapter_leaves_the_model_unchanged_and_is_seeded(tiny_lm):
    env = make_env(tiny_lm)
    first = small(seed=3).initial_state(env)["adapter"]
    again = small(seed=3).initial_state(env)["adapter"]
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in first)
    lora_b = [k for k in first if "lora_B" in k]
    assert lora_b and all(not first[k].numpy().any() for k in lora_b)  # B = 0: no change
    # rank 2 on q and v of every layer: A is [2, d_in], B is [d_out, 2]
    assert len(first) == 2 * 2 * tiny_lm.num_layers


def test_fedavg_of_adapters_is_the_example_weighted_mean():
    method = small()
    a = {"x.lora_A.weight": np.array([[1.0, 2.0]], np.float32)}
    b = {"x.lora_A.weight": np.array([[3.0, 6.0]], np.float32)}
    replies = [Reply(0, RecordDict({"adapter": adapter_record(a)}), num_examples=1),
               Reply(1, RecordDict({"adapter": adapter_record(b)}), num_examples=3)]
    state = method.aggregate(0, RecordDict(), replies)
    np.testing.assert_allclose(state["adapter"]["x.lora_A.weight"].numpy(), [[2.5, 5.0]])


def test_local_training_lowers_the_loss(tiny_lm):
    env = make_env(tiny_lm)
    method = small(local_epochs=10, local_examples=None)
    client = make_clients(env)[2]
    message = method.configure_round(0, method.initial_state(env))

    def loss(weights):
        queries = [SPEC.format_query(ex) for ex in client.data]
        scorer = env.scorer()
        targets = torch.tensor([scorer.labels.first[ex.label] for ex in client.data])
        with lora_adapter(tiny_lm, method.config, weights), torch.no_grad():
            return torch.nn.functional.nll_loss(scorer.logprobs(queries), targets).item()

    before = loss({k: v.numpy() for k, v in message["adapter"].items()})
    trained = method.client_step(message, client)["adapter"]
    assert loss({k: v.numpy() for k, v in trained.items()}) < before - 0.05


def test_full_run_counts_adapter_bytes_and_evaluates(tiny_lm):
    env = make_env(tiny_lm)
    method = small()
    outcome = InProcessRuntime().run(method, make_clients(env), env)
    assert len(outcome.rounds) == 2 and all(not r.rejected for r in outcome.rounds)
    adapter_bytes = payload_bytes(RecordDict({"adapter": outcome.state["adapter"]}))
    for r in outcome.rounds:  # each of 3 clients sends the adapter (+ a loss) and gets it
        assert 3 * adapter_bytes <= r.bytes_up <= 3 * (adapter_bytes + 100)
        assert 3 * adapter_bytes <= r.bytes_down <= 3 * (adapter_bytes + 100)
    metrics = method.evaluate(outcome.state, env)
    assert 0 <= metrics["accuracy"] <= 1 and len(metrics["train_loss"]) == 2


@pytest.mark.parametrize("bad", ["shape", "nan"])
def test_a_broken_adapter_is_refused_and_the_round_goes_on(tiny_lm, bad):
    env = make_env(tiny_lm)

    class Broken(FedAvgLoRA):
        def client_step(self, message, client):
            reply = super().client_step(message, client)
            if client.cid == 1:
                key = next(iter(reply["adapter"]))
                value = reply["adapter"][key].numpy()
                value = value[:, :1] if bad == "shape" else np.full_like(value, np.nan)
                reply["adapter"][key] = Array(np.ascontiguousarray(value))
            return reply

    outcome = InProcessRuntime().run(Broken(**small().__dict__), make_clients(env), env)
    for r in outcome.rounds:
        assert [x["cid"] for x in r.rejected] == [1]
    assert all(np.isfinite(v.numpy()).all() for v in outcome.state["adapter"].values())


def test_the_saved_adapter_is_peft_format(tiny_lm, tmp_path):
    env = make_env(tiny_lm)
    method = small()
    state = method.initial_state(env)
    method.save_artifact(state, tmp_path, "tiny-random", "toy")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["base_model_name_or_path"] == "tiny-random"
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == set(state["adapter"].keys())


def test_options_come_through_make_method():
    method = make_method("fedavg-lora", rank=4, target_modules=["q_proj", "k_proj"], shots=4)
    assert method.rank == 4 and method.target_modules == ("q_proj", "k_proj")
    with pytest.raises(ValueError):
        FedAvgLoRA(rank=0)
