"""AsynDBT: the asynchronous runtime's staleness bound, the consensus updates, a run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedsteer.data import Example, TaskSpec
from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.federation.asynchronous import AsyncConfig, AsyncInProcessRuntime
from fedsteer.methods import AsyncMethod, Client, Environment, Reply
from fedsteer.methods.asyndbt import AsynDBT
from fedsteer.methods.bdpl import project_simplex
from fedsteer.methods.records import float32_array as _array
from test_federation_flower import flower_identity, serve_inline, tiny_config  # noqa: F401

SPEC = TaskSpec(name="toy", labels=("negative", "positive"),
                label_words=(" negative", " positive"), template="Review: {text}\nSentiment:")


@dataclass
class Counting(AsyncMethod):
    """Workers reply with nothing but who they are; the server counts its updates."""

    name = "counting"
    iterations: int = 12

    def initial_state(self, env):
        return RecordDict({"progress": MetricRecord({"iteration": 0})})

    def finished(self, state):
        return int(state["progress"]["iteration"]) >= self.iterations

    def worker_message(self, state, cid, iteration):
        return RecordDict({"progress": state["progress"]})

    def client_step(self, message, client):
        return RecordDict({"who": MetricRecord({"cid": client.cid})})

    def server_update(self, state, replies):
        state["progress"] = MetricRecord({"iteration": int(state["progress"]["iteration"]) + 1})
        return state

    def evaluate(self, state, env):
        return {"accuracy": 0.0, "macro_f1": 0.0}


def clients(n: int, env) -> list[Client]:
    return [Client(cid=i, data=[Example(text="x", label=0)], env=env) for i in range(n)]


def test_a_slow_worker_is_waited_for_within_the_staleness_bound():
    env = Environment(task=SPEC, test=[], model_name="none")
    config = AsyncConfig(active=1, staleness=2, latency=(0.0, 0.0, 0.25))
    outcome = AsyncInProcessRuntime(config).run(Counting(), clients(3, env), env)
    used = [set(r.clients) for r in outcome.rounds]
    slow_rounds = [i for i, cids in enumerate(used) if 2 in cids]
    gaps = np.diff([-1, *slow_rounds])
    assert slow_rounds and gaps.max() <= 3  # never more than τ iterations without it
    assert any(len(cids) < 3 for cids in used)  # and the server did not wait for everyone


def test_the_synchronous_setting_is_a_barrier():
    env = Environment(task=SPEC, test=[], model_name="none")
    outcome = AsyncInProcessRuntime(AsyncConfig(active=3, latency=(0.0, 0.05, 0.1))).run(
        Counting(iterations=4), clients(3, env), env)
    assert [sorted(r.clients) for r in outcome.rounds] == [[0, 1, 2]] * 4


def test_server_update_follows_the_equations():
    method = AsynDBT(prompt_length=1, mu=0.5, psi=0.1, lr_z=0.2, lr_dual=0.3)
    z = np.array([[0.5, 0.3, 0.2]])
    dual = np.array([[0.01, -0.02, 0.01]])
    p1, p2 = np.array([[0.6, 0.2, 0.2]]), np.array([[0.1, 0.8, 0.1]])
    state = RecordDict({"z": ArrayRecord({"z": _array(z)}),
                        "duals": ArrayRecord({"0": _array(dual)}), "latest": ArrayRecord(),
                        "progress": MetricRecord({"iteration": 0, "calls": 0})})
    replies = [Reply(cid, RecordDict({"prompt": ArrayRecord({"p": _array(p)}),
                                      "metrics": MetricRecord({"calls": 4})}), 1)
               for cid, p in ((0, p1), (1, p2))]
    out = method.server_update(state, replies)
    step = (-dual - 0.5 * (p1 - z) + 0.1 * np.sign(z - p1)) + (-0.5 * (p2 - z)
                                                                + 0.1 * np.sign(z - p2))
    new_z = project_simplex(z - 0.2 * step)
    np.testing.assert_allclose(out["z"]["z"].numpy(), new_z, atol=1e-6)
    np.testing.assert_allclose(out["duals"]["0"].numpy(), dual + 0.3 * (p1 - new_z), atol=1e-6)
    np.testing.assert_allclose(out["duals"]["1"].numpy(), 0.3 * (p2 - new_z), atol=1e-6)
    assert int(out["progress"]["iteration"]) == 1
    assert int(out["progress"]["declared_calls"]) == 8  # reported; the server bills itself


def test_a_robust_rule_takes_the_median_of_the_latest_prompts():
    method = AsynDBT(prompt_length=1, consensus="median")
    prompts = [np.array([[0.6, 0.4]]), np.array([[0.5, 0.5]]), np.array([[0.0, 1.0]])]
    state = RecordDict({"z": ArrayRecord({"z": _array(np.array([[0.5, 0.5]]))}),
                        "duals": ArrayRecord(), "latest": ArrayRecord(),
                        "progress": MetricRecord({"iteration": 0, "calls": 0})})
    replies = [Reply(i, RecordDict({"prompt": ArrayRecord({"p": _array(p)}),
                                    "metrics": MetricRecord({"calls": 0})}), 1)
               for i, p in enumerate(prompts)]
    out = method.server_update(state, replies)
    np.testing.assert_allclose(out["z"]["z"].numpy(), [[0.5, 0.5]], atol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="consensus"):
        AsynDBT(consensus="vote")
    with pytest.raises(ValueError, match="attack"):
        AsynDBT(attack="bribe")


@pytest.mark.parametrize("method", ["asyndbt", "sync-dbt", "cen-dbt"])
def test_dbt_runs_end_to_end_on_the_local_black_box(tmp_path, method):
    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 3, "demo_candidates": 2,
               "lr": 0.01, "byzantine": 1 if method == "asyndbt" else 0}
    record = run_experiment(RunConfig(method, "sst2", "tiny-random", clients=3, test_size=6,
                                      options=options), tmp_path)
    metrics = record["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and len(metrics["prompt"].split()) == 2
    assert record["costs"]["num_rounds"] == 3
    assert metrics["api_training_calls"] > 0 and metrics["api_calls"] > metrics[
        "api_training_calls"]


def test_a_worker_keeps_its_cuts_across_messages():
    from toy import SPEC as TOY
    from toy import examples

    env = Environment(task=TOY, test=[], model_name="tiny-random", transfer=examples(8))
    method = AsynDBT(prompt_length=2, candidates=4, samples=2, shots_per_class=2, batch_size=2,
                     steps_per_round=2, demo_candidates=2, cut_epsilon=-1.0, cut_refresh=0)
    state = method.initial_state(env)
    client = Client(cid=0, data=examples(6), env=env)
    for iteration in range(2):
        reply = method.client_step(method.worker_message(state, 0, iteration), client)
        assert reply["metrics"]["cuts"] == 2 * (iteration + 1)  # ε < 0: a cut every step
    assert "planes" in client.state
    off = AsynDBT(**{**method.__dict__, "cutting_planes": False})
    fresh = Client(cid=0, data=examples(6), env=env)
    assert "cuts" not in off.client_step(off.worker_message(state, 0, 0), fresh)["metrics"]


def test_each_worker_saves_the_consensus_prompt_with_its_own_demonstrations(tmp_path):
    import json

    from fedsteer.artifacts import evaluate_artifact
    from fedsteer.data import load_task

    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 2, "demo_candidates": 2}
    run_experiment(RunConfig("asyndbt", "sst2", "tiny-random", clients=2, test_size=4,
                             options=options), tmp_path / "run", save_dir=tmp_path / "saved")
    shared = json.loads((tmp_path / "saved" / "prompt.json").read_text())
    assert shared["demonstrations"] == []  # the server's copy holds no worker's rows
    for cid in (0, 1):
        mine = json.loads((tmp_path / "saved" / "clients" / str(cid) / "prompt.json").read_text())
        assert mine["prompt"] == shared["prompt"] and len(mine["demonstrations"]) == 2
        assert mine["demonstrations"][0]["text"] in mine["prefix"]
    kind, _, metrics, rows = evaluate_artifact(tmp_path / "saved" / "clients" / "0",
                                               load_task("sst2"), None, 4, 0, 4)
    assert kind == "prompt" and rows == 4 and 0.0 <= metrics["accuracy"] <= 1.0


@dataclass
class BrokenMessages(Counting):
    """Building worker 1's message fails: outside its client step, where nothing catches it."""

    def worker_message(self, state, cid, iteration):
        if cid == 1:
            raise KeyError("no message for worker 1")
        return super().worker_message(state, cid, iteration)


