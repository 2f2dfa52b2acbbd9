"""`fedsteer serve` (issue 18): every artifact kind through the openai SDK equals its offline
evaluation; authentication; each limit; batching; no cross-talk between served names."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from openai import OpenAI
from typer.testing import CliRunner

from fedsteer.artifacts import score_artifact
from fedsteer.blackbox import OpenAIBlackBox
from fedsteer.cli import app as cli
from fedsteer.data import load_task
from fedsteer.models import build_tiny_random, load_model
from fedsteer.serve import Limits, Server, build_adaptations, make_app
from fedsteer.serve.adaptations import Adaptation, Stream
from http_server import ServerThread

ROWS = 6
RUNS = {  # method, options: the smallest run that saves an artifact of each kind
    "steering": ("ifed-icl", ["--rounds", "1", "-o", "local_epochs=1", "-o", "demos_per_class=1",
                              "-o", "calibration_per_class=1"]),
    "lora": ("fedavg-lora", ["--rounds", "1", "-o", "rank=2", "-o", "local_examples=4"]),
    "prompt": ("bdpl", ["--rounds", "1", "-o", "prompt_length=2", "-o", "candidates=6",
                        "-o", "samples=2", "-o", "shots_per_class=2", "-o", "steps_per_round=1"]),
    "proxy": ("fedpt", ["--rounds", "1", "-o", "large=tiny-random", "-o", "rank=2",
                        "-o", "local_examples=4", "-o", "distill_examples=4",
                        "-o", "alpha=2.0"]),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, str]:
    """kind -> a directory `fedsteer run --save` wrote, on the tiny random model."""
    root, saved = tmp_path_factory.mktemp("artifacts"), {}
    for kind, (method, options) in RUNS.items():
        result = CliRunner().invoke(cli, [
            "run", method, "--model", "tiny-random", "--clients", "3", "--test-size", "10",
            *options, "--out", str(root / f"run-{kind}"), "--save", str(root / kind)],
            catch_exceptions=False)
        assert result.exit_code == 0, result.output
        saved[kind] = str(root / kind)
    return saved


@pytest.fixture(scope="module")
def base():
    return load_model("tiny-random")


def serve(base, artifacts: dict[str, str], **limits) -> Server:
    vocab = len(base.tokenizer)
    adaptations = build_adaptations(base, [f"{k}={d}" for k, d in artifacts.items()],
                                    load_model)
    return Server(adaptations, Limits(**{"max_logprobs": vocab, **limits}))


def test_every_artifact_kind_through_the_sdk_equals_its_offline_evaluation(base, artifacts):
    """The acceptance check of issue 18 in small: identical labels, log-probs within 1e-4
    (every token in the top-k here, so no label falls to the floor)."""
    task = load_task("sst2")
    server = serve(base, artifacts)
    with ServerThread(make_app(server)) as url:
        listed = {m.id: m for m in OpenAI(base_url=url, api_key="x").models.list().data}
        assert set(listed) == {"tiny-random", *artifacts}
        for kind, directory in artifacts.items():
            assert listed[kind].kind == kind
            assert listed[kind].method == RUNS[kind][0] and listed[kind].task == "sst2"
            offline = score_artifact(directory, task, None, ROWS, 0, 4)
            box = OpenAIBlackBox(url, kind, top_logprobs=len(base.tokenizer), batch_size=4)
            served = box.label_logprobs([task.spec.format_query(ex) for ex in offline.test],
                                        task.spec.label_words)
            np.testing.assert_allclose(served, offline.scores, atol=1e-4, err_msg=kind)
            assert (served.argmax(1) == offline.scores.argmax(1)).all()


def test_eval_endpoint_scores_a_served_artifact_like_eval_artifact(base, artifacts):
    server = serve(base, {"lora": artifacts["lora"]})
    with ServerThread(make_app(server)) as url:
        args = ["--task", "sst2", "--test-size", str(ROWS)]
        through_http = CliRunner().invoke(cli, ["eval", "--endpoint", f"{url}#lora", *args])
        offline = CliRunner().invoke(cli, ["eval", "--artifact", artifacts["lora"], *args])
    assert through_http.exit_code == 0 and offline.exit_code == 0, through_http.output
    accuracy = [line.split("│")[-3].strip() for line in (through_http.output, offline.output)
                for line in line.splitlines() if "sst2" in line]
    assert accuracy[0] == accuracy[1]


def test_generation_chat_and_streaming_parse_with_the_sdk_types(base, artifacts):
    server = serve(base, {"steering": artifacts["steering"]})
    with ServerThread(make_app(server)) as url:
        client = OpenAI(base_url=url, api_key="x")
        whole = client.completions.create(model="steering", prompt="Review: fine", max_tokens=4,
                                          logprobs=2)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="steering", prompt="Review: fine", max_tokens=4, stream=True))
        assert whole.choices[0].text == streamed and len(whole.choices[0].logprobs.tokens) == 4
        assert whole.usage.completion_tokens == 4
        chat = client.chat.completions.create(model="steering", max_tokens=3, logprobs=True,
                                              top_logprobs=2, messages=[
                                                  {"role": "user", "content": "hello"}])
        assert len(chat.choices[0].logprobs.content) == 3
        assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
        chunks = list(client.chat.completions.create(model="steering", max_tokens=3, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
            chat.choices[0].message.content
        echo = client.completions.create(model="steering", prompt="a b", max_tokens=0, echo=True,
                                         logprobs=1)
        assert echo.choices[0].text == "a b" and echo.choices[0].logprobs.token_logprobs[0] is None


# ------------------------------------------------------------------ safety
def test_an_api_key_is_required_when_set(base):
    server = Server(build_adaptations(base, [], load_model), api_key="s3cret")
    with ServerThread(make_app(server)) as url:
        body = {"model": "tiny-random", "prompt": "x", "max_tokens": 1}
        assert httpx.post(f"{url}/completions", json=body).status_code == 401
        assert httpx.get(f"{url}/models").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{url}/completions", json=body, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/completions", json=body, headers=right).status_code == 200
        assert OpenAI(base_url=url, api_key="s3cret").models.list().data


@pytest.mark.parametrize("body, status, names", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "served: tiny-random"),
    ({"model": "tiny-random", "prompt": []}, 400, "prompt is empty"),
    ({"model": "tiny-random", "prompt": "x", "max_tokens": 10**9}, 400, "--max-tokens"),
    ({"model": "tiny-random", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny-random", "prompt": "x", "n": 99}, 400, "--max-n"),
    ({"model": "tiny-random", "prompt": "x", "logprobs": 21}, 400, "--max-logprobs"),
    ({"model": "tiny-random", "prompt": ["x"] * 65}, 400, "--max-prompts"),
    ({"model": "tiny-random", "prompt": "word " * 3000}, 400, "--max-prompt-tokens"),
    ({"model": "tiny-random", "prompt": [10**9]}, 400, "token id outside"),
    ({"model": "tiny-random", "messages": []}, 400, "messages"),
    ({"prompt": "x"}, 400, "model"),
])
def test_each_limit_is_a_clear_error(base, body, status, names):
    server = Server(build_adaptations(base, [], load_model))
    path = "chat/completions" if "messages" in body else "completions"
    with ServerThread(make_app(server)) as url:
        response = httpx.post(f"{url}/{path}", json=body)
        assert response.status_code == status
        assert names in response.json()["error"]["message"]
        chat = httpx.post(f"{url}/chat/completions", json={
            "model": "tiny-random", "messages": [{"role": "user", "content": "x"}],
            "logprobs": True, "top_logprobs": 21})
        assert chat.status_code == 400 and "--max-logprobs" in chat.text
        big = httpx.post(f"{url}/completions", content=b"x" * 1_000_001)
        assert big.status_code == 413 and "--max-body-bytes" in big.text
        assert httpx.post(f"{url}/completions", content=b"{no").status_code == 400
        assert httpx.post(f"{url}/completions", json={"model": "tiny-random", "prompt": "ok",
                                                     "max_tokens": 1}).status_code == 200


@dataclass
class Gate:
    """An adaptation whose forwards wait until the test opens the gate: holds the engine."""

    opened: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    @contextmanager
    def context(self, rows: int, width: int):
        self.entered.set()
        self.opened.wait(30)
        yield


def gated(base) -> tuple[dict[str, Adaptation], Gate]:
    gate = Gate()

    @dataclass
    class Held(Adaptation):
        @property
        def streams(self):
            return [Stream(self.base, gate.context)]

    adaptations = build_adaptations(base, [], load_model)
    adaptations["held"] = Held("held", base, "test")
    return adaptations, gate


def post_later(url: str, body: dict, results: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(
        httpx.post(f"{url}/completions", json=body, timeout=30)))
    thread.start()
    return thread


def test_a_full_house_is_a_429_and_a_slow_request_a_504_and_the_server_goes_on(base):
    adaptations, gate = gated(base)
    server = Server(adaptations, Limits(max_concurrent=1, timeout_seconds=1.0))
    with ServerThread(make_app(server)) as url:
        results: list = []
        thread = post_later(url, {"model": "held", "prompt": "x", "max_tokens": 1}, results)
        assert gate.entered.wait(10)
        refused = httpx.post(f"{url}/completions", json={"model": "tiny-random", "prompt": "x"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        thread.join(10)
        assert results[0].status_code == 504 and "--timeout" in results[0].text
        gate.opened.set()
        ok = httpx.post(f"{url}/completions", json={"model": "tiny-random", "prompt": "x",
                                                   "max_tokens": 1})
        assert ok.status_code == 200 and server.in_flight == 0


def test_a_client_that_leaves_frees_its_place(base):
    adaptations, gate = gated(base)
    server = Server(adaptations, Limits(max_concurrent=1))
    with ServerThread(make_app(server)) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/completions", json={"model": "held", "prompt": "x"}, timeout=0.5)
        deadline = time.monotonic() + 10
        while server.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.in_flight == 0
        gate.opened.set()
        assert httpx.post(f"{url}/completions", json={"model": "tiny-random", "prompt": "x",
                                                     "max_tokens": 1}).status_code == 200


# ---------------------------------------------------------------- batching
def test_concurrent_requests_for_one_name_share_a_forward_and_get_their_own_answers(base):
    adaptations, gate = gated(base)
    server = Server(adaptations)
    prompts = ["one", "two words", "three words here"]
    with ServerThread(make_app(server)) as url:
        client = OpenAI(base_url=url, api_key="x")
        alone = [client.completions.create(model="tiny-random", prompt=p, max_tokens=3,
                                           logprobs=1) for p in prompts]
        results: list = []
        holder = post_later(url, {"model": "held", "prompt": "x", "max_tokens": 1}, [])
        assert gate.entered.wait(10)
        threads = [post_later(url, {"model": "tiny-random", "prompt": p, "max_tokens": 3,
                                    "logprobs": 1}, results) for p in prompts]
        time.sleep(0.5)  # all three queued behind the held batch
        gate.opened.set()
        for thread in [holder, *threads]:
            thread.join(30)
    assert ("tiny-random", 3) in server.engine.batches
    by_prompt = {json.loads(r.request.content)["prompt"]: r.json() for r in results}
    for prompt, single in zip(prompts, alone, strict=True):
        batched = by_prompt[prompt]["choices"][0]
        assert batched["text"] == single.choices[0].text
        np.testing.assert_allclose(batched["logprobs"]["token_logprobs"],
                                   single.choices[0].logprobs.token_logprobs, atol=1e-4)


def test_mixed_traffic_has_no_cross_talk_and_leaves_no_hooks(base, artifacts):
    """Requests for the base, steering and LoRA at once: each answer equals that name's
    answer alone (it would not if one name's hooks stayed on during another's forward)."""
    names = ["tiny-random", "steering", "lora"]
    server = serve(base, {k: artifacts[k] for k in names[1:]})
    prompt = "Review: a fine film\nSentiment:"
    hooks_at_load = hook_counts(base.model)
    with ServerThread(make_app(server)) as url:
        client = OpenAI(base_url=url, api_key="x")

        def ask(name: str) -> list[float]:
            response = client.completions.create(model=name, prompt=prompt, max_tokens=2,
                                                 logprobs=1)
            return response.choices[0].logprobs.token_logprobs

        alone = {name: ask(name) for name in names}
        assert alone["steering"] != alone["tiny-random"] != alone["lora"]
        with ThreadPoolExecutor(9) as pool:
            mixed = list(pool.map(ask, names * 3))
    for name, got in zip(names * 3, mixed, strict=True):
        np.testing.assert_allclose(got, alone[name], atol=1e-4, err_msg=name)
    assert hook_counts(base.model) == hooks_at_load


def hook_counts(model) -> dict[str, tuple[int, int]]:
    """Forward (pre-)hooks per module: serving adds none for good (loading may, once)."""
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}


def test_an_artifact_made_on_another_model_is_refused(base, artifacts, tmp_path):
    other = build_tiny_random(seed=1)
    other.name = "another-model"
    with pytest.raises(ValueError, match="made on 'tiny-random'"):
        build_adaptations(other, [f"x={artifacts['lora']}"], load_model)
    with pytest.raises(ValueError, match="NAME=DIR"):
        build_adaptations(base, [artifacts["lora"]], load_model)
    with pytest.raises(ValueError, match="already served"):
        build_adaptations(base, [f"tiny-random={artifacts['lora']}"], load_model)


@pytest.mark.parametrize("flag", [["--max-concurrent", "0"], ["--timeout", "0"],
                                  ["--max-tokens", "-1"]])
def test_serve_refuses_a_limit_that_would_refuse_everything(flag):
    result = CliRunner().invoke(cli, ["serve", "--model", "tiny-random", *flag])
    assert result.exit_code == 2  # refused before any model is loaded or port bound


# ------------------------------------------------------------ issue 44: stop strings
def sdk_answers(client: OpenAI, chat: bool, **request) -> tuple[tuple[str, str], ...]:
    """(text, finish_reason) whole and streamed, for one request."""
    if chat:
        whole = client.chat.completions.create(**request).choices[0]
        chunks = list(client.chat.completions.create(**request, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        return (whole.message.content, whole.finish_reason), \
            (streamed, chunks[-1].choices[0].finish_reason)
    whole = client.completions.create(**request).choices[0]
    chunks = list(client.completions.create(**request, stream=True))
    return (whole.text, whole.finish_reason), \
        ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)


def stops_across(text: str, rng: np.random.Generator, count: int) -> list[str]:
    """Substrings of an answer at random places: most begin in one token and end in another."""
    found = {text[start : start + size] for start in range(len(text)) for size in (2, 3, 5)}
    return sorted(rng.choice(sorted(found), size=min(count, len(found)), replace=False))


def test_a_stream_says_exactly_what_the_whole_answer_says_for_every_stop(base):
    """Issue 44's cases (the old stream sent ' is' for stop 's i', ' is' for ' is is' and
    '\\n\\n' for a chat stop '\\n\\n\\n', where the whole answers are ' i', '' and ''), then
    stops cut from greedy and sampled answers (multi-byte characters included)."""
    server = Server(build_adaptations(base, [], load_model))
    rng = np.random.default_rng(0)
    prompt, chat = "The capital of France is", [{"role": "user", "content": "The capital of "
                                                                            "France is"}]
    with ServerThread(make_app(server)) as url:
        client = OpenAI(base_url=url, api_key="x")
        ask = {"model": "tiny-random", "temperature": 0, "max_tokens": 12}
        cases = [(False, {**ask, "prompt": prompt, "stop": ["s i"]}, " i"),
                 (False, {**ask, "prompt": prompt, "stop": [" is is"]}, ""),
                 (True, {**ask, "messages": chat, "stop": ["\n\n\n"]}, "")]
        for is_chat, request, text in cases:
            whole, streamed = sdk_answers(client, is_chat, **request)
            assert whole == streamed == (text, "stop"), request["stop"]
        for is_chat, request in [(False, {**ask, "prompt": prompt}),
                                 (False, {**ask, "prompt": prompt, "temperature": 1.5,
                                          "seed": 3}),
                                 (False, {**ask, "prompt": "日本語 😀", "temperature": 1.5,
                                          "seed": 5}),
                                 (True, {**ask, "messages": chat, "temperature": 1.5,
                                         "seed": 7})]:
            full, _ = sdk_answers(client, is_chat, **request)
            for stop in stops_across(full[0], rng, 12):
                whole, streamed = sdk_answers(client, is_chat, **request, stop=[stop])
                assert whole == streamed and whole[0] == full[0][: full[0].index(stop)], stop


@pytest.mark.parametrize("echo", [False, True])
def test_a_stream_of_several_prompts_keeps_each_under_its_own_index(base, echo):
    """Every row's tokens went out as choice 0, and an echoed prompt not at all."""
    server = Server(build_adaptations(base, [], load_model))
    ask = {"model": "tiny-random", "prompt": ["a b", "c d e", "The capital of France is"],
           "max_tokens": 4, "echo": echo}
    with ServerThread(make_app(server)) as url:
        client = OpenAI(base_url=url, api_key="x")
        whole = client.completions.create(**ask)
        texts, reasons = ["", "", ""], [None, None, None]
        for chunk in client.completions.create(**ask, stream=True):
            texts[chunk.choices[0].index] += chunk.choices[0].text
            reasons[chunk.choices[0].index] = chunk.choices[0].finish_reason or \
                reasons[chunk.choices[0].index]
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert reasons == ["length"] * 3


