"""AsynDBT (arXiv 2602.17694): asynchronous distributed bilevel tuning of prompts and demos.

Workers tune, through a black box only, a discrete prompt (M positions × N candidate words,
a categorical `p_i` per position) and one demonstration per class (a categorical `q_i`
per slot over V of the worker's own examples, which never leave it: demonstrations are
personalised). Prompts are tied to a global consensus `z` held by the server.

What this module implements (K local steps per worker message, then one server update):

- worker i:  p_i ← Π(p_i − η_p(ĝ_p + ρ_i + μ(p_i − z) + ψ·sign(p_i − z)))
             q_i ← Π(q_i − η_p·ĝ_q)
  where ĝ_p, ĝ_q are BDPL's variance-reduced policy gradients of the worker's loss over I
  sampled (prompt, demonstrations) pairs, and ρ_i + μ(p_i − z) is the gradient of the
  augmented Lagrangian ρ_iᵀ(p_i − z) + (μ/2)‖p_i − z‖²; ψ·sign(p_i − z) is the
  subgradient of ψ‖p_i − z‖₁;
- server, over the active set A of replies that have arrived:
             z ← Π(z − η_z Σ_{i∈A} (−ρ_i − μ(p_i − z) + ψ·sign(z − p_i)))
             ρ_i ← ρ_i + η_ρ (p_i − z)   for i ∈ A
  (`consensus="sign"`, the paper's rule). It does *not* bound a bad worker: the μ(p_i − z)
  term pulls z in proportion to the worker's distance, and ρ_i grows without bound.
  `consensus="robust-sign"` is RSA's update (Li et al. 2019): z ← Π(z − η_z·ψ Σ_{i∈A}
  sign(z − p_i)) and workers keep only ψ·sign(p_i − z), so no worker moves any coordinate
  of z by more than η_z·ψ a step *before* Π, and by at most 2·η_z·ψ after it
  (`coordinate_pull_bound`: Π's threshold can shift by as much as the worker moved a
  coordinate, and on a wide prompt it does). Or, for comparison, z ← Π(rule({p_i})) with one of
  Flower's aggregation rules over every worker's latest p_i (mean, median, trimmed-mean,
  krum). Every reply must be a distribution per position over the N candidates and declare
  the calls it made (`reply_problem`), else it is rejected.
- Π is the per-position projection onto the simplex; the asynchronous runtime
  (`federation/asynchronous.py`) supplies A: S fresh replies, no worker older than τ.

- cutting planes (ADBO; `methods/cutting_planes.py`), kept by each worker: the lower
  level's optimality is the gap h(q, p) = E_{p,q}[ℓ] − min_k ℓ_k between the expected loss
  under the prompt distribution and the best of the I sampled prompts (estimated from the
  same calls); where h > ε a cut h + a·(q − q_t) + b·(p − p_t) ≤ ε is added with a = ĝ_q,
  b = ĝ_p (the policy-gradient estimates stand in for ∇h); the updates gain Σ λ_l a_l on q
  and Σ λ_l b_l on p; λ_l ← [λ_l + η_λ·cut_l(q, p)]₊; every δ steps cuts with λ_l < γ go.
  Upper and lower level share the worker's mini-batch loss (the paper splits it by level;
  we have too little data per worker to split).

Candidates are words of the server's held-out texts (public, as FedPT's transfer set), so
every worker shares one prompt vocabulary.
`sync-dbt` is the same with a barrier (S = all workers); `cen-dbt` one worker with all data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsteer.blackbox import Usage
from fedsteer.data import Example
from fedsteer.eval.metrics import classification_metrics, summarize_clients
from fedsteer.methods.aggregation import RULES
from fedsteer.methods.base import (
    WAIT_METRIC,
    AsyncMethod,
    Client,
    Environment,
    Reply,
    seeded_rng,
)
from fedsteer.methods.bdpl import (
    AdamOnSimplex,
    cross_entropy,
    kshot_training_set,
    policy_gradient,
    project_simplex,
    prompt_prefix,
    sample_prompts,
    save_prompt,
    saved_optimizer,
    word_candidates,
)
from fedsteer.methods.cutting_planes import CuttingPlanes
from fedsteer.methods.records import float32_array

ATTACKS = ("random", "sign-flip", "scale", "farthest", "worst")
#: "sign": the paper's rule (duals, penalty and ψ·sign; a far worker pulls in proportion to
#: its distance). "robust-sign": RSA's (Li et al. 2019) — z moves by ψ·Σ sign(z − p_i) only,
#: so no worker can pull any coordinate by more than 2·η_z·ψ a step (`coordinate_pull_bound`).
CONSENSUS = ("sign", "robust-sign")
SIMPLEX_TOLERANCE = 1e-3


def _dual(duals: ArrayRecord, cid: int, like: np.ndarray) -> np.ndarray:
    """Worker `cid`'s multipliers ρ_i (zero until the server first updates them)."""
    return duals[str(cid)].numpy() if str(cid) in duals else np.zeros_like(like)


