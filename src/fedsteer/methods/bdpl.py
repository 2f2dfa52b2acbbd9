"""BDPL (Diao et al., TMLR 2023): black-box discrete prompt learning by policy gradient.

The prompt is M discrete tokens, each drawn from a categorical over N candidates; only
the black box's label scores are used (no weights, no gradients). One step:

1. sample I prompts from the categoricals; score a mini-batch with each through the black
   box (the I prompts in one request, a batch of different prefixes that the box may run
   together); loss_k = cross-entropy of the label scores;
2. the variance-reduced policy gradient over the probabilities,
   g = 1/(I−1) · Σ_k (loss_k − mean loss) · ∇_p log P(prompt_k), where for a categorical
   parametrised by its probabilities ∂ log P / ∂p_{m,j} = +1/p_{m,j} at the sampled j and
   −1/p_{m,j} elsewhere (the derivative BDPL's code uses), clipped to norm 3;
3. an Adam step on the probabilities, then each position projected back onto the simplex.

Candidates are the N most frequent words of the client's own training texts (the black box's
tokenizer is out of reach, so candidates are words, not token ids). Evaluation uses the most
probable token per position. Every API call and token is counted (`metrics["api_*"]`).
This module also holds the pieces AsynDBT shares: simplex projection, the estimator, the
prompt text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsteer.data import Example
from fedsteer.eval.metrics import classification_metrics
from fedsteer.methods.base import Client, Environment, Method, Reply, seeded_rng

WORD = re.compile(r"[a-z]{3,}")


# ------------------------------------------------------------------ the pieces
def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of `v` onto the probability simplex (exact, sort)."""
    v = np.atleast_2d(v)
    u = -np.sort(-v, axis=1)
    cumulative = np.cumsum(u, axis=1) - 1.0
    index = np.arange(1, v.shape[1] + 1)
    rho = (u - cumulative / index > 0).sum(axis=1)
    theta = cumulative[np.arange(v.shape[0]), rho - 1] / rho
    return np.maximum(v - theta[:, None], 0.0)


