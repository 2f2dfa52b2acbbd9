"""What an artifact adds to the one base model: nothing, steering, a LoRA adapter, a
prompt, or a proxy-tuning pair; and a stack of them, applied in one forward.

Each adaptation says how one forward of a batch runs: which models take part (`streams`:
a model and the context that adapts it *for that forward only*: hooks on, then off), which
token ids go before the input (`prefix_ids`), and how the streams' log-probs become one
next-token distribution (`combine`). `Stack` composes several of them (the prompt before
the input, hooks and adapters on the base model's forward, the proxy shift on its output
scores); `fedsteer serve` runs any of them token by token, `AdaptedScorer` scores a task's
label words with them (`fedsteer eval`), and `in_place` keeps a stack on for a whole
training run (`fedsteer run --on-top-of`). The composition is written here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsteer.models.hooks import RowGroups, inject
from fedsteer.models.load import LoadedModel
from fedsteer.models.lora import RowAdapters, per_row_lora
from fedsteer.models.proxy import proxy_logprobs
from fedsteer.models.scoring import LabelScorer

#: a model's context for one forward over `rows` rows and `width` tokens
Context = Callable[[int, int], AbstractContextManager]


def no_context(rows: int, width: int) -> AbstractContextManager:
    return nullcontext()


@dataclass
class Stream:
    """One model taking part in a served name's forward, adapted by `context`."""

    lm: LoadedModel
    context: Context = no_context


