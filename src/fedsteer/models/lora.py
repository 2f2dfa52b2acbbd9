"""LoRA adapters on the shared frozen model, through peft, for as long as a step needs them.

Many methods and simulated clients share one loaded model, so an adapter is injected for
one step (`with lora_adapter(...)`) and removed afterwards: the model is its plain self
for everyone else. Adapter weights travel as peft's state dict (`lora_A`/`lora_B` per
target module), the format `PeftModel.save_pretrained` writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict


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