def log_prob_derivative(probs: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """∂ log P(sample) / ∂ probs as BDPL takes it: +1/p at the sampled index, −1/p elsewhere.

    A probability the projection set to 0 is floored at 1e-9: such an entry is never
    sampled, so its terms cancel in the estimator (Σ_k (loss_k − mean) = 0) instead of
    turning into inf − inf.
    """
    derivative = -1.0 / np.maximum(probs, 1e-9)
    rows = np.arange(probs.shape[0])
    derivative[rows, sample] *= -1.0
    return derivative


def policy_gradient(probs: np.ndarray, samples: Sequence[np.ndarray],
                    losses: Sequence[float], clip: float = 3.0) -> np.ndarray:
    """The variance-reduced estimator over `I ≥ 2` samples, clipped to norm `clip`."""
    losses = np.asarray(losses, dtype=np.float64)
    if len(losses) < 2:
        raise ValueError("the variance-reduced estimator needs at least 2 samples")
    mean = losses.mean()
    grad = sum((loss - mean) * log_prob_derivative(probs, s)
               for loss, s in zip(losses, samples, strict=True)) / (len(losses) - 1)
    norm = float(np.linalg.norm(grad))
    return grad * (clip / norm) if norm > clip else grad


def sample_prompts(probs: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` index vectors, one categorical draw per position."""
    cumulative = np.cumsum(probs, axis=1)
    draws = rng.random((count, probs.shape[0], 1))
    return [np.minimum((d >= cumulative).sum(axis=1), probs.shape[1] - 1) for d in draws]


def kshot_training_set(client: Client, shots_per_class: int, seed: int) -> list[Example]:
    """Up to `shots_per_class` of the client's examples per label (seeded): the k-shot set a
    prompt is tuned on (BDPL's setting, shared by the DBT workers)."""
    rng = seeded_rng(seed, "kshot", client.cid)
    picked = []
    for label in range(len(client.env.task.labels)):
        rows = [ex for ex in client.data if ex.label == label]
        take = min(shots_per_class, len(rows))
        picked += [rows[i] for i in sorted(rng.choice(len(rows), take, replace=False))]
    if not picked:
        raise ValueError(f"client {client.cid} holds no examples")
    return picked


def word_candidates(examples: Sequence[Example], count: int) -> list[str]:
    """The `count` most frequent words (≥ 3 letters) of these texts: the prompt vocabulary."""
    counts = Counter(w for ex in examples for w in WORD.findall(ex.text.lower()))
    words = [w for w, _ in counts.most_common(count)]
    if not words:
        raise ValueError("no words to build prompt candidates from")
    return words


def prompt_prefix(words: Sequence[str], demos: str = "") -> str:
    """What precedes each query: the discrete prompt (BDPL's "Definition:"), then demos."""
    return "Definition: " + " ".join(words) + "\n" + demos


def cross_entropy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of label scores (log-probs of the label words, renormalised)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(len(labels)), labels]))


class AdamOnSimplex:
    """Adam on the probabilities (as BDPL), each row projected back after the step.

    Its moments and step count travel in a party's state (`to_record` / `saved`), so a
    policy that is stepped once per message keeps being Adam, not Adam's first step
    (±lr·sign(g)) over and over. The policy is numpy on both sides of every step, never
    next to the model, so its tensors live on the CPU whatever device the model runs on.
    """

    def __init__(self, probs: np.ndarray, lr: float, saved: ArrayRecord | None = None) -> None:
        self.param = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64, device="cpu"))
        self.optimizer = torch.optim.Adam([self.param], lr=lr)
        if saved is not None and saved["exp_avg"].shape == tuple(self.param.shape):
            self.optimizer.state[self.param] = {
                "step": torch.tensor(float(saved["step"].numpy()[0]), device="cpu"),
                "exp_avg": torch.from_numpy(saved["exp_avg"].numpy().astype(np.float64)),
                "exp_avg_sq": torch.from_numpy(saved["exp_avg_sq"].numpy().astype(np.float64)),
            }

    @property
    def probs(self) -> np.ndarray:
        return self.param.detach().numpy().copy()

    def set(self, probs: np.ndarray) -> None:
        """Move the parameter to a policy changed outside the optimizer (e.g. masked)."""
        with torch.no_grad():
            self.param.copy_(torch.from_numpy(np.asarray(probs, dtype=np.float64)))

    def to_record(self) -> ArrayRecord:
        """The moments and step count (empty before the first step)."""
        state = self.optimizer.state.get(self.param)
        if not state:
            return ArrayRecord()
        return ArrayRecord({
            "step": Array(np.array([float(state["step"])], dtype=np.float64)),
            "exp_avg": Array(state["exp_avg"].numpy().copy()),
            "exp_avg_sq": Array(state["exp_avg_sq"].numpy().copy()),
        })

    def step(self, grad: np.ndarray) -> np.ndarray:
        self.param.grad = torch.tensor(grad, dtype=torch.float64, device="cpu")
        self.optimizer.step()
        with torch.no_grad():
            self.param.copy_(torch.from_numpy(project_simplex(self.param.numpy())))
        return self.param.detach().numpy().copy()


def saved_optimizer(client: Client, key: str) -> ArrayRecord | None:
    """A party's optimizer state from its earlier messages, if it has one."""
    return client.state[key] if key in client.state.array_records else None


# ------------------------------------------------------------------ the method
@dataclass
class BDPL(Method):
    """Centralized BDPL: one party holds the data; a round is `steps_per_round` PG steps."""

    name = "bdpl"
    steers = "input"
    centralized: ClassVar[bool] = True

    prompt_length: int = 10
    candidates: int = 200
    samples: int = 20  # prompts sampled per step (I)
    shots_per_class: int = 16  # the k-shot training set
    batch_size: int = 16
    steps_per_round: int = 10
    rounds: int = 3
    lr: float = 1e-4
    api_budget: int | None = 8000  # calls; training stops when spent
    blackbox: str = "local"  # or "openai:BASE_URL#MODEL"
    seed: int = 0

    def planned_rounds(self) -> int:
        return self.rounds

    def configure_round(self, rnd: int, state: RecordDict) -> RecordDict | None:
        if rnd >= self.rounds or self._budget_spent(state):
            return None
        content = RecordDict({"config": ConfigRecord({"round": rnd})})
        if "prompt" in state:
            content["prompt"] = state["prompt"]
        return content

    def _budget_spent(self, state: RecordDict) -> bool:
        calls = int(state["api"]["calls"]) if "api" in state else 0
        return self.api_budget is not None and calls >= self.api_budget

    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        rnd = int(message["config"]["round"])
        train = self.training_set(client)
        words = self.candidate_words(client, message)
        probs = (message["prompt"]["probs"].numpy().astype(np.float64) if "prompt" in message
                 else np.full((self.prompt_length, len(words)), 1.0 / len(words)))
        box = client.env.blackbox(self.blackbox)
        start = box.usage.calls
        optimizer = AdamOnSimplex(probs, self.lr, saved_optimizer(client, "adam"))
        probs, loss = self.train(box, client.env, train, words, optimizer, rnd, client.cid)
        client.state["adam"] = optimizer.to_record()
        return RecordDict({
            "prompt": ArrayRecord({"probs": Array(probs.astype(np.float32))}),
            "words": ConfigRecord({"words": words}),
            "metrics": MetricRecord({"loss": loss, "calls": box.usage.calls - start}),
        })

    def candidate_words(self, client: Client, message: RecordDict) -> list[str]:
        return word_candidates(client.data, self.candidates)

    def training_set(self, client: Client) -> list[Example]:
        return kshot_training_set(client, self.shots_per_class, self.seed)

    def train(self, box, env: Environment, train: list[Example], words: list[str],
              optimizer: AdamOnSimplex, rnd: int, cid: int) -> tuple[np.ndarray, float]:
        """`steps_per_round` policy-gradient steps on the prompt distribution."""
        rng = seeded_rng(self.seed, "bdpl", rnd, cid)
        probs, losses = optimizer.probs, []
        queries = [env.task.format_query(ex) for ex in train]
        labels = np.array([ex.label for ex in train])
        for _ in range(self.steps_per_round):
            batch = rng.choice(len(train), min(self.batch_size, len(train)), replace=False)
            samples = sample_prompts(probs, self.samples, rng)
            rows = [queries[i] for i in batch]
            scores = box.label_logprobs_many(  # the I prompts: one batch of prefixes
                [(prompt_prefix([words[j] for j in s]), rows) for s in samples],
                env.task.label_words)
            step_losses = [cross_entropy(each, labels[batch]) for each in scores]
            probs = optimizer.step(policy_gradient(probs, samples, step_losses))
            losses.append(float(np.mean(step_losses)))
        return probs, float(np.mean(losses)) if losses else float("nan")

    def aggregate(self, rnd: int, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        (reply,) = replies  # centralized: one party
        state["prompt"] = reply.content["prompt"]
        state["words"] = reply.content["words"]
        calls = (int(state["api"]["calls"]) if "api" in state else 0) + int(
            reply.content["metrics"]["calls"])
        state["api"] = MetricRecord({"calls": calls})
        return state

    def save_artifact(self, state: RecordDict, directory, model_name: str, task_name: str):
        """`prompt.json`: the learned words, the text put before each query, the policy."""
        return save_prompt(directory, self.best_prompt(state), model_name, task_name,
                           self.name, list(state["words"]["words"]),
                           state["prompt"]["probs"].numpy())

    def best_prompt(self, state: RecordDict) -> list[str]:
        words = list(state["words"]["words"])
        return [words[j] for j in state["prompt"]["probs"].numpy().argmax(axis=1)]

    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        words = self.best_prompt(state) if "prompt" in state else []
        metrics = evaluate_prefix(env, prompt_prefix(words), self.blackbox)
        metrics["prompt"] = " ".join(words)
        metrics["api_training_calls"] = int(state["api"]["calls"]) if "api" in state else 0
        return metrics


PROMPT_FILE = "prompt.json"


def save_prompt(directory, words: list[str], model_name: str, task_name: str, method: str,
                candidates: list[str], probs: np.ndarray,
                demonstrations: Sequence[Example] = (), demo_text: str = ""):
    """prompt.json: the words, the exact prefix to put before a query, and what chose them
    (with a worker's own demonstrations when it saves its personal prompt)."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PROMPT_FILE).write_text(json.dumps({
        "method": method, "model": model_name, "task": task_name, "prompt": words,
        "prefix": prompt_prefix(words, demo_text), "candidates": candidates,
        "probs": np.round(probs, 6).tolist(),
        "demonstrations": [asdict(ex) for ex in demonstrations],
    }, indent=2) + "\n")
    return directory


def evaluate_prefix(env: Environment, prefix: str, blackbox: str = "local") -> dict[str, Any]:
    """Score the evaluation rows with `prefix` before each query, through the black box."""
    box = env.blackbox(blackbox)
    scores = box.label_logprobs([env.task.format_query(ex) for ex in env.test],
                                env.task.label_words, prefix=prefix)
    truth = [ex.label for ex in env.test]
    metrics = classification_metrics(truth, scores.argmax(axis=1).tolist(),
                                     len(env.task.labels))
    metrics.update({f"api_{k}": v for k, v in box.usage.to_dict().items()})
    return metrics
