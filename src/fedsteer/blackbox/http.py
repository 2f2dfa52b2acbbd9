"""Any OpenAI-compatible endpoint as a black box, through the official `openai` SDK.

`/v1/completions` with `max_tokens=1` and `logprobs=k`: a label word scores the log-prob of
the longest returned top-k token that begins it — the API speaks token *text*, not ids, and
the longest such token is the one a BPE tokenizer would start the word with; a label
word with no such token among the top k gets the floor `min(top-k) − 1`, i.e. "less likely
than anything shown". Retries with backoff and timeouts are the SDK's; concurrency is a
thread pool; each finished batch is cached at once, so an error later loses nothing done.
Billing comes from the responses' own `usage`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fedsteer.blackbox.base import BlackBox, BlackBoxError


def score_label_words(top: dict[str, float], label_words: Sequence[str]) -> np.ndarray:
    """Each label word's score from one position's top-k `{token text: log-prob}`."""
    if not top:
        raise BlackBoxError("the response has no top log-probs at the answer position")
    floor = min(top.values()) - 1.0
    scores = []
    for word in label_words:
        matches = [(len(token), lp) for token, lp in top.items()
                   if token.strip() and word.startswith(token)]
        scores.append(max(matches)[1] if matches else floor)
    return np.array(scores, dtype=np.float32)


class OpenAIBlackBox(BlackBox):
    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 top_logprobs: int = 20, batch_size: int = 8, max_concurrency: int = 4,
                 retries: int = 3, timeout: float = 60.0, cache: bool = True) -> None:
        from openai import OpenAI

        super().__init__(cache=cache)
        self.name, self.model, self.top_logprobs = f"openai:{model}@{base_url}", model, top_logprobs
        self.retries = retries
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env, "none"),
                             max_retries=retries, timeout=timeout)

    def _query(self, prefix: str, prompts: list[str], label_words: tuple[str, ...]
               ) -> list[np.ndarray]:
        return self._query_many([(prefix, prompts)], label_words)[0]

    def _query_many(self, requests: list[tuple[str, list[str]]], label_words: tuple[str, ...]
                    ) -> list[list[np.ndarray]]:
        """Every request's batches through one pool: the prompts of a policy-gradient step
        are in flight together, `max_concurrency` requests at a time."""
        batches = [(r, prefix, prompts[i : i + self.batch_size])
                   for r, (prefix, prompts) in enumerate(requests)
                   for i in range(0, len(prompts), self.batch_size)]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            results = list(pool.map(lambda b: self._batch(b[1], b[2], label_words), batches))
        out: list[list[np.ndarray]] = [[] for _ in requests]
        for (r, _, _), rows in zip(batches, results, strict=True):
            out[r].extend(rows)
        return out

    def _batch(self, prefix: str, prompts: list[str], label_words: tuple[str, ...]):
        """One request. Transport errors are retried by the SDK; an answer that does not
        parse, or lacks log-probs, is retried here (it may be a proxy's hiccup)."""
        from openai import OpenAIError

        for attempt in range(self.retries + 1):
            try:
                response = self.client.completions.create(
                    model=self.model, prompt=[prefix + p for p in prompts], max_tokens=1,
                    temperature=0.0, logprobs=self.top_logprobs)
                rows = self._rows(response, len(prompts), label_words)
                break
            except OpenAIError as error:
                raise BlackBoxError(f"{self.name}: {type(error).__name__}: {error}") from error
            except (ValueError, BlackBoxError) as error:  # malformed JSON, missing logprobs
                if attempt == self.retries:
                    raise BlackBoxError(f"{self.name}: bad response after {attempt + 1} "
                                        f"tries: {error}") from error
                time.sleep(0.5 * 2**attempt)
        usage = response.usage
        if usage is None:
            raise BlackBoxError(f"{self.name}: the response reports no usage")
        self._bill(calls=len(prompts), prompt_tokens=usage.prompt_tokens,
                   completion_tokens=usage.completion_tokens)
        self._keep(prefix, prompts, label_words, rows)
        return rows

    def _rows(self, response, expected: int, label_words) -> list[np.ndarray]:
        choices = sorted(response.choices or [], key=lambda c: c.index)
        if len(choices) != expected:
            raise BlackBoxError(f"{self.name}: {len(choices)} choices for {expected} prompts")
        rows = []
        for choice in choices:
            logprobs = choice.logprobs
            if logprobs is None or not logprobs.top_logprobs:
                raise BlackBoxError(f"{self.name}: choice {choice.index} has no logprobs; "
                                    "the endpoint must support `logprobs` on completions")
            rows.append(score_label_words(logprobs.top_logprobs[0], label_words))
        return rows