# ------------------------------------------------------------ issue 44: bodies
FINITE = "must be a finite number"
NUMERIC = {"completions": ["temperature", "top_p", "n", "max_tokens", "logprobs", "seed"],
           "chat/completions": ["temperature", "top_p", "n", "max_tokens",
                                "max_completion_tokens", "top_logprobs", "seed"]}
ORDINARY = {"completions": '"model": "tiny-random", "prompt": "x"',
            "chat/completions": '"model": "tiny-random", "messages": '
                                '[{"role": "user", "content": "x"}]'}


def malformed_bodies() -> list[tuple[str, bytes, str]]:
    cases = [("completions", b'[{"model": "tiny-random", "prompt": "x"}]',
              "the request body must be a JSON object"),
             ("chat/completions", b'"hello"', "the request body must be a JSON object"),
             ("completions", b"[" * 100_000, "not valid JSON"),
             ("completions", b'{"model": "tiny-random", "prompt": [1, NaN]}', f"prompt.1 {FINITE}"),
             ("completions", b'{"model": "tiny-random", "prompt": "x", "temperature": "NaN"}',
              f"temperature: {FINITE}")]
    for path, fields in NUMERIC.items():
        for name in fields:
            for value in ("NaN", "Infinity", "-Infinity", "1e999"):
                body = f'{{{ORDINARY[path]}, "{name}": {value}}}'.encode()
                cases.append((path, body, f"{name} {FINITE}"))
    return cases