def test_a_worker_that_dies_outside_its_step_is_reported_and_no_longer_waited_for():
    env = Environment(task=SPEC, test=[], model_name="none")
    outcome = AsyncInProcessRuntime(AsyncConfig(active=3, staleness=1)).run(
        BrokenMessages(iterations=4), clients(3, env), env)
    assert len(outcome.rounds) == 4
    rejected = [r for cost in outcome.rounds for r in cost.rejected]
    assert [r["cid"] for r in rejected] == [1] and "no message for worker 1" in rejected[0][
        "reason"]
    assert all(sorted(set(cost.clients) - {1}) == [0, 2] for cost in outcome.rounds)


@pytest.mark.parametrize("setting", [{"eval_every": 1}, {"fraction": 0.5}])
def test_settings_the_asynchronous_runtime_would_ignore_are_refused(tmp_path, setting):
    config = RunConfig("asyndbt", "sst2", "tiny-random", clients=3, test_size=6, **setting)
    (name,) = setting
    with pytest.raises(ValueError, match=f"asynchronous runtime, which has no {name}"):
        run_experiment(config, tmp_path)


def test_a_grid_asking_to_resume_an_asynchronous_run_starts_it_afresh(tmp_path):
    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 2, "demo_candidates": 2}
    config = RunConfig("asyndbt", "sst2", "tiny-random", clients=2, test_size=4, options=options)
    record = run_experiment(config, tmp_path, resume=True)  # as `fedsteer bench` asks
    assert record["costs"]["num_rounds"] == 2


