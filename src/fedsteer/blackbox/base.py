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
        words = tuple(label_words)
        keys = [(prefix + p, words) for p in prompts]
        missing = [i for i, key in enumerate(keys)
                   if self._cache is None or key not in self._cache]
        fresh: dict[tuple, np.ndarray] = {}
        self._queued.seconds = 0.0
        if missing:
            scores = self._query(prefix, [prompts[i] for i in missing], words)
            fresh = {keys[i]: row for i, row in zip(missing, scores, strict=True)}
        with self._lock:
            self.usage.wait_seconds += self._queued.seconds
            if meter is not None:
                meter.wait_seconds += self._queued.seconds
            if self._cache is not None:
                self._cache.update(fresh)
            self.usage.cache_hits += len(prompts) - len(missing)
            if meter is not None:
                meter.calls += len(missing)
                meter.cache_hits += len(prompts) - len(missing)
            rows = [fresh[k] if k in fresh else self._cache[k] for k in keys]
        return np.stack(rows) if rows else np.empty((0, len(words)))

    @abstractmethod
    def _query(self, prefix: str, prompts: list[str], label_words: tuple[str, ...]
               ) -> list[np.ndarray]:
        """Ask the model; add to `self.usage`; return one `[C]` row per prompt, in order."""

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
