"""Batched label scoring: prompts + label words -> log-probability of each label.

Every method in fedsteer is judged by the same question: which label word does the model
find most likely right after the prompt? This module answers it fast and exactly:

* **Left padding with explicit position ids.** Padded rows see the same positions as
  unpadded ones, so a batch gives the numbers a one-by-one loop gives (a test pins it).
* **Logits only where they are read.** The LM head over a 150k vocabulary costs a third of
  a small model's forward; we ask for the last positions only (`logits_to_keep`).
* **Shared-prefix reuse.** In-context demonstrations precede every query unchanged, so their
  key/value cache is computed once and each batch of queries continues from a copy of it.
  Prefix and query are tokenized separately in *both* paths, so reuse changes cost, never
  the result. Different prefixes (a policy-gradient step's sampled prompts) are encoded in
  one forward and their queries scored together, each row from its own prefix's cache.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from fedsteer.models.hooks import RowGroups
from fedsteer.models.load import LoadedModel


@dataclass(frozen=True)
class GroupedBatch:
    """One forward's token ids and mask, with which rows are whose (`RowGroups`)."""

    ids: torch.Tensor
    mask: torch.Tensor
    groups: RowGroups

    def select(self, members: Sequence[int]) -> GroupedBatch:
        """Some groups' rows as a forward of their own, padded only to the widest of them:
        what `grouped` gives for those groups alone, without encoding them again (left
        padding, so the columns dropped are padding in every row kept)."""
        width = max(self.groups.widths[g] for g in members)
        spans, start = [], 0
        for g in members:
            first, stop = self.groups.spans[g]
            spans.append((start, start + stop - first))
            start += stop - first
        rows = torch.cat([torch.arange(*self.groups.spans[g], device=self.ids.device)
                          for g in members])
        return GroupedBatch(self.ids[rows, -width:], self.mask[rows, -width:],
                            RowGroups(tuple(spans), tuple(self.groups.widths[g] for g in members)))