def test_two_messages_of_one_step_equal_one_message_of_two_steps(monkeypatch):
    """A worker's Adam state survives between messages: not a fresh first step each time."""
    import fedsteer.methods.asyndbt as asyndbt_module
    from toy import SPEC as TOY
    from toy import examples

    env = Environment(task=TOY, test=[], model_name="tiny-random", transfer=examples(8))
    settings = dict(prompt_length=2, candidates=4, samples=2, shots_per_class=2, batch_size=2,
                    demo_candidates=2, cutting_planes=False, lr=0.05)
    real = asyndbt_module.seeded_rng

    def final_p(steps_per_round: int, messages: int) -> np.ndarray:
        shared = real(0, "one stream")  # every call continues the same draws
        monkeypatch.setattr(asyndbt_module, "seeded_rng",
                            lambda *key: shared if key[1] == "asyndbt" else real(*key))
        method = AsynDBT(steps_per_round=steps_per_round, **settings)
        state = method.initial_state(env)
        client = Client(cid=0, data=examples(6), env=env)
        for _ in range(messages):
            reply = method.client_step(method.worker_message(state, 0, 0), client)
        assert float(client.state["adam_p"]["step"].numpy()[0]) == 2
        return reply["prompt"]["p"].numpy()

    np.testing.assert_allclose(final_p(1, 2), final_p(2, 1), atol=1e-6)


def test_bdpl_keeps_its_optimizer_across_rounds():
    from fedsteer.methods.bdpl import AdamOnSimplex

    probs = np.full((2, 4), 0.25)
    grads = [np.array([[1.0, -1, 0.5, 0], [0, 0, 1, -1]]), np.array([[0.2, 0, -1, 0.1]] * 2)]
    straight = AdamOnSimplex(probs, 0.05)
    for grad in grads:
        expected = straight.step(grad)
    first = AdamOnSimplex(probs, 0.05)
    first.step(grads[0])
    second = AdamOnSimplex(first.probs, 0.05, first.to_record())
    np.testing.assert_allclose(second.step(grads[1]), expected, atol=1e-12)
    fresh = AdamOnSimplex(first.probs, 0.05)  # what every message did before
    assert not np.allclose(fresh.step(grads[1]), expected)


def _state(z):
    return RecordDict({"z": ArrayRecord({"z": _array(z)}), "duals": ArrayRecord(),
                       "latest": ArrayRecord(),
                       "progress": MetricRecord({"iteration": 0, "calls": 0})})


