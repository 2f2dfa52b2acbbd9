"""The thread budget: each process that runs a model sets torch's threads to its share.

In process one process hosts every client (all cores); in Flower's simulation each Ray actor
gets cores // the actors that fit; in a deployment each ClientApp cores // the SuperNodes on
the machine; `threads` overrides all. The tests read torch's count inside a client step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from fedsteer.federation import InProcessRuntime, RuntimeConfig, threads
from fedsteer.flower import launch
from test_federation_flower import (  # noqa: F401 - fixtures
    IFED,
    flower_identity,
    no_leftover_processes,
    serve_inline,
    tiny_config,
)
from test_federation_runtime import ToyAverage, make_clients


def test_a_share_is_the_cores_over_the_processes_at_least_one_unless_set():
    assert threads.thread_share(1, cores=8) == 8
    assert threads.thread_share(3, cores=8) == 2
    assert threads.thread_share(10, cores=2) == 1
    assert threads.thread_share(10, threads=3, cores=2) == 3  # --threads overrides
    with pytest.raises(ValueError, match="threads"):
        threads.thread_share(threads=0)


def fake_ray(cpus: float) -> SimpleNamespace:
    context = SimpleNamespace(get_assigned_resources=lambda: {"CPU": cpus})
    return SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)


def test_a_client_process_counts_the_actors_or_the_supernodes_beside_it(monkeypatch):
    monkeypatch.setattr(threads, "machine_cores", lambda: 8)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert threads.client_processes({}) == 1  # a lone SuperNode
    assert threads.client_processes({threads.NODES_ON_MACHINE: 5}) == 5
    monkeypatch.setitem(sys.modules, "ray", fake_ray(2.0))  # a simulation actor of 2 CPUs
    assert threads.client_processes({threads.NODES_ON_MACHINE: 5}) == 4  # 8 // 2 actors
    monkeypatch.setitem(sys.modules, "ray", fake_ray(1.0))
    assert threads.client_processes({}) == 8


@dataclass
class ThreadsSeen(ToyAverage):
    """Records torch's thread count inside each client step."""

    name = "threads-seen"

    def __post_init__(self) -> None:
        self.seen: list[int] = []

    def client_step(self, message, client):
        self.seen.append(torch.get_num_threads())
        return super().client_step(message, client)


@pytest.mark.parametrize("asked", [None, 1])
def test_the_in_process_runtime_steps_its_clients_on_the_budget(asked):
    expected = threads.thread_share(1, asked)  # one process: all cores, or --threads
    torch.set_num_threads(expected + 1)  # a count the budget must replace
    env, clients = make_clients(3)
    method = ThreadsSeen(rounds=2)
    outcome = InProcessRuntime(RuntimeConfig(threads=asked)).run(method, clients, env)
    assert method.seen == [expected] * 6
    assert all(r.client_threads == dict.fromkeys(range(3), expected) for r in outcome.rounds)
    assert torch.get_num_threads() == expected + 1  # the caller's count back


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("asked", [None, 1])
def test_each_client_app_takes_its_share_of_the_supernodes_machine(tmp_path, asked):
    nodes = {100 + p: {threads.NODES_ON_MACHINE: 3} for p in range(3)}
    config = tiny_config(options={**IFED, "rounds": 1}, threads=asked)
    record, _ = serve_inline(config, tmp_path, node_config=nodes)
    expected = threads.thread_share(3, asked)
    for r in record["costs"]["rounds"]:
        assert r["client_threads"] == dict.fromkeys(["0", "1", "2"], expected)  # JSON keys


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_processes")
def test_each_simulation_actor_takes_its_share(tmp_path):
    # one CPU an actor: cores // 1 actors at once, each with cores // actors threads
    config = tiny_config(clients=2, options={**IFED, "rounds": 1})
    record = launch.run_on_flower(config, tmp_path / "sim", cpus_per_client=1)
    actors = threads.machine_cores()
    expected = threads.thread_share(actors)
    rounds = record["costs"]["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        assert r["client_threads"] == {"0": expected, "1": expected}


def test_the_run_command_passes_threads_to_every_client_step(tmp_path, tiny_lm):
    import json

    from typer.testing import CliRunner

    from fedsteer.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "local-icl", "--model", "tiny-random", "--task", "sst2", "--clients", "2",
        "--test-size", "4", "--threads", "1", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())  # one method: the run's own
    assert record["config"]["threads"] == 1
    assert record["costs"]["rounds"][0]["client_threads"] == {"0": 1, "1": 1}
