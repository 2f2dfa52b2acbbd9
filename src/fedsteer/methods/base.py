"""The one seam: a method is pure algorithm, a runtime only moves its messages.

A method is a small dataclass (its fields are its hyperparameters) with five steps,
shaped like a Flower strategy so the Flower runtime can carry it unchanged:

    method.setup(env); state = method.initial_state(env)   # server, once
    loop:
      msg  = method.configure_round(rnd, state)         # server -> clients (None: done)
      reply= method.client_step(msg, client)            # on each sampled client
      state= method.aggregate(rnd, state, replies)      # server
    metrics = method.evaluate(state, env)               # server, the global artifact

Messages, replies and server state are Flower `RecordDict`s (`ArrayRecord` for tensors,
`ConfigRecord` for settings, `MetricRecord` for numbers), so they serialize, count their
bytes and checkpoint the same way in every runtime. Methods with phases say so in the
message's config ("phase"), never through a runtime special case.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, TypeVar

import numpy as np
from flwr.app import RecordDict

from fedsteer.data import Example, TaskSpec

T = TypeVar("T")


def seeded_rng(*keys: int | str) -> np.random.Generator:
    """A generator fixed by its keys (seed, round, client id...), so a resumed run repeats."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def seeded_subset(rows: Sequence[T], size: int | None, *keys: int | str) -> list[T]:
    """`size` of `rows` drawn by `seeded_rng(*keys)`, in their original order (all of them
    when `size` is None or not smaller)."""
    if size is None or size >= len(rows):
        return list(rows)
    picks = seeded_rng(*keys).choice(len(rows), size, replace=False)
    return [rows[i] for i in sorted(picks)]


@dataclass
class Environment:
    """What one process shares among all methods and simulated clients it hosts.

    The model is loaded lazily and once: many clients, one model (never a copy each).
    """

    task: TaskSpec
    test: list[Example]
    model_name: str
    seed: int = 0
    batch_size: int = 16
    progress: Any = None  # a rich Progress to report scoring on, or None
    #: unlabelled held-out task texts a server may use (FedPT's distillation transfer set)
    transfer: list[Example] = field(default_factory=list)
    #: what the model runs in and where (`fedsteer.models.placement`; `auto`: the hardware's)
    dtype: str = "float32"
    device: str = "auto"
    _lm: Any = None
    _scorers: dict = field(default_factory=dict)
    _others: dict = field(default_factory=dict)

    @property
    def lm(self):
        if self._lm is None:
            self._lm = self._load(self.model_name)
        return self._lm

    def other_lm(self, name: str):
        """A second model in this process (e.g. FedPT's large model at the server), loaded
        once; the run's own model when it is the one named (one copy, one set of hooks)."""
        if name == self.model_name:
            return self.lm
        if name not in self._others:
            self._others[name] = self._load(name)
        return self._others[name]

    def _load(self, name: str):
        from fedsteer.models import load_placed

        return load_placed(name, dtype=self.dtype, device=self.device,
                           batch_size=self.batch_size)

    def blackbox(self, spec: str = "local"):
        """The run's black box, shared by every client here (one bill, one cache).

        `spec` as `fedsteer.blackbox.open_blackbox` reads it ("local" or an endpoint).
        """
        if spec not in self._others:  # the transport is the blackbox room's business
            from fedsteer.blackbox import open_blackbox

            self._others[spec] = open_blackbox(spec, lambda: self.lm, self.batch_size)
        return self._others[spec]

    def scorer(self, multi_token: bool = False):
        """The task's label scorer on the shared model (built once per process)."""
        if multi_token not in self._scorers:
            from fedsteer.models.scoring import LabelScorer

            self._scorers[multi_token] = LabelScorer(
                self.lm, self.task.label_words, batch_size=self.batch_size, multi_token=multi_token
            )
        return self._scorers[multi_token]


#: A reply's `metrics` may report, under this key, the seconds its client spent queued for a
#: shared resource (one model behind several simulated workers); runtimes count that time as
#: waiting, not as the client's compute.
WAIT_METRIC = "wait_seconds"


@dataclass
class Client:
    """One simulated party: its id, its private examples and its own persistent state."""

    cid: int
    data: list[Example]
    env: Environment
    state: RecordDict = field(default_factory=RecordDict)

    @cached_property
    def labels(self) -> np.ndarray:
        return np.array([ex.label for ex in self.data], dtype=np.int64)


@dataclass
class Reply:
    """A client's answer to one round's message, as the server's aggregate step sees it."""

    cid: int
    content: RecordDict
    num_examples: int