@pytest.mark.parametrize("path, content, message", malformed_bodies())
def test_a_malformed_body_is_a_400_that_names_what_is_wrong(base, path, content, message):
    """Was "None: Input should be a valid dictionary" for an array and "should be ≤ 2"
    for a NaN temperature (and a 500 for deep nesting)."""
    server = Server(build_adaptations(base, [], load_model))
    with ServerThread(make_app(server)) as url:
        response = httpx.post(f"{url}/{path}", content=content)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_every_other_field_is_bounded_and_one_request_cannot_fail_another(base):
    """A seed past int64 failed its whole batch with a 500 (torch's generator overflows),
    as could a temperature so small that every score divided into -inf; stop lists were
    unbounded (each stop is searched after every token)."""
    server = Server(build_adaptations(base, [], load_model))
    ok = {"model": "tiny-random", "prompt": "The capital of France is", "max_tokens": 3}
    with ServerThread(make_app(server)) as url:
        def post(**fields) -> httpx.Response:
            return httpx.post(f"{url}/completions", json={**ok, **fields}, timeout=30)

        for fields, names in [({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop"),
                              ({"stop": "x" * 257}, "at most 256 characters"),
                              ({"seed": 2**63, "temperature": 1}, "seed"),
                              ({"seed": -(2**63) - 1, "temperature": 1}, "seed")]:
            response = post(**fields)
            assert response.status_code == 400 and names in response.text, fields
            assert response.json()["error"]["param"] == next(iter(fields))
        greedy = post(temperature=0).json()["choices"][0]["text"]
        for fields in ({"seed": 2**63 - 1, "temperature": 1}, {"seed": -(2**63), "temperature": 1},
                       {"temperature": 5e-324}, {"stop": ["a", "b", "c", "d"]}):
            assert post(**fields).status_code == 200, fields
        assert post(temperature=5e-324).json()["choices"][0]["text"] == greedy


# ------------------------------------------------------------ issue 42: serve bounds
def test_echoed_log_probs_are_bounded_per_request(base):
    """`echo` with `logprobs` answers (1 + top-k) entries per prompt token, every prompt × n
    of them: over --max-echo-tokens it is refused by name (was unbounded)."""
    server = Server(build_adaptations(base, [], load_model), Limits(max_echo_tokens=40))
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen " * 2
    tokens = len(base.tokenizer(prompt)["input_ids"])
    assert 20 < tokens <= 40
    ask = {"model": "tiny-random", "prompt": prompt, "max_tokens": 0, "echo": True}
    with ServerThread(make_app(server)) as url:
        refused = httpx.post(f"{url}/completions", json={**ask, "logprobs": 1, "n": 2})
        assert refused.status_code == 400 and "--max-echo-tokens" in refused.text
        assert refused.json()["error"]["param"] == "echo"
        one = httpx.post(f"{url}/completions", json={**ask, "logprobs": 1})
        assert one.status_code == 200
        assert len(one.json()["choices"][0]["logprobs"]["tokens"]) == tokens
        no_logprobs = httpx.post(f"{url}/completions", json={**ask, "n": 2})
        assert no_logprobs.status_code == 200


def test_a_request_wider_than_max_batch_rows_runs_in_parts(base):
    server = Server(build_adaptations(base, [], load_model), max_batch_rows=2)
    prompts = ["one", "two words", "three words here", "four", "five five"]
    with ServerThread(make_app(server)) as url:
        client = OpenAI(base_url=url, api_key="x")
        alone = [client.completions.create(model="tiny-random", prompt=p, max_tokens=3).choices[0]
                 .text for p in prompts]
        together = client.completions.create(model="tiny-random", prompt=prompts, max_tokens=3)
    assert [c.text for c in sorted(together.choices, key=lambda c: c.index)] == alone
    assert max(rows for _, rows in server.engine.batches) == 2


class OwnedLock:
    """A lock that knows which thread holds it (`threading.Lock` only knows that one does)."""

    def __init__(self) -> None:
        self._lock, self.owner = threading.Lock(), None

    def __enter__(self) -> OwnedLock:
        self._lock.acquire()
        self.owner = threading.get_ident()
        return self

    def __exit__(self, *exc) -> None:
        self.owner = None
        self._lock.release()


class LockedOnly:
    """A tokenizer that notes every use by a thread that does not hold `lock`."""

    def __init__(self, tokenizer, lock: OwnedLock) -> None:
        self._tokenizer, self._lock, self.unlocked = tokenizer, lock, []

    def _check(self, what: str) -> None:
        if self._lock.owner != threading.get_ident():
            self.unlocked.append((what, threading.current_thread().name))

    def __getattr__(self, name: str):
        self._check(name)
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        self._check("__call__")
        return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        self._check("__len__")
        return len(self._tokenizer)


def test_the_tokenizer_is_only_used_under_the_engine_lock(base, artifacts, monkeypatch):
    """Concurrent traffic of every shape for a prompt artifact and the base: HF tokenizers
    are not safe across threads, and the prompt's prefix was tokenized outside the lock
    (sporadic 500s), as were the vocabulary size and EOS/pad ids."""
    server = serve(base, {"prompt": artifacts["prompt"]})
    lock = server.engine.tokenizer_lock = OwnedLock()
    guard = LockedOnly(base.tokenizer, lock)
    monkeypatch.setattr(base, "tokenizer", guard)
    chat = [{"role": "user", "content": "Review: fine"}]
    with ServerThread(make_app(server)) as url:
        client = OpenAI(base_url=url, api_key="x")

        def ask(i: int) -> str:
            name = ("prompt", "tiny-random")[i % 2]
            shape = i // 2 % 5
            if shape == 0:
                return client.completions.create(model=name, prompt="Review: fine",
                                                  max_tokens=2, logprobs=2, echo=True
                                                  ).choices[0].text
            if shape == 1:
                return client.completions.create(model=name, prompt=[[40, 41, 42], [43]],
                                                  max_tokens=2).choices[0].text
            if shape == 2:
                return client.chat.completions.create(model=name, messages=chat, max_tokens=2,
                                                       logprobs=True, top_logprobs=1
                                                       ).choices[0].message.content
            if shape == 3:
                return "".join(c.choices[0].text for c in client.completions.create(
                    model=name, prompt="Review: dull", max_tokens=3, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model=name, messages=chat,
                                                          max_tokens=3, stream=True))

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(40)))
    assert len(answers) == 40
    assert guard.unlocked == []


