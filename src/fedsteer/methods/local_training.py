"""The one local training loop: label-word cross-entropy, a client's own batches and optimizer.

IFed-ICL calibrates coefficients, FedAvg-LoRA trains adapters and FedPT distils with the
same loop; what differs is which parameters the loss reaches (hooks the caller sets up
around it) and, for distillation, the loss. Several clients can run it *together* on one
frozen model (client-batched simulation): at each step
the clients that still have a batch contribute it to one forward over the concatenation,
each row with its own client's parameters (`prepare` installs them), and the loss is the sum
of the clients' own mean losses, so each client's gradient is exactly its own. Each keeps
its own data order, optimizer and schedule; a client whose batches run out drops out of the
forward (no padding to the longest client's epochs). One client alone is the plain loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedsteer.models.hooks import RowGroups


@dataclass
class LocalRun:
    """One party's local training: its queries, gold first tokens (or its own `loss`), batch
    order and optimizer."""

    queries: list[str]
    targets: torch.Tensor | None
    batches: list[list[int]]  # the rows of each step, in order (all epochs)
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    #: (full-vocabulary log-probs of a batch's rows, their indices) -> the loss; None: the
    #: cross-entropy of `targets` (FedPT's distillation brings a KL instead)
    loss: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None
    losses: list[float] = field(default_factory=list)

    def loss_of(self, logp: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if self.loss is not None:
            return self.loss(logp, rows)
        # CE over the full vocabulary, in float32 (logp is), on the model's device
        return F.nll_loss(logp, self.targets[rows].to(logp.device))

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches)

    def last_epoch_loss(self, epochs: int) -> float:
        """Mean loss of the last epoch's steps (what a client reports)."""
        per_epoch = math.ceil(len(self.batches) / max(epochs, 1))
        return float(np.mean(self.losses[-per_epoch:]))


def labelled_run(env, examples, batches: list[list[int]], optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> LocalRun:
    """A run on labelled examples: their zero-shot queries, trained towards the first token
    of each gold label word (what calibration and FedAvg-LoRA both train on)."""
    first = env.scorer().labels.first
    targets = torch.tensor([first[ex.label] for ex in examples], device=env.lm.device)
    return LocalRun([env.task.format_query(ex) for ex in examples], targets, batches, optimizer,
                    schedule)


def epoch_batches(rng: np.random.Generator, size: int, batch_size: int,
                  epochs: int) -> list[list[int]]:
    """A fresh permutation per epoch, cut into batches: every step's rows, in order."""
    batches = []
    for _ in range(epochs):
        order = rng.permutation(size)
        batches += [order[s : s + batch_size].tolist() for s in range(0, size, batch_size)]
    return batches


#: A forward's fixed cost, in padded tokens of one row: what it pays to split one client-batched
#: step into two forwards. From `benchmarks/results/compute_ceiling.md` (2 cores, sst2 rows
#: of ≈ 34 tokens): 1.65 rows/s at batch 2 and 1.92 at batch 8 fit 0.23 s a forward plus
#: 0.49 s a row, so a forward costs about half a row: ≈ 16 tokens.
FORWARD_OVERHEAD_TOKENS = 16


def forward_chunks(widths: Sequence[int], rows: Sequence[int],
                   overhead: float | None = None) -> list[list[int]]:
    """Split a step's groups into forwards that cost the least in padded tokens.

    A forward pads every row to its widest group, so one long client makes every short
    client's rows as long as its own (on agnews 4 clients pad ≈ 1.3× the tokens they need).
    Sorted by width, the best split into runs of neighbours is found exactly: each forward
    costs `overhead` + its rows × its widest width. Returns group indices per forward.
    """
    overhead = FORWARD_OVERHEAD_TOKENS if overhead is None else overhead
    order = sorted(range(len(widths)), key=lambda g: widths[g])
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for stop in range(1, len(order) + 1):
        chunk_rows = 0
        for start in range(stop - 1, -1, -1):  # on a tie the longer chunk (smaller start) wins
            chunk_rows += rows[order[start]]
            cost = best[start] + overhead + chunk_rows * widths[order[stop - 1]]
            if cost <= best[stop]:
                best[stop], cut[stop] = cost, start
    chunks, stop = [], len(order)
    while stop > 0:
        chunks.append(sorted(order[cut[stop]:stop]))
        stop = cut[stop]
    return chunks[::-1]


def train_together(runs: Sequence[LocalRun], scorer,
                   prepare: Callable[[list[int], RowGroups], None]) -> None:
    """Step every run through its own batches, the active runs sharing forwards.

    `prepare(active, groups)` is called before each forward with the indices of the runs
    taking part and which rows are whose, to install their parameters for those rows. A
    step's runs go in as few forwards as pay (`forward_chunks`): each run is in exactly one,
    so its gradient, and hence the result, is what it would be alone.
    """
    for step in range(max((len(r.batches) for r in runs), default=0)):
        active = [i for i, r in enumerate(runs) if step < len(r.batches)]
        queries = [[runs[i].queries[j] for j in runs[i].batches[step]] for i in active]
        step_batch = scorer.grouped(queries)
        for i in active:
            runs[i].optimizer.zero_grad()
        losses: dict[int, torch.Tensor] = {}
        for chunk in forward_chunks(step_batch.groups.widths, [len(q) for q in queries]):
            members = [active[c] for c in chunk]
            batch = step_batch.select(chunk)
            prepare(members, batch.groups)
            logp = scorer.grouped_logprobs(batch)
            for i, (start, stop) in zip(members, batch.groups.spans, strict=True):
                losses[i] = runs[i].loss_of(logp[start:stop], runs[i].batches[step])
            # each client's parameters see only its own loss
            torch.stack([losses[i] for i in members]).sum().backward()
        for i in active:
            runs[i].optimizer.step()
            if runs[i].schedule is not None:
                runs[i].schedule.step()
            runs[i].losses.append(losses[i].item())