class Aggregator(ABC):
    """One round's aggregate built one reply at a time: a runtime hands it each reply it kept
    (`add`, in the order it chooses) and asks once for the new state (`result`).

    The runtime needs no list of the round's replies for it: a mean folds each reply into
    a running weighted sum and drops it, so the server holds one model's worth of replies,
    not N. A rule that needs every reply at once (median, trimmed mean, Krum, Bulyan, or a
    method's own `aggregate`) keeps them, and says so with `holds_replies`.
    """

    #: True when `add` keeps the replies (memory grows with the clients)
    holds_replies: ClassVar[bool] = False

    def reply_problem(self, content: RecordDict) -> str | None:
        """What in a reply this aggregator could not fold (a record it reads missing or of
        the wrong kind), or None. A runtime asks on arrival, so such a reply is rejected
        instead of failing the round when it is folded in."""
        return None

    @abstractmethod
    def add(self, reply: Reply) -> None:
        """Take one reply into the round's aggregate."""

    @abstractmethod
    def result(self) -> RecordDict:
        """The new server state, from every reply added."""


class HeldReplies(Aggregator):
    """Keeps every reply for a batch step (`Method.aggregate`) at the end: what a method that
    defines only `aggregate` gets, since its rule may need them all."""

    holds_replies = True

    def __init__(self, combine: Callable[[list[Reply]], RecordDict]) -> None:
        self.combine, self.replies = combine, []

    def add(self, reply: Reply) -> None:
        self.replies.append(reply)

    def result(self) -> RecordDict:
        return self.combine(self.replies)


def fold(aggregator: Aggregator, replies: Iterable[Reply]) -> RecordDict:
    """The batch form of an aggregator: every reply added, in order, then its result."""
    for reply in replies:
        aggregator.add(reply)
    return aggregator.result()


@dataclass
class BatchedSteps:
    """The replies of clients stepped together (`Method.client_steps`), in their order, and the
    rows each put through the shared forwards: its share of the batched compute time."""

    contents: list[RecordDict]
    rows: list[int]


class MethodBase(ABC):
    """What every method has, whatever its shape: a name, its hyperparameters (the dataclass
    fields), a server state, a client step, checks on replies, an evaluation, artifacts."""

    name: ClassVar[str]
    #: True for the non-private references (central-icl, ...): one client holds all data.
    centralized: ClassVar[bool] = False
    #: True when `aggregate` of the replies equals `aggregate` of one reply holding their
    #: (weighted) mean: then secure aggregation, which reveals only that mean, is exact.
    secure_mean: ClassVar[bool] = False
    #: True when a reply's content is its arrays: client-level DP clips and noises arrays and
    #: drops metrics, so a method that reports through metrics (local ICL's accuracies, BDPL's
    #: call counts) cannot run under it.
    supports_client_dp: ClassVar[bool] = False
    #: Reject replies whose arrays' global L2 norm exceeds this (None: no bound).
    max_reply_norm: ClassVar[float | None] = None
    #: Where the saved artifact steers the frozen model (input, activations, weights or
    #: output; None: it saves none): a run on top of a stack may not steer a point twice.
    steers: ClassVar[str | None] = None

    def artifact_model(self, model_name: str) -> str:
        """The model this run's artifact is applied to (the run's model; FedPT: its large
        model): the base of any stack the run is trained on top of."""
        return model_name

    def setup(self, env: Environment) -> None:  # noqa: B027 - optional hook
        """Once per run on the server, before `initial_state` or a resume: a method whose
        server steps need more than the state (FedPT's large model) takes it from `env`."""

    def initial_state(self, env: Environment) -> RecordDict:
        return RecordDict()

    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        """On one client (a worker, for an asynchronous method): its reply to a message."""
        raise NotImplementedError(f"{self.name} has no client step")

    @abstractmethod
    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        """Final metrics of the run's global artifact: at least accuracy and macro_f1."""

    def save_artifact(self, state: RecordDict, directory, model_name: str, task_name: str):
        """Write the adapted model (vectors, adapters, prompts) for reuse; None if none."""
        return None

    def save_client_artifact(self, state: RecordDict, client: Client, directory):
        """What one client keeps for itself (e.g. its own demonstrations), written on its side
        under `directory/clients/<cid>/`; None if the method has nothing personal."""
        return None

    def reply_shapes(self, message: RecordDict) -> dict[str, tuple[int, ...]] | None:
        """Expected `"record.array" -> shape` of a reply, so a runtime can reject bad ones."""
        return None

    def reply_problem(self, content: RecordDict) -> str | None:
        """What is wrong with a reply's values beyond shapes and NaN/Inf (e.g. a policy that is
        not a distribution), or None; runtimes reject such a reply like any malformed one."""
        return None

    def reference_reply(self, message: RecordDict, env: Environment) -> RecordDict | None:
        """A reply to `message` computed from public, data-free input alone (no client's
        data), or None: the point honest replies scatter around. Array records a message
        does not carry already are sent with it, so a client's update to one is its
        deviation from this reference (what client-level DP then clips and noises)."""
        return None

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


