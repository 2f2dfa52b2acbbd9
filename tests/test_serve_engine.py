"""The serve engine on its own (issues 42, 44): a stream adds up to the whole answer for
every stop string, a job never runs wider than `max_batch_rows`, a cancelled job stops
between chunks, and echoed log-probs never take a rows × width × vocab tensor at once."""

from __future__ import annotations

import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from fedsteer.models import load_model
from fedsteer.serve.adaptations import Adaptation, Stream
from fedsteer.serve.engine import Answer, Engine, Job, Row, streamable

EOS = 256  # the byte tokenizer's end of text: token ids 0..255 are bytes


class ByteTokenizer:
    """A byte-level tokenizer: every UTF-8 byte its own token, so most non-ASCII characters
    span tokens and decode as U+FFFD until their last byte comes (as SmolLM2's does)."""

    pad_token_id, eos_token_id = 0, EOS

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return EOS + 1


class ScriptedModel(torch.nn.Module):
    """Says what it is told: after a prompt of one token, `script[k]` is the k-th token
    (one-hot log-probs); with no script, the token after the last one (`x + 1`)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=EOS + 1)
        self.script: list[int] = []
        self.calls = 0
        self.gate: tuple[threading.Event, threading.Event] | None = None  # entered, opened

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0,
                use_cache=False, past_key_values=None):
        self.calls += 1
        if self.gate is not None and self.calls == 1:
            self.gate[0].set()
            self.gate[1].wait(30)
        if self.script:
            steps = position_ids[:, -1]
            nxt = torch.tensor([self.script[min(int(s), len(self.script) - 1)] for s in steps])
        else:
            nxt = (input_ids[:, -1] + 1) % EOS
        logits = torch.full((len(input_ids), 1, EOS + 1), -30.0)
        logits[torch.arange(len(input_ids)), 0, nxt] = 0.0
        return SimpleNamespace(logits=logits)


def scripted_engine(**options) -> tuple[Engine, ScriptedModel]:
    model = ScriptedModel()
    base = SimpleNamespace(model=model, tokenizer=ByteTokenizer(), name="bytes",
                           device=torch.device("cpu"))
    engine = Engine({"bytes": Adaptation("bytes", base)}, window_seconds=0.0, **options)
    return engine, model


def run(engine: Engine, rows: list[Row], stream: bool = False, model: str = "bytes"
        ) -> tuple[list[Answer], list[list[str]]]:
    """Every row's answer, and each row's streamed pieces."""
    done = threading.Event()
    result: list = []
    pieces: list[list[str]] = [[] for _ in rows]
    job = Job(model, rows, lambda answers, error: (result.append((answers, error)),
                                                   done.set()),
              (lambda row, token, text: pieces[row].append(text)) if stream else None)
    engine.submit(job)
    assert done.wait(30)
    answers, error = result[0]
    assert error is None, error
    return answers, pieces


# ------------------------------------------------------------------ stop strings
def expected_answer(data: bytes, stops: tuple[str, ...], max_tokens: int) -> tuple[str, str]:
    """What the whole answer must be: generation stops at the first token after which a
    stop string is in the text (cut at its earliest start), else at EOS or max_tokens."""
    for size in range(1, min(len(data), max_tokens) + 1):
        text = data[:size].decode("utf-8", errors="replace")
        found = [text.find(stop) for stop in stops if stop in text]
        if found:
            return text[: min(found)], "stop"
    text = data[:max_tokens].decode("utf-8", errors="replace")
    return text, "length" if max_tokens <= len(data) else "stop"


PIECES = ["a", "b", "ab", " ", "\n", "s i", " is", "é", "日本", "😀", "x😀y", "\n\n"]


def random_case(rng: random.Random) -> tuple[bytes, tuple[str, ...], int]:
    text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
    stops = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.6:  # a substring of the answer: across tokens and characters
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 6)])
        else:
            stops.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3))))
    data = text.encode()
    return data, tuple(stops), rng.randint(1, len(data) + 2)


def test_a_stream_adds_up_to_the_whole_answer_for_every_stop_string():
    """Property test over 400 random answers and stops (multi-byte characters split over
    tokens, stops spanning tokens, several stops at once, EOS and max_tokens endings)."""
    engine, model = scripted_engine()
    rng = random.Random(0)
    try:
        for case in range(400):
            data, stops, max_tokens = random_case(rng)
            model.script = [*data, EOS]
            whole, _ = run(engine, [Row([65], 1, max_tokens, stop=stops)])
            streamed, pieces = run(engine, [Row([65], 1, max_tokens, stop=stops)], True)
            want = expected_answer(data, stops, max_tokens)
            label = f"case {case}: {data!r} stops={stops} max_tokens={max_tokens}"
            assert (whole[0].text, whole[0].finish_reason) == want, label
            assert "".join(pieces[0]) == whole[0].text == streamed[0].text, label
            # a half character is only ever sent as the answer's own end (max_tokens cut it)
            assert not any(piece.endswith("\ufffd") for piece in pieces[0][:-1]), label
    finally:
        engine.close()


@pytest.mark.parametrize("text, stops, sent", [
    (" i", ("s i",), " i"),  # nothing of "s i" begun
    (" is", ("s i",), " i"),  # "s" may begin "s i"
    (" is i", (" is is",), ""),  # all of it may begin " is is"
    ("\n\n", ("\n\n\n",), ""),
    ("ab\ufffd", ("b日",), "a"),  # a half character, and what it may complete
    ("abc", ("x", "bcd", "cz"), "a"),  # the longest ending that begins any stop is held
])
def test_streamable_holds_back_what_may_still_become_a_stop(text, stops, sent):
    assert streamable(text, stops) == sent


# ------------------------------------------------------------------ batches
def test_no_job_runs_wider_than_max_batch_rows_and_its_answers_keep_their_order():
    """A single job of 5 rows under --max-batch-rows 2 (the old engine took the first job
    whole, whatever its size)."""
    engine, _ = scripted_engine(max_batch_rows=2)
    try:
        rows = [Row([10 * i], 1, 3) for i in range(5)]
        answers, pieces = run(engine, rows, stream=True)
    finally:
        engine.close()
    assert [name_rows[1] for name_rows in engine.batches] == [2, 2, 1]
    assert [a.text for a in answers] == [bytes([10 * i + 1, 10 * i + 2, 10 * i + 3]).decode()
                                         for i in range(5)]
    assert ["".join(p) for p in pieces] == [a.text for a in answers]


def cancel_during_first_forward(engine, model, make_job) -> None:
    """Submit `make_job(done)`, cancel it while its first forward runs, wait for its answer."""
    entered, opened, done = threading.Event(), threading.Event(), threading.Event()
    model.gate = (entered, opened)
    job = make_job(done)
    try:
        engine.submit(job)
        assert entered.wait(10)
        job.cancelled.set()
        opened.set()
        assert done.wait(10)
    finally:
        engine.close()


def test_a_cancelled_job_stops_between_chunks():
    """Four rows, one per forward: cancelled during the first, the other three never run
    (the old engine prefilled every remaining chunk while other names waited)."""
    engine, model = scripted_engine(chunk_rows=1)
    answers: list = []
    cancel_during_first_forward(engine, model, lambda done: Job(
        "bytes", [Row([1 + i], 1, 1) for i in range(4)],
        lambda got, error: (answers.append(got), done.set())))
    assert model.calls == 1
    assert sum(a.finish_reason == "cancelled" for a in answers[0]) == 4


# ------------------------------------------------------------------ echo
@dataclass
class Widths:
    """A stream context that records each forward's rows and width."""

    seen: list[tuple[int, int]] = field(default_factory=list)

    @contextmanager
    def context(self, rows: int, width: int):
        self.seen.append((rows, width))
        yield


