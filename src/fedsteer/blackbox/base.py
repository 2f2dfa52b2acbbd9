"""A black-box LLM: prompts in, label-word log-probs out; weights and gradients out of reach.

Every backend counts what an API would bill — calls, prompt tokens, completion tokens — and
shares one response cache keyed by the exact request, so a repeated query (the same sampled
prompt on the same example) is never paid twice and work finished before an error is kept.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


class BlackBoxError(RuntimeError):
    """A query failed for good (after retries); the message says what the endpoint did."""


@dataclass
class Usage:
    """What the queries cost: for an API, the bill."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    wait_seconds: float = 0.0  # queued behind other users of the same model, not computing

    def to_dict(self) -> dict[str, int]:
        """The bill: calls, tokens, cache hits (time spent queued is a cost, not billed)."""
        return {k: v for k, v in asdict(self).items() if k != "wait_seconds"}


class BlackBox(ABC):
    """Label scores from an LLM that can only be queried."""

    name: str = "black-box"

    def __init__(self, cache: bool = True) -> None:
        self.usage = Usage()
        self._cache: dict[tuple, np.ndarray] | None = {} if cache else None
        self._lock = threading.Lock()
        self._queued = threading.local()  # this thread's wait in the current `_query`

    def label_logprobs(self, prompts: Sequence[str], label_words: Sequence[str],
                       prefix: str = "", meter: Usage | None = None) -> np.ndarray:
        """`[N, C]` log-probs of each label word's first token after `prefix + prompt`.

        Queries that share `prefix` (a sampled instruction and demonstrations before many
        examples) are sent together, so a backend can encode the prefix once. `meter`, if
        given, also counts this request's calls and cache hits (one worker's share of a
        black box that several workers use at once).
        """
        return self.label_logprobs_many([(prefix, prompts)], label_words, meter)[0]

    def label_logprobs_many(self, requests: Sequence[tuple[str, Sequence[str]]],
                            label_words: Sequence[str], meter: Usage | None = None
                            ) -> list[np.ndarray]:
        """`label_logprobs(prompts, label_words, prefix)` for each `(prefix, prompts)`, with
        the same numbers, bill and cache as asking them in turn, but handed to the backend
        at once: a policy-gradient step's sampled prompts are a batch of different prefixes,
        which a local model scores in shared forwards and an API in concurrent requests.
        """
        words = tuple(label_words)
        keys = [[(prefix + p, words) for p in prompts] for prefix, prompts in requests]
        missing = self._missing(keys)
        self._queued.seconds = 0.0
        asked = [(prefix, [prompts[i] for i in todo])
                 for (prefix, prompts), todo in zip(requests, missing, strict=True) if todo]
        answers = iter(self._query_many(asked, words) if asked else [])
        fresh: dict[tuple, np.ndarray] = {}
        for request_keys, todo in zip(keys, missing, strict=True):
            if todo:
                rows = next(answers)
                fresh.update({request_keys[i]: row for i, row in zip(todo, rows, strict=True)})
        total, asked_rows = sum(map(len, keys)), sum(map(len, missing))
        with self._lock:
            self.usage.wait_seconds += self._queued.seconds
            if meter is not None:
                meter.wait_seconds += self._queued.seconds
                meter.calls += asked_rows
                meter.cache_hits += total - asked_rows
            if self._cache is not None:
                self._cache.update(fresh)
            self.usage.cache_hits += total - asked_rows
            return [np.stack([fresh[k] if k in fresh else self._cache[k] for k in request_keys])
                    if request_keys else np.empty((0, len(words))) for request_keys in keys]

    def _missing(self, keys: list[list[tuple]]) -> list[list[int]]:
        """Per request, the queries to ask: those neither cached nor asked by an earlier
        request of the same call (asked in turn, that one would have filled the cache)."""
        if self._cache is None:
            return [list(range(len(request))) for request in keys]
        earlier: set[tuple] = set()
        missing = []
        for request in keys:
            missing.append([i for i, key in enumerate(request)
                            if key not in self._cache and key not in earlier])
            earlier.update(request)
        return missing

    @abstractmethod
    def _query(self, prefix: str, prompts: list[str], label_words: tuple[str, ...]
               ) -> list[np.ndarray]:
        """Ask the model; add to `self.usage`; return one `[C]` row per prompt, in order."""

    def _query_many(self, requests: list[tuple[str, list[str]]], label_words: tuple[str, ...]
                    ) -> list[list[np.ndarray]]:
        """`_query` for each `(prefix, prompts)`; a backend that can run different prefixes
        together overrides this."""
        return [self._query(prefix, prompts, label_words) for prefix, prompts in requests]

    def _note_queued(self, seconds: float) -> None:
        """A backend that serialises its users reports how long this query waited its turn."""
        self._queued.seconds = getattr(self._queued, "seconds", 0.0) + seconds

    def _keep(self, prefix: str, prompts: Sequence[str], label_words: tuple[str, ...],
              rows: Sequence[np.ndarray]) -> None:
        """Cache rows as soon as they arrive, so a later failure loses no finished work."""
        if self._cache is not None:
            with self._lock:
                self._cache.update({(prefix + p, label_words): r
                                    for p, r in zip(prompts, rows, strict=True)})

    def _bill(self, calls: int, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.usage.calls += calls
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