class Method(MethodBase):
    """The round shape: configure → client steps → aggregate, until `configure_round` says
    done; then evaluate. Subclasses are dataclasses of their hyperparameters."""

    #: True when every client must take part in every round (a runtime's fraction is ignored).
    every_client: ClassVar[bool] = False

    @abstractmethod
    def configure_round(self, rnd: int, state: RecordDict) -> RecordDict | None:
        """The message for round `rnd` (0-based), or None when the method is finished."""

    def planned_rounds(self) -> int | None:
        """How many rounds `configure_round` hands out when nothing stops it early, for a
        progress line's "round r/N"; None when a method cannot tell."""
        return None

    def client_step_rows(self) -> int | None:
        """Rows one client puts through a forward in a local step, for a runtime sizing a
        client batch from a row budget; None: the method cannot step its clients together."""
        return None

    #: whether a runtime batches this method's clients unless told (`client_batch=None`); a
    #: method whose batched step measured slower here says False and batches only on request
    batches_by_default: ClassVar[bool] = True

    def client_steps(self, message: RecordDict, clients: Sequence[Client]) -> BatchedSteps | None:
        """Step several clients on one shared frozen model together: one forward/backward
        over the concatenation of their batches, each with its own parameters, optimizer
        and data order, giving what `client_step` gives each (an execution choice, never a
        change to the algorithm). None when this message is not batched (then the runtime
        steps the clients one by one)."""
        return None

    def aggregate(self, rnd: int, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        return state

    def aggregator(self, rnd: int, state: RecordDict) -> Aggregator:
        """How round `rnd`'s replies become the new state, one at a time as they arrive;
        runtimes call this, not `aggregate`. By default every reply is kept for `aggregate`.
        A method whose rule is a mean returns one that folds each reply in
        (`methods.aggregation.RecordsAggregator`) and defines `aggregate` as `fold` of it,
        so the two never differ; a subclass overriding one of them overrides both."""
        return HeldReplies(lambda replies: self.aggregate(rnd, state, replies))

    def reply_weighting(self, message: RecordDict) -> str:
        """How this round's mean weighs the replies: "examples" (FedAvg) or "uniform". A
        secure mean follows it, and the weight cap applies only to "examples": in a uniform
        mean a claimed size weighs nothing, so there is nothing to cap."""
        return "examples"


class AsyncMethod(MethodBase):
    """The asynchronous shape: no rounds. A free worker gets `worker_message`, runs its
    `client_step` when it can, and replies; the server runs `server_update` on the fresh
    replies it waits for (how many and how stale: the runtime's `AsyncConfig`), until
    `finished`. Each worker then scores the result with what only it holds
    (`evaluate_client`), and `evaluate` sums that up."""

    @abstractmethod
    def worker_message(self, state: RecordDict, cid: int, iteration: int) -> RecordDict:
        """What worker `cid` gets to start a step, from the server's state at `iteration`."""

    @abstractmethod
    def server_update(self, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        """The server's step on the fresh replies the runtime gathered."""

    def messages_answered(self, state: RecordDict, cids: Sequence[int]) -> RecordDict:
        """Before each `server_update`: the workers whose messages came back since the last
        one — used, rejected, or given up after the runtime's timeout. What a method may
        count without trusting any reply (e.g. the work its messages asked for)."""
        return state

    @abstractmethod
    def finished(self, state: RecordDict) -> bool:
        """True once the server has done all it will (iterations, a budget spent)."""

    def evaluate_client(self, state: RecordDict, client: Client) -> dict[str, Any]:
        """This worker's own score of the final state (e.g. with its own demonstrations)."""
        raise NotImplementedError(f"{self.name} has no per-worker evaluation")

    def async_config(self) -> dict[str, Any]:
        """The runtime settings this method asks for (`federation.asynchronous.AsyncConfig`'s
        fields: `active`, `staleness`, `latency`, `schedule`)."""
        return {}


AnyMethod = Method | AsyncMethod