def _replies(prompts):
    return [Reply(cid, RecordDict({"prompt": ArrayRecord({"p": _array(p)}),
                                   "metrics": MetricRecord({"calls": 1})}), 1)
            for cid, p in enumerate(prompts)]


def test_under_robust_sign_one_attacker_moves_z_by_at_most_lr_z_times_psi_per_step():
    rng = np.random.default_rng(0)
    z = project_simplex(rng.dirichlet(np.ones(6), size=3))
    honest = [project_simplex(z + rng.normal(0, 0.02, z.shape)) for _ in range(3)]
    far = np.zeros_like(z)
    far[np.arange(3), z.argmin(axis=1)] = 1.0  # the simplex point farthest from z
    lr_z, psi = 0.1, 0.05
    for consensus, bounded in (("robust-sign", True), ("sign", False)):
        method = AsynDBT(prompt_length=3, lr_z=lr_z, psi=psi, mu=1.0, consensus=consensus)
        clean = method.server_update(_state(z), _replies(honest))["z"]["z"].numpy()
        attacked = method.server_update(_state(z), _replies([*honest, far]))["z"]["z"].numpy()
        pull = np.linalg.norm(attacked - clean)  # the projection is non-expansive
        limit = lr_z * psi * np.sqrt(z.size)
        assert bool(pull <= limit + 1e-6) is bounded, (consensus, pull, limit)


@pytest.mark.parametrize("p, reason", [
    (np.array([[0.5, 0.6], [0.5, 0.5]]), "rows sum to"),
    (np.array([[1.2, -0.2], [0.5, 0.5]]), "negative"),
    (np.array([[0.5, 0.5]]), "shape"),
])
def test_a_reply_that_is_not_a_distribution_is_rejected(p, reason):
    method = AsynDBT(prompt_length=2)
    (reply,) = _replies([p])
    assert reason in method.reply_problem(reply.content)
    assert method.reply_problem(_replies([np.full((2, 2), 0.5)])[0].content) is None


def test_the_asynchronous_runtime_rejects_a_non_distribution_and_goes_on():
    from toy import SPEC as TOY
    from toy import examples

    env = Environment(task=TOY, test=[], model_name="tiny-random", transfer=examples(8))

    class Sloppy(AsynDBT):
        def client_step(self, message, client):
            reply = super().client_step(message, client)
            if client.cid == 1:
                reply["prompt"] = ArrayRecord({"p": _array(reply["prompt"]["p"].numpy() * 3)})
            return reply

    method = Sloppy(prompt_length=2, candidates=4, samples=2, shots_per_class=2, batch_size=2,
                    steps_per_round=1, demo_candidates=2, iterations=3, active=2,
                    cutting_planes=False)
    workers = [Client(cid=i, data=examples(6, offset=i), env=env) for i in range(2)]
    outcome = AsyncInProcessRuntime(AsyncConfig(active=2)).run(method, workers, env)
    rejected = [x for r in outcome.rounds for x in r.rejected]
    assert rejected and {x["cid"] for x in rejected} == {1}
    assert all("rows sum to" in x["reason"] for x in rejected)
    assert np.allclose(outcome.state["z"]["z"].numpy().sum(axis=1), 1.0, atol=1e-5)


def test_calls_are_billed_from_the_black_box_and_unused_steps_commit_nothing():
    """Workers mid-step when the run ends finish, but neither their state nor (only) the
    replies' counts decide what evaluation sees and what is billed."""
    from fedsteer.experiment import run_asynchronous
    from toy import SPEC as TOY
    from toy import examples

    env = Environment(task=TOY, test=examples(4), model_name="tiny-random",
                      transfer=examples(8))
    method = AsynDBT(prompt_length=2, candidates=4, samples=2, shots_per_class=2, batch_size=2,
                     steps_per_round=1, demo_candidates=2, iterations=3, active=1,
                     latency=(0.0, 0.3, 0.6), cutting_planes=False)
    workers = [Client(cid=i, data=examples(6, offset=i), env=env) for i in range(3)]
    box = env.blackbox("local")
    before = box.usage.calls
    outcome = run_asynchronous(method, workers, env)
    billed = int(outcome.state["billing"]["training_calls"])
    evaluation = sum(len(env.test) for _ in workers)  # each worker scores the test rows
    assert billed == box.usage.calls - before - evaluation
    assert billed >= int(outcome.state["progress"]["calls"])  # in-flight calls included
    used = {w.cid: sum(c == w.cid for r in outcome.rounds for c in r.clients) for w in workers}
    for worker in workers:  # one Adam step per *used* reply, none for a discarded one
        steps = (float(worker.state["adam_p"]["step"].numpy()[0])
                 if "adam_p" in worker.state else 0.0)
        assert steps == used[worker.cid], (worker.cid, steps, used)