def left_pad(seqs: list[list[int]], pad: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-aligned in one tensor, and the mask of the real ones (positions are
    then counted over real tokens only, so a padded row sees what it would alone)."""
    width = max(len(s) for s in seqs)
    # filled row by row on the CPU, then moved in one copy
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long, device="cpu")
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def forward_kwargs(model, keep: int, cache: DynamicCache | None) -> dict:
    """`logits_to_keep` where the model takes it (the LM head only where read) and the
    cache under its name (transformers 5.x renamed `past_key_values` to `cache`)."""
    params = _forward_parameters(type(model))
    kwargs: dict = {"logits_to_keep": keep} if "logits_to_keep" in params else {}
    kwargs["use_cache"] = cache is not None
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    return kwargs


@functools.cache
def _forward_parameters(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


class LabelWordError(ValueError):
    """Label words that the scorer cannot tell apart under a tokenizer."""


@dataclass(frozen=True)
class LabelTokens:
    """Token ids of each label word (with its leading space, as it follows the prompt)."""

    words: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

    @property
    def first(self) -> list[int]:
        return [ids[0] for ids in self.ids]


def tokenize_label_words(tokenizer, label_words: Sequence[str], multi_token: bool) -> LabelTokens:
    ids = tuple(tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in label_words)
    if any(len(i) == 0 for i in ids):
        raise LabelWordError(f"a label word tokenizes to nothing: {list(label_words)}")
    keys = ids if multi_token else [i[:1] for i in ids]
    if len(set(keys)) != len(keys):
        what = "token sequences" if multi_token else "first tokens"
        raise LabelWordError(
            f"label words {list(label_words)} share {what} under this tokenizer; "
            "choose label words that differ in their first token (--label-words, or the "
            "task spec's label_words)"
        )
    return LabelTokens(tuple(label_words), ids)


class LabelScorer:
    """Scores prompts against a task's label words on one shared, frozen model.

    `score(queries, prefix)` returns a `[len(queries), num_labels]` tensor of log-probs:
    by default of each label word's first token at the answer position; with
    `multi_token=True` the summed log-prob of all its tokens.
    """

    def __init__(
        self,
        lm: LoadedModel,
        label_words: Sequence[str],
        *,
        batch_size: int = 16,
        multi_token: bool = False,
    ) -> None:
        self.lm = lm
        self.batch_size = batch_size
        self.multi_token = multi_token
        self.labels = tokenize_label_words(lm.tokenizer, label_words, multi_token)

    # ----------------------------------------------------------------- public
    @torch.no_grad()
    def score(
        self,
        queries: Sequence[str],
        prefix: str = "",
        *,
        reuse_prefix: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ):
        """Log-probs `[N, C]`; `prefix` (e.g. demonstrations) precedes every query.

        `on_batch(n)` is called after each batch of `n` queries (for a progress bar).
        """
        prefix_ids = self._encode(prefix, first=True) if prefix else []
        query_ids = [self._encode(q, first=not prefix) for q in queries]
        if not query_ids:
            return torch.empty(0, len(self.labels.ids), device=self.lm.device)
        cache = self._prefix_cache(prefix_ids) if (prefix_ids and reuse_prefix) else None

        def score_batch(batch: list[list[int]]) -> torch.Tensor:
            if cache is None:
                return self._score_batch([prefix_ids + q for q in batch], None, 0)
            return self._score_batch(batch, cache, len(prefix_ids))

        return self._by_length(query_ids, score_batch, on_batch)

    @torch.no_grad()
    def score_prefixed(self, requests: Sequence[tuple[str, Sequence[str]]]
                       ) -> list[torch.Tensor]:
        """`score(queries, prefix)` for each `(prefix, queries)`, as one batch of different
        prefixes: the distinct prefixes go through one left-padded forward, then every
        request's queries are scored together in batches of similar length, each row
        continuing from its own prefix's cache (the one-prefix-at-a-time numbers, up to
        float summation order)."""
        if self.multi_token or any(not prefix for prefix, _ in requests):
            return [self.score(queries, prefix) for prefix, queries in requests]
        prefixes = list(dict.fromkeys(prefix for prefix, _ in requests))
        prefix_ids, prefix_mask = self._left_pad([self._encode(p, first=True) for p in prefixes])
        cache = DynamicCache()
        self._forward(prefix_ids, prefix_mask, cache, 0, keep=1)
        owner = {prefix: i for i, prefix in enumerate(prefixes)}
        rows = [(owner[prefix], self._encode(q, first=False))
                for prefix, queries in requests for q in queries]

        def score_batch(batch: list[tuple[int, list[int]]]) -> torch.Tensor:
            which = torch.tensor([i for i, _ in batch], device=self.lm.device)
            ids, mask = self._left_pad([q for _, q in batch])
            rows_cache = copy.deepcopy(cache)
            rows_cache.batch_select_indices(which)
            logits = self._forward(ids, mask, rows_cache, 0, keep=1,
                                   prefix_mask=prefix_mask[which]).logits[:, -1]
            return logits.float().log_softmax(-1)[:, self.labels.first]

        scores = self._by_length(rows, score_batch, size=lambda row: len(row[1]))
        return list(scores.split([len(queries) for _, queries in requests]))

    @torch.no_grad()
    def next_token_logprobs(self, queries: Sequence[str]) -> torch.Tensor:
        """Full-vocabulary log-probs `[N, V]` at each answer position, without gradients:
        the numbers `logprobs` gives, batched by length as `score` is (FedPT's proxy)."""
        ids = [self._encode(q, first=True) for q in queries]
        if not ids:
            return torch.empty(0, device=self.lm.device)
        return self._by_length(ids, self._vocab_batch)

    def _by_length(self, seqs: list, run: Callable[[list], torch.Tensor],
                   on_batch: Callable[[int], None] | None = None,
                   size: Callable[[Any], int] = len) -> torch.Tensor:
        """`run` over batches of similar `size` (less padding), rows back in input order."""
        order = sorted(range(len(seqs)), key=lambda i: size(seqs[i]))
        out = []
        for start in range(0, len(order), self.batch_size):
            batch = [seqs[i] for i in order[start : start + self.batch_size]]
            out.append(run(batch))
            if on_batch is not None:
                on_batch(len(batch))
        rows = torch.cat(out)
        result = torch.empty_like(rows)
        result[torch.tensor(order, device=rows.device)] = rows
        return result

    def logprobs(self, queries: Sequence[str]) -> torch.Tensor:
        """Full-vocabulary log-probs `[N, V]` at each query's answer position, as one batch.

        The differentiable path (no `no_grad`, no prefix cache): calibration backpropagates
        through it to steering coefficients in forward hooks. Same padding and positions as
        `score`, so `logprobs(q)[:, labels.first]` equals `score(q)` for first-token scoring.
        """
        return self._vocab_batch([self._encode(q, first=True) for q in queries])

    def grouped(self, groups: Sequence[Sequence[str]]) -> GroupedBatch:
        """Several parties' query batches as one forward's rows, each group left-padded to its
        own width first (then all to the longest), so a row sees what it would alone."""
        seqs = [[self._encode(q, first=True) for q in group] for group in groups]
        spans, widths, start = [], [], 0
        for group in seqs:
            spans.append((start, start + len(group)))
            widths.append(max(len(s) for s in group))
            start += len(group)
        ids, mask = self._left_pad([s for group in seqs for s in group])
        return GroupedBatch(ids, mask, RowGroups(tuple(spans), tuple(widths)))

    def grouped_logprobs(self, batch: GroupedBatch) -> torch.Tensor:
        """`logprobs` of a `grouped` batch (differentiable): `[rows, V]`, rows in group order."""
        logits = self._forward(batch.ids, batch.mask, None, 0, keep=1).logits[:, -1]
        return logits.float().log_softmax(-1)

    # ---------------------------------------------------------------- helpers
    def _encode(self, text: str, first: bool) -> list[int]:
        """Special tokens (a BOS) only at the very start of the whole prompt."""
        return self.lm.tokenizer(text, add_special_tokens=first)["input_ids"]

    def _vocab_batch(self, seqs: list[list[int]]) -> torch.Tensor:
        ids, mask = self._left_pad(seqs)
        logits = self._forward(ids, mask, None, 0, keep=1).logits[:, -1]
        return logits.float().log_softmax(-1)

    def _prefix_cache(self, prefix_ids: list[int]) -> DynamicCache:
        ids = torch.tensor([prefix_ids], device=self.lm.device)
        cache = DynamicCache()  # filled in place by the forward
        self._forward(ids, torch.ones_like(ids), cache=cache, prefix_len=0, keep=1)
        return cache

    def _score_batch(self, seqs: list[list[int]], prefix_cache, prefix_len: int) -> torch.Tensor:
        if self.multi_token:
            return self._score_multi_token(seqs, prefix_cache, prefix_len)
        ids, mask = self._left_pad(seqs)
        cache = self._expand(prefix_cache, len(seqs))
        logits = self._forward(ids, mask, cache, prefix_len, keep=1).logits[:, -1]
        return logits.float().log_softmax(-1)[:, self.labels.first]

    def _score_multi_token(self, seqs, prefix_cache, prefix_len: int) -> torch.Tensor:
        """Append each label's tokens; sum the log-probs the model gives them in turn."""
        num_labels = len(self.labels.ids)
        longest = max(len(ids) for ids in self.labels.ids)
        scores = torch.zeros(len(seqs), num_labels, device=self.lm.device)
        for c, label_ids in enumerate(self.labels.ids):
            ids, mask = self._left_pad([s + list(label_ids) for s in seqs])
            cache = self._expand(prefix_cache, len(seqs))
            logits = self._forward(ids, mask, cache, prefix_len, keep=longest + 1).logits
            n = len(label_ids)
            logp = logits[:, -(n + 1) : -1].float().log_softmax(-1)
            target = torch.tensor(label_ids, device=self.lm.device).expand(len(seqs), n)
            target = target.unsqueeze(-1)
            scores[:, c] = logp.gather(-1, target).squeeze(-1).sum(-1)
        return scores

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(seqs, self.lm.tokenizer.pad_token_id or 0, self.lm.device)

    @staticmethod
    def _expand(prefix_cache: DynamicCache | None, batch: int) -> DynamicCache | None:
        """A private copy of the prefix cache, one row per query (the forward appends to it)."""
        if prefix_cache is None:
            return None
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def _forward(self, ids, mask, cache, prefix_len: int, keep: int,
                 prefix_mask: torch.Tensor | None = None):
        """Continue from `cache`: `prefix_len` real tokens in every row, or, when rows hold
        different (left-padded) prefixes, each row's own `prefix_mask`."""
        if prefix_mask is None and prefix_len:
            prefix_mask = torch.ones(len(ids), prefix_len, dtype=mask.dtype, device=mask.device)
        start = prefix_mask.sum(-1, keepdim=True) if prefix_mask is not None else 0
        positions = start + (mask.cumsum(-1) - 1).clamp(min=0)
        if prefix_mask is not None:
            mask = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)
        return self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             **forward_kwargs(self.lm.model, keep, cache))