@pytest.fixture(scope="module")
def base():
    return load_model("tiny-random")


def recorded(base, **options) -> tuple[Engine, Widths]:
    """An engine serving `base` as "r", recording the rows and width of every forward."""
    widths = Widths()

    @dataclass
    class Recorded(Adaptation):
        @property
        def streams(self):
            return [Stream(self.base, widths.context)]

    return Engine({"r": Recorded("r", base)}, window_seconds=0.0, **options), widths


TEXTS = ("The capital of France is Paris, a city", "One two three four five six", "Hi")


def test_echoed_log_probs_come_from_forwards_within_the_budget_and_equal_one_forward(base):
    """(The old engine took log-probs at every position of the whole batch in one forward:
    sixteen 2,000-token prompts of a 150k vocabulary ≈ 20 GB.)"""
    vocab = base.model.config.vocab_size
    budget = 3 * 3 * vocab  # three rows of three positions
    engine, widths = recorded(base, echo_budget=budget)
    prompts = [base.tokenizer(text)["input_ids"] for text in TEXTS]
    try:
        answers, _ = run(engine, [Row(ids, len(ids), 2, top=3, echo=True) for ids in prompts],
                         model="r")
    finally:
        engine.close()
    prompt_forwards = [(rows, width) for rows, width in widths.seen if width > 1]
    assert len(prompt_forwards) > 2  # "Hi" is all padding in the first of them
    assert all(rows * width * vocab <= budget for rows, width in widths.seen)
    for ids, answer in zip(prompts, answers, strict=True):
        with torch.no_grad():
            full = base.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert [t.id for t in answer.prompt] == ids and answer.prompt[0].logprob is None
        want = [float(full[pos - 1, ids[pos]]) for pos in range(1, len(ids))]
        torch.testing.assert_close(torch.tensor([t.logprob for t in answer.prompt[1:]]),
                                   torch.tensor(want), atol=1e-4, rtol=0)
        assert len(answer.tokens) == 2 and all(len(t.top) == 3 for t in answer.prompt[1:])


def test_a_long_prompt_is_read_in_forwards_of_prefill_tokens_with_the_same_answer(base):
    prompts = [base.tokenizer(text)["input_ids"] for text in TEXTS]

    def answers(**options) -> tuple[list[Answer], list[tuple[int, int]]]:
        engine, widths = recorded(base, **options)
        try:
            got, _ = run(engine, [Row(ids, len(ids), 3, top=2) for ids in prompts], model="r")
        finally:
            engine.close()
        return got, widths.seen

    whole, _ = answers()
    chunked, seen = answers(prefill_tokens=9)
    # a 9-token width read 3 positions × 3 rows at a time, then two one-token steps
    assert [rows * width for rows, width in seen] == [9, 9, 9, 3, 3]
    for one, other in zip(whole, chunked, strict=True):
        assert [t.id for t in one.tokens] == [t.id for t in other.tokens]
        torch.testing.assert_close(torch.tensor([t.logprob for t in one.tokens]),
                                   torch.tensor([t.logprob for t in other.tokens]),
                                   atol=1e-4, rtol=0)


def test_a_job_cancelled_while_its_prompt_is_read_stops_at_the_next_forward():
    engine, model = scripted_engine(prefill_tokens=4)
    cancel_during_first_forward(engine, model, lambda done: Job(
        "bytes", [Row(list(range(1, 21)), 20, 5)], lambda got, error: done.set()))
    assert model.calls == 1  # of the 5 forwards a 20-token prompt takes, 4 tokens each