def test_simulated_latency_and_queueing_count_as_waiting_not_compute():
    from toy import SPEC as TOY
    from toy import examples

    env = Environment(task=TOY, test=[], model_name="tiny-random", transfer=examples(8))
    method = AsynDBT(prompt_length=2, candidates=4, samples=2, shots_per_class=2, batch_size=2,
                     steps_per_round=1, demo_candidates=2, iterations=2, active=2,
                     latency=(0.3, 0.3), cutting_planes=False)
    workers = [Client(cid=i, data=examples(6, offset=i), env=env) for i in range(2)]
    outcome = AsyncInProcessRuntime(AsyncConfig(active=2, latency=(0.3, 0.3))).run(
        method, workers, env)
    from fedsteer.eval.costs import summarize_costs

    costs = summarize_costs(outcome.rounds)
    replies = sum(len(r.clients) for r in outcome.rounds)
    assert costs["client_wait_seconds"] >= 0.3 * replies
    assert costs["client_compute_seconds"] == pytest.approx(
        costs["client_seconds"] - costs["client_wait_seconds"])


def test_a_simulated_clock_run_is_reproducible_from_its_seed(tmp_path):
    options = {"iterations": 4, "prompt_length": 2, "candidates": 6, "samples": 2,
               "shots_per_class": 2, "batch_size": 2, "steps_per_round": 1,
               "demo_candidates": 2, "active": 1, "latency": [0.5, 1.0, 2.0]}
    config = RunConfig(method="asyndbt", model="tiny-random", clients=3, test_size=8,
                       options=options)
    first = run_experiment(config, tmp_path / "a")
    second = run_experiment(config, tmp_path / "b")
    assert first["metrics"] == second["metrics"]
    order = [r["clients"] for r in first["costs"]["rounds"]]
    assert order == [r["clients"] for r in second["costs"]["rounds"]]
    clocks = [r["simulated_time"] for r in first["costs"]["rounds"]]
    assert clocks == sorted(clocks) and clocks[0] > 0


def test_on_the_simulated_clock_a_worker_dying_outside_its_step_is_not_waited_for():
    """Its thread posts why it died instead of leaving the server waiting for ever."""
    from fedsteer.federation.simulated import SimulatedClockRuntime

    class Unsaveable(RecordDict):
        def __deepcopy__(self, memo):
            raise RuntimeError("state cannot be copied")

    env = Environment(task=SPEC, test=[], model_name="none")
    workers = clients(3, env)
    workers[1].state = Unsaveable()
    outcome = SimulatedClockRuntime(AsyncConfig(active=2, staleness=1)).run(
        Counting(iterations=4), workers, env)
    assert len(outcome.rounds) == 4
    died = [r for cost in outcome.rounds for r in cost.rejected if r["cid"] == 1]
    assert len(died) == 1 and "state cannot be copied" in died[0]["reason"]


def test_the_worst_word_attacker_searches_once_and_sends_its_most_harmful_vertex():
    """The 'worst' attack: the attacker ranks the candidate words by the loss each gives as
    the whole prompt on its own data (its calls billed), once, then sends the simplex vertex
    that puts its most harmful words in every position."""
    from toy import SPEC as TOY
    from toy import examples

    env = Environment(task=TOY, test=[], model_name="tiny-random", transfer=examples(8))
    method = AsynDBT(prompt_length=2, candidates=4, samples=2, shots_per_class=2, batch_size=2,
                     demo_candidates=2, cutting_planes=False, byzantine=1, attack="worst")
    state = method.initial_state(env)
    attacker = Client(cid=0, data=examples(6), env=env)
    honest = Client(cid=1, data=examples(6, 3), env=env)
    box = env.blackbox("local")
    before = box.usage.calls
    first = method.client_step(method.worker_message(state, 0, 0), attacker)
    searched = box.usage.calls - before
    second = method.client_step(method.worker_message(state, 0, 1), attacker)
    assert box.usage.calls - before - searched < searched  # the search is not repeated
    sent = first["prompt"]["p"].numpy()
    order = attacker.state["attack"]["order"].numpy()
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    np.testing.assert_array_equal(sent.argmax(axis=1), order[:2])
    assert set(np.unique(sent)) == {0.0, 1.0} and method.reply_problem(first) is None
    np.testing.assert_array_equal(second["prompt"]["p"].numpy(), sent)
    mine = method.client_step(method.worker_message(state, 1, 0), honest)["prompt"]["p"].numpy()
    assert "attack" not in honest.state and not np.array_equal(mine, sent)


