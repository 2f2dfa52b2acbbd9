"""One run, end to end: task -> partitions -> method on a runtime -> metrics -> result.json.

The CLI, the benchmarks and `make demo` all come through `run_experiment`, so every number
fedsteer prints is produced by the same path.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.progress import Progress

from fedsteer.data import Example, Task, load_task, partition
from fedsteer.eval.costs import reset_peak_rss, summarize_costs
from fedsteer.eval.metrics import accuracy_interval
from fedsteer.eval.record import environment, write_provenance, write_result
from fedsteer.federation import InProcessRuntime, Runtime, RuntimeConfig
from fedsteer.federation.privacy import CentralDP, ClientDP, check_adjacency
from fedsteer.federation.runtime import (
    DEFAULT_CLIENT_BATCH_ROWS,
    SAMPLINGS,
    client_batch_size,
)
from fedsteer.federation.threads import thread_budget
from fedsteer.methods import METHODS, Client, Environment, make_method
from fedsteer.methods.base import AsyncMethod, seeded_subset
from fedsteer.models import DEFAULT_MODEL
from fedsteer.stacks import pipeline_costs, stack_name

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Everything needed to rerun a run; stored verbatim in `result.json["config"]`."""

    method: str
    task: str = "sst2"
    model: str = DEFAULT_MODEL
    clients: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5
    min_per_client: int = 2
    rounds: int | None = None  # None: the method's own default
    fraction: float = 1.0
    sampling: str = "fixed"  # or "poisson": each client on its own with probability fraction
    seed: int = 0
    test_size: int | None = 300  # None: the whole test split
    test_seed: int = 0  # fixed apart from `seed`, so every method sees the same test rows
    shots: int = 4
    batch_size: int = 16
    max_reply_norm: float | None = None  # absolute bound on any reply record's L2 norm
    reply_norm_factor: float = 10.0  # reject a reply record > k × the round's median; 0: off
    max_client_weight: float | None = None  # cap on one reply's weight; None: 10 × median
    tolerate_client_errors: bool = False  # leave out a client whose step raised anything
    #: clients stepped together in one forward (in process); None: as many as the row budget
    #: allows, 1: one by one. An execution choice: the results are the same either way
    client_batch: int | None = None
    client_batch_rows: int = DEFAULT_CLIENT_BATCH_ROWS  # the row budget of one batched forward
    #: torch intra-op threads of each process that runs a model; None: its share of the
    #: cores (cores // processes running at once). An execution choice, like client_batch
    threads: int | None = None
    dp_clip: float | None = None  # client-level DP: clip each reply record to this L2 norm
    dp_noise: float = 0.0  # ... and add N(0, (dp_noise * dp_clip)^2) noise to it
    dp_delta: float = 1e-5
    dp_record_clips: dict[str, float] = field(default_factory=dict)  # per-record clip norms
    dp_record_noise: dict[str, float] = field(default_factory=dict)  # per-record noise z
    #: κ per record: clip each row to κ × its norm in the method's public reference
    dp_relative_clips: dict[str, float] = field(default_factory=dict)
    dp_adjacency: str = "replace-one"  # what ε protects: a client replaced (or added/removed)
    #: local: each client noises its reply; central: clients clip, the server noises the mean
    dp_mode: str = "local"
    secagg: bool = False  # Flower only: SecAgg+, the server sees only the mean of replies
    eval_every: int = 0  # evaluate after every k-th round too (accuracy per round); 0: at the end
    #: the model's dtype: float32, bfloat16, float16 or auto (bf16 where the hardware pays)
    dtype: str = "float32"
    device: str = "auto"  # cpu, cuda, mps or auto (a GPU when there is one)
    #: saved artifacts (`a+b`) applied in every forward of this run, clients' and
    #: evaluation's (`--on-top-of`): the new point is trained for the steered model
    on_top_of: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # method-specific extras

    @classmethod
    def from_record(cls, config: dict[str, Any]) -> RunConfig:
        """The config a result record stores (which also lists derived values)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def method_options(self) -> dict[str, Any]:
        return {"shots": self.shots, "seed": self.seed, "rounds": self.rounds, **self.options}


#: RunConfig fields that choose how a run executes, never what it computes (client batching
#: is tested equal to one by one): a finished cell is reused, and a run resumes, under others
EXECUTION_CHOICES = frozenset({"client_batch", "client_batch_rows", "threads", "device"})


def result_settings(config: RunConfig) -> dict[str, Any]:
    """The fields that decide a run's result, as its record stores them."""
    return {key: value for key, value in dataclasses.asdict(config).items()
            if key not in EXECUTION_CHOICES}


def default_run_dir(config: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.method}-{Path(config.task).stem}"


