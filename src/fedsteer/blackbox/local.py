"""The default black box: a local model, queried only for label scores.

The method sees no weights and no gradients, by construction. Queries sharing a prefix
reuse its key/value cache (one encoding of a sampled prompt for all the examples scored
with it); requests with different prefixes (a policy-gradient step's sampled prompts) are
scored together, each row continuing from its own prefix's cache (`batch_prefixes`, an
execution choice). Billing counts each query as an API would: one call, its full prompt's
tokens, one completion token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from fedsteer.blackbox.base import BlackBox
from fedsteer.models.scoring import LabelScorer


class LocalBlackBox(BlackBox):
    def __init__(self, lm, batch_size: int = 16, cache: bool = True,
                 batch_prefixes: bool = True) -> None:
        super().__init__(cache=cache)
        self.lm, self.name, self.batch_size = lm, f"local:{lm.name}", batch_size
        self.batch_prefixes = batch_prefixes  # False: one prefix's queries at a time
        self._scorers: dict[tuple[str, ...], LabelScorer] = {}
        # One query at a time: workers in threads share the model and its tokenizer (which
        # is not safe to use concurrently), and the cores are busy anyway.
        self._model_lock = threading.Lock()

    def _scorer(self, label_words: Sequence[str]) -> LabelScorer:
        words = tuple(label_words)
        if words not in self._scorers:
            self._scorers[words] = LabelScorer(self.lm, words, batch_size=self.batch_size)
        return self._scorers[words]

    def _query(self, prefix: str, prompts: list[str], label_words: tuple[str, ...]
               ) -> list[np.ndarray]:
        return self._query_many([(prefix, prompts)], label_words)[0]

    def _query_many(self, requests: list[tuple[str, list[str]]], label_words: tuple[str, ...]
                    ) -> list[list[np.ndarray]]:
        """One turn at the model for all the requests: different prefixes scored together
        (`batch_prefixes`), or one prefix's queries at a time from its cache."""
        queued = time.perf_counter()
        with self._model_lock:
            self._note_queued(time.perf_counter() - queued)
            scorer = self._scorer(label_words)
            scores = (scorer.score_prefixed(requests)
                      if self.batch_prefixes and len(requests) > 1
                      else [scorer.score(prompts, prefix=prefix) for prefix, prompts in requests])
            tokens = sum(len(self.lm.tokenizer(prefix + p)["input_ids"])
                         for prefix, prompts in requests for p in prompts)
        calls = sum(len(prompts) for _, prompts in requests)
        self._bill(calls=calls, prompt_tokens=tokens, completion_tokens=calls)
        return [list(rows.numpy()) for rows in scores]