def test_the_two_method_shapes_are_declared_types_not_flags():
    """AsynDBT is an AsyncMethod (no rounds to disable), sharing BDPL's estimator by
    composition; runtimes dispatch on the type, so a flag proves nothing (issue 19)."""
    from fedsteer.experiment import check_settings
    from fedsteer.methods import Method
    from fedsteer.methods.bdpl import BDPL

    for cls in (AsynDBT,):
        assert issubclass(cls, AsyncMethod) and not issubclass(cls, (Method, BDPL))
        assert not hasattr(cls, "configure_round")
    assert AsynDBT().async_config()["active"] == 2

    class FlaggedRounds(BDPL):  # an old-style flag on a round method
        asynchronous = True

    # a round method with the flag is still checked as a round method (client_batch allowed)
    check_settings(RunConfig("bdpl", client_batch=1), FlaggedRounds())
    with pytest.raises(ValueError, match="client_batch"):
        check_settings(RunConfig("asyndbt", client_batch=4), AsynDBT())


def test_only_a_flower_rule_keeps_the_workers_latest_prompts():
    """The paper's sign consensus and robust-sign need only this update's replies; keeping
    every worker's latest prompt is the Flower rules' business (dead state otherwise)."""
    z = np.full((2, 3), 1 / 3)
    p = project_simplex(z + np.array([[0.1, 0.0, -0.1], [0.0, 0.2, -0.2]]))
    for consensus, kept in (("sign", 0), ("robust-sign", 0), ("median", 1)):
        state = AsynDBT(prompt_length=2, consensus=consensus).server_update(
            _state(z), _replies([p]))
        assert len(state["latest"]) == kept, consensus


def test_one_update_rule_for_every_asynchronous_runtime():
    """`active` replies from workers still waited for; silence (a timeout, a death) never
    counts as a reply, and an overdue worker is waited for (issue 19: the Flower runtime
    used to count timed-out messages towards `active`)."""
    from fedsteer.federation.asynchronous import ready_to_update

    waiting = {0: 3, 1: 3, 2: 3}
    assert not ready_to_update([], waiting, active=2, iteration=3, staleness=3)
    assert not ready_to_update([0], waiting, active=2, iteration=3, staleness=3)
    assert ready_to_update([0, 1], waiting, active=2, iteration=3, staleness=3)
    assert not ready_to_update([0, 7], waiting, active=2, iteration=3, staleness=3)  # 7: gone
    assert ready_to_update([0], {0: 3}, active=2, iteration=3, staleness=3)  # one left: one
    overdue = {0: 3, 1: 3, 2: 0}
    assert not ready_to_update([0, 1], overdue, active=2, iteration=3, staleness=3)
    assert ready_to_update([0, 1, 2], overdue, active=2, iteration=3, staleness=3)


def test_on_the_simulated_clock_no_step_starts_after_the_last_update_and_none_outlives_it():
    """The last update's senders get no new message (old code sent one: a wasted step, and a
    worker thread still in torch when the interpreter exits aborts the process); the run
    returns only when no worker is inside a step."""
    import threading
    import time

    from fedsteer.federation.simulated import SimulatedClockRuntime

    started: list[int] = []

    class Slow(Counting):
        def client_step(self, message, client):
            started.append(client.cid)
            time.sleep(0.05)
            return super().client_step(message, client)

    env = Environment(task=SPEC, test=[], model_name="none")
    outcome = SimulatedClockRuntime(AsyncConfig(active=1)).run(
        Slow(iterations=3), clients(2, env), env)
    assert len(outcome.rounds) == 3
    # each worker's first step, then one per update that was not the last
    assert len(started) == 2 + 2
    assert not [t for t in threading.enumerate() if t.name.endswith("(_worker)")]