def evaluation_rows(task: Task, size: int | None, seed: int) -> list[Example]:
    """A seeded subset of the test split (all of it when `size` is None or larger)."""
    return seeded_subset(task.test, size, seed, "test", task.name)


def test_set_warnings(test: list[Example], labels: tuple[str, ...]) -> list[str]:
    """What makes a score mislead: macro-F1 over labels the rows never show."""
    present = sorted({ex.label for ex in test})
    if len(present) < len(labels):
        missing = [labels[i] for i in range(len(labels)) if i not in present]
        return [f"the {len(test)} test rows hold {len(present)} of {len(labels)} labels "
                f"(none of {', '.join(missing)}): macro-F1 counts those labels as 0"]
    return []


def unused_privacy_settings(privacy: dict | None) -> list[str]:
    """The privacy block's settings no release used, logged now and kept as warnings."""
    unused = list((privacy or {}).get("unused_settings", ()))
    for warning in unused:
        log.warning("%s", warning)
    return unused


def client_dp(config: RunConfig) -> ClientDP | None:
    """What each client does to its reply: clip and noise (local DP), clip only (central)."""
    if config.dp_clip is None:
        return None
    check_adjacency(config.dp_adjacency)
    central = central_dp(config)
    if central is not None:
        return central.client_side()
    return ClientDP(clip=config.dp_clip, noise_multiplier=config.dp_noise, delta=config.dp_delta,
                    record_clips=dict(config.dp_record_clips), adjacency=config.dp_adjacency,
                    record_noise=dict(config.dp_record_noise),
                    relative_clips=dict(config.dp_relative_clips))


def central_dp(config: RunConfig) -> CentralDP | None:
    """The server's part of central DP (its noise and accounting), when asked for."""
    if config.dp_mode not in ("local", "central"):
        raise ValueError(f"dp mode {config.dp_mode!r}: use 'local' or 'central'")
    if config.dp_clip is None or config.dp_mode == "local":
        return None
    return CentralDP(clip=config.dp_clip, noise_multiplier=config.dp_noise,
                     delta=config.dp_delta, record_clips=dict(config.dp_record_clips),
                     record_noise=dict(config.dp_record_noise),
                     relative_clips=dict(config.dp_relative_clips))


def transfer_rows(task: Task, evaluated: list[Example]) -> list[Example]:
    """Held-out texts for a server-side transfer set: the dev split, else the test rows that
    are not evaluated. Only their text is meant to be used (they are unlabelled to a method)."""
    if task.dev:
        return list(task.dev)
    held = {id(ex) for ex in evaluated}
    return [ex for ex in task.test if id(ex) not in held]


def check_settings(config: RunConfig, method, resume: bool = False) -> None:
    """Refuse run settings this method's runtime would ignore, before any work is done."""
    if config.sampling not in SAMPLINGS:
        raise ValueError(f"sampling {config.sampling!r}: use one of {', '.join(SAMPLINGS)}")
    if config.dp_clip is not None and not method.supports_client_dp:
        private = sorted(n for n, cls in METHODS.items() if cls.supports_client_dp)
        raise ValueError(f"{method.name} reports through metrics, which client-level DP drops; "
                         f"dp_clip applies to {', '.join(private)}")
    if not isinstance(method, AsyncMethod):
        refuse_a_rule_that_is_not_the_mean(config, method)
        client_batch_size(runtime_config(config), method)  # refuses a batch it cannot step
        return
    ignored = {"dp_clip": config.dp_clip is not None, "eval_every": config.eval_every > 0,
               "fraction": config.fraction < 1, "sampling": config.sampling != "fixed",
               "client_batch": config.client_batch not in (None, 1)}
    named = [name for name, is_set in ignored.items() if is_set]
    if named:
        raise ValueError(f"{method.name} runs on the asynchronous runtime, which has no "
                         f"{', '.join(named)}: its workers are chosen by `active` and "
                         "`staleness`")
    if resume:  # `bench` resumes every cell it can; this one cannot, and says so
        log.warning("%s runs on the asynchronous runtime, which keeps no checkpoint: "
                    "the run starts afresh", method.name)


def refuse_a_rule_that_is_not_the_mean(config: RunConfig, method) -> None:
    """SecAgg+ reveals only the mean of the replies, and central DP's noise joins that mean:
    a method whose aggregate is another rule (`-o rule=median`, krum, ...) would silently
    become the mean, or drop the noise with the reply it rejects."""
    if method.secure_mean:
        return
    rule = method.options().get("rule")
    which = f"{method.name} with rule={rule}" if rule else method.name
    if config.secagg:
        raise ValueError(f"--secagg: {which} does not aggregate by a mean, and SecAgg+ reveals "
                         "only the mean of the replies; use -o rule=mean or drop --secagg")
    if config.dp_clip is not None and config.dp_mode == "central":
        raise ValueError(f"--dp-mode central: {which} does not aggregate by a mean, and the "
                         "server's noise joins that mean; use -o rule=mean or --dp-mode local")


