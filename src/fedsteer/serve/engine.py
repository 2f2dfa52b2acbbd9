"""The one thread that runs the models: requests for the same served name are batched.

HTTP handlers put `Job`s in a queue; the engine takes the oldest job's name, waits a short
window for more jobs of that name, and runs them (up to `max_batch_rows` rows; a larger job is
split into parts of that size), sorted by length into forwards of `chunk_rows` (little
padding), each a left-padded forward with a key/value cache, then one token per step for
every row until each has its answer. Jobs of other names wait their turn, so a batch never
mixes names and an adaptation's hooks are on only around its own forwards. A cancelled job
(timeout, client gone) drops out between chunks and between steps, so it stops holding the
one thread; an error fails that batch's jobs, never the engine. Prompts are read
`prefill_tokens` tokens per forward (so a cancel is heard within one such forward), and
echoed prompts' log-probs a few positions at a time (`echo_budget`), never as one rows ×
width × vocab tensor.
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

    @property
    def echo_logprobs(self) -> bool:
        """Whether the prompt's own log-probs are asked for (echo alone needs no forward
        over every position: its text is the prompt's)."""
        return self.echo and self.top is not None


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
    #: streaming: row, token (None: only text held back until the row ended), new text
    on_token: Callable[[int, Token | None, str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


def split(job: Job, max_rows: int) -> list[Job]:
    """`job` as parts of at most `max_rows` rows that share its cancel event; its `on_done`
    is called once, with every row's answer in order, or with the first part's error."""
    if len(job.rows) <= max_rows:
        return [job]
    answers: list[Answer | None] = [None] * len(job.rows)
    pending = [len(range(0, len(job.rows), max_rows))]

    def part(start: int) -> Job:
        def done(got: list[Answer] | None, error: BaseException | None) -> None:
            if pending[0] == 0:
                return  # an earlier part failed and was reported
            if error is not None:
                pending[0] = 0
                job.cancelled.set()  # the other parts have no one left to answer
                job.on_done(None, error)
                return
            answers[start : start + len(got)] = got
            pending[0] -= 1
            if pending[0] == 0:
                job.on_done(answers, None)

        on_token = None if job.on_token is None else (
            lambda row, token, text: job.on_token(start + row, token, text))
        return Job(job.model, job.rows[start : start + max_rows], done, on_token,
                   job.cancelled)

    return [part(start) for start in range(0, len(job.rows), max_rows)]


class Engine:
    """Owns the models' thread; `submit` is safe from any thread."""

    def __init__(self, adaptations: dict[str, Adaptation], max_batch_rows: int = 32,
                 window_seconds: float = 0.005, chunk_rows: int = 16,
                 echo_budget: int = 2**25, prefill_tokens: int = 2048) -> None:
        self.adaptations = adaptations
        self.max_batch_rows, self.window = max_batch_rows, window_seconds
        self.chunk_rows = chunk_rows  # rows of one forward, sorted by length within a batch
        #: rows × positions × vocab of the log-probs one echo forward may compute (float32:
        #: 2**25 is 128 MiB per copy)
        self.echo_budget = echo_budget
        #: rows × positions of one prompt forward: long prompts are read in position chunks
        self.prefill_tokens = prefill_tokens
        self.tokenizer_lock = threading.Lock()  # HF tokenizers are not safe across threads
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._stopped = False
        #: (name, rows) of the latest batches: what batching did, for tests and logs
        self.batches: deque[tuple[str, int]] = deque(maxlen=1000)
        self._thread = threading.Thread(target=self._loop, name="fedsteer-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; one larger than `max_batch_rows` is queued as parts of that size."""
        with self._ready:
            self._jobs.extend(split(job, self.max_batch_rows))
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
                # (`submit` split every job to fit; `not batch` only guards against a stall)
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
    """One stream's forward over a batch: the prompt (whole, or a few positions at a time),
    then token by token from its cache."""

    def __init__(self, stream: Stream, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.stream, self.ids, self.mask = stream, ids, mask
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()

    def prompt(self, start: int, stop: int, every_position: bool) -> torch.Tensor:
        """Log-probs after prompt positions `start..stop-1` (each of them, or the last),
        continuing the cache of the positions before `start`."""
        return self._run(self.ids[:, start:stop], self.positions[:, start:stop],
                         self.mask[:, :stop], keep=0 if every_position else 1)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._run(tokens, self.positions, self.mask, keep=1)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             keep: int) -> torch.Tensor:
        model = self.stream.lm.model
        with self.stream.context(len(ids), ids.shape[1]):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           **forward_kwargs(model, keep, self.cache)).logits
        return (logits if keep == 0 else logits[:, -keep:]).float().log_softmax(-1)


@torch.no_grad()
def generate(engine: Engine, adaptation: Adaptation, jobs: list[Job]) -> list[Answer]:
    """Every row of `jobs` answered, in chunks of `chunk_rows` rows of similar length (as
    the offline scorer batches: arrival order padded a batch of sst2 rows to 1.7x the
    tokens); rows that want their prompt's log-probs go together, and a row whose job was
    cancelled is not started."""
    rows = [(job, row, i) for job in jobs for i, row in enumerate(job.rows)]
    order = sorted(range(len(rows)),
                   key=lambda i: (rows[i][1].echo_logprobs, len(rows[i][1].ids)))
    answers = [Answer(finish_reason="cancelled") for _ in rows]
    for start in range(0, len(order), engine.chunk_rows):
        live = [i for i in order[start : start + engine.chunk_rows]
                if not rows[i][0].cancelled.is_set()]
        if live:
            for i, answer in zip(live, decode(engine, adaptation, [rows[i] for i in live]),
                                 strict=True):
                answers[i] = answer
    return answers


def decode(engine: Engine, adaptation: Adaptation, rows: list[tuple[Job, Row, int]]
           ) -> list[Answer]:
    """One left-padded prompt forward with a cache, then a token per step (greedy unless a
    temperature) until every row has its answer."""
    tokenizer = adaptation.base.tokenizer
    with engine.tokenizer_lock:
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, mask = left_pad([row.ids for _, row, _ in rows], pad or 0, adaptation.base.device)
    forwards = [Forward(stream, ids, mask) for stream in adaptation.streams]
    decoding = Decoding(engine, tokenizer, eos, rows, ids, mask)
    last = prefill(engine, adaptation, forwards, decoding)
    if last is None:
        return decoding.answers()
    for _ in range(max(row.max_tokens for _, row, _ in rows)):
        tokens = decoding.step(last)
        if decoding.finished():
            break
        last = adaptation.combine([f.next(tokens) for f in forwards])[:, -1]
    return decoding.answers()


def prefill(engine: Engine, adaptation: Adaptation, forwards: list[Forward],
            decoding: Decoding) -> torch.Tensor | None:
    """The next-token log-probs after every row's prompt, read in forwards of at most
    `engine.prefill_tokens` tokens (rows × positions), each continuing the cache of the
    last. Rows that echo their prompt's log-probs get them on the way, with at most
    `engine.echo_budget` rows × positions × vocab log-probs per forward. None if every row
    was cancelled meanwhile (checked between forwards)."""
    rows, width = decoding.ids.shape
    step = max(1, engine.prefill_tokens // rows)
    if decoding.echoes:
        vocab = max(f.stream.lm.model.config.vocab_size for f in forwards)
        step = min(step, max(1, engine.echo_budget // (rows * vocab)))
    for start in range(0, width, step):
        if decoding.all_cancelled():
            return None
        logprobs = adaptation.combine([f.prompt(start, min(start + step, width),
                                                decoding.echoes) for f in forwards])
        if decoding.echoes:
            decoding.echo(start, logprobs)
    return logprobs[:, -1]


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string in it, and whether there was one."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return (text[: min(found)], True) if found else (text, False)


def streamable(text: str, stops: tuple[str, ...]) -> str:
    """What of an unfinished answer may be sent: without a trailing half character (a
    byte-level tokenizer decodes a split UTF-8 sequence as U+FFFD until the rest comes)
    and without any ending that a later token could complete into a stop string."""
    text = text.rstrip("\ufffd")
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return text[: len(text) - held]


class Decoding:
    """Per-row bookkeeping of a batched decode: chosen tokens, texts, stops, streaming."""

    def __init__(self, engine: Engine, tokenizer, eos: int | None,
                 rows: list[tuple[Job, Row, int]], ids: torch.Tensor, mask: torch.Tensor
                 ) -> None:
        self.engine, self.tokenizer, self.eos, self.rows = engine, tokenizer, eos, rows
        self.ids, self.mask = ids, mask
        self.out = [Answer() for _ in rows]
        self.sent = ["" for _ in rows]  # what each row's stream has sent
        self.generators = [_generator(row) for _, row, _ in rows]
        for (_, row, _), answer in zip(rows, self.out, strict=True):
            if row.max_tokens == 0:
                answer.finish_reason = "length"

    @property
    def echoes(self) -> bool:
        return any(row.echo_logprobs for _, row, _ in self.rows)

    def all_cancelled(self) -> bool:
        return all(job.cancelled.is_set() for job, _, _ in self.rows)

    def echo(self, start: int, logprobs: torch.Tensor) -> None:
        """The prompt's own tokens whose log-probs `logprobs` (after positions `start`…)
        holds, each with the log-prob the model gave it (None for the very first)."""
        width, stop = self.ids.shape[1], start + logprobs.shape[1]
        for i, ((_, row, _), answer) in enumerate(zip(self.rows, self.out, strict=True)):
            if not row.echo_logprobs:
                continue
            first = width - row.prompt_tokens
            for pos in range(first if start == 0 else max(first, start + 1),
                             min(stop + 1, width)):
                before = pos - 1  # the position whose log-probs score this token
                lp = None if before < 0 or not self.mask[i, before] else \
                    logprobs[i, before - start]
                answer.prompt.append(self._token(int(self.ids[i, pos]), lp, row.top))

    def step(self, last: torch.Tensor) -> torch.Tensor:
        """Choose each row's next token; record it for rows still going."""
        chosen = torch.zeros((len(self.rows), 1), dtype=torch.long, device=self.ids.device)
        for i, ((job, row, _), answer) in enumerate(zip(self.rows, self.out, strict=True)):
            if answer.finish_reason is None and job.cancelled.is_set():
                answer.finish_reason = "cancelled"
            if answer.finish_reason is not None:
                continue
            token = _choose(last[i], row, self.generators[i])
            chosen[i, 0] = token
            self._append(i, token, last[i])
        return chosen

    def _append(self, i: int, token: int, logprobs: torch.Tensor) -> None:
        _, row, _ = self.rows[i]
        answer, piece = self.out[i], None
        if token == self.eos:
            answer.finish_reason = "stop"
        else:
            piece = self._token(token, logprobs if row.top is not None else None, row.top)
            answer.tokens.append(piece)
            with self.engine.tokenizer_lock:
                text = self.tokenizer.decode([t.id for t in answer.tokens])
            answer.text, stopped = cut_at_stop(text, row.stop)
            if stopped:
                answer.finish_reason = "stop"
            elif len(answer.tokens) >= row.max_tokens:
                answer.finish_reason = "length"
        self._stream(i, piece)

    def _stream(self, i: int, piece: Token | None) -> None:
        """Send row i's new text: all of it once the row has ended, else only what no later
        token can take back (so the stream adds up to exactly the whole answer's text)."""
        job, row, index = self.rows[i]
        if job.on_token is None:
            return
        answer = self.out[i]
        ready = answer.text if answer.finish_reason else streamable(answer.text, row.stop)
        new = ready[len(self.sent[i]):] if ready.startswith(self.sent[i]) else ""
        self.sent[i] += new
        if piece is not None or new:
            job.on_token(index, piece, new)

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
        for (job, _, _), answer in zip(self.rows, self.out, strict=True):
            answer.finish_reason = answer.finish_reason or (
                "cancelled" if job.cancelled.is_set() else "length")
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
    # shifted so the likeliest token scores 0, in float64 (where any positive temperature
    # is > 0): a tiny temperature sharpens towards that token instead of dividing every
    # score into -inf, a NaN distribution that failed the whole batch
    scores = logprobs.double()
    probs = ((scores - scores.max()) / row.temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