# ---------------------------------------------- issue 41 (8) and 42: budget, bound, replies
def test_under_robust_sign_an_attacker_moves_a_coordinate_by_at_most_twice_lr_z_psi():
    """Before the projection one worker moves each coordinate by at most η_z·ψ; after it, by
    up to 2·η_z·ψ (`coordinate_pull_bound`). Adversarial workers on a 50-word prompt: the
    farthest vertex nearly reaches the bound (so η_z·ψ alone was not one), nothing passes it."""
    rng = np.random.default_rng(0)
    z = project_simplex(rng.dirichlet(np.ones(50), size=4))
    honest = [project_simplex(z + rng.normal(0, 0.02, z.shape)) for _ in range(3)]
    method = AsynDBT(prompt_length=4, lr_z=0.1, psi=0.05, consensus="robust-sign")
    clean = method.server_update(_state(z), _replies(honest))["z"]["z"].numpy()
    far = np.zeros_like(z)
    far[np.arange(4), z.argmin(axis=1)] = 1.0
    attacks = [far, project_simplex(z - 5.0 * (honest[0] - z)),
               *(rng.dirichlet(np.full(50, 0.1), size=4) for _ in range(50)),
               *(np.eye(50)[rng.integers(0, 50, 4)] for _ in range(50))]
    pulls = []
    for attack in attacks:
        attacked = method.server_update(_state(z), _replies([*honest, attack]))["z"]["z"]
        pulls.append(float(np.abs(attacked.numpy() - clean).max()))
    assert max(pulls) <= method.coordinate_pull_bound() + 1e-6
    assert pulls[0] > 1.9 * method.lr_z * method.psi  # the farthest vertex: (2 − 2/50)·η_z·ψ
    two = method.server_update(_state(z), _replies([*honest, far, far]))["z"]["z"].numpy()
    assert np.abs(two - clean).max() <= method.coordinate_pull_bound(attackers=2) + 1e-6


def _tiny_dbt(cls=AsynDBT, **options):
    settings = {"prompt_length": 2, "candidates": 4, "samples": 2, "shots_per_class": 2,
                "batch_size": 2, "steps_per_round": 1, "demo_candidates": 2,
                "cutting_planes": False, **options}
    return cls(**settings)


def _toy_run(method, workers: int = 2, active: int = 2):
    from toy import SPEC as TOY
    from toy import examples

    env = Environment(task=TOY, test=[], model_name="tiny-random", transfer=examples(8))
    clients_ = [Client(cid=i, data=examples(6, offset=i), env=env) for i in range(workers)]
    return AsyncInProcessRuntime(AsyncConfig(active=active)).run(method, clients_, env)


class Liar(AsynDBT):
    """Worker 0 says it made −10⁹ calls (which once turned the budget off), worker 1 says 0."""

    def client_step(self, message, client):
        reply = super().client_step(message, client)
        metrics = dict(reply["metrics"])
        metrics["calls"] = -10**9 if client.cid == 0 else 0
        reply["metrics"] = MetricRecord(metrics)
        return reply


def test_the_budget_bills_every_answered_message_at_its_work_whatever_the_reply_says():
    method = _tiny_dbt(Liar, iterations=12, api_budget=3 * 4)  # 4 calls a message
    outcome = _toy_run(method)
    answered = sum(len(r.clients) for r in outcome.rounds)
    assert len(outcome.rounds) < 12  # the budget ended the run, not the iterations
    assert method.scheduled_calls() == 4
    assert int(outcome.state["progress"]["calls"]) == 4 * answered >= 12
    rejected = [x for r in outcome.rounds for x in r.rejected]
    assert rejected and {x["cid"] for x in rejected} == {0}  # billed all the same
    assert all("metrics.calls" in x["reason"] for x in rejected)