@dataclass
class WorkerStep:
    """What one worker's local steps work with: its black box (and the meter billing it),
    its k-shot data, the candidate words and demonstrations, and the server's z and its dual
    as the message brought them."""

    box: Any
    env: Environment
    train: list[Example]
    words: list[str]
    demos: list[list[Example]]
    z: np.ndarray
    dual: np.ndarray
    iteration: int
    cid: int
    meter: Usage
    planes: CuttingPlanes | None = None


@dataclass
class AsynDBT(AsyncMethod):
    """Workers tune prompts and pick demonstrations with BDPL's estimator (by composition:
    the functions of `methods.bdpl`), asynchronously, around a consensus z."""

    name = "asyndbt"
    steers = "input"

    # BDPL's settings, per worker (see `methods.bdpl.BDPL`)
    prompt_length: int = 10  # M: prompt tokens
    candidates: int = 200  # N: candidate words per position
    samples: int = 20  # I: prompts sampled per step
    shots_per_class: int = 16  # the k-shot training set of each worker
    batch_size: int = 16  # queries per sampled prompt
    steps_per_round: int = 10  # local steps per message
    lr: float = 1e-4  # Adam on the simplex
    #: calls; training stops once the server has billed this much (`messages_answered`)
    api_budget: int | None = 8000
    blackbox: str = "local"  # or "openai:BASE_URL#MODEL"
    seed: int = 0
    demo_candidates: int = 8  # V: candidates per class slot, from the worker's own data
    iterations: int = 20  # server updates (T)
    mu: float = 1.0  # augmented-Lagrangian penalty
    psi: float = 0.05  # weight of the sign (ℓ1) consensus term
    lr_z: float = 1e-2
    lr_dual: float = 1e-1
    consensus: str = "sign"  # or a Flower rule over the workers' latest prompts
    active: int = 2  # S: fresh replies per server update
    staleness: int = 3  # τ
    latency: tuple[float, ...] = ()  # simulated seconds per local round, per worker
    #: "simulated": arrival order from a clock drawn from the seed (reproducible); "threads":
    #: workers race in real time, latencies slept (wall-clock measurements)
    schedule: str = "simulated"
    byzantine: int = 0  # workers 0..byzantine-1 send corrupted prompts
    attack: str = "sign-flip"
    cutting_planes: bool = True
    cut_epsilon: float = 0.1  # ε: the lower-level gap a cut enforces
    cut_gamma: float = 1e-3  # γ: cuts whose multiplier falls below this are dropped
    cut_refresh: int = 5  # δ: local steps between refreshes of the cut set
    cut_lr: float = 0.1  # η_λ: multiplier step
    cut_limit: int = 10  # most cuts a worker keeps

    def __post_init__(self) -> None:
        self.latency = tuple(self.latency)
        if self.consensus not in CONSENSUS and self.consensus not in RULES:
            raise ValueError(f"consensus must be one of {', '.join(CONSENSUS + tuple(RULES))}")
        if self.schedule not in ("simulated", "threads"):
            raise ValueError("schedule must be 'simulated' or 'threads'")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}")

    # ---------------------------------------------------------------- server
    def initial_state(self, env: Environment) -> RecordDict:
        if not env.transfer:
            raise ValueError("AsynDBT draws its prompt vocabulary from held-out task texts, "
                             "and this run has none")
        words = word_candidates(env.transfer, self.candidates)
        z = np.full((self.prompt_length, len(words)), 1.0 / len(words))
        return RecordDict({
            "z": ArrayRecord({"z": float32_array(z)}), "words": ConfigRecord({"words": words}),
            "duals": ArrayRecord(), "latest": ArrayRecord(),
            "progress": MetricRecord({"iteration": 0, "calls": 0, "declared_calls": 0}),
        })

    def setup(self, env: Environment) -> None:
        """The prompt width N every reply must have (the candidate words `initial_state`
        draws from the same texts)."""
        self._width = len(word_candidates(env.transfer, self.candidates)) if env.transfer \
            else None

    def training_set(self, client: Client) -> list[Example]:
        return kshot_training_set(client, self.shots_per_class, self.seed)

    def async_config(self) -> dict[str, Any]:
        return {"active": self.active, "staleness": self.staleness, "latency": self.latency,
                "schedule": self.schedule}

    def finished(self, state: RecordDict) -> bool:
        """After `iterations` server updates, or once the server's bill reaches `api_budget`."""
        progress = state["progress"]
        spent = self.api_budget is not None and int(progress["calls"]) >= self.api_budget
        return int(progress["iteration"]) >= self.iterations or spent

    def worker_message(self, state: RecordDict, cid: int, iteration: int) -> RecordDict:
        z = state["z"]["z"].numpy()
        dual = _dual(state["duals"], cid, z)
        return RecordDict({
            "z": ArrayRecord({"z": float32_array(z), "dual": float32_array(dual)}),
            "words": state["words"], "config": ConfigRecord({"iteration": iteration}),
        })

    def scheduled_calls(self) -> int:
        """The calls one message asks for: `steps_per_round` steps of `samples` prompts on a
        mini-batch of `batch_size` — an honest worker's most (fewer with fewer rows, or cache
        hits), and what the server can know without trusting a reply."""
        return self.steps_per_round * self.samples * self.batch_size

    def messages_answered(self, state: RecordDict, cids: Sequence[int]) -> RecordDict:
        """Bill every message that came back, used or rejected (or given up: the worker may
        have spent them), at the work it asked for. A reply's own `calls` never lowers the
        bill: a worker that says 0, or −10⁹, spent the budget all the same."""
        progress = dict(state["progress"])
        progress["calls"] = int(progress["calls"]) + len(cids) * self.scheduled_calls()
        state["progress"] = MetricRecord(progress)
        return state

    def coordinate_pull_bound(self, attackers: int = 1) -> float:
        """Under `robust-sign`, the most `attackers` workers can move any coordinate of z in
        one update, against the update without them. Each adds at most η_z·ψ to every
        coordinate before Π; Π's threshold τ (z_j = (u_j − τ)₊) is monotone and shifts
        one-for-one with a uniform shift of u, so it moves by at most that much too, and
        (u_j − τ)₊ by at most twice. It is reached: the farthest vertex moves z's least
        likely word by (2 − 2/N)·η_z·ψ while every coordinate stays positive."""
        return 2.0 * attackers * self.lr_z * self.psi

    def server_update(self, state: RecordDict, replies: Sequence[Reply]) -> RecordDict:
        z = state["z"]["z"].numpy().astype(np.float64)
        duals, latest = state["duals"], state["latest"]
        prompts = {r.cid: r.content["prompt"]["p"].numpy().astype(np.float64) for r in replies}
        if self.consensus in RULES:  # a Flower rule runs over every worker's latest prompt
            for cid, p in prompts.items():
                latest[str(cid)] = float32_array(p)
        if self.consensus == "robust-sign":
            step = self.psi * sum(np.sign(z - p) for p in prompts.values())
            z = project_simplex(z - self.lr_z * step)
        elif self.consensus == "sign":
            step = np.zeros_like(z)
            for cid, p in prompts.items():
                step += -_dual(duals, cid, z) - self.mu * (p - z) + self.psi * np.sign(z - p)
            z = project_simplex(z - self.lr_z * step)
            for cid, p in prompts.items():
                duals[str(cid)] = float32_array(_dual(duals, cid, z) + self.lr_dual * (p - z))
        elif latest:
            results = [([latest[k].numpy().astype(np.float64)], 1) for k in latest]
            z = project_simplex(RULES[self.consensus](results)[0])
        progress = dict(state["progress"])
        progress["iteration"] = int(progress["iteration"]) + 1
        progress["declared_calls"] = int(progress.get("declared_calls", 0)) + sum(
            int(r.content["metrics"]["calls"]) for r in replies)  # reported, never billed
        state["z"] = ArrayRecord({"z": float32_array(z)})
        state["progress"] = MetricRecord(progress)
        return state

    # ---------------------------------------------------------------- worker
    def client_step(self, message: RecordDict, client: Client) -> RecordDict:
        z = message["z"]["z"].numpy()
        p, q, demos = self._local_variables(client, z)
        step = WorkerStep(
            box=client.env.blackbox(self.blackbox), env=client.env,
            train=self.training_set(client), words=list(message["words"]["words"]),
            demos=demos, z=z, dual=message["z"]["dual"].numpy(),
            iteration=int(message["config"]["iteration"]), cid=client.cid, meter=Usage(),
            planes=self._planes(client, q, p))
        opt_p = AdamOnSimplex(p, self.lr, saved_optimizer(client, "adam_p"))
        opt_q = AdamOnSimplex(q, self.lr, saved_optimizer(client, "adam_q"))
        p, q, loss = self.local_steps(step, opt_p, opt_q)
        client.state["mine"] = ArrayRecord({"p": float32_array(p), "q": float32_array(q)})
        client.state["adam_p"], client.state["adam_q"] = opt_p.to_record(), opt_q.to_record()
        metrics = {"loss": loss, "calls": step.meter.calls, WAIT_METRIC: step.meter.wait_seconds}
        if step.planes is not None:
            client.state["planes"] = step.planes.to_record()
            metrics["cuts"] = len(step.planes)
        sent = self._corrupt(p, step, client) if client.cid < self.byzantine else p
        return RecordDict({
            "prompt": ArrayRecord({"p": float32_array(sent)}),
            "metrics": MetricRecord(metrics),
        })

    def _planes(self, client: Client, q: np.ndarray, p: np.ndarray) -> CuttingPlanes | None:
        """This worker's cuts, kept across its messages (None when switched off)."""
        if not self.cutting_planes:
            return None
        if "planes" in client.state:
            return CuttingPlanes.from_record(client.state["planes"])
        return CuttingPlanes(q_size=q.size, p_size=p.size)

    def _local_variables(self, client: Client, z: np.ndarray):
        demos = self.demo_pool(client)
        if "mine" in client.state:
            mine = client.state["mine"]
            return mine["p"].numpy().astype(np.float64), mine["q"].numpy().astype(
                np.float64), demos
        q = np.full((len(demos), self.demo_candidates), 0.0)
        for slot, pool in enumerate(demos):
            q[slot, : len(pool)] = 1.0 / len(pool)
        return z.astype(np.float64).copy(), q, demos

    def demo_pool(self, client: Client) -> list[list[Example]]:
        """Per class, up to V of the worker's own examples (seeded): demonstration candidates."""
        rng = seeded_rng(self.seed, "demo-pool", client.cid)
        pool = []
        for label in range(len(client.env.task.labels)):
            rows = [ex for ex in client.data if ex.label == label]
            if not rows:
                rows = list(client.data)  # a class it lacks: any of its examples
            take = min(self.demo_candidates, len(rows))
            pool.append([rows[i] for i in sorted(rng.choice(len(rows), take, replace=False))])
        return pool

    def local_steps(self, step: WorkerStep, opt_p: AdamOnSimplex, opt_q: AdamOnSimplex):
        """`steps_per_round` steps of p and q, continuing the worker's own optimizers."""
        box, env, train, words, demos = step.box, step.env, step.train, step.words, step.demos
        z, dual, meter, planes = step.z, step.dual, step.meter, step.planes
        iteration, cid = step.iteration, step.cid
        rng = seeded_rng(self.seed, "asyndbt", iteration, cid)
        p, q, losses = opt_p.probs, opt_q.probs, []
        queries = [env.task.format_query(ex) for ex in train]
        labels = np.array([ex.label for ex in train])
        spec = env.task
        for _ in range(self.steps_per_round):
            batch = rng.choice(len(train), min(self.batch_size, len(train)), replace=False)
            prompt_samples = sample_prompts(p, self.samples, rng)
            demo_samples = sample_prompts(q, self.samples, rng)
            rows = [queries[i] for i in batch]
            prefixes = [prompt_prefix([words[j] for j in prompt], spec.demo_prefix(
                [demos[s][j] for s, j in enumerate(chosen)]))
                for prompt, chosen in zip(prompt_samples, demo_samples, strict=True)]
            scores = box.label_logprobs_many([(prefix, rows) for prefix in prefixes],
                                             spec.label_words, meter=meter)
            step_losses = [cross_entropy(each, labels[batch]) for each in scores]
            grad_p = policy_gradient(p, prompt_samples, step_losses)
            grad_q = policy_gradient(q, demo_samples, step_losses)
            cut_q, cut_p = self._cuts(planes, step_losses, grad_q, grad_p, q, p)
            consensus = self.psi * np.sign(p - z)
            if self.consensus != "robust-sign":  # the augmented Lagrangian's pull as well
                consensus = consensus + dual + self.mu * (p - z)
            p = opt_p.step(grad_p + consensus + cut_p)
            q = opt_q.step(grad_q + cut_q)
            mask = self._valid_mask(demos)  # slots with fewer than V candidates stay so
            q = q * mask + 1e-12 * mask
            q = q / q.sum(axis=1, keepdims=True)
            opt_q.set(q)  # the optimizer continues from the policy actually used
            if planes is not None:
                planes.update_multipliers(q, p, self.cut_lr)
                planes.refresh(self.cut_refresh, self.cut_gamma, self.cut_limit)
            losses.append(float(np.mean(step_losses)))
        return p, q, float(np.mean(losses))

    def _cuts(self, planes: CuttingPlanes | None, step_losses: list[float], grad_q, grad_p,
              q: np.ndarray, p: np.ndarray) -> tuple[np.ndarray | float, np.ndarray | float]:
        """Cut here if the lower-level gap is too large; the cuts' pull on q and on p."""
        if planes is None:
            return 0.0, 0.0
        gap = float(np.mean(step_losses) - np.min(step_losses))
        planes.add(gap, grad_q, grad_p, q, p, self.cut_epsilon)
        return planes.penalty_gradients(q.shape, p.shape)

    def _valid_mask(self, demos: list[list[Example]]) -> np.ndarray:
        mask = np.zeros((len(demos), self.demo_candidates))
        for slot, pool in enumerate(demos):
            mask[slot, : len(pool)] = 1.0
        return mask

    def _corrupt(self, p: np.ndarray, step: WorkerStep, client: Client) -> np.ndarray:
        """What a Byzantine worker sends instead of its prompt."""
        z = step.z
        rng = seeded_rng(self.seed, "byzantine", client.cid, step.iteration)
        if self.attack == "worst":  # position j: the j-th most harmful word, all its weight
            worst = self._harmful_words(client, step)
            out = np.zeros_like(z)
            out[np.arange(z.shape[0]), worst[: z.shape[0]]] = 1.0
            return out
        if self.attack == "random":
            return rng.dirichlet(np.ones(p.shape[1]), size=p.shape[0])
        if self.attack == "sign-flip":
            return project_simplex(z - 5.0 * (p - z))
        if self.attack == "farthest":  # the simplex vertex farthest from z, per position
            far = np.zeros_like(z)
            far[np.arange(z.shape[0]), z.argmin(axis=1)] = 1.0
            return far
        return project_simplex(z + 10.0 * (p - z))  # scale

    def _harmful_words(self, client: Client, step: WorkerStep) -> np.ndarray:
        """The attacker's own search, once (kept in its state): each candidate word repeated
        as the whole prompt, scored on a batch of its data through the black box (billed
        like any call); words by descending loss."""
        if "attack" in client.state:
            return client.state["attack"]["order"].numpy().astype(int)
        env, train = client.env, self.training_set(client)
        rows = train[: self.batch_size * 4]
        demos = env.task.demo_prefix(self.chosen_demonstrations(client))
        labels = np.array([ex.label for ex in rows])
        losses = [cross_entropy(step.box.label_logprobs(
            [env.task.format_query(ex) for ex in rows], env.task.label_words,
            prefix=prompt_prefix([word] * self.prompt_length, demos), meter=step.meter), labels)
            for word in step.words]
        order = np.argsort(losses)[::-1].copy()
        client.state["attack"] = ArrayRecord({"order": Array(order.astype(np.int64))})
        return order

    def reply_problem(self, content: RecordDict) -> str | None:
        """A prompt reply must be a distribution per position over the N candidate words
        (the server's update assumes it) and say how many calls it made, a count ≥ 0."""
        if "prompt" not in content.array_records or "p" not in content["prompt"]:
            return "reply carries no prompt distribution 'prompt.p'"
        calls = content["metrics"].get("calls") if "metrics" in content.metric_records else None
        if not isinstance(calls, int | float) or isinstance(calls, bool) or not (
                np.isfinite(calls) and calls >= 0 and float(calls).is_integer()):
            return f"reply's 'metrics.calls' is {calls!r}, not a count of calls ≥ 0"
        p = content["prompt"]["p"].numpy()
        if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
            return f"prompt has dtype {p.dtype}, not real numbers"
        width = getattr(self, "_width", None)
        if p.ndim != 2 or p.shape[0] != self.prompt_length or (width and p.shape[1] != width):
            return (f"prompt has shape {p.shape}, expected "
                    f"({self.prompt_length}, {width or 'candidates'})")
        if not np.all(np.isfinite(p)) or p.min() < -SIMPLEX_TOLERANCE:
            return "prompt holds negative or non-finite probabilities"
        sums = p.sum(axis=1)
        if np.max(np.abs(sums - 1.0)) > SIMPLEX_TOLERANCE:
            return f"prompt rows sum to {sums.min():.4g}..{sums.max():.4g}, not 1"
        return None

    def best_prompt(self, state: RecordDict) -> list[str]:
        words = list(state["words"]["words"])
        return [words[j] for j in state["z"]["z"].numpy().argmax(axis=1)]

    def save_artifact(self, state: RecordDict, directory, model_name: str, task_name: str):
        """The consensus prompt (workers' demonstrations are theirs and stay with them)."""
        return save_prompt(directory, self.best_prompt(state), model_name, task_name,
                           self.name, list(state["words"]["words"]), state["z"]["z"].numpy())

    def save_client_artifact(self, state: RecordDict, client: Client, directory):
        """The consensus prompt with this worker's own demonstrations, kept by the worker."""
        demos = self.chosen_demonstrations(client)
        return save_prompt(Path(directory) / "clients" / str(client.cid), self.best_prompt(state),
                           client.env.model_name, client.env.task.name, self.name,
                           list(state["words"]["words"]), state["z"]["z"].numpy(),
                           demonstrations=demos, demo_text=client.env.task.demo_prefix(demos))

    def chosen_demonstrations(self, client: Client) -> list[Example]:
        """Per class slot, this worker's most likely demonstration (the first before training)."""
        demos = self.demo_pool(client)
        chosen = (client.state["mine"]["q"].numpy().argmax(axis=1) if "mine" in client.state
                  else np.zeros(len(demos), dtype=int))
        return [demos[s][min(j, len(demos[s]) - 1)] for s, j in enumerate(chosen)]

    # ------------------------------------------------------------- evaluation
    def evaluate_client(self, state: RecordDict, client: Client) -> dict[str, float]:
        """The consensus prompt with this worker's own most likely demonstrations."""
        env = client.env
        prompt = self.best_prompt(state)
        prefix = prompt_prefix(prompt, env.task.demo_prefix(self.chosen_demonstrations(client)))
        scores = env.blackbox(self.blackbox).label_logprobs(
            [env.task.format_query(ex) for ex in env.test], env.task.label_words, prefix=prefix)
        return classification_metrics([ex.label for ex in env.test],
                                      scores.argmax(axis=1).tolist(), len(env.task.labels))

    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        """Mean over workers of their personalised accuracy (`evaluate_client`, recorded in
        the state by the runtime as `client.<cid>`)."""
        per_client = [{"cid": int(k.split(".")[1]), **dict(v)}
                      for k, v in state.metric_records.items() if k.startswith("client.")]
        if not per_client:
            raise ValueError("no per-worker evaluation in the state")
        prompt = self.best_prompt(state)
        metrics: dict[str, Any] = {
            **summarize_clients(sorted(per_client, key=lambda c: c["cid"])),
            "prompt": " ".join(prompt),
            # billed by the black box's own meter where the run has it (in process), else
            # the server's bill: every message answered at the calls it asked for
            "api_training_calls": int(state["billing"]["training_calls"]) if "billing" in state
            else int(state["progress"]["calls"]),
            "api_calls_billed_by_server": int(state["progress"]["calls"]),
            "api_calls_in_used_replies": int(state["progress"].get("declared_calls", 0)),
        }
        usage = env.blackbox(self.blackbox).usage.to_dict()
        metrics.update({f"api_{k}": v for k, v in usage.items()})
        return metrics


@dataclass
class SyncDBT(AsynDBT):
    """The synchronous baseline: the server waits for every worker each iteration."""

    name = "sync-dbt"
    active: int = 10**6


@dataclass
class CenDBT(AsynDBT):
    """The centralized baseline: one worker holding all the data."""

    name = "cen-dbt"
    centralized: ClassVar[bool] = True
    active: int = 1
