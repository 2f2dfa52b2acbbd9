"""FedAvg-LoRA: each client trains a LoRA adapter of the frozen LM; the server averages them.

The fine-tuning baseline that IFed-ICL's and FedPT's papers compare against. Clients
start each round from the global adapter, train it on their own examples with a
label-word cross-entropy at the answer position (the scorer's differentiable path, the
same loss IFed-ICL calibrates with), and send the adapter back; the server takes the
example-weighted mean through Flower's aggregation. Bytes per round are the adapter's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsteer.methods.aggregation import RecordsAggregator, record_combiner
from fedsteer.methods.base import (
    Aggregator,
    BatchedSteps,
    Client,
    Environment,
    Method,
    Reply,
    fold,
    seeded_rng,
    seeded_subset,
)
from fedsteer.methods.icl import evaluate_prompting
from fedsteer.methods.local_training import (
    LocalRun,
    epoch_batches,
    labelled_run,
    train_together,
)
from fedsteer.methods.records import float32_record
from fedsteer.models.hooks import RowGroups
from fedsteer.models.lora import (
    RowAdapters,
    initial_adapter,
    lora_adapter,
    lora_config,
    per_row_lora,
    trainable_adapter,
)


def adapter_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    """An adapter on the wire: peft's state-dict names, float32 arrays."""
    return float32_record(weights)


def record_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


@dataclass
class FedAvgLoRA(Method):
    """LoRA on the attention projections; E local epochs over a seeded sample per round."""

    name = "fedavg-lora"
    steers = "weights"
    supports_client_dp: ClassVar[bool] = True
    #: measured on 2 CPU cores (benchmarks/results/client_batching.md): 8 clients' batches of
    #: 8 in one forward ran 0.75x the speed of one by one (compute-bound already, and every
    #: row padded to the longest of 64), so batching is on request only (`--client-batch`)
    batches_by_default: ClassVar[bool] = False

    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    rounds: int = 5
    local_epochs: int = 1
    #: examples a client trains on per round (a seeded sample; None: all it holds)
    local_examples: int | None = 32
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.0
    rule: str = "mean"  # or median, trimmed-mean, krum, bulyan (Flower's functions)
    seed: int = 0

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1 or self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("rank, rounds, local_epochs and batch_size must be >= 1")

    @property
    def secure_mean(self) -> bool:  # type: ignore[override]
        """Only `rule=mean` is a mean of the replies: a robust rule needs every reply (SecAgg+
        shows none) and may drop the one central DP's noise joined."""
        return self.rule == "mean"

    @property
    def config(self):
        return lora_config(self.rank, self.lora_alpha, self.target_modules)

    # ---------------------------------------------------------------- server
    def initial_state(self, env: Environment) -> RecordDict:
        weights = initial_adapter(env.lm, self.config, self.seed)
        return RecordDict({"adapter": adapter_record(weights)})

    def planned_rounds(self) -> int:
        return self.rounds

    def configure_round(self, rnd: int, state: RecordDict) -> RecordDict | None:
        if rnd >= self.rounds:
            return None
        return RecordDict({"adapter": state["adapter"], "config": ConfigRecord({"round": rnd})})

    def reply_shapes(self, message: RecordDict) -> dict[str, tuple[int, ...]]:
        return {f"adapter.{k}": tuple(v.shape) for k, v in message["adapter"].items()}

    def aggregator(self, rnd: int, state: RecordDict) -> Aggregator:
        """FedAvg folds each adapter into a running weighted sum as it arrives; the robust
        rules (median, trimmed mean, Krum, Bulyan) need every adapter, and keep them."""
        return RecordsAggregator(state, [record_combiner("adapter", self.rule)], losses=True,
                                 finish=lambda new: self.after_average(rnd, new))

    def aggregate(self, rnd: int, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        return fold(self.aggregator(rnd, state), replies)

    def after_average(self, rnd: int, state: RecordDict) -> RecordDict:
        """The server's step after the adapters are combined (none here; FedPT distills)."""
        return state

    # ---------------------------------------------------------------- client
    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        return self.client_steps(message, [client]).contents[0]

    def client_step_rows(self) -> int:
        return self.batch_size

    def client_steps(self, message: RecordDict, clients: Sequence[Client]) -> BatchedSteps:
        """Each client trains its own copy of the global adapter; several clients share each
        forward, every row through its own client's adapter (`per_row_lora`)."""
        rnd = int(message["config"]["round"])
        env = clients[0].env
        start = record_weights(message["adapter"])
        adapters = RowAdapters([trainable_adapter(start) for _ in clients])
        runs = [self.local_run(client, rnd, list(weights.values()))
                for client, weights in zip(clients, adapters.weights, strict=True)]

        def prepare(active: list[int], groups: RowGroups) -> None:
            adapters.active, adapters.groups = active, groups

        with torch.enable_grad(), per_row_lora(env.lm, self.config, adapters):
            train_together(runs, env.scorer(), prepare)
        return BatchedSteps(
            [RecordDict({"adapter": adapter_record({k: v.detach().numpy() for k, v in w.items()}),
                         "metrics": MetricRecord({"loss": run.last_epoch_loss(self.local_epochs)})})
             for w, run in zip(adapters.weights, runs, strict=True)],
            [run.rows for run in runs])

    def local_run(self, client: Client, rnd: int, params: list[torch.Tensor]) -> LocalRun:
        """Label-word cross-entropy over the full vocabulary on this round's seeded sample;
        AdamW on the client's own adapter only."""
        examples = self.local_sample(client, rnd)
        batches = epoch_batches(seeded_rng(self.seed, "batches", rnd, client.cid),
                                len(examples), self.batch_size, self.local_epochs)
        return labelled_run(client.env, examples, batches,
                            torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay))

    def local_sample(self, client: Client, rnd: int):
        if not client.data:
            raise ValueError(f"client {client.cid} holds no examples")
        return seeded_subset(client.data, self.local_examples, self.seed, "local", rnd,
                             client.cid)

    # ------------------------------------------------------------- evaluation
    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        with lora_adapter(env.lm, self.config, record_weights(state["adapter"])):
            metrics = evaluate_prompting(env)
        if "train" in state:
            metrics["train_loss"] = list(state["train"]["loss"])
        return metrics

    def save_artifact(self, state: RecordDict, directory, model_name: str, task_name: str):
        """peft's own format, loadable with `PeftModel.from_pretrained(base, directory)`."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config
        config.base_model_name_or_path = model_name
        config.save_pretrained(str(directory))
        save_file(record_weights(state["adapter"]), str(directory / "adapter_model.safetensors"))
        return directory
