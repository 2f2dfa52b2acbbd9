"""my-method: federated averaging of context vectors, without calibration.

A worked example of a fedsteer method that lives in its own package. It is IFed-ICL's first
half alone: in one round each client turns its own demonstrations into context vectors (the
frozen model's attention and MLP outputs at the end of each demonstration, averaged), the
server averages the clients' vectors, and evaluation injects the average into every query
at a fixed strength. No text leaves a client, only 2·L·d numbers, once.

A method is a dataclass (its fields are its `-o KEY=VALUE` options) with the steps of
`fedsteer.methods.Method`; it never touches a transport, so the same class runs in process
and on Flower. Messages and replies are Flower `RecordDict`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsteer.methods import Client, Environment, Method, Reply
from fedsteer.methods.aggregation import aggregate_arrays
from fedsteer.methods.icl import evaluate_prompting
from fedsteer.methods.ifed_icl import IFedICL
from fedsteer.models.hooks import initial_coefficients, inject

__all__ = ["VectorAveraging"]


@dataclass
class VectorAveraging(Method):
    """One round: clients extract context vectors, the server averages, evaluation injects."""

    name = "my-method"  # the entry point's name in pyproject.toml, and the CLI's
    secure_mean: ClassVar[bool] = True  # the aggregate is a plain mean: SecAgg+ is exact

    demos_per_class: int = 5  # demonstrations per label a client turns into its vectors
    strength: float = 0.1  # how strongly the averaged vectors are injected (I2CL's lambda)
    seed: int = 0  # which demonstrations each client picks

    # ---------------------------------------------------------------- server
    def initial_state(self, env: Environment) -> RecordDict:
        dims = {"num_layers": env.lm.num_layers, "hidden_size": env.lm.hidden_size}
        return RecordDict({"dims": ConfigRecord(dims)})

    def planned_rounds(self) -> int:
        return 1

    def configure_round(self, rnd: int, state: RecordDict) -> RecordDict | None:
        if rnd > 0:
            return None  # one round is the whole method
        return RecordDict({"config": ConfigRecord(dict(state["dims"]))})

    def reply_shapes(self, message: RecordDict) -> dict[str, tuple[int, ...]]:
        """What a reply must hold, so the runtime rejects a malformed one before it counts."""
        shape = (int(message["config"]["num_layers"]), int(message["config"]["hidden_size"]))
        return {"vectors.attn": shape, "vectors.mlp": shape}

    def aggregate(self, rnd: int, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        state["vectors"] = aggregate_arrays(replies, "vectors", weighted=False)
        return state

    # ---------------------------------------------------------------- client
    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        """On the client: its own demonstrations in, two [L, d] arrays out."""
        extractor = IFedICL(demos_per_class=self.demos_per_class, seed=self.seed)
        attn, mlp = extractor.extract(client)  # reuse IFed-ICL's extraction as is
        return RecordDict({"vectors": ArrayRecord({
            "attn": Array(attn.numpy().astype(np.float32)),
            "mlp": Array(mlp.numpy().astype(np.float32)),
        })})

    # ------------------------------------------------------------ evaluation
    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        """Zero-shot test queries with the averaged vectors injected at `strength`."""
        import torch

        attn, mlp = (torch.from_numpy(state["vectors"][k].numpy().copy()) for k in ("attn", "mlp"))
        dtype = next(env.lm.model.parameters()).dtype
        coef = initial_coefficients(env.lm.num_layers, self.strength, 1.0)
        with torch.no_grad(), inject(env.lm, attn.to(dtype), mlp.to(dtype), coef):
            return evaluate_prompting(env)
