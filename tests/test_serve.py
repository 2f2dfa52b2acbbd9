"""`fedsteer serve` (issue 18): every artifact kind through the openai SDK equals its offline
evaluation; authentication; each limit; batching; no cross-talk between served names."""

from __future__ import annotations

import json
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
    leftover = [m for m in base.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not leftover


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