def run_asynchronous(method: AsyncMethod, clients, env: Environment):
    """Asynchronous methods (AsynDBT) on the in-process asynchronous runtime, then each
    worker's own evaluation (its personalised parts never leave it)."""
    from flwr.app import MetricRecord

    from fedsteer.federation.asynchronous import AsyncInProcessRuntime
    from fedsteer.federation.simulated import SimulatedClockRuntime

    box = env.blackbox(method.blackbox) if hasattr(method, "blackbox") else None
    before = box.usage.calls if box is not None else 0
    config = async_config(method)
    if config.schedule == "simulated":
        runtime = SimulatedClockRuntime(config, seed=getattr(method, "seed", 0))
    else:
        runtime = AsyncInProcessRuntime(config)
    outcome = runtime.run(method, clients, env)
    if box is not None:  # the bill is what the black box served, unused replies included
        outcome.state["billing"] = MetricRecord({"training_calls": box.usage.calls - before})
    for client in clients:
        outcome.state[f"client.{client.cid}"] = MetricRecord(
            method.evaluate_client(outcome.state, client))
    return outcome


def async_config(method: AsyncMethod):
    """The asynchronous runtime's settings as the method asks for them."""
    from fedsteer.federation.asynchronous import AsyncConfig

    return AsyncConfig(**method.async_config())


def runtime_config(config: RunConfig) -> RuntimeConfig:
    return RuntimeConfig(fraction=config.fraction, sampling=config.sampling, seed=config.seed,
                         max_reply_norm=config.max_reply_norm, dp=client_dp(config),
                         central_dp=central_dp(config),
                         reply_norm_factor=config.reply_norm_factor,
                         max_client_weight=config.max_client_weight,
                         tolerate_client_errors=config.tolerate_client_errors,
                         eval_every=config.eval_every, client_batch=config.client_batch,
                         client_batch_rows=config.client_batch_rows, threads=config.threads)


def build_clients(config: RunConfig, task: Task, env: Environment, centralized: bool):
    """One client per partition; a centralized method gets one client with all the data."""
    if centralized:
        return [Client(cid=0, data=list(task.train), env=env)]
    labels = [ex.label for ex in task.train]
    parts = partition(
        labels, config.clients, config.partition,
        alpha=config.alpha, seed=config.seed, min_per_client=config.min_per_client,
    )
    return [
        Client(cid=i, data=[task.train[j] for j in idx], env=env) for i, idx in enumerate(parts)
    ]


