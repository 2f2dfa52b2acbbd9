"""FedPT: proxy arithmetic, α = 0, vocabulary check, distillation, and a run on an emulator pair."""

from __future__ import annotations

import pytest
import torch

from fedsteer.federation import InProcessRuntime
from fedsteer.methods import Client, Environment
from fedsteer.methods.fedavg_lora import adapter_record
from fedsteer.methods.fedpt import FedPT
from fedsteer.models import build_tiny_random
from fedsteer.models.arch import keep_layers
from fedsteer.models.load import LoadedModel, finalize
from fedsteer.models.proxy import (
    VocabularyMismatch,
    check_shared_vocabulary,
    proxy_logprobs,
)
from toy import SPEC, examples


@pytest.fixture(scope="module")
def pair():
    """large = tiny-random (2 layers), small = its 1-layer emulator (a separate copy)."""
    large = build_tiny_random(seed=0)
    small = build_tiny_random(seed=0)
    keep_layers(small.model, [0])
    return finalize(small.model, small.tokenizer, "emulator:1:tiny-random"), large


def make_env(pair) -> Environment:
    small, large = pair
    env = Environment(task=SPEC, test=examples(6, 100), model_name=small.name, _lm=small,
                      batch_size=4, transfer=examples(8, 200))
    env._others["tiny-random"] = large
    return env


def small_fedpt(**overrides) -> FedPT:
    options = dict(large="tiny-random", rank=2, rounds=1, local_examples=4, batch_size=2,
                   lr=1e-2, distill_examples=8, distill_batch_size=4, distill_lr=1e-2)
    return FedPT(**{**options, **overrides})


def test_proxy_arithmetic_matches_a_manual_logits_computation():
    torch.manual_seed(0)
    large, tuned, base = (torch.randn(3, 7) for _ in range(3))
    got = proxy_logprobs(large.log_softmax(-1), tuned.log_softmax(-1), base.log_softmax(-1),
                         0.7, vocab=7)
    manual = torch.softmax(large + 0.7 * (tuned - base), dim=-1).log()
    torch.testing.assert_close(got, manual)


def test_alpha_zero_gives_the_large_models_output_exactly(pair):
    env = make_env(pair)
    method = small_fedpt(alpha=0.0)
    method.setup(env)
    state = method.initial_state(env)
    queries = [SPEC.format_query(ex) for ex in env.test]
    large = method.large_scores(env).next_token_logprobs(queries)
    proxy = method.proxy(env, state["adapter"], queries)
    vocab = method.vocabulary(env)
    torch.testing.assert_close(proxy, large[:, :vocab].log_softmax(-1))


def test_a_pair_without_a_shared_vocabulary_is_refused_by_name(pair, tiny_lm):
    small, large = pair
    vocab = dict(small.tokenizer.get_vocab())

    class OneMoreToken:
        def get_vocab(self):
            return {**vocab, "<extra-token>": len(vocab)}

    odd = LoadedModel(tiny_lm.model, OneMoreToken(), "odd-large")
    with pytest.raises(VocabularyMismatch, match="emulator:1:tiny-random and odd-large"):
        check_shared_vocabulary(small, odd)
    assert check_shared_vocabulary(small, large) == len(vocab)


def test_distillation_lowers_the_kl_to_the_proxy(pair):
    env = make_env(pair)
    method = small_fedpt(distill_epochs=15)
    method.setup(env)
    start = method.initial_state(env)["adapter"]
    # a non-trivial averaged adapter, so the proxy differs from the large model
    gen = torch.Generator().manual_seed(1)
    averaged = adapter_record({k: (torch.randn(v.numpy().shape, generator=gen) * 0.5).numpy()
                               for k, v in start.items()})
    queries = method.transfer_queries(env, 0)
    target = method.proxy(env, averaged, queries)

    def kl(adapter) -> float:
        student, _ = method.small_pair(env, adapter, queries)
        vocab = target.shape[-1]
        student = student[:, :vocab].log_softmax(-1)
        return torch.nn.functional.kl_div(student, target, log_target=True,
                                          reduction="batchmean").item()

    distilled = adapter_record(method.distill(averaged, env, 0))
    assert kl(distilled) < kl(averaged) - 1e-3


def test_a_run_on_the_emulator_pair_reports_every_comparison(pair):
    env = make_env(pair)
    clients = [Client(cid=i, data=examples(6, 10 * i), env=env) for i in range(3)]
    method = small_fedpt()
    outcome = InProcessRuntime().run(method, clients, env)
    assert len(outcome.rounds) == 1 and not outcome.rounds[0].rejected
    metrics = method.evaluate(outcome.state, env)
    for key in ("accuracy", "proxy_distilled_accuracy", "small_tuned_accuracy",
                "small_zero_shot_accuracy", "large_zero_shot_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # the devices got the distilled adapter, not the plain average
    assert any((outcome.state["adapter"][k].numpy() != outcome.state["fedavg_adapter"][k]
                .numpy()).any() for k in outcome.state["adapter"])


def test_without_held_out_texts_distillation_says_why(pair):
    env = make_env(pair)
    env.transfer = []
    with pytest.raises(ValueError, match="held-out task texts"):
        small_fedpt().transfer_queries(env, 0)


@pytest.fixture()
def bf16_pair():
    """The pair of `pair`, both models in bfloat16."""
    large = build_tiny_random(seed=0)
    small = build_tiny_random(seed=0)
    keep_layers(small.model, [0])
    large.model.to(torch.bfloat16)
    small.model.to(torch.bfloat16)
    return finalize(small.model, small.tokenizer, "emulator:1:tiny-random"), large


def test_fedpt_in_bfloat16_trains_float32_masters_and_sends_float32(bf16_pair, monkeypatch):
    """Issue 43: with both models in bfloat16, what FedPT trains (the devices' adapters and
    the server's distilled one) is a float32 master copy, the replies on the wire and the
    state sent back to the devices are float32, and the run reports finite accuracies."""
    import fedsteer.methods.fedavg_lora as fedavg_lora_mod
    import fedsteer.methods.fedpt as fedpt_mod

    trained: list[torch.dtype] = []

    def recording(train):
        def wrapped(runs, *a, **kw):
            trained.extend(p.dtype for run in runs for group in run.optimizer.param_groups
                           for p in group["params"])
            return train(runs, *a, **kw)
        return wrapped

    for module in (fedavg_lora_mod, fedpt_mod):
        monkeypatch.setattr(module, "train_together", recording(module.train_together))
    replies, step = [], FedPT.client_step

    def recording_step(self, message, client):
        reply = step(self, message, client)
        replies.append(reply)
        return reply

    monkeypatch.setattr(FedPT, "client_step", recording_step)
    env = make_env(bf16_pair)
    assert next(env.lm.model.parameters()).dtype == torch.bfloat16
    clients = [Client(cid=i, data=examples(6, 10 * i), env=env) for i in range(3)]
    method = small_fedpt()
    outcome = InProcessRuntime().run(method, clients, env)
    assert len(outcome.rounds) == 1 and not outcome.rounds[0].rejected
    assert trained and set(trained) == {torch.float32}
    sent = {a.dtype for reply in replies for record in reply.array_records.values()
            for a in record.values()}
    assert replies and sent == {"float32"}
    for key in ("adapter", "fedavg_adapter"):
        assert {a.dtype for a in outcome.state[key].values()} == {"float32"}, key
    metrics = method.evaluate(outcome.state, env)
    for key in ("accuracy", "proxy_distilled_accuracy", "small_tuned_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
