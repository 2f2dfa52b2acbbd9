"""The one thread that runs the models: requests for the same served name are batched.

HTTP handlers put `Job`s in a queue; the engine takes the oldest job's name, waits a short
window for more jobs of that name, and runs them (up to `max_batch_rows` rows), sorted by
length into forwards of `chunk_rows` (little padding), each a left-padded forward with a
key/value cache, then one token per step for every row until each has its answer. Jobs of
other names wait their turn, so a batch never mixes names and an adaptation's hooks are on
only around its own forwards. A cancelled job (timeout, client
gone) drops out between steps; an error fails that batch's jobs, never the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from fedsteer.models.scoring import forward_kwargs, left_pad
from fedsteer.serve.adaptations import Adaptation, Stream

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One prompt of a request, already tokenized (the adaptation's prefix included)."""

    ids: list[int]
    prompt_tokens: int  # the request's own tokens (the prefix is the server's, not billed)
    max_tokens: int
    top: int | None = None  # top-k alternatives per token (None: no log-probs at all)
    echo: bool = False  # also the prompt's tokens with their log-probs
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Token:
    """A token of an answer (or of an echoed prompt): id, text, log-prob, top-k."""

    id: int
    text: str
    logprob: float | None
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class Answer:
    """What a row produced: the prompt's tokens when echoed, the new ones, why it ended."""

    prompt: list[Token] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass(eq=False)
class Job:
    """A request's rows for one served name, and where the engine reports back."""

    model: str
    rows: list[Row]
    on_done: Callable[[list[Answer] | None, BaseException | None], None]
    on_token: Callable[[int, Token, str], None] | None = None  # streaming: row, token, text
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Owns the models' thread; `submit` is safe from any thread."""

    def __init__(self, adaptations: dict[str, Adaptation], max_batch_rows: int = 32,
                 window_seconds: float = 0.005, chunk_rows: int = 16) -> None:
        self.adaptations = adaptations
        self.max_batch_rows, self.window = max_batch_rows, window_seconds
        self.chunk_rows = chunk_rows  # rows of one forward, sorted by length within a batch
        self.tokenizer_lock = threading.Lock()  # HF tokenizers are not safe across threads
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._stopped = False
        #: (name, rows) of the latest batches: what batching did, for tests and logs
        self.batches: deque[tuple[str, int]] = deque(maxlen=1000)
        self._thread = threading.Thread(target=self._loop, name="fedsteer-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and, after a short window, every queued job of its name that fits."""
        with self._ready:
            while not self._jobs and not self._stopped:
                self._ready.wait()
            if self._stopped:
                return None
            name = self._jobs[0].model
        time.sleep(self.window)  # let concurrent requests for the same name arrive
        with self._ready:
            batch, rows = [], 0
            for job in list(self._jobs):
                if job.model == name and (not batch or rows + len(job.rows)
                                          <= self.max_batch_rows):
                    batch.append(job)
                    rows += len(job.rows)
                    self._jobs.remove(job)
            return batch

    def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.cancelled.is_set()]
        if not live:
            return
        rows = [row for job in live for row in job.rows]
        self.batches.append((live[0].model, len(rows)))
        try:
            answers = generate(self, self.adaptations[live[0].model], live)
        except Exception as error:  # a bug or out of memory: these requests fail, not us
            log.exception("batch of %d rows for %s failed", len(rows), live[0].model)
            for job in live:
                job.on_done(None, error)
            return
        start = 0
        for job in live:
            job.on_done(answers[start : start + len(job.rows)], None)
            start += len(job.rows)


# ------------------------------------------------------------------ forwards
class Forward:
    """One stream's forward over a batch, continued token by token from its cache."""

    def __init__(self, stream: Stream, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.stream, self.ids, self.mask = stream, ids, mask
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()

    def first(self, all_positions: bool) -> torch.Tensor:
        return self._run(self.ids, self.positions, keep=0 if all_positions else 1)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._run(tokens, self.positions, keep=1)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        model = self.stream.lm.model
        with self.stream.context(len(ids), ids.shape[1]):
            logits = model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                           **forward_kwargs(model, keep, self.cache)).logits
        return (logits if keep == 0 else logits[:, -keep:]).float().log_softmax(-1)


@torch.no_grad()
def generate(engine: Engine, adaptation: Adaptation, jobs: list[Job]) -> list[Answer]:
    """Every row of `jobs` answered, in chunks of `chunk_rows` rows of similar length (as
    the offline scorer batches: arrival order padded a batch of sst2 rows to 1.7x the
    tokens)."""
    rows = [(job, row, i) for job in jobs for i, row in enumerate(job.rows)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1].ids))
    answers: list[Answer] = [Answer()] * len(rows)
    for start in range(0, len(order), engine.chunk_rows):
        chunk = order[start : start + engine.chunk_rows]
        for i, answer in zip(chunk, decode(engine, adaptation, [rows[i] for i in chunk]),
                             strict=True):
            answers[i] = answer
    return answers


