"""What a served name adds to the one base model: nothing, steering, a LoRA adapter, a
prompt, or a proxy-tuning pair.

Each adaptation says how one forward of a batch runs: which models take part (`streams`:
a model and the context that adapts it *for that forward only*: hooks on, then off), which
token ids go before the request's prompt (`prefix_ids`), and how the streams' log-probs
become one next-token distribution (`combine`). The engine never knows which kind it runs,
and a context is entered around each forward, so nothing of one name leaks into another's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsteer.models.hooks import RowGroups, inject
from fedsteer.models.load import LoadedModel
from fedsteer.models.lora import RowAdapters, per_row_lora
from fedsteer.models.proxy import check_shared_vocabulary, proxy_logprobs

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


# ------------------------------------------------------------------- loading
def load_adaptation(name: str, directory: Path, base: LoadedModel,
                    load_model: Callable[[str], LoadedModel]) -> Adaptation:
    """The adaptation a `fedsteer run --save` directory holds, on the served base model.

    `load_model` loads any extra model a kind needs (FedPT's small pair), once per name."""
    from fedsteer.artifacts import artifact_kind, read_provenance

    directory = Path(directory)
    kind = artifact_kind(directory)
    info = {"kind": kind, "source": str(directory), **read_provenance(directory)}
    if kind == "steering":
        from fedsteer.methods.ifed_icl import load_steering

        saved = load_steering(directory)
        _check_base(name, saved.config.get("model"), base)
        return SteeringAdaptation(name, base, kind, info, saved.attn, saved.mlp, saved.coef)
    if kind == "lora":
        config, weights, made_on = _read_lora(directory)
        _check_base(name, made_on, base)
        return LoraAdaptation(name, base, kind, info, config, weights)
    if kind == "proxy":
        return _load_proxy(name, directory, base, info, load_model)
    saved = json.loads((directory / "prompt.json").read_text())
    _check_base(name, saved.get("model"), base)
    return PromptAdaptation(name, base, kind, info, saved["prefix"])


def _read_lora(directory: Path) -> tuple[Any, dict[str, torch.Tensor], str | None]:
    """The adapter as tensors for the per-row hooks, and the model it was made on."""
    from fedsteer.artifacts import read_adapter

    config, arrays = read_adapter(directory)
    weights = {k: torch.tensor(np.asarray(v, dtype=np.float32), device="cpu")  # masters
               for k, v in arrays.items()}
    return config, weights, config.base_model_name_or_path


def _load_proxy(name: str, directory: Path, base: LoadedModel, info: dict[str, Any],
                load_model: Callable[[str], LoadedModel]) -> ProxyAdaptation:
    from fedsteer.artifacts import PROXY_ADAPTER, PROXY_FILE

    spec = json.loads((directory / PROXY_FILE).read_text())
    _check_base(name, spec["large"], base)
    small = load_model(spec["small"])
    vocab = check_shared_vocabulary(small, base)
    config, weights, _ = _read_lora(directory / PROXY_ADAPTER)
    tuned = LoraAdaptation(f"{name}/small", base, "lora", {}, config, weights, small)
    info["small"] = spec["small"]
    return ProxyAdaptation(name, base, "proxy", info, tuned, float(spec["alpha"]), vocab)


def _check_base(name: str, made_on: str | None, base: LoadedModel) -> None:
    """An adaptation only means something on the model it was made on."""
    if made_on and made_on != base.name:
        raise ValueError(f"artifact {name!r} was made on {made_on!r}, but the served model is "
                         f"{base.name!r}: serve it with --model {made_on}")
