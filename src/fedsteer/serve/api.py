"""The HTTP face of `fedsteer serve`: OpenAI's `/v1/models`, `/v1/completions` and
`/v1/chat/completions`, bounded so that no request can spoil the service for others.

Every limit is checked before a request reaches the engine, and answered with a 400 that
names it; a full house is a 429 with Retry-After, never a queue without end; a body has
`timeout_seconds` to arrive, and a request that outlives them, or whose client goes away,
is cancelled at the engine's next forward (between prompt chunks and between tokens).
With an API key, every path needs `Authorization: Bearer <key>` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from fedsteer.serve import protocol
from fedsteer.serve.adaptations import Adaptation, prompt_query_ids
from fedsteer.serve.engine import Answer, Engine, Job, Row
from fedsteer.serve.protocol import ApiError, ChatRequest, CompletionRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask; each is a `fedsteer serve` option of the same name."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 2048
    max_tokens: int = 256
    max_n: int = 4
    max_prompts: int = 64  # prompts in one completions request
    max_logprobs: int = 20  # top-k of `logprobs` / `top_logprobs`
    max_echo_tokens: int = 16_384  # prompt tokens echoed with log-probs, over a request's rows
    max_concurrent: int = 32  # requests in flight; one more is a 429
    timeout_seconds: float = 60.0


@dataclass
class Server:
    """The served names, their engine, the limits, and what is in flight."""

    adaptations: dict[str, Adaptation]
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    max_batch_rows: int = 32
    batch_window_seconds: float = 0.005
    in_flight: int = 0
    requests: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def __post_init__(self) -> None:
        self.engine = Engine(self.adaptations, self.max_batch_rows, self.batch_window_seconds)

    def adaptation(self, name: str) -> Adaptation:
        if name not in self.adaptations:
            raise ApiError(404, f"model {name!r} is not served here; served: "
                           f"{', '.join(self.adaptations)}", "model", "model_not_found")
        return self.adaptations[name]

    def admit(self) -> None:
        if self.in_flight >= self.limits.max_concurrent:
            raise ApiError(429, f"{self.in_flight} requests in flight, the limit "
                           f"(--max-concurrent) is {self.limits.max_concurrent}; retry shortly",
                           kind="rate_limit_error", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def make_app(server: Server) -> FastAPI:
    app = FastAPI(title="fedsteer serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Authentication, api_key=server.api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}",
                                     kind="server_error").body(), 500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(a) for a in server.adaptations.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return model_card(server.adaptation(name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest, server.limits)
        return await answer(server, request, body, completion_rows, CompletionView)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatRequest, server.limits)
        return await answer(server, request, body, chat_rows, ChatView)

    app.router.on_shutdown.append(server.engine.close)
    return app


def model_card(adaptation: Adaptation) -> dict[str, Any]:
    return {"id": adaptation.name, "object": "model", "created": 0, "owned_by": "fedsteer",
            "kind": adaptation.kind, **adaptation.info}


class Authentication:
    """Every request carries the key, when the server has one (plain ASGI, so streams and
    disconnects pass through untouched)."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app, self.expected = app, (f"Bearer {api_key}".encode() if api_key else None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.expected is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "a valid API key is required: Authorization: Bearer "
                                 "<key>", kind="authentication_error")
                await JSONResponse(error.body(), 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------ parsing
async def parse(request: Request, model, limits: Limits):
    """The body, read up to the size limit, as JSON, as the endpoint's request type."""
    try:
        raw = await asyncio.wait_for(read_body(request, limits), limits.timeout_seconds)
    except asyncio.TimeoutError as error:  # a body sent a byte at a time holds its memory
        raise ApiError(408, f"the body did not arrive within {limits.timeout_seconds:g} s "
                       "(--timeout)", kind="timeout") from error
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as error:  # RecursionError: nested without end
        raise ApiError(400, f"the body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object ({...}), got a JSON "
                       f"{_json_kind(data)}")
    where = non_finite(data)
    if where is not None:
        raise ApiError(400, f"{where} must be a finite number (NaN and Infinity are not "
                       "JSON)", where)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from error


async def read_body(request: Request, limits: Limits) -> bytearray:
    """The body, refused (413) as soon as it is over the size limit."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
        raise ApiError(413, f"the body is over the limit of {limits.max_body_bytes} bytes "
                       "(--max-body-bytes)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise ApiError(413, f"the body is over the limit of {limits.max_body_bytes} bytes "
                           "(--max-body-bytes)")
    return raw


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def non_finite(data: Any) -> str | None:
    """The path of the first NaN or ±Infinity in parsed JSON (Python's `json` reads them,
    and 1e999 as Infinity), or None; iterative, so any depth `json` parsed is fine."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path or "the request body"
        children = value.items() if isinstance(value, dict) else \
            enumerate(value) if isinstance(value, list) else ()
        pending += [(f"{path}.{key}" if path else str(key), child) for key, child in children]
    return None


def validation_error(error: ValidationError) -> ApiError:
    """The first problem, naming its field as the body spells it."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or None
    message = (str(first["ctx"]["error"]) if first["type"] == "value_error"
               else "must be a finite number" if first["type"] == "finite_number"
               else first["msg"])
    return ApiError(400, f"{where or 'the request body'}: {message}", where)


def check_common(body, limits: Limits, max_tokens: int, top: int | None) -> None:
    """The limits both endpoints share, each named in its error."""
    for name, value, limit in (("max_tokens", max_tokens, limits.max_tokens),
                               ("n", body.n, limits.max_n),
                               ("logprobs", top or 0, limits.max_logprobs)):
        if value > limit:
            flag = {"max_tokens": "--max-tokens", "n": "--max-n"}.get(name, "--max-logprobs")
            raise ApiError(400, f"{name} = {value} is over this server's limit of {limit} "
                           f"({flag})", name)
    if body.top_p not in (None, 1.0):
        raise ApiError(400, "top_p is not supported (use temperature)", "top_p")
    if body.stream and body.n > 1:
        raise ApiError(400, "stream with n > 1 is not supported", "n")


def check_echo(rows: list[Row], limits: Limits) -> None:
    """The answer holds (1 + top-k) entries per echoed token: bounded per request."""
    echoed = sum(row.prompt_tokens for row in rows if row.echo_logprobs)
    if echoed > limits.max_echo_tokens:
        raise ApiError(400, f"echo with logprobs over {echoed} prompt tokens (all prompts × "
                       f"n), over this server's limit of {limits.max_echo_tokens} "
                       "(--max-echo-tokens)", "echo")


def check_prompt_tokens(ids: list[int], limits: Limits, vocab: int, param: str) -> None:
    if not ids:
        raise ApiError(400, f"{param} is empty", param)
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"{param} has {len(ids)} tokens, over this server's limit of "
                       f"{limits.max_prompt_tokens} (--max-prompt-tokens)", param)
    if any(not 0 <= token < vocab for token in ids):
        raise ApiError(400, f"{param} holds a token id outside 0..{vocab - 1}", param)


# ------------------------------------------------------------------- rows
@dataclass
class Prepared:
    """A request turned into engine rows, with what its answer needs to say."""

    rows: list[Row]
    texts: list[str]  # each row's prompt text (echo, offsets)
    max_tokens: int
    top: int | None
    echo: bool = False


def completion_rows(server: Server, adaptation: Adaptation, body: CompletionRequest
                    ) -> Prepared:
    limits, tokenizer = server.limits, adaptation.base.tokenizer
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ApiError(400, "prompt is empty", "prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"{len(prompts)} prompts, over this server's limit of "
                       f"{limits.max_prompts} per request (--max-prompts)", "prompt")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    check_common(body, limits, max_tokens, body.logprobs)
    rows, texts = [], []
    for prompt in prompts:
        with server.engine.tokenizer_lock:  # every use of the tokenizer, prefix included
            if isinstance(prompt, str):
                ids, text = prompt_query_ids(adaptation, prompt), prompt
            else:
                ids, text = list(prompt), tokenizer.decode(prompt)
            prefix, vocab = adaptation.prefix_ids, len(tokenizer)
        check_prompt_tokens(ids, limits, vocab, "prompt")
        for _ in range(body.n):
            rows.append(Row(prefix + ids, len(ids), max_tokens, body.logprobs,
                            body.echo, body.temperature or 0.0, body.seed, body.stops()))
            texts.append(text)
    check_echo(rows, limits)
    return Prepared(rows, texts, max_tokens, body.logprobs, body.echo)


def chat_rows(server: Server, adaptation: Adaptation, body: ChatRequest) -> Prepared:
    limits = server.limits
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = limits.max_tokens if requested is None else requested
    top = (body.top_logprobs or 0) if body.logprobs else None
    check_common(body, limits, max_tokens, top)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    with server.engine.tokenizer_lock:
        ids = chat_prompt_ids(adaptation.base.tokenizer, messages)
        prefix, vocab = adaptation.prefix_ids, len(adaptation.base.tokenizer)
    check_prompt_tokens(ids, limits, vocab, "messages")
    row = Row(prefix + ids, len(ids), max_tokens, top, False,
              body.temperature or 0.0, body.seed, body.stops())
    return Prepared([row] * body.n, [""] * body.n, max_tokens, top)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The model's own chat template; a plain "role: text" transcript for a model without one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


# ---------------------------------------------------------------- answering
async def answer(server: Server, request: Request, body, prepare, view):
    """Admit, prepare, run, answer: the whole life of one request."""
    adaptation = server.adaptation(body.model)
    server.admit()
    slot = Slot(server)
    try:
        prepared = await asyncio.to_thread(prepare, server, adaptation, body)
        if body.stream:
            stream = view.stream(server, request, body, prepared, slot)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     background=BackgroundTask(slot.release))
        answers = await run(server, request, Job(body.model, prepared.rows, None))
    except BaseException:
        slot.release()
        raise
    slot.release()
    log_request(server, body.model, prepared, answers)
    return view.whole(body, prepared, answers)


class Slot:
    """One admitted request's place, given back exactly once however the request ends."""

    def __init__(self, server: Server) -> None:
        self.server, self.held = server, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.server.release()


async def run(server: Server, request: Request, job: Job) -> list[Answer]:
    """The job's answers, or a 504 at the time limit; a client gone cancels it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    job.on_done = lambda answers, error: loop.call_soon_threadsafe(
        _settle, future, answers, error)
    server.engine.submit(job)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=server.limits.timeout_seconds,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if future in done:
        return future.result()
    job.cancelled.set()
    if gone in done:
        raise ApiError(499, "the client closed the request")
    raise ApiError(504, f"no answer within {server.limits.timeout_seconds:g} s (--timeout)",
                   kind="timeout")


def _settle(future: asyncio.Future, answers, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(answers)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def log_request(server: Server, model: str, prepared: Prepared, answers: list[Answer]) -> None:
    """What each request cost, as billed (what a client's own accounting is checked against)."""
    used = billed(prepared, answers)
    server.requests.append({"model": model, "prompts": len(prepared.rows),
                            "prompt_tokens": used["prompt_tokens"],
                            "completion_tokens": used["completion_tokens"]})


def billed(prepared: Prepared, answers: list[Answer]) -> dict[str, int]:
    return protocol.usage(sum(r.prompt_tokens for r in prepared.rows),
                          sum(len(a.tokens) for a in answers))


class CompletionView:
    @staticmethod
    def whole(body: CompletionRequest, prepared: Prepared, answers: list[Answer]):
        choices = [protocol.completion_choice(i, a, text, prepared.echo, prepared.top is not None)
                   for i, (a, text) in enumerate(zip(answers, prepared.texts, strict=True))]
        return protocol.completion(protocol.new_id("cmpl"), body.model, choices,
                                   billed(prepared, answers))

    @staticmethod
    def stream(server, request, body, prepared, slot) -> AsyncIterator[str]:
        def chunk(ident, index, text, token, reason):
            return protocol.completion_chunk(ident, body.model, index, text, token, reason)

        def opening(ident):  # echo: each prompt first, as the whole answer begins with it
            return [chunk(ident, i, text, None, None) for i, text in enumerate(prepared.texts)
                    ] if prepared.echo else []

        return event_stream(server, slot, body.model, prepared, chunk, "cmpl", opening)


class ChatView:
    @staticmethod
    def whole(body: ChatRequest, prepared: Prepared, answers: list[Answer]):
        choices = [protocol.chat_choice(i, a, prepared.top is not None)
                   for i, a in enumerate(answers)]
        return protocol.chat_completion(protocol.new_id("chatcmpl"), body.model, choices,
                                        billed(prepared, answers))

    @staticmethod
    def stream(server, request, body, prepared, slot) -> AsyncIterator[str]:
        def chunk(ident, index, text, token, reason):
            delta = {"content": text} if text or token else {}
            return protocol.chat_chunk(ident, body.model, index, delta, token, reason)

        def opening(ident):
            return [protocol.chat_chunk(ident, body.model, 0, {"role": "assistant",
                                                               "content": ""}, None, None)]

        return event_stream(server, slot, body.model, prepared, chunk, "chatcmpl", opening)


async def event_stream(server: Server, slot: Slot, model: str, prepared: Prepared,
                       chunk, prefix: str, opening) -> AsyncIterator[str]:
    """Server-sent events, a token at a time (each row under its own choice index), then
    `[DONE]`; the admission slot is held until the stream ends, and a reader who leaves
    cancels the job."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(model, prepared.rows, lambda answers, error: loop.call_soon_threadsafe(
        events.put_nowait, (None, answers, error)),
        lambda row, token, text: loop.call_soon_threadsafe(
            events.put_nowait, (row, token, text)))
    ident, deadline = protocol.new_id(prefix), loop.time() + server.limits.timeout_seconds
    server.engine.submit(job)
    try:
        for payload in opening(ident):
            yield _sse(payload)
        while True:
            row, first, second = await asyncio.wait_for(events.get(), deadline - loop.time())
            if row is not None:
                yield _sse(chunk(ident, row, second, first, None))
                continue
            if second is not None:
                yield _sse(ApiError(500, f"internal error: {type(second).__name__}",
                                    kind="server_error").body())
            else:
                log_request(server, model, prepared, first)
                for index, ended in enumerate(first):
                    yield _sse(chunk(ident, index, "", None, ended.finish_reason))
            yield "data: [DONE]\n\n"
            return
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        yield _sse(ApiError(504, "no answer within the time limit (--timeout)",
                            kind="timeout").body())
    finally:
        job.cancelled.set()
        slot.release()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
