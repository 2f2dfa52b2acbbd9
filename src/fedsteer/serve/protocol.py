"""The OpenAI wire format: requests as pydantic models, answers as the dicts the `openai`
SDK's own types parse (`Completion`, `ChatCompletion` and their stream chunks)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedsteer.serve.engine import Answer, Token

MAX_STOPS = 4  # stop sequences per request, as OpenAI's API allows
MAX_STOP_CHARS = 256  # each is searched for, and partly held back, after every token
INT64 = 2**63  # a seed is an int64, as OpenAI's; torch's generator takes no more


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape; `param` names the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


class _Request(BaseModel):
    """Fields both endpoints share; unknown fields are ignored, as OpenAI's servers do.
    Numbers are finite (`"NaN"` is refused as such, not as out of range)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(len(text) > MAX_STOP_CHARS for text in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return stop

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts of a multi-part content; other parts refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)


# ------------------------------------------------------------------ answers
def _head(kind: str, model: str, ident: str) -> dict[str, Any]:
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[Token], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, text offsets from `offset`."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else t.top for t in tokens],
            "text_offset": offsets}


def completion_choice(index: int, answer: Answer, prompt_text: str, echo: bool,
                      with_logprobs: bool) -> dict[str, Any]:
    tokens = [*answer.prompt, *answer.tokens] if echo else answer.tokens
    text = (prompt_text if echo else "") + answer.text
    return {"index": index, "text": text, "finish_reason": _reason(answer.finish_reason),
            "logprobs": completion_logprobs(tokens, 0 if echo else len(prompt_text))
            if with_logprobs else None}


def completion(ident: str, model: str, choices: list[dict], used: dict) -> dict[str, Any]:
    return {**_head("text_completion", model, ident), "choices": choices, "usage": used}


def chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                         "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode())}
                                          for k, v in t.top.items()]} for t in tokens]}


def chat_choice(index: int, answer: Answer, with_logprobs: bool) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": answer.text},
            "finish_reason": _reason(answer.finish_reason),
            "logprobs": chat_logprobs(answer.tokens) if with_logprobs else None}


def chat_completion(ident: str, model: str, choices: list[dict], used: dict) -> dict[str, Any]:
    return {**_head("chat.completion", model, ident), "choices": choices, "usage": used}


def completion_chunk(ident: str, model: str, index: int, text: str, token: Token | None,
                     reason: str | None) -> dict[str, Any]:
    logprobs = completion_logprobs([token], 0) if token and token.logprob is not None else None
    return {**_head("text_completion", model, ident), "choices": [
        {"index": index, "text": text, "finish_reason": _reason(reason), "logprobs": logprobs}]}


def chat_chunk(ident: str, model: str, index: int, delta: dict[str, Any], token: Token | None,
               reason: str | None) -> dict[str, Any]:
    logprobs = chat_logprobs([token]) if token and token.logprob is not None else None
    return {**_head("chat.completion.chunk", model, ident), "choices": [
        {"index": index, "delta": delta, "finish_reason": _reason(reason),
         "logprobs": logprobs}]}


def _reason(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length"; a row cut short by its own cancel never reaches a
    reader, but say "stop" rather than a word the SDK's types refuse."""
    return "stop" if reason == "cancelled" else reason