class Python310Asyncio:
    """`asyncio` as Python 3.10 has it: `wait_for` times out with `asyncio.TimeoutError`,
    which there is not the builtin `TimeoutError` (they are one class from 3.11)."""

    class TimeoutError(Exception):  # noqa: A001 - the name asyncio gave it
        pass

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    async def wait_for(self, awaitable, timeout):
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError as error:
            raise Python310Asyncio.TimeoutError() from error


def test_a_stream_that_times_out_says_so_on_python_3_10(base, monkeypatch):
    """The stream caught the builtin TimeoutError, which 3.10's asyncio does not raise: the
    stream broke off without its 504 event."""
    from fedsteer.serve import api

    monkeypatch.setattr(api, "asyncio", Python310Asyncio())
    adaptations, gate = gated(base)
    server = Server(adaptations, Limits(timeout_seconds=1.0))
    with ServerThread(make_app(server)) as url:
        received = ""
        try:
            with httpx.stream("POST", f"{url}/completions", json={
                    "model": "held", "prompt": "x", "max_tokens": 2, "stream": True},
                    timeout=20) as response:
                for text in response.iter_text():
                    received += text
        except httpx.HTTPError:
            pass  # the old stream broke off here
        gate.opened.set()
        assert "--timeout" in received and '"code": 504' in received
        deadline = time.monotonic() + 10
        while server.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.in_flight == 0


def test_a_body_that_never_finishes_arriving_is_a_408(base):
    """A client that sends its body a byte at a time (or stops) held its connection and up
    to --max-body-bytes of memory for good: the body now has --timeout to arrive."""
    server = Server(build_adaptations(base, [], load_model), Limits(timeout_seconds=1.0))
    with ServerThread(make_app(server)) as url:
        port = int(url.split(":")[-1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
            started = time.monotonic()
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and b"--timeout" in answer
        assert time.monotonic() - started < 10
        ok = httpx.post(f"{url}/completions", json={"model": "tiny-random", "prompt": "x",
                                                   "max_tokens": 1})
        assert ok.status_code == 200 and server.in_flight == 0
