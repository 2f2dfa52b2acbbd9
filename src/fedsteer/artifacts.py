"""Saved artifacts (`run ... --save DIR`) applied to new inputs: `fedsteer eval --artifact DIR`.

The kind is read from what the directory holds: `steering.json` (IFed-ICL vectors and
coefficients), `adapter_config.json` (a peft LoRA adapter: FedAvg-LoRA, FedPT's small
model) or `prompt.json` (a prompt learned through a black box: BDPL, AsynDBT).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedsteer.data import Task
from fedsteer.experiment import evaluation_rows
from fedsteer.methods import Environment


def artifact_kind(directory: Path) -> str:
    for kind, marker in (("steering", "steering.json"), ("lora", "adapter_config.json"),
                         ("prompt", "prompt.json")):
        if (Path(directory) / marker).is_file():
            return kind
    raise FileNotFoundError(f"{directory} holds no steering.json, adapter_config.json or "
                            "prompt.json: not a directory written by `fedsteer run --save`")


def evaluate_artifact(directory: Path, task: Task, model: str | None, test_size: int | None,
                      test_seed: int, batch_size: int, blackbox: str = "local"
                      ) -> tuple[str, str, dict[str, Any], int]:
    """(kind, model used, metrics, rows scored)."""
    directory = Path(directory)
    kind = artifact_kind(directory)
    test = evaluation_rows(task, test_size, test_seed)
    if kind == "steering":
        from fedsteer.methods.ifed_icl import evaluate_steering, load_steering

        saved = load_steering(directory)
        name = model or saved.config["model"]
        env = Environment(task=task.spec, test=test, model_name=name, batch_size=batch_size)
        return kind, name, evaluate_steering(env, saved.attn, saved.mlp, saved.coef), len(test)
    if kind == "lora":
        from peft import LoraConfig
        from safetensors.numpy import load_file

        from fedsteer.methods.icl import evaluate_prompting
        from fedsteer.models.lora import lora_adapter

        config = LoraConfig.from_pretrained(str(directory))
        name = model or config.base_model_name_or_path
        env = Environment(task=task.spec, test=test, model_name=name, batch_size=batch_size)
        weights = load_file(str(directory / "adapter_model.safetensors"))
        with lora_adapter(env.lm, config, weights):
            return kind, name, evaluate_prompting(env), len(test)
    from fedsteer.methods.bdpl import PROMPT_FILE, evaluate_prefix

    saved = json.loads((directory / PROMPT_FILE).read_text())
    name = model or saved["model"]
    env = Environment(task=task.spec, test=test, model_name=name, batch_size=batch_size)
    return kind, name, evaluate_prefix(env, saved["prefix"], blackbox), len(test)
