"""BDPL: the simplex projection, the policy-gradient estimator, and learning a prompt."""

from __future__ import annotations

import numpy as np
import pytest

from fedsteer.blackbox import BlackBox
from fedsteer.data import Example, TaskSpec
from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.federation import InProcessRuntime
from fedsteer.methods import Client, Environment
from fedsteer.methods.bdpl import (
    BDPL,
    log_prob_derivative,
    policy_gradient,
    project_simplex,
    sample_prompts,
    word_candidates,
)

SPEC = TaskSpec(name="toy", labels=("negative", "positive"),
                label_words=(" negative", " positive"), template="Review: {text}\nSentiment:")


def test_projection_lands_on_the_simplex_and_keeps_simplex_points():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 7))
    p = project_simplex(v)
    assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0)
    # a point already on the simplex is its own projection
    q = rng.dirichlet(np.ones(7), size=3)
    np.testing.assert_allclose(project_simplex(q), q, atol=1e-12)
    # and the projection is the nearest simplex point (vs random simplex points)
    for row, proj in zip(v, p, strict=True):
        others = rng.dirichlet(np.ones(7), size=500)
        assert np.linalg.norm(row - proj) <= np.linalg.norm(others - row, axis=1).min() + 1e-9


def test_the_estimator_is_unbiased_on_a_toy_objective():
    """E[(L − L̄)·∂log P] over samples equals the exact gradient of E[L] in the tangent space."""
    probs = np.array([[0.2, 0.5, 0.3]])
    loss_of = np.array([1.0, 3.0, 2.0])  # L(prompt) depends on the one position's choice
    rng = np.random.default_rng(1)
    estimates = []
    for _ in range(4000):
        samples = sample_prompts(probs, 8, rng)
        estimates.append(policy_gradient(probs, samples, [loss_of[s[0]] for s in samples],
                                         clip=np.inf))
    mean = np.mean(estimates, axis=0)[0]
    # E[L] = Σ p_j L_j; with BDPL's derivative (±1/p) the estimator's expectation is
    # 2·L_j − 2·E[L] per coordinate (its component along the simplex is ∝ ∇E[L]).
    expected = 2 * (loss_of - probs[0] @ loss_of)
    np.testing.assert_allclose(mean, expected, atol=0.08)
    # projected onto the simplex's tangent space it points along the true gradient
    tangent = lambda g: g - g.mean()  # noqa: E731
    cosine = tangent(mean) @ tangent(loss_of) / (
        np.linalg.norm(tangent(mean)) * np.linalg.norm(tangent(loss_of)))
    assert cosine > 0.99


def test_the_log_prob_derivative_signs():
    d = log_prob_derivative(np.array([[0.5, 0.25, 0.25]]), np.array([1]))
    np.testing.assert_allclose(d, [[-2.0, 4.0, -4.0]])


class KeywordBox(BlackBox):
    """A black box that answers right only when the prompt holds the word 'sentiment'."""

    name = "keyword"

    def _query(self, prefix, prompts, label_words):
        self._bill(len(prompts), 10 * len(prompts), len(prompts))
        helped = "sentiment" in prefix.split("\n")[0]
        rows = []
        for prompt in prompts:
            truth = 1 if "good" in prompt else 0
            score = np.array([-1.0, -1.0])
            score[truth] += 2.0 if helped else 0.0
            rows.append(score)
        return rows


def test_bdpl_learns_the_word_that_makes_the_box_right():
    texts = [f"{w} movie sentiment {i}" for i, w in enumerate(["good", "bad"] * 20)]
    data = [Example(text=t, label=1 if t.startswith("good") else 0) for t in texts]
    words = word_candidates(data, 4)
    assert "sentiment" in words
    env = Environment(task=SPEC, test=data[:10], model_name="none")
    box = KeywordBox()
    env._others["local"] = box
    method = BDPL(prompt_length=1, candidates=4, samples=6, shots_per_class=8, batch_size=8,
                  steps_per_round=30, rounds=1, lr=0.05)
    outcome = InProcessRuntime().run(method, [Client(cid=0, data=data, env=env)], env)
    assert method.best_prompt(outcome.state) == ["sentiment"]
    metrics = method.evaluate(outcome.state, env)
    assert metrics["accuracy"] == 1.0 and metrics["prompt"] == "sentiment"
    assert metrics["api_calls"] == box.usage.calls > 0


def test_the_budget_stops_training():
    method = BDPL(rounds=5, api_budget=10)
    from flwr.app import MetricRecord, RecordDict

    assert method.configure_round(1, RecordDict({"api": MetricRecord({"calls": 12})})) is None
    assert method.configure_round(1, RecordDict({"api": MetricRecord({"calls": 3})})) is not None


def test_bdpl_runs_end_to_end_on_the_local_black_box(tmp_path):
    options = {"prompt_length": 2, "candidates": 8, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "rounds": 1, "lr": 0.01}
    record = run_experiment(RunConfig("bdpl", "sst2", "tiny-random", test_size=6,
                                      options=options), tmp_path)
    assert record["metrics"]["num_clients"] == 1
    # 1 step x 2 samples x 2 queries, then 6 test queries
    assert record["metrics"]["api_calls"] == 2 * 2 + 6
    assert len(record["metrics"]["prompt"].split()) == 2
    with pytest.raises(ValueError, match="black box"):
        Environment(task=SPEC, test=[], model_name="none").blackbox("nope")
