"""IFed-ICL: hooks, extraction, aggregation, calibration on the runtime, bytes, artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

from fedsteer.data import Example, Task
from fedsteer.eval.costs import payload_bytes
from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.federation import InProcessRuntime, RuntimeConfig
from fedsteer.methods import METHODS, Client, Environment, Reply, make_method
from fedsteer.methods.ifed_icl import (
    CentralI2CL,
    IFedICL,
    MissingContextVectors,
    load_steering,
    save_steering,
)
from fedsteer.models.hooks import capture, initial_coefficients, inject
from fedsteer.models.load import LoadedModel
from fedsteer.models.scoring import LabelScorer
from toy import SPEC, examples

# Flower ships each array as .npy bytes (a 128-byte header) plus ~55 bytes of protobuf fields:
# 183 bytes an array as measured; bound it at 200, plus 50 for a config or metric record.
PER_ARRAY, PER_RECORD = 200, 50


def make_env(lm, test_size: int = 6) -> Environment:
    return Environment(task=SPEC, test=examples(test_size, 100), model_name="tiny", _lm=lm,
                       batch_size=4)


def make_clients(env, sizes=(4, 6, 8)) -> list[Client]:
    return [Client(cid=i, data=examples(n, 10 * i), env=env) for i, n in enumerate(sizes)]


def small_method(**overrides) -> IFedICL:
    options = dict(rounds=2, local_epochs=1, demos_per_class=2, calibration_per_class=2)
    return IFedICL(**{**options, **overrides})


def ids(lm, text="Review: a film\nSentiment:"):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def random_vectors(lm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (lm.num_layers, lm.hidden_size)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def hook_count(lm) -> int:
    return sum(len(m._forward_hooks) for lay in lm.layers for m in (lay.attention, lay.mlp))


# ----------------------------------------------------------------------------- hooks
def tiny_gpt2() -> LoadedModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return LoadedModel(GPT2LMHeadModel(config).eval(), None, "gpt2-tiny")


def tiny_gemma2() -> LoadedModel:
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return LoadedModel(Gemma2ForCausalLM(config).eval(), None, "gemma2-tiny")


@pytest.fixture(params=["llama", "gpt2", "gemma2"])
def any_lm(request, tiny_lm):
    """One model per residual-writer layout arch.py knows: tuple attention, plain, sandwich."""
    return {"llama": lambda: tiny_lm, "gpt2": tiny_gpt2, "gemma2": tiny_gemma2}[request.param]()


def test_identity_coefficients_give_the_plain_logits_exactly(any_lm):
    x = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        plain = any_lm.model(x).logits
        attn, mlp = random_vectors(any_lm)
        with inject(any_lm, attn, mlp, initial_coefficients(any_lm.num_layers, 0.0, 1.0)):
            same = any_lm.model(x).logits
        with inject(any_lm, attn, mlp, initial_coefficients(any_lm.num_layers, 0.1, 1.0)):
            steered = any_lm.model(x).logits
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, steered, atol=1e-4)


def test_hooks_are_removed_after_the_context_even_on_error(tiny_lm):
    attn, mlp = random_vectors(tiny_lm)
    coef = initial_coefficients(tiny_lm.num_layers, 0.1, 1.0)
    with inject(tiny_lm, attn, mlp, coef):
        assert hook_count(tiny_lm) == 2 * tiny_lm.num_layers
    assert hook_count(tiny_lm) == 0
    with pytest.raises(RuntimeError, match="boom"), inject(tiny_lm, attn, mlp, coef):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), capture(tiny_lm):
        raise RuntimeError("boom")
    assert hook_count(tiny_lm) == 0


def test_inject_rejects_wrong_shapes(tiny_lm):
    attn, mlp = random_vectors(tiny_lm)
    with pytest.raises(ValueError, match="context vectors"), inject(
        tiny_lm, attn[:1], mlp, initial_coefficients(tiny_lm.num_layers, 0.1, 1.0)
    ):
        pass
    with pytest.raises(ValueError, match="coefficients"), inject(
        tiny_lm, attn, mlp, torch.ones(4, tiny_lm.num_layers + 1)
    ):
        pass


def test_noise_is_seeded_and_gradients_reach_the_coefficients(tiny_lm):
    scorer = LabelScorer(tiny_lm, SPEC.label_words)
    attn, mlp = random_vectors(tiny_lm)
    queries = ["Review: fine\nSentiment:", "Review: not good at all\nSentiment:"]

    def noisy(seed):
        coef = torch.nn.Parameter(initial_coefficients(tiny_lm.num_layers, 0.1, 1.0))
        gen = torch.Generator().manual_seed(seed)
        with inject(tiny_lm, attn, mlp, coef, noise=0.01, generator=gen):
            logp = scorer.logprobs(queries)
        logp[:, scorer.labels.first[1]].sum().backward()
        return logp.detach(), coef.grad

    first, grad = noisy(1)
    torch.testing.assert_close(noisy(1)[0], first, rtol=0, atol=0)
    assert not torch.allclose(noisy(2)[0], first)
    assert grad is not None and grad.abs().sum() > 0 and grad.shape == (4, tiny_lm.num_layers)


def test_logprobs_agree_with_score(tiny_lm):
    scorer = LabelScorer(tiny_lm, SPEC.label_words)
    queries = ["Review: fine\nSentiment:", "Review: not good at all, really\nSentiment:"]
    with torch.no_grad():
        full = scorer.logprobs(queries)
    torch.testing.assert_close(full[:, scorer.labels.first], scorer.score(queries),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ extraction
def test_extraction_matches_a_manual_forward_for_one_demo(tiny_lm):
    env = make_env(tiny_lm)
    client = Client(cid=0, data=[Example(text="great film", label=1)], env=env)
    attn, mlp = small_method().extract(client)
    assert attn.shape == mlp.shape == (tiny_lm.num_layers, tiny_lm.hidden_size)
    assert attn.dtype == torch.float32

    text = SPEC.format_demo(client.data[0]) + SPEC.demo_separator
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for lay in tiny_lm.layers:
        handles.append(lay.attention.register_forward_hook(
            lambda m, a, out, i=lay.index: seen.__setitem__(("attn", i), out[0][0, -1])))
        handles.append(lay.mlp.register_forward_hook(
            lambda m, a, out, i=lay.index: seen.__setitem__(("mlp", i), out[0, -1])))
    with torch.no_grad():
        hidden = tiny_lm.model(ids(tiny_lm, text), output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    for i in range(tiny_lm.num_layers):
        torch.testing.assert_close(attn[i], seen[("attn", i)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mlp[i], seen[("mlp", i)], atol=1e-5, rtol=1e-5)
    # independent of hooks: layer 0's two writers sum to its residual-stream update
    torch.testing.assert_close(attn[0] + mlp[0], (hidden[1] - hidden[0])[0, -1],
                               atol=1e-5, rtol=1e-5)


def test_extraction_averages_over_demos_across_batches(tiny_lm):
    env = make_env(tiny_lm)
    env.batch_size = 3  # 4 demos: a batch of 3 and one of 1, padded differently
    data = examples(4)
    method = small_method(demos_per_class=2)
    both = method.extract(Client(cid=0, data=data, env=env))
    singles = [method.extract(Client(cid=0, data=[ex], env=env)) for ex in data]
    torch.testing.assert_close(both[0], torch.stack([s[0] for s in singles]).mean(0),
                               atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------- aggregation
def vector_reply(cid, value, n, layers=2, width=3):
    arr = np.full((layers, width), value, np.float32)
    content = RecordDict({"vectors": ArrayRecord({"attn": Array(arr), "mlp": Array(-arr)})})
    return Reply(cid=cid, content=content, num_examples=n)


@pytest.mark.parametrize("weighting, expected", [("uniform", 2.5), ("size", 3.25)])
def test_vector_aggregate_uniform_or_by_size(weighting, expected):
    replies = [vector_reply(0, 1.0, 1), vector_reply(1, 4.0, 3)]  # (1 + 4*3) / 4 = 3.25
    state = IFedICL(weighting=weighting).aggregate(0, RecordDict(), replies)
    np.testing.assert_allclose(state["vectors"]["attn"].numpy(), expected)
    np.testing.assert_allclose(state["vectors"]["mlp"].numpy(), -expected)
    assert state["vectors"]["attn"].numpy().dtype == np.float32


def test_coefficients_are_averaged_by_client_size():
    def reply(value, n):
        content = RecordDict({
            "coef": ArrayRecord({"coef": Array(np.full((4, 2), value, np.float32))}),
            "metrics": MetricRecord({"loss": value}),
        })
        return Reply(cid=0, content=content, num_examples=n)

    state = IFedICL().aggregate(1, RecordDict(), [reply(0.0, 1), reply(1.0, 3)])
    np.testing.assert_allclose(state["coef"]["coef"].numpy(), 0.75)
    assert list(state["train"]["loss"]) == [0.5]


# --------------------------------------------------------------------------- the run
def test_a_client_without_vectors_fails_clearly(tiny_lm):
    env = make_env(tiny_lm)
    method = small_method()
    message = RecordDict({
        "config": ConfigRecord({"phase": "calibrate", "round": 2}),
        "coef": ArrayRecord({"coef": Array(np.ones((4, tiny_lm.num_layers), np.float32))}),
    })
    with pytest.raises(MissingContextVectors, match="round 1"):
        method.client_step(message, make_clients(env)[0])


def test_every_client_takes_part_whatever_the_fraction(tiny_lm, caplog):
    env = make_env(tiny_lm)
    runtime = InProcessRuntime(RuntimeConfig(fraction=0.3))
    outcome = runtime.run(small_method(rounds=1), make_clients(env), env)
    assert all(r.clients == [0, 1, 2] and not r.rejected for r in outcome.rounds)
    assert "ignoring fraction=0.3" in caplog.text


def test_full_run_trains_coefficients_and_counts_bytes(tiny_lm):
    env = make_env(tiny_lm)
    method = small_method()
    outcome = InProcessRuntime().run(method, make_clients(env), env)
    layers, width = tiny_lm.num_layers, tiny_lm.hidden_size
    vectors, coefs = 2 * layers * width * 4, 4 * layers * 4
    extract, first, second = outcome.rounds
    assert [r.rejected for r in outcome.rounds] == [[], [], []]
    assert all(r.clients == [0, 1, 2] for r in outcome.rounds)
    # round 0: each client uploads its vectors; only a small config goes down
    assert 3 * vectors <= extract.bytes_up <= 3 * (vectors + 2 * PER_ARRAY)
    assert extract.bytes_down <= 3 * 2 * PER_RECORD
    # round 1: vectors + coefficients down (once), coefficients (+ a loss metric) up
    down_once = vectors + coefs + 3 * PER_ARRAY + PER_RECORD
    assert 3 * (vectors + coefs) <= first.bytes_down <= 3 * down_once
    for rnd in (first, second):
        assert 3 * coefs <= rnd.bytes_up <= 3 * (coefs + PER_ARRAY + PER_RECORD)
    # round 2: coefficients only, both ways
    assert 3 * coefs <= second.bytes_down <= 3 * (coefs + PER_ARRAY + PER_RECORD)

    coef = outcome.state["coef"]["coef"].numpy()
    start = initial_coefficients(layers, 0.1, 1.0).numpy()
    assert coef.shape == (4, layers) and not np.allclose(coef, start)
    assert len(outcome.state["train"]["loss"]) == 2
    metrics = method.evaluate(outcome.state, env)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "macro_f1" in metrics


def test_reply_shapes_follow_the_phase(tiny_lm):
    env = make_env(tiny_lm)
    method = small_method()
    state = method.initial_state(env)
    shape = (tiny_lm.num_layers, tiny_lm.hidden_size)
    assert method.reply_shapes(method.configure_round(0, state)) == {
        "vectors.attn": shape, "vectors.mlp": shape}
    state["vectors"] = ArrayRecord({"attn": Array(np.zeros(shape, np.float32)),
                                    "mlp": Array(np.zeros(shape, np.float32))})
    assert method.reply_shapes(method.configure_round(1, state)) == {
        "coef.coef": (4, tiny_lm.num_layers)}
    assert "vectors" in method.configure_round(1, state)
    assert "vectors" not in method.configure_round(2, state)
    assert method.configure_round(3, state) is None


class KilledAtRound2(IFedICL):
    """The same method (same name and options), but the process 'dies' in round 2."""

    def client_step(self, message, client):
        if message["config"]["round"] == 2:
            raise KeyboardInterrupt
        return super().client_step(message, client)

    def client_steps(self, message, clients):
        if message["config"]["round"] == 2:
            raise KeyboardInterrupt
        return super().client_steps(message, clients)


def test_resume_after_a_kill_repeats_the_coefficients(tiny_lm, tmp_path):
    env = make_env(tiny_lm)
    options = dict(rounds=2, local_epochs=1, demos_per_class=2, calibration_per_class=2)
    expected = InProcessRuntime().run(IFedICL(**options), make_clients(env), env).state

    runtime = InProcessRuntime(checkpoint_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runtime.run(KilledAtRound2(**options), make_clients(env), env)
    # a new process: fresh clients whose vectors come back from the checkpoint only
    resumed = runtime.run(IFedICL(**options), make_clients(env), env, resume=True)
    assert [r.round for r in resumed.rounds] == [0, 1, 2]
    assert resumed.rounds[2].rejected == []
    np.testing.assert_array_equal(resumed.state["coef"]["coef"].numpy(),
                                  expected["coef"]["coef"].numpy())


def test_save_and_load_round_trip(tiny_lm, tmp_path):
    env = make_env(tiny_lm)
    state = InProcessRuntime().run(small_method(rounds=1), make_clients(env), env).state
    save_steering(state, tmp_path / "steer", "tiny", "toy-sentiment")
    art = load_steering(tmp_path / "steer")
    np.testing.assert_array_equal(art.attn.numpy(), state["vectors"]["attn"].numpy())
    np.testing.assert_array_equal(art.coef.numpy(), state["coef"]["coef"].numpy())
    assert art.config["num_layers"] == tiny_lm.num_layers
    assert art.config["hidden_size"] == tiny_lm.hidden_size
    assert art.config["model"] == "tiny" and art.config["fedsteer_version"]
    with inject(tiny_lm, art.attn, art.mlp, art.coef), torch.no_grad():
        tiny_lm.model(ids(tiny_lm))

    (tmp_path / "steer" / "steering.json").write_text(
        (tmp_path / "steer" / "steering.json").read_text().replace(
            f'"hidden_size": {tiny_lm.hidden_size}', '"hidden_size": 7'))
    with pytest.raises(ValueError, match="steering.safetensors.*'attn'"):
        load_steering(tmp_path / "steer")
    with pytest.raises(FileNotFoundError, match="steering.json"):
        load_steering(tmp_path / "nowhere")


def test_central_i2cl_runs_with_one_client_through_run_experiment(tiny_lm, tmp_path):
    assert METHODS["central-i2cl"] is CentralI2CL and CentralI2CL.centralized
    assert isinstance(make_method("ifed-icl", shots=4, seed=0, rounds=None), IFedICL)
    task = Task(spec=SPEC, train=examples(10), test=examples(6, 100))
    config = RunConfig(method="central-i2cl", task="toy", model="tiny", rounds=1,
                       test_size=None, options={"local_epochs": 1, "demos_per_class": 2,
                                                "calibration_per_class": 2})
    record = run_experiment(config, tmp_path, lm=tiny_lm, task=task)
    assert record["metrics"]["num_clients"] == 1
    assert record["costs"]["num_rounds"] == 2
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0


# ------------------------------------------------- wire arithmetic for the real models
@pytest.mark.parametrize("name, layers, width, once, per_round", [
    ("qwen2.5-coder-0.5b", 24, 896, 172_032, 384),
    ("smollm2-135m", 30, 576, 138_240, 480),
])
def test_payload_arithmetic_for_real_model_shapes(name, layers, width, once, per_round):
    assert 2 * layers * width * 4 == once and 4 * layers * 4 == per_round
    zeros = np.zeros((layers, width), np.float32)
    vectors = RecordDict({"vectors": ArrayRecord({"attn": Array(zeros), "mlp": Array(zeros)})})
    coef = RecordDict({"coef": ArrayRecord({"coef": Array(np.zeros((4, layers), np.float32))})})
    assert once < payload_bytes(vectors) <= once + 2 * PER_ARRAY
    assert per_round < payload_bytes(coef) <= per_round + PER_ARRAY


def test_bytes_are_recorded_per_phase(tmp_path, tiny_lm):
    from fedsteer.experiment import RunConfig, run_experiment

    options = {"rounds": 2, "local_epochs": 1, "demos_per_class": 1, "calibration_per_class": 1}
    record = run_experiment(RunConfig(method="ifed-icl", model="tiny-random", clients=3,
                                      test_size=4, options=options), tmp_path, lm=tiny_lm)
    phases = record["costs"]["phases"]
    assert phases["extract"]["rounds"] == 1 and phases["calibrate"]["rounds"] == 2
    assert phases["extract"]["bytes_up_per_round"] > phases["calibrate"]["bytes_up_per_round"]
    total = phases["extract"]["bytes_up"] + phases["calibrate"]["bytes_up"]
    assert total == record["costs"]["bytes_up"]
