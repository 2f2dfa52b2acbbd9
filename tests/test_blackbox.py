"""Black boxes: local scoring and billing, `fedsteer serve` via the openai SDK, HTTP failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from openai import OpenAI

from fedsteer.blackbox import BlackBoxError, LocalBlackBox, OpenAIBlackBox, score_label_words
from fedsteer.models.scoring import LabelScorer
from fedsteer.serve import Limits, Server, build_adaptations, make_app
from http_server import ServerThread, free_port

WORDS = (" negative", " positive")
PROMPTS = ["Review: lovely film\nSentiment:", "Review: a mess\nSentiment:"]
PREFIXES = ["Definition: film words here\n", "Definition: a\n",
            "Definition: a much longer sampled prompt of many words\n"]


def test_local_black_box_scores_like_the_scorer_and_bills_each_query(tiny_lm):
    box = LocalBlackBox(tiny_lm, batch_size=2)
    prefix = "Review: great\nSentiment: positive\n\n"
    scores = box.label_logprobs(PROMPTS, WORDS, prefix=prefix)
    expected = LabelScorer(tiny_lm, WORDS).score(PROMPTS, prefix=prefix).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    tokens = sum(len(tiny_lm.tokenizer(prefix + p)["input_ids"]) for p in PROMPTS)
    assert box.usage.to_dict() == {"calls": 2, "prompt_tokens": tokens,
                                   "completion_tokens": 2, "cache_hits": 0}
    again = box.label_logprobs(PROMPTS, WORDS, prefix=prefix)  # the exact same requests
    np.testing.assert_array_equal(again, scores)
    assert box.usage.calls == 2 and box.usage.cache_hits == 2


def test_a_label_word_is_scored_by_the_top_token_that_begins_it():
    top = {" pos": -0.5, " p": -0.2, " neg": -2.0, " the": -1.0}
    np.testing.assert_allclose(score_label_words(top, (" positive", " negative", " maybe")),
                               [-0.5, -2.0, -3.0])  # the longest start; absent: min(top) - 1
    with pytest.raises(BlackBoxError, match="no top log-probs"):
        score_label_words({}, WORDS)


def test_fedsteer_serve_answers_the_openai_sdk_and_matches_the_local_box(tiny_lm):
    server = Server(build_adaptations(tiny_lm, [], None),
                    Limits(max_logprobs=len(tiny_lm.tokenizer)))
    with ServerThread(make_app(server)) as url:
        client = OpenAI(base_url=url, api_key="none")
        assert client.models.list().data[0].id == "tiny-random"
        completion = client.completions.create(model="tiny-random", prompt=PROMPTS,
                                               max_tokens=2, logprobs=3)
        assert len(completion.choices) == 2
        assert len(completion.choices[0].logprobs.tokens) == 2
        assert len(completion.choices[0].logprobs.top_logprobs[0]) <= 3
        # with every token in the top-k, the HTTP box equals the local one
        remote = OpenAIBlackBox(url, "tiny-random", top_logprobs=len(tiny_lm.tokenizer),
                                batch_size=1, max_concurrency=2)
        local = LocalBlackBox(tiny_lm)
        np.testing.assert_allclose(remote.label_logprobs(PROMPTS, WORDS),
                                   local.label_logprobs(PROMPTS, WORDS), atol=1e-4)
        # billing equals what the server logged for those requests
        logged = list(server.requests)[-2:]
        assert remote.usage.calls == 2
        assert remote.usage.prompt_tokens == sum(r["prompt_tokens"] for r in logged)
        assert remote.usage.completion_tokens == sum(r["completion_tokens"] for r in logged)
        # a batch of prefixes is in flight together and comes back request by request
        requests = [(prefix, PROMPTS[::-1][: i + 1]) for i, prefix in enumerate(PREFIXES)]
        for got, (prefix, rows) in zip(remote.label_logprobs_many(requests, WORDS), requests,
                                       strict=True):
            np.testing.assert_allclose(got, local.label_logprobs(rows, WORDS, prefix=prefix),
                                       atol=1e-4)


def misbehaving_app(mode: str, hits: list) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    def completions(body: dict):
        hits.append(body["prompt"])
        if mode == "500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if mode == "malformed":
            return PlainTextResponse("{not json", media_type="application/json")
        if mode == "slow":
            time.sleep(3)
        if mode == "second-fails" and len(hits) > 1:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        logprobs = None if mode == "no-logprobs" else {
            "tokens": [" pos"], "token_logprobs": [-0.1], "top_logprobs": [{" pos": -0.1}],
            "text_offset": [0]}
        return {"id": "x", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": i, "text": " pos", "finish_reason": "length",
                             "logprobs": logprobs} for i in range(len(body["prompt"]))],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}

    return app


@pytest.mark.parametrize("mode, message", [
    ("500", "InternalServerError"), ("malformed", "bad response after 3 tries.*Expecting"),
    ("no-logprobs", "bad response after 3 tries.*has no logprobs"), ("slow", "Timeout"),
])
def test_http_failures_give_clear_errors_after_retries(mode, message):
    hits: list = []
    with ServerThread(misbehaving_app(mode, hits)) as url:
        box = OpenAIBlackBox(url, "m", retries=2, timeout=1.0, batch_size=2)
        with pytest.raises(BlackBoxError, match=message):
            box.label_logprobs(PROMPTS, WORDS)
    assert len(hits) == 3  # the first try and two retries, whatever went wrong


def test_an_error_loses_no_finished_work():
    hits: list = []
    with ServerThread(misbehaving_app("second-fails", hits)) as url:
        box = OpenAIBlackBox(url, "m", retries=0, batch_size=1, max_concurrency=1)
        with pytest.raises(BlackBoxError):
            box.label_logprobs(PROMPTS, WORDS)
        assert box.usage.calls == 1  # the first batch was answered and billed
        scores = box.label_logprobs(PROMPTS[:1], WORDS)  # ... and is served from the cache
        assert box.usage.cache_hits == 1 and len(hits) == 2
        np.testing.assert_allclose(scores[0], [-1.1, -0.1])


@pytest.mark.slow
def test_the_serve_command_runs_and_stops_by_pid():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fedsteer.cli", "serve", "--model", "tiny-random",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), 0.5):
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.completions.create(model="tiny-random", prompt="Hi", max_tokens=1,
                                          logprobs=2)
        assert reply.usage.completion_tokens == 1
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
    assert process.returncode is not None


def test_different_prefixes_scored_together_equal_each_prefix_alone(tiny_lm):
    scorer = LabelScorer(tiny_lm, WORDS, batch_size=3)  # batches mix the prefixes' rows
    queries = [*PROMPTS, "Review: an utterly long and winding plot\nSentiment:"]
    requests = [(prefix, queries[: i + 1]) for i, prefix in enumerate(PREFIXES)]
    together = scorer.score_prefixed(requests)
    for (prefix, rows), scores in zip(requests, together, strict=True):
        alone = scorer.score(rows, prefix=prefix)
        assert scores.shape == alone.shape
        np.testing.assert_allclose(scores.numpy(), alone.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", [True, False])
def test_a_batch_of_prefixes_is_billed_and_cached_as_asking_them_in_turn(tiny_lm, cache):
    requests = [(PREFIXES[0], PROMPTS), (PREFIXES[1], PROMPTS[:1]), (PREFIXES[0], PROMPTS),
                (PREFIXES[2], PROMPTS + PROMPTS[:1])]  # a repeated request, a repeated row
    in_turn = LocalBlackBox(tiny_lm, batch_size=2, cache=cache, batch_prefixes=False)
    together = LocalBlackBox(tiny_lm, batch_size=2, cache=cache)
    for box in (in_turn, together):
        box.label_logprobs(PROMPTS, WORDS, prefix=PREFIXES[1])  # one row cached before
    expected = [in_turn.label_logprobs(rows, WORDS, prefix=prefix) for prefix, rows in requests]
    scores = together.label_logprobs_many(requests, WORDS)
    for a, b in zip(scores, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert together.usage.to_dict() == in_turn.usage.to_dict()
    # cached: the second request's row and the third request's two; the last request's
    # repeated row is asked twice, as within any one request
    assert together.usage.cache_hits == (3 if cache else 0)
    assert together.usage.calls == (2 + 2 + 3 if cache else 2 + 2 + 1 + 2 + 3)