def run_experiment(
    config: RunConfig,
    out_dir: Path | None = None,
    *,
    lm: Any = None,
    task: Task | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    save_dir: Path | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Run `config`; write and return its result record. Pass `lm` to share a loaded model.

    By default the clients are simulated here (`InProcessRuntime`); a runtime whose clients
    live elsewhere (Flower) is passed in and addresses them by id, holding none of their data.
    """
    started = time.perf_counter()
    reset_peak_rss()  # this run's peak, not the one of a bench's earlier cells
    out_dir = Path(out_dir) if out_dir else default_run_dir(config)
    task = task or load_task(config.task)
    method = make_method(config.method, **config.method_options())
    check_settings(config, method, resume)
    env, warnings = _environment(config, task, lm, progress)
    hosted = runtime is None  # else the clients live elsewhere (Flower), known by id only
    clients = (build_clients(config, task, env, method.centralized) if hosted
               else list(range(1 if method.centralized else config.clients)))
    with (thread_budget(threads=config.threads),  # this process, server or all the clients
          on_top_of(config, method, task, env, hosted) as stack):
        if isinstance(method, AsyncMethod):
            outcome = (run_asynchronous(method, clients, env) if hosted
                       else runtime.run(method, clients, env))
        else:
            runtime = runtime or InProcessRuntime(
                runtime_config(config), checkpoint_dir=out_dir / "checkpoint", progress=progress)
            outcome = runtime.run(
                method, clients, env, resume=resume,
                fingerprint={"config": result_settings(config), "options": method.options()},
            )
        if save_dir is not None:
            _save_artifacts(method, outcome, clients if hosted else [], Path(save_dir), config,
                            task)
        warnings += unused_privacy_settings(outcome.privacy)
        record = _record(config, method, task, env, outcome, len(clients), warnings)
        if stack:
            record["stack"] = stack
            record["method"] = stack_name(stack, method.name)
            record["pipeline_costs"] = pipeline_costs(record["costs"], stack)
    record["costs"]["wall_seconds"] = time.perf_counter() - started
    write_result(record, out_dir)
    if save_dir is not None and Path(save_dir).is_dir():
        write_provenance(Path(save_dir), record, task.spec.labels)
    log.info("%s on %s: accuracy %.4f -> %s", method.name, task.name,
             record["metrics"]["accuracy"], out_dir)
    return record


@contextmanager
def on_top_of(config: RunConfig, method, task: Task, env: Environment, hosted: bool
              ) -> Iterator[list[dict[str, Any]]]:
    """`config.on_top_of`'s artifacts applied in place for the body (their hooks on the model
    the new artifact is made for, their prompt before every input of the run's models),
    yielding what the record says of them; nothing when there are none. The method does not
    know: its scorer runs the model as before."""
    if not config.on_top_of:
        yield []
        return
    from fedsteer.models.adapted import POINTS
    from fedsteer.stacks import ArtifactMismatch, artifact_kind, split_stack
    from fedsteer.stacks import on_top_of as applied

    if not hosted:
        raise ValueError("--on-top-of runs in process only: Flower's clients load their "
                         "model elsewhere, without the stack")
    directories = split_stack(config.on_top_of)
    for directory in directories:
        if method.steers is not None and POINTS[artifact_kind(directory)] == method.steers:
            raise ArtifactMismatch(
                f"--on-top-of {directory}: it steers the {method.steers} already, which "
                f"{method.name} would steer again; a stack takes one artifact per point")
    base = env.other_lm(method.artifact_model(config.model))  # FedPT: its large model
    with applied(directories, task, base, [env.lm]) as record:
        yield record


def _environment(config: RunConfig, task: Task, lm, progress) -> tuple[Environment, list[str]]:
    """What the run's clients and server share, and what is odd about its test rows."""
    test = evaluation_rows(task, config.test_size, config.test_seed)
    warnings = test_set_warnings(test, task.spec.labels)
    for warning in warnings:
        log.warning("%s", warning)
    env = Environment(
        task=task.spec, test=test, model_name=config.model, seed=config.seed,
        batch_size=config.batch_size, progress=progress, transfer=transfer_rows(task, test),
        dtype=config.dtype, device=config.device, _lm=lm,
    )
    return env, warnings


def _save_artifacts(method, outcome, clients: list[Client], directory: Path, config: RunConfig,
                    task: Task) -> None:
    """The adapted model, and what each client here keeps (on Flower, the nodes keep theirs)."""
    if method.save_artifact(outcome.state, directory, config.model, task.name) is None:
        log.warning("%s has no artifact to save; --save ignored", method.name)
    for client in clients:
        method.save_client_artifact(outcome.state, client, directory)


def _record(config: RunConfig, method, task: Task, env: Environment, outcome, num_clients: int,
            warnings: list[str]) -> dict[str, Any]:
    """The result record: settings, metrics with their interval, per-row scores, costs."""
    if outcome.metrics is not None:  # the last round was evaluated: the same state
        metrics, eval_seconds = outcome.metrics, outcome.rounds[-1].eval_seconds
    else:
        eval_started = time.perf_counter()
        metrics = method.evaluate(outcome.state, env)
        eval_seconds = time.perf_counter() - eval_started
    metrics = dict(metrics)
    per_row = {key: metrics.pop(key) for key in ("correct", "correct_fraction")
               if metrics.get(key) is not None}
    metrics["num_test"] = len(env.test)
    metrics["accuracy_ci95"] = list(accuracy_interval(metrics))
    costs = summarize_costs(outcome.rounds)
    costs["eval_seconds"] = eval_seconds
    return {
        "method": method.name,
        "task": task.name,
        "model": config.model,
        "config": {**dataclasses.asdict(config), "method_options": method.options()},
        "metrics": {**metrics, "num_clients": num_clients},
        #: each test row's correctness, in row order (the rows: task, test_size, test_seed),
        #: so two records on the same rows can be compared pairwise (`eval.metrics.mcnemar_exact`);
        #: where clients evaluated on their own, the share of them right (`correct_fraction`)
        "per_row": per_row or None,
        "costs": costs,
        "privacy": outcome.privacy,
        "warnings": warnings,
        "env": {**environment(), "placement": placement_record(env)},
    }


def placement_record(env: Environment) -> dict[str, str] | None:
    """Which device and dtype the run's model ran in, and why (None: no model was loaded)."""
    lm = env._lm
    if lm is None:
        return None
    placement = getattr(lm, "placement", None)
    if placement is not None:
        return placement.as_record()
    param = next(lm.model.parameters())  # a model handed in, placed by its caller
    return {"device": param.device.type, "dtype": str(param.dtype).removeprefix("torch."),
            "reason": "the model handed to run_experiment"}
