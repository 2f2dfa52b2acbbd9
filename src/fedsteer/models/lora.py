"""LoRA adapters on the shared frozen model, through peft, for as long as a step needs them.

Many methods and simulated clients share one loaded model, so an adapter is injected for
one step (`with lora_adapter(...)`) and removed afterwards: the model is its plain self
for everyone else. Adapter weights travel as peft's state dict (`lora_A`/`lora_B` per
target module), the format `PeftModel.save_pretrained` writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedsteer.models.hooks import RowGroups, hooked


def lora_config(rank: int, alpha: float, target_modules: Sequence[str]) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                      lora_dropout=0.0, bias="none")


@contextmanager
def lora_adapter(lm, config: LoraConfig, weights: dict[str, np.ndarray] | None = None,
                 seed: int = 0) -> Iterator:
    """The shared model with a LoRA adapter (seeded init, or `weights`), removed on exit."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(lm.model, config)
    try:
        if weights is not None:
            tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}
            result = set_peft_model_state_dict(peft_model, tensors)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"adapter weights do not fit this model: {unexpected[:3]}")
        yield peft_model
    finally:
        peft_model.unload()  # the base modules back in place, adapter gone


def adapter_weights(peft_model) -> dict[str, np.ndarray]:
    """The adapter's trainable weights as float32 arrays, by peft's state-dict names."""
    return {k: v.detach().cpu().float().numpy() for k, v in
            get_peft_model_state_dict(peft_model).items()}


def initial_adapter(lm, config: LoraConfig, seed: int) -> dict[str, np.ndarray]:
    """A fresh adapter (A random, B zero: the model's output is unchanged)."""
    with lora_adapter(lm, config, seed=seed) as peft_model:
        return adapter_weights(peft_model)


#: peft's state-dict keys are the module's name under this prefix, then `.lora_A.weight`
PEFT_PREFIX, A_SUFFIX, B_SUFFIX = "base_model.model.", ".lora_A.weight", ".lora_B.weight"


@dataclass
class RowAdapters:
    """Per-client LoRA weights for a client-batched forward: each client's adapter as peft's
    state dict of trainable leaf tensors, which clients take part, and whose rows are whose."""

    weights: list[dict[str, torch.Tensor]]
    active: list[int] = field(default_factory=list)
    groups: RowGroups | None = None


def trainable_adapter(weights: dict[str, np.ndarray], device: torch.device | str = "cpu"
                      ) -> dict[str, torch.Tensor]:
    """An adapter as float32 leaf tensors that require grad (one client's parameters): the
    master copy, cast to the model's dtype only inside the forward."""
    return {k: torch.tensor(np.asarray(v, dtype=np.float32), requires_grad=True, device=device)
            for k, v in weights.items()}


@contextmanager
def per_row_lora(lm, config: LoraConfig, adapters: RowAdapters) -> Iterator[None]:
    """Every target module adds, to each client's rows, its own adapter's `B·A·x · α/r`
    (the multi-adapter batching of S-LoRA / Punica, here as a loop over the few clients of
    a batch with the very ops peft's LoRA layer runs, so each row gets peft's numbers)."""
    scaling = config.lora_alpha / config.r
    modules = dict(lm.model.named_modules())
    registrations = []
    for key in adapters.weights[0]:
        if key.endswith(A_SUFFIX):
            name = key.removeprefix(PEFT_PREFIX).removesuffix(A_SUFFIX)
            if name not in modules:
                raise ValueError(f"adapter weights do not fit this model: no module {name!r}")
            registrations.append((modules[name], _row_lora_hook(
                adapters, key, key.removesuffix(A_SUFFIX) + B_SUFFIX, scaling)))
    with hooked(registrations):
        yield


def _row_lora_hook(adapters: RowAdapters, a_key: str, b_key: str, scaling: float):
    def hook(module, args, output):
        x, deltas = args[0], []
        for i, (start, stop) in zip(adapters.active, adapters.groups.spans, strict=True):
            a, b = adapters.weights[i][a_key], adapters.weights[i][b_key]
            like = {"device": x.device, "dtype": x.dtype}
            deltas.append(F.linear(F.linear(x[start:stop], a.to(**like)), b.to(**like)))
        return output + torch.cat(deltas) * scaling

    return hook
