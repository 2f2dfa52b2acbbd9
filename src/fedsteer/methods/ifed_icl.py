"""IFed-ICL: implicit federated in-context learning (arXiv 2511.06757), built on I2CL.

Demonstrations never leave their client, and neither does text: clients send the frozen
model's *activations* on them, then a handful of injection coefficients.

    round 0, "extract"     client: mean over its demos of each layer's attention / MLP
                                   output at the demo's last token -> attn, mlp [L, d]
                           server: v = mean_k v_k (uniform, the paper; or by |D_k|)
    rounds 1..R, "calibrate"
                           server -> client: coefficients [4, L] (+ v, in round 1 only)
                           client: inject `out <- beta*out + lam*v` at every query token,
                                   train only the coefficients on its own labelled
                                   zero-shot queries (AdamW, warmup + cosine, noise)
                           server: FedAvg of the coefficients weighted by |D_k|
    evaluate               zero-shot test queries, scored with v and the coefficients injected

Choices, and where they come from (I2CL = github LzVv123456/I2CL, configs/config_i2cl.py and
wrapper.py; METHODS.md §1 summarises the IFed-ICL paper):

* demos: `demos_per_class=5` per label the client holds (I2CL `shot_per_class=5`), picked
  round-robin over its labels with `select_demonstrations`. Each demo is run *alone*
  (I2CL `split_demon=True`) as `format_demo(ex) + demo_separator` (I2CL appends its example
  separator too, METHODS.md says the same), so the last token is the separator: the position
  where in-context the model would next read a query (I2CL `tok_pos='last'`). Vectors are
  the plain mean over demos (I2CL `post_fuse_method='mean'`).
* calibration: I2CL calibrates on the very demonstrations the vectors came from; so do we by
  default (`calibration_per_class=5`, drawn with the same seeded generator as the demos,
  hence the same examples when both counts agree). More is allowed.
* optimisation: AdamW lr 1e-2, weight decay 1e-3, batch 2, noise 0.001 (I2CL, paper);
  I2CL's schedule: linear warmup over 5% of the steps, then cosine to 0, here over each
  client's local steps of a round (the optimizer restarts each round: FedAvg sends
  coefficients only, never optimizer state). I2CL runs 100 epochs centrally; our default
  `rounds=10` x `local_epochs=10` keeps that total. The paper's own round / epoch counts
  were not reachable from the material we could read: these two are ours.
* loss: cross-entropy of the gold label word's *first token* over the full vocabulary, as
  I2CL's `F.cross_entropy(pred_logits, gt_label)` does (no renormalisation over label words).
* noise: `N(0,1) * 0.001 * ||out||` per token, added after injection, calibration only
  (I2CL `add_noise`, `noise_scale`).
* init: lam = 0.1, beta = 1.0 for all 4L coefficients (I2CL `init_value=[0.1, 1.0]`).
* the vectors' demo count is `demos_per_class`, fixed by I2CL; the ICL baselines' `shots`
  (which RunConfig passes every method) does not apply and is not taken.

Randomness is seeded: demo choice by (seed, cid), batch order and noise by (seed, round, cid),
so a resumed run repeats the same numbers. The vectors reach clients once; clients keep them
in their persistent state, so every client takes part in every round (`every_client`, the paper's
setting): runtimes ignore a smaller `fraction` for this method, with a warning. A client
that still misses round 1 (it failed) cannot calibrate later: it raises
`MissingContextVectors` and the runtime leaves it out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsteer.data import Example
from fedsteer.methods.aggregation import RecordMean, RecordsAggregator
from fedsteer.methods.base import (
    Aggregator,
    BatchedSteps,
    Client,
    Environment,
    Method,
    Reply,
    fold,
    seeded_rng,
)
from fedsteer.methods.icl import evaluate_prompting, select_demonstrations
from fedsteer.methods.local_training import epoch_batches, labelled_run, train_together
from fedsteer.methods.records import float32_record
from fedsteer.models.hooks import (
    COEF_ROWS,
    RowGroups,
    Steering,
    capture,
    initial_coefficients,
    inject,
    inject_rows,
)

__all__ = [
    "CentralI2CL",
    "IFedICL",
    "MissingContextVectors",
    "SteeringArtifact",
    "evaluate_steering",
    "load_steering",
    "save_steering",
]

EXTRACT, CALIBRATE = "extract", "calibrate"
STEERING_TENSORS, STEERING_CONFIG = "steering.safetensors", "steering.json"


class MissingContextVectors(RuntimeError):
    """A client was asked to calibrate before it ever received the global context vectors."""


# --------------------------------------------------------------------------- records
def _record(**arrays: np.ndarray | torch.Tensor) -> ArrayRecord:
    """float32 arrays, the wire format of both phases (2·L·d, then 4·L numbers)."""
    return float32_record(arrays)


def _tensors(record: ArrayRecord, *names: str) -> list[torch.Tensor]:
    return [torch.from_numpy(record[n].numpy().copy()) for n in names]


def _config(message: RecordDict) -> ConfigRecord:
    return message["config"]


# --------------------------------------------------------------------------- method
@dataclass
class IFedICL(Method):
    """Context vectors once, then federated calibration of their 4L injection strengths."""

    name = "ifed-icl"
    steers = "activations"
    # Replies of the two phases differ by orders of magnitude (activations of model-dependent
    # scale, then ~4L numbers near 0.1 and 1); one class-wide bound would either reject honest
    # vectors or never bind on coefficients. Shapes and NaN/Inf are still checked; a run can
    # set RuntimeConfig.max_reply_norm when it knows its model.
    max_reply_norm: ClassVar[float | None] = None
    every_client: ClassVar[bool] = True  # the vectors are sent once, to everyone
    supports_client_dp: ClassVar[bool] = True
    secure_mean: ClassVar[bool] = True  # both aggregates are (weighted) means

    demos_per_class: int = 5  # demonstrations per label a client turns into its vectors
    calibration_per_class: int = 5  # labelled queries per label a client calibrates on
    local_epochs: int = 10  # epochs over its calibration set per round
    rounds: int = 10  # calibration rounds (after the one extraction round)
    batch_size: int = 2  # calibration queries per step
    lr: float = 1e-2  # AdamW learning rate of the coefficients
    weight_decay: float = 1e-3  # AdamW weight decay
    warmup: float = 0.05  # share of a round's steps of linear warmup (then cosine to 0)
    noise: float = 0.001  # calibration noise, relative to each token's output norm
    init_lambda: float = 0.1  # starting strength of the vectors (lam)
    init_beta: float = 1.0  # starting scale of the layers' own outputs (beta)
    weighting: str = "uniform"  # averaging of the vectors: uniform (the paper) or by size
    seed: int = 0  # seeds demonstrations, batch order and noise

    def __post_init__(self) -> None:
        if self.weighting not in ("uniform", "size"):
            raise ValueError(f"weighting must be 'uniform' or 'size', got {self.weighting!r}")
        if min(self.demos_per_class, self.calibration_per_class, self.batch_size) < 1:
            raise ValueError("demos_per_class, calibration_per_class and batch_size must be >= 1")
        if self.rounds < 0 or self.local_epochs < 1:
            raise ValueError("rounds must be >= 0 and local_epochs >= 1")

    # ---------------------------------------------------------------- server
    def initial_state(self, env: Environment) -> RecordDict:
        dims = {"num_layers": env.lm.num_layers, "hidden_size": env.lm.hidden_size}
        coef = initial_coefficients(dims["num_layers"], self.init_lambda, self.init_beta)
        return RecordDict({"dims": ConfigRecord(dims), "coef": _record(coef=coef)})

    def planned_rounds(self) -> int:
        return self.rounds + 1  # round 0 extracts the context vectors

    def configure_round(self, rnd: int, state: RecordDict) -> RecordDict | None:
        if rnd == 0:
            return RecordDict({"config": ConfigRecord({"phase": EXTRACT, "round": 0,
                                                       **dict(state["dims"])})})
        if rnd > self.rounds:
            return None
        message = RecordDict({
            "config": ConfigRecord({"phase": CALIBRATE, "round": rnd}),
            "coef": state["coef"],
        })
        if rnd == 1:  # the 2·L·d vectors travel down once; clients keep them
            message["vectors"] = state["vectors"]
        return message

    def reply_shapes(self, message: RecordDict) -> dict[str, tuple[int, ...]]:
        config = _config(message)
        if config["phase"] == EXTRACT:
            shape = (int(config["num_layers"]), int(config["hidden_size"]))
            return {"vectors.attn": shape, "vectors.mlp": shape}
        return {"coef.coef": tuple(message["coef"]["coef"].shape)}

    def reply_weighting(self, message: RecordDict) -> str:
        if _config(message)["phase"] == EXTRACT and self.weighting == "uniform":
            return "uniform"
        return "examples"

    def aggregator(self, rnd: int, state: RecordDict) -> Aggregator:
        """Both phases are means, folded in as the replies arrive: round 0 the paper's
        unweighted mean of the vectors (or FedAvg by |D_k|), then FedAvg of the coefficients."""
        if rnd == 0:
            return RecordsAggregator(
                state, [RecordMean("vectors", weighted=self.weighting == "size")])
        return RecordsAggregator(state, [RecordMean("coef", weighted=True)], losses=True)

    def aggregate(self, rnd: int, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        return fold(self.aggregator(rnd, state), replies)

    # ---------------------------------------------------------------- client
    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        config = _config(message)
        if config["phase"] == EXTRACT:
            attn, mlp = self.extract(client)
            return RecordDict({"vectors": _record(attn=attn, mlp=mlp)})
        attn, mlp = self._vectors(message, client)
        (coef,) = _tensors(message["coef"], "coef")
        coef, loss = self.calibrate(client, attn, mlp, coef, int(config["round"]))
        return RecordDict({"coef": _record(coef=coef), "metrics": MetricRecord({"loss": loss})})

    def client_step_rows(self) -> int:
        return self.batch_size

    def client_steps(self, message: RecordDict, clients: Sequence[Client]) -> BatchedSteps | None:
        """Calibration rounds step the clients together (`calibrate_together`); extraction,
        a few no-grad forwards per client, runs one by one."""
        config = _config(message)
        if config["phase"] != CALIBRATE:
            return None
        vectors = [self._vectors(message, client) for client in clients]
        attn, mlp = vectors[0]
        if any(not (torch.equal(a, attn) and torch.equal(m, mlp)) for a, m in vectors[1:]):
            return None  # clients hold different vectors: no shared injection
        (coef,) = _tensors(message["coef"], "coef")  # each client trains its own clone
        results = self.calibrate_together(clients, attn, mlp, [coef] * len(clients),
                                          int(config["round"]))
        return BatchedSteps(
            [RecordDict({"coef": _record(coef=coef), "metrics": MetricRecord({"loss": loss})})
             for coef, loss, _ in results],
            [rows for _, _, rows in results])

    def _vectors(self, message: RecordDict, client: Client) -> list[torch.Tensor]:
        """The global vectors this client keeps (stored from round 1's message)."""
        if "vectors" in message:
            client.state["vectors"] = _record(**{
                n: message["vectors"][n].numpy() for n in ("attn", "mlp")
            })
        if "vectors" not in client.state:
            raise MissingContextVectors(
                f"client {client.cid} has no context vectors: they are sent only in round 1, "
                "which it missed"
            )
        return _tensors(client.state["vectors"], "attn", "mlp")

    def demonstrations(self, client: Client, per_class: int) -> list[Example]:
        """Seeded by (seed, cid) alone: the same demos whichever round asks."""
        if not client.data:
            raise ValueError(f"client {client.cid} holds no examples")
        shots = per_class * len(client.env.task.labels)
        return select_demonstrations(client.data, shots, seeded_rng(self.seed, "demos", client.cid))

    def reference_reply(self, message: RecordDict, env: Environment) -> RecordDict | None:
        """For the extraction round: the vectors of data-free demonstrations, the task's
        template with an empty input once per label word (public: no client's text). Most
        of a client's vectors is this part every input shares, so a client's deviation
        from it is far shorter than the vectors themselves."""
        if _config(message)["phase"] != EXTRACT:
            return None
        spec = env.task
        empty = [Example(text="", label=label, text_pair="" if spec.is_pair else None)
                 for label in range(len(spec.labels))]
        attn, mlp = self.extract_texts(env, [spec.format_demo(ex) + spec.demo_separator
                                             for ex in empty])
        return RecordDict({"vectors": _record(attn=attn, mlp=mlp)})

    def extract(self, client: Client) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over the client's demos of each layer's attn / MLP output at the last token."""
        spec = client.env.task
        return self.extract_texts(client.env, [
            spec.format_demo(ex) + spec.demo_separator
            for ex in self.demonstrations(client, self.demos_per_class)])

    @staticmethod
    @torch.no_grad()
    def extract_texts(env: Environment, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over `texts` of each layer's attn / MLP output at the last token."""
        scorer, total_attn, total_mlp = env.scorer(), 0.0, 0.0
        with capture(env.lm) as acts:
            for start in range(0, len(texts), env.batch_size):
                scorer.logprobs(texts[start : start + env.batch_size])  # left-padded: -1 is last
                total_attn = total_attn + torch.stack([a[:, -1] for a in acts.attn], 1).sum(0)
                total_mlp = total_mlp + torch.stack([m[:, -1] for m in acts.mlp], 1).sum(0)
        return (total_attn / len(texts)).float(), (total_mlp / len(texts)).float()

    def calibrate(
        self, client: Client, attn: torch.Tensor, mlp: torch.Tensor, coef: torch.Tensor, rnd: int
    ) -> tuple[torch.Tensor, float]:
        """Train only the coefficients on the client's zero-shot queries, vectors injected."""
        (coef, loss, _), = self.calibrate_together([client], attn, mlp, [coef], rnd)
        return coef, loss

    def calibrate_together(
        self, clients: Sequence[Client], attn: torch.Tensor, mlp: torch.Tensor,
        coefs: Sequence[torch.Tensor], rnd: int,
    ) -> list[tuple[torch.Tensor, float, int]]:
        """`calibrate` for several clients in shared forwards: row r uses its own client's
        coefficients and noise generator. Per client: (coefficients, loss, rows)."""
        env = clients[0].env
        runs, params, generators = [], [], []
        for client, coef in zip(clients, coefs, strict=True):
            run, param, generator = self._calibration_run(client, coef, rnd)
            runs.append(run)
            params.append(param)
            generators.append(generator)
        steering = Steering(params[0][None], noise=self.noise)

        def prepare(active: list[int], groups: RowGroups) -> None:
            steering.coef = torch.stack([params[i] for i in active])
            steering.groups, steering.generators = groups, [generators[i] for i in active]

        dtype = next(env.lm.model.parameters()).dtype
        with torch.enable_grad(), inject_rows(env.lm, attn.to(dtype), mlp.to(dtype), steering):
            train_together(runs, env.scorer(), prepare)
        return [(p.detach(), run.last_epoch_loss(self.local_epochs), run.rows)
                for p, run in zip(params, runs, strict=True)]

    def _calibration_run(self, client: Client, coef: torch.Tensor, rnd: int):
        """One client's calibration: its queries, seeded batch order and noise, AdamW with
        I2CL's warmup + cosine over its own steps of this round."""
        examples = self.demonstrations(client, self.calibration_per_class)
        param = torch.nn.Parameter(coef.float().clone())
        batches = epoch_batches(seeded_rng(self.seed, "batches", rnd, client.cid),
                                len(examples), self.batch_size, self.local_epochs)
        optimizer = torch.optim.AdamW([param], lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _warmup_cosine(len(batches), self.warmup))
        noise = torch.Generator().manual_seed(
            int(seeded_rng(self.seed, "noise", rnd, client.cid).integers(2**62)))
        return labelled_run(client.env, examples, batches, optimizer, schedule), param, noise

    # ------------------------------------------------------------- evaluation
    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        return evaluate_steering(env, *steering_tensors(state))

    def save_artifact(self, state: RecordDict, directory, model_name: str, task_name: str):
        return save_steering(state, directory, model_name, task_name)


def evaluate_steering(
    env: Environment, attn: torch.Tensor, mlp: torch.Tensor, coef: torch.Tensor
) -> dict[str, Any]:
    """Zero-shot test queries scored with the vectors injected; plus the mean coefficients."""
    dtype = next(env.lm.model.parameters()).dtype
    with torch.no_grad(), inject(env.lm, attn.to(dtype), mlp.to(dtype), coef):
        metrics = evaluate_prompting(env)
    means = {f"{row}_mean": float(coef[i].mean()) for i, row in enumerate(COEF_ROWS)}
    return {**metrics, **means}


@dataclass
class CentralI2CL(IFedICL):
    """I2CL itself: the same steps run by one client holding the pooled data."""

    name = "central-i2cl"
    centralized = True


def _warmup_cosine(total: int, warmup: float):
    """I2CL's schedule: linear warmup over `warmup` of the steps, then cosine down to 0."""
    warm = int(warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


# --------------------------------------------------------------------------- artifacts
def steering_tensors(state: RecordDict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attn`, `mlp` `[L, d]` and `coef` `[4, L]` from a finished run's server state."""
    if "vectors" not in state:
        raise RuntimeError("no context vectors in the state: round 0 (extract) never completed")
    attn, mlp = _tensors(state["vectors"], "attn", "mlp")
    (coef,) = _tensors(state["coef"], "coef")
    return attn, mlp, coef


@dataclass
class SteeringArtifact:
    """Saved steering: what `fedsteer.models.hooks.inject` needs, plus where it came from."""

    attn: torch.Tensor
    mlp: torch.Tensor
    coef: torch.Tensor
    config: dict[str, Any]


def save_steering(state: RecordDict, directory: Path, model_name: str, task_name: str) -> Path:
    """Write `steering.safetensors` (attn, mlp, coef) and `steering.json` (provenance)."""
    from safetensors.torch import save_file

    import fedsteer

    attn, mlp, coef = steering_tensors(state)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"attn": attn, "mlp": mlp, "coef": coef}, str(directory / STEERING_TENSORS))
    config = {
        "fedsteer_version": fedsteer.__version__, "model": model_name, "task": task_name,
        "num_layers": int(attn.shape[0]), "hidden_size": int(attn.shape[1]),
        "coef_rows": list(COEF_ROWS), "injection": "out <- beta*out + lam*v, every token",
    }
    (directory / STEERING_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_steering(directory: Path) -> SteeringArtifact:
    """Read what `save_steering` wrote, checking every tensor against the JSON config."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, tensor_path = directory / STEERING_CONFIG, directory / STEERING_TENSORS
    for path in (config_path, tensor_path):
        if not path.exists():
            raise FileNotFoundError(f"steering artifact incomplete: {path} is missing")
    config = json.loads(config_path.read_text())
    tensors = load_file(str(tensor_path))
    layers, width = int(config["num_layers"]), int(config["hidden_size"])
    expected = {"attn": (layers, width), "mlp": (layers, width), "coef": (len(COEF_ROWS), layers)}
    for key, shape in expected.items():
        got = tuple(tensors[key].shape) if key in tensors else None
        if got != shape:
            raise ValueError(f"{tensor_path}: tensor {key!r} has shape {got}, expected {shape} "
                             f"(from {config_path})")
    return SteeringArtifact(tensors["attn"], tensors["mlp"], tensors["coef"], config)
