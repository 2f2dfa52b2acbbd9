"""`fedsteer serve`: an OpenAI-compatible completions endpoint over a local model.

So anyone can stand up a black box here: `POST /v1/completions` returns the greedy
continuation with top-k log-probs per token, in the shape the `openai` SDK parses
(`Completion`), and `usage` counts tokens as billed. Every request is also logged (tokens
in and out), which is what the client-side accounting is checked against.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

MAX_TOP_LOGPROBS = 20


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = 16
    logprobs: int | None = None
    temperature: float = 0.0
    echo: bool = False


def make_app(lm, max_top_logprobs: int = MAX_TOP_LOGPROBS) -> FastAPI:
    """The app; `app.state.requests` lists every request's token counts."""
    app = FastAPI(title=f"fedsteer black box: {lm.name}")
    app.state.requests = []
    lock = threading.Lock()  # one forward at a time: the model is shared

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": lm.name, "object": "model", "created": 0, "owned_by": "fedsteer"}]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> dict[str, Any]:
        if request.echo:
            raise HTTPException(400, "echo is not supported")
        top = request.logprobs
        if top is not None and not 0 <= top <= max_top_logprobs:
            raise HTTPException(400, f"logprobs must be in 0..{max_top_logprobs}")
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        with lock:
            choices, used = zip(*(
                _complete(lm, text, request.max_tokens, top, index)
                for index, text in enumerate(prompts)), strict=True)
        prompt_tokens = sum(u[0] for u in used)
        completion_tokens = sum(u[1] for u in used)
        app.state.requests.append({"prompts": len(prompts), "prompt_tokens": prompt_tokens,
                                   "completion_tokens": completion_tokens})
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": request.model or lm.name,
            "choices": list(choices),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    return app


@torch.no_grad()
def _complete(lm, prompt: str, max_tokens: int, top: int | None, index: int):
    """Greedy tokens with their log-probs (and the top-k alternatives when asked)."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    prompt_len = ids.shape[1]
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    text_offset = len(prompt)
    for _ in range(max(max_tokens, 0)):
        logprobs = lm.model(ids).logits[0, -1].float().log_softmax(-1)
        best = int(logprobs.argmax())
        text = lm.tokenizer.decode([best])
        tokens.append(text)
        token_logprobs.append(float(logprobs[best]))
        offsets.append(text_offset)
        text_offset += len(text)
        if top:
            values, indices = logprobs.topk(top)
            alternatives: dict[str, float] = {}
            for value, token in zip(values.tolist(), indices.tolist(), strict=True):
                alternatives.setdefault(lm.tokenizer.decode([token]), value)
            top_logprobs.append(alternatives)
        ids = torch.cat([ids, torch.tensor([[best]])], dim=1)
        if best == lm.tokenizer.eos_token_id:
            break
    choice = {
        "index": index, "text": "".join(tokens),
        "finish_reason": "length" if len(tokens) == max_tokens else "stop",
        "logprobs": None if top is None else {
            "tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets},
    }
    return choice, (prompt_len, len(tokens))
