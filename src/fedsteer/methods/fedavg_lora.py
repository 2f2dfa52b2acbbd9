"""FedAvg-LoRA: each client trains a LoRA adapter of the frozen LM; the server averages them.

The fine-tuning baseline that IFed-ICL's and FedPT's papers compare against. Clients
start each round from the global adapter, train it on their own examples with a
label-word cross-entropy at the answer position (the scorer's differentiable path, the
same loss IFed-ICL calibrates with), and send the adapter back; the server takes the
example-weighted mean through Flower's aggregation. Bytes per round are the adapter's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsteer.methods.aggregation import aggregate_arrays, record_train_loss
from fedsteer.methods.base import Client, Environment, Method, Reply, seeded_rng, seeded_subset
from fedsteer.methods.icl import evaluate_prompting
from fedsteer.models.lora import adapter_weights, initial_adapter, lora_adapter, lora_config


def adapter_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32)) for k, v in weights.items()})


def record_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


@dataclass
class FedAvgLoRA(Method):
    """LoRA on the attention projections; E local epochs over a seeded sample per round."""

    name = "fedavg-lora"
    secure_mean: ClassVar[bool] = True
    supports_client_dp: ClassVar[bool] = True

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

    def aggregate(self, rnd: int, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        state["adapter"] = aggregate_arrays(replies, "adapter", rule=self.rule, weighted=True)
        return record_train_loss(state, replies)

    # ---------------------------------------------------------------- client
    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        rnd = int(message["config"]["round"])
        weights = record_weights(message["adapter"])
        with lora_adapter(client.env.lm, self.config, weights) as peft_model:
            loss = self.train(peft_model, client, rnd)
            trained = adapter_weights(peft_model)
        return RecordDict({"adapter": adapter_record(trained),
                           "metrics": MetricRecord({"loss": loss})})

    def train(self, peft_model, client: Client, rnd: int) -> float:
        """Label-word cross-entropy over the full vocabulary; only the adapter learns."""
        env = client.env
        examples = self.local_sample(client, rnd)
        queries = [env.task.format_query(ex) for ex in examples]
        scorer = env.scorer()
        targets = torch.tensor([scorer.labels.first[ex.label] for ex in examples])
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        order_rng, losses = seeded_rng(self.seed, "batches", rnd, client.cid), []
        with torch.enable_grad():
            for _ in range(self.local_epochs):
                order = order_rng.permutation(len(queries))
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size].tolist()
                    loss = F.nll_loss(scorer.logprobs([queries[i] for i in idx]), targets[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
        last_epoch = math.ceil(len(queries) / self.batch_size)
        return float(np.mean(losses[-last_epoch:]))

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