@pytest.mark.usefixtures("flower_identity")
def test_on_flower_the_server_bills_too(tmp_path):
    """On Flower no black box meters the workers: the server's own bill ends the run, and a
    node that reports a negative count is rejected, not credited."""
    options = {"prompt_length": 2, "candidates": 6, "samples": 2, "shots_per_class": 2,
               "batch_size": 2, "steps_per_round": 1, "iterations": 8, "demo_candidates": 2,
               "active": 1, "staleness": 3, "api_budget": 3 * 4}

    def negative(node, content):
        if node == 100 and "metrics" in content.metric_records:
            metrics = dict(content["metrics"])
            metrics["calls"] = -1000
            content["metrics"] = MetricRecord(metrics)

    record, _ = serve_inline(tiny_config(method="asyndbt", options=options), tmp_path,
                             tamper=negative, round_timeout=60.0)
    rounds = record["costs"]["rounds"]
    assert len(rounds) < 8
    assert record["metrics"]["api_calls_billed_by_server"] >= 12
    assert record["metrics"]["api_training_calls"] == record["metrics"][
        "api_calls_billed_by_server"]
    assert any(rej["cid"] == 0 and "metrics.calls" in rej["reason"]
               for r in rounds for rej in r["rejected"])


def _hostile(kind: str, width: int) -> RecordDict:
    """A reply an honest worker would never send."""
    p = np.full((2, width), 1.0 / width)
    metrics: dict = {"calls": 4, "loss": 0.5}
    if kind == "wider":
        p = np.full((2, width + 3), 1.0 / (width + 3))
    elif kind == "narrower":
        p = np.full((2, 1), 1.0)
    elif kind == "no calls":
        del metrics["calls"]
    elif kind == "negative calls":
        metrics["calls"] = -1
    elif kind == "fractional calls":
        metrics["calls"] = 2.5
    elif kind == "nan calls":
        metrics["calls"] = float("nan")
    elif kind == "list of calls":
        metrics["calls"] = [1, 2]
    content = RecordDict({"prompt": ArrayRecord({"p": _array(p)})})
    if kind != "no metrics":
        content["metrics"] = MetricRecord(metrics)
    return content


HOSTILE = ["wider", "narrower", "no calls", "negative calls", "fractional calls", "nan calls",
           "list of calls", "no metrics"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_reply_is_named_by_the_check(kind):
    from toy import SPEC as TOY
    from toy import examples

    method = AsynDBT(prompt_length=2, candidates=4)
    method.setup(Environment(task=TOY, test=[], model_name="none", transfer=examples(8)))
    assert method.reply_problem(_hostile("none", 4)) is None
    problem = method.reply_problem(_hostile(kind, 4))
    assert problem and ("shape" in problem if kind in ("wider", "narrower")
                        else "metrics.calls" in problem)


def test_hostile_replies_are_rejected_and_the_run_goes_on():
    """Worker 1 sends a different malformed reply each time; worker 0 is honest. Every
    hostile reply is a rejected reply with its reason; the run ends normally."""

    class Hostile(AsynDBT):
        sent = 0

        def client_step(self, message, client):
            reply = super().client_step(message, client)
            if client.cid != 1:
                return reply
            kind = HOSTILE[Hostile.sent % len(HOSTILE)]
            Hostile.sent += 1
            return _hostile(kind, reply["prompt"]["p"].numpy().shape[1])

    outcome = _toy_run(_tiny_dbt(Hostile, iterations=len(HOSTILE), active=2))
    assert len(outcome.rounds) == len(HOSTILE)
    rejected = [x for r in outcome.rounds for x in r.rejected]
    assert {x["cid"] for x in rejected} == {1} and len(rejected) == len(HOSTILE)
    assert np.allclose(outcome.state["z"]["z"].numpy().sum(axis=1), 1.0, atol=1e-5)


def test_a_reply_check_that_raises_rejects_the_reply_not_the_run():
    class Brittle(AsynDBT):
        def reply_problem(self, content):
            if int(content["metrics"]["calls"]) == 0:
                raise KeyError("a field the check did not foresee")
            return super().reply_problem(content)

    outcome = _toy_run(_tiny_dbt(type("BrittleLiar", (Liar, Brittle), {}), iterations=3))
    rejected = [x for r in outcome.rounds for x in r.rejected]
    assert any(x["cid"] == 1 and "reply check failed" in x["reason"] for x in rejected)