def decode(engine: Engine, adaptation: Adaptation, rows: list[tuple[Job, Row, int]]
           ) -> list[Answer]:
    """One left-padded forward with a cache, then a token per step (greedy unless a
    temperature) until every row has its answer."""
    tokenizer = adaptation.base.tokenizer
    ids, mask = left_pad([row.ids for _, row, _ in rows], tokenizer.pad_token_id or 0)
    forwards = [Forward(stream, ids, mask) for stream in adaptation.streams]
    echo = any(row.echo for _, row, _ in rows)
    logprobs = adaptation.combine([f.first(echo) for f in forwards])
    decoding = Decoding(engine, tokenizer, rows)
    if echo:
        decoding.echo(ids, mask, logprobs)
    last = logprobs[:, -1]
    for _ in range(max(row.max_tokens for _, row, _ in rows)):
        tokens = decoding.step(last)
        if decoding.finished():
            break
        last = adaptation.combine([f.next(tokens) for f in forwards])[:, -1]
    return decoding.answers()


class Decoding:
    """Per-row bookkeeping of a batched decode: chosen tokens, texts, stops, streaming."""

    def __init__(self, engine: Engine, tokenizer, rows: list[tuple[Job, Row, int]]) -> None:
        self.engine, self.tokenizer, self.rows = engine, tokenizer, rows
        self.out = [Answer() for _ in rows]
        self.generators = [_generator(row) for _, row, _ in rows]
        for (_, row, _), answer in zip(rows, self.out, strict=True):
            if row.max_tokens == 0:
                answer.finish_reason = "length"

    def echo(self, ids: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor) -> None:
        """The prompt's own tokens and the log-prob the model gave each (None for the first)."""
        for i, ((_, row, _), answer) in enumerate(zip(self.rows, self.out, strict=True)):
            if not row.echo:
                continue
            start = ids.shape[1] - row.prompt_tokens
            for pos in range(start, ids.shape[1]):
                token = int(ids[i, pos])
                lp = None if pos == 0 or not mask[i, pos - 1] else logprobs[i, pos - 1]
                answer.prompt.append(self._token(token, lp, row.top))

    def step(self, last: torch.Tensor) -> torch.Tensor:
        """Choose each row's next token; record it for rows still going."""
        chosen = torch.zeros((len(self.rows), 1), dtype=torch.long)
        for i, ((job, row, index), answer) in enumerate(zip(self.rows, self.out, strict=True)):
            if answer.finish_reason is None and job.cancelled.is_set():
                answer.finish_reason = "cancelled"
            if answer.finish_reason is not None:
                continue
            token = _choose(last[i], row, self.generators[i])
            chosen[i, 0] = token
            self._append(index, job, row, answer, token, last[i])
        return chosen

    def _append(self, index: int, job: Job, row: Row, answer: Answer, token: int,
                logprobs: torch.Tensor) -> None:
        if token == self.tokenizer.eos_token_id:
            answer.finish_reason = "stop"
            return
        piece = self._token(token, logprobs if row.top is not None else None, row.top)
        answer.tokens.append(piece)
        with self.engine.tokenizer_lock:
            text = self.tokenizer.decode([t.id for t in answer.tokens])
        stop = next((s for s in row.stop if s in text), None)
        if stop is not None:
            text, answer.finish_reason = text[: text.index(stop)], "stop"
        elif len(answer.tokens) >= row.max_tokens:
            answer.finish_reason = "length"
        if job.on_token is not None:
            job.on_token(index, piece, text[len(answer.text):])
        answer.text = text

    def _token(self, token: int, logprobs: torch.Tensor | None, top: int | None) -> Token:
        with self.engine.tokenizer_lock:
            text = self.tokenizer.decode([token])
            if logprobs is None:
                return Token(token, text, None)
            alternatives: dict[str, float] = {}
            if top:
                values, indices = logprobs.topk(top)
                for value, index in zip(values.tolist(), indices.tolist(), strict=True):
                    alternatives.setdefault(self.tokenizer.decode([index]), value)
        return Token(token, text, float(logprobs[token]), alternatives)

    def finished(self) -> bool:
        return all(answer.finish_reason is not None for answer in self.out)

    def answers(self) -> list[Answer]:
        for answer in self.out:
            answer.finish_reason = answer.finish_reason or "length"
        return self.out


def _generator(row: Row) -> torch.Generator | None:
    if row.temperature <= 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(row.seed if row.seed is not None else torch.seed())
    return generator


def _choose(logprobs: torch.Tensor, row: Row, generator: torch.Generator | None) -> int:
    if row.temperature <= 0:
        return int(logprobs.argmax())
    probs = (logprobs / row.temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