@dataclass
class Adaptation:
    """The base model as it is: one stream, no prefix."""

    name: str
    base: LoadedModel
    kind: str = "base"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def streams(self) -> list[Stream]:
        return [Stream(self.base)]

    @property
    def prefix_ids(self) -> list[int]:
        return []

    def combine(self, logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
        return logprobs[0]


@dataclass
class SteeringAdaptation(Adaptation):
    """IFed-ICL / I2CL context vectors and coefficients, injected during the forward."""

    attn: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    coef: torch.Tensor | None = None

    @property
    def streams(self) -> list[Stream]:
        param = next(self.base.model.parameters())
        attn, mlp = (v.to(param.device, param.dtype) for v in (self.attn, self.mlp))
        return [Stream(self.base, lambda rows, width: inject(self.base, attn, mlp, self.coef))]


@dataclass
class LoraAdaptation(Adaptation):
    """A peft LoRA adapter added to the base's rows by hooks (S-LoRA style, peft's numbers),
    so many adapters share one copy of the base weights."""

    config: Any = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    model: LoadedModel | None = None  # the model it adapts, when not the base (FedPT's small)

    @property
    def streams(self) -> list[Stream]:
        return [Stream(self.model or self.base, self.lora_context)]

    def lora_context(self, rows: int, width: int) -> AbstractContextManager:
        adapters = RowAdapters([self.weights], [0], RowGroups(((0, rows),), (width,)))
        return per_row_lora(self.model or self.base, self.config, adapters)


@dataclass
class PromptAdaptation(Adaptation):
    """A tuned prompt (BDPL / AsynDBT tokens and demonstrations) before every request,
    tokenized on its own as the offline scorer does."""

    prefix: str = ""

    def __post_init__(self) -> None:
        # tokenized once, at load: the tokenizer is not safe across request threads
        self._prefix_ids = tuple(self.base.tokenizer(self.prefix,
                                                     add_special_tokens=True)["input_ids"])

    @property
    def prefix_ids(self) -> list[int]:
        return list(self._prefix_ids)


@dataclass
class ProxyAdaptation(Adaptation):
    """FedPT: the base (large) model's scores shifted by α·(tuned small − base small)."""

    tuned: LoraAdaptation | None = None
    alpha: float = 1.0
    vocab: int = 0  # the shared tokenizer's size: the scores are renormalised over it

    @property
    def streams(self) -> list[Stream]:
        return [Stream(self.base), *self.tuned.streams, Stream(self.tuned.model)]

    def combine(self, logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
        large, tuned, small = logprobs
        return proxy_logprobs(large, tuned, small, self.alpha, self.vocab)


def prompt_query_ids(adaptation: Adaptation, text: str) -> list[int]:
    """The request's tokens after the adaptation's prefix: special tokens only at the very
    start of the whole input (as `LabelScorer` encodes prefix and query)."""
    first = not adaptation.prefix_ids
    return adaptation.base.tokenizer(text, add_special_tokens=first)["input_ids"]


# -------------------------------------------------------------------- stacks
#: where each kind steers the frozen model: a stack holds at most one artifact per point
POINTS = {"prompt": "input", "steering": "activations", "lora": "weights", "proxy": "output"}


class StackError(ValueError):
    """Adaptations that cannot be applied together in one forward."""


@dataclass
class Stack(Adaptation):
    """Several adaptations of one base model in one forward: the prompt before the input,
    steering hooks and LoRA adapters on the base model's forward (entered together), and a
    proxy's extra streams, combined with the base's scores after the forward."""

    kind: str = "stack"
    parts: list[Adaptation] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for part in self.parts:
            if part.base is not self.base:
                raise StackError(f"stack {self.name!r}: {part.name!r} adapts {part.base.name!r},"
                                 f" not the stack's base {self.base.name!r}")
            point = POINTS.get(part.kind)
            if point is not None and point in seen:
                raise StackError(f"stack {self.name!r}: {seen[point]!r} and {part.name!r} both "
                                 f"steer the {point} ({part.kind}); a stack takes one artifact "
                                 "per point")
            if point is not None:
                seen[point] = part.name
        # how many streams beyond the base each part adds (its combine reads them)
        self._extra = [len(part.streams) - 1 for part in self.parts]

    @property
    def streams(self) -> list[Stream]:
        contexts = [part.streams[0].context for part in self.parts]
        extras = [s for part in self.parts for s in part.streams[1:]]
        return [Stream(self.base, lambda rows, width: _together(contexts, rows, width)),
                *extras]

    @property
    def prefix_ids(self) -> list[int]:
        return [i for part in self.parts for i in part.prefix_ids]

    def combine(self, logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The base stream's log-probs through each part's combine in turn (a proxy shifts
        the steered, prompted base's scores by its small pair's)."""
        result, at = logprobs[0], 1
        for part, extra in zip(self.parts, self._extra, strict=True):
            if extra:
                result = part.combine([result, *logprobs[at : at + extra]])
                at += extra
        return result


@contextmanager
def _together(contexts: Sequence[Context], rows: int, width: int) -> Iterator[None]:
    with ExitStack() as entered:
        for context in contexts:
            entered.enter_context(context(rows, width))
        yield


# ------------------------------------------------------------------- scoring
class _StreamScorer(LabelScorer):
    """A `LabelScorer` on one stream's model with its context around every forward."""

    def __init__(self, stream: Stream, label_words: Sequence[str], batch_size: int) -> None:
        super().__init__(stream.lm, label_words, batch_size=batch_size)
        self.context = stream.context

    def _forward(self, ids, mask, cache, prefix_len: int, keep: int,
                 prefix_mask: torch.Tensor | None = None):
        with self.context(len(ids), ids.shape[1]):
            return super()._forward(ids, mask, cache, prefix_len, keep, prefix_mask)

    def vocab_batch(self, batch: list[list[int]], cache, prefix_len: int) -> torch.Tensor:
        """Full-vocabulary log-probs at the answer position, continuing the prefix's cache
        (the ops `LabelScorer.score` runs, before it picks the label columns)."""
        ids, mask = self._left_pad(batch)
        logits = self._forward(ids, mask, self._expand(cache, len(batch)),
                               prefix_len if cache is not None else 0, keep=1).logits[:, -1]
        return logits.float().log_softmax(-1)


class AdaptedScorer:
    """A task's label words scored through an adaptation (one artifact or a stack): every
    stream's forward, batched by length as `LabelScorer` batches, then the adaptation's
    combine, then each label word's first token."""

    def __init__(self, adaptation: Adaptation, label_words: Sequence[str],
                 batch_size: int = 16) -> None:
        self.adaptation = adaptation
        self.scorers = [_StreamScorer(s, label_words, batch_size) for s in adaptation.streams]
        self.labels = self.scorers[0].labels

    @torch.no_grad()
    def score(self, queries: Sequence[str]) -> torch.Tensor:
        """Log-probs `[N, labels]`; the prefix's key/value cache is computed once per
        stream and continued by every batch (as `LabelScorer.score` does)."""
        prefix = self.adaptation.prefix_ids
        first = self.scorers[0]
        query_ids = [first._encode(q, first=not prefix) for q in queries]
        if not query_ids:
            return torch.empty(0, len(self.labels.ids), device=first.lm.device)
        caches = [s._prefix_cache(prefix) if prefix else None for s in self.scorers]

        def run(batch: list[list[int]]) -> torch.Tensor:
            logprobs = [s.vocab_batch(batch, cache, len(prefix))
                        for s, cache in zip(self.scorers, caches, strict=True)]
            return self.adaptation.combine(logprobs)[:, self.labels.first]

        return first._by_length(query_ids, run)


# ------------------------------------------------------------------ in place
#: the kinds a stack may hold while a method trains on top of it: their change lives in
#: the base model's forward or input, which every method's own scorer then runs through
IN_PLACE_KINDS = ("base", "prompt", "steering")


@contextmanager
def in_place(stack: Adaptation, models: Sequence[LoadedModel] = ()) -> Iterator[None]:
    """The stack on for every forward in the body: its hooks on the base model, its prompt's
    ids before every whole input (an encoding that asks for special tokens) of the base and
    of each of `models` (which must share its vocabulary), removed on the way out.

    What a training run's clients and its evaluation then see, without the method knowing:
    a method's scorer tokenizes and runs the model as before."""
    from fedsteer.models.proxy import check_shared_vocabulary

    parts = getattr(stack, "parts", [stack])
    for part in parts:
        if part.kind not in IN_PLACE_KINDS:
            raise StackError(f"{part.name!r} is a {part.kind}: a method can be trained on top "
                             f"of {', '.join(k for k in IN_PLACE_KINDS if k != 'base')} "
                             "artifacts only (a proxy or an adapter must be the last stage)")
    prefix = stack.prefix_ids
    prompted = {id(lm): lm for lm in (stack.base, *models)}
    if prefix:
        for lm in prompted.values():
            check_shared_vocabulary(lm, stack.base)
    with ExitStack() as entered:
        entered.enter_context(stack.streams[0].context(0, 0))  # hooks: no per-forward state
        if prefix:
            for lm in prompted.values():
                entered.enter_context(_prefixed(lm, prefix))
        yield


@contextmanager
def _prefixed(lm: LoadedModel, prefix: Sequence[int]) -> Iterator[None]:
    tokenizer = lm.tokenizer
    lm.tokenizer = PrefixedTokenizer(tokenizer, tuple(prefix))
    try:
        yield
    finally:
        lm.tokenizer = tokenizer


class PrefixedTokenizer:
    """A tokenizer that puts a prompt's ids before every whole input: an encoding that asks
    for special tokens (the start of an input, as `LabelScorer` encodes one) gets the
    prompt's ids (its own special tokens included) and then the text's without; a
    continuation (`add_special_tokens=False`) is encoded as before. Everything else is the
    tokenizer's own."""

    def __init__(self, tokenizer, prefix_ids: tuple[int, ...]) -> None:
        self._tokenizer, self.prefix_ids = tokenizer, prefix_ids

    def __call__(self, text, *args, add_special_tokens: bool = True, **kwargs):
        if not add_special_tokens or not isinstance(text, str) or args or kwargs:
            return self._tokenizer(text, *args, add_special_tokens=add_special_tokens, **kwargs)
        ids = list(self.prefix_ids) + self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)
