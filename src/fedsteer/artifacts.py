"""Saved artifacts (`run ... --save DIR`) applied to new inputs: `fedsteer eval --artifact DIR`.

The kind is read from what the directory holds: `steering.json` (IFed-ICL vectors and
coefficients), `proxy.json` (FedPT: a large model proxy-tuned by a small pair),
`adapter_config.json` (a peft LoRA adapter: FedAvg-LoRA) or `prompt.json` (a prompt
learned through a black box: BDPL, AsynDBT). `provenance.json` says which run made it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsteer.data import Example, Task
from fedsteer.eval.metrics import classification_metrics
from fedsteer.eval.record import PROVENANCE_FILE
from fedsteer.experiment import evaluation_rows
from fedsteer.methods import Environment
from fedsteer.methods.fedpt import PROXY_ADAPTER, PROXY_FILE

__all__ = ["PROVENANCE_FILE", "PROXY_ADAPTER", "PROXY_FILE", "ArtifactMismatch",
           "ArtifactScores", "artifact_kind", "check_fit", "evaluate_artifact",
           "evaluate_endpoint", "made_for", "read_adapter", "read_provenance", "score_artifact"]

KIND_MARKERS = (("steering", "steering.json"), ("proxy", PROXY_FILE),
                ("lora", "adapter_config.json"), ("prompt", "prompt.json"))


def artifact_kind(directory: Path) -> str:
    for kind, marker in KIND_MARKERS:
        if (Path(directory) / marker).is_file():
            return kind
    raise FileNotFoundError(f"not a directory written by `fedsteer run --save`: {directory} "
                            f"holds none of {', '.join(m for _, m in KIND_MARKERS)}")


def read_provenance(directory: Path) -> dict[str, Any]:
    """What `write_provenance` wrote ({} when absent or unreadable: it is information only)."""
    try:
        saved = json.loads((Path(directory) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in saved.items() if v is not None} if isinstance(saved, dict) else {}


@dataclass
class ArtifactScores:
    """An artifact's label log-probs `[rows, labels]` on a task's test rows."""

    kind: str
    model: str
    scores: np.ndarray
    test: list[Example]
    usage: dict[str, int] = field(default_factory=dict)  # black-box bill (prompts)

    def metrics(self) -> dict[str, Any]:
        metrics = classification_metrics([ex.label for ex in self.test],
                                         self.scores.argmax(axis=1).tolist(), self.scores.shape[1])
        return {**metrics, **{f"api_{k}": v for k, v in self.usage.items()}}


class ArtifactMismatch(ValueError):
    """An artifact asked to run on a task or model other than the one it was made on."""


#: the file of each kind that names the model it was made on (beside provenance.json)
_MADE_ON = {"steering": ("steering.json", "model"), "proxy": (PROXY_FILE, "large"),
            "prompt": ("prompt.json", "model")}


def made_for(directory: Path, kind: str) -> dict[str, Any]:
    """The `model`, `task` and `labels` the artifact was made for, where its files say.

    The model a kind is applied to is its own file's (FedPT's proxy: the large model), the
    task and labels provenance.json's, else the kind's file's."""
    directory = Path(directory)
    found = {k: v for k, v in read_provenance(directory).items()
             if k in ("model", "task", "labels")}
    if kind == "lora":
        adapter = _json(directory / "adapter_config.json")
        found["model"] = adapter.get("base_model_name_or_path") or found.get("model")
    elif kind in _MADE_ON:
        own = _json(directory / _MADE_ON[kind][0])
        found["model"] = own.get(_MADE_ON[kind][1]) or found.get("model")
        found.setdefault("task", own.get("task"))
    return {k: v for k, v in found.items() if v}


def _json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def check_fit(directory: Path, kind: str, task: Task, model: str | None) -> None:
    """Refuse, by name, a task or model other than the artifact's: its numbers would be
    those of a transfer nobody asked for (an sst2 steering scored on trec's labels)."""
    made = made_for(directory, kind)
    labels = tuple(made.get("labels") or ())
    if made.get("task", task.name) != task.name or (labels and labels != task.spec.labels):
        shown = f" (labels {', '.join(labels)})" if labels else ""
        raise ArtifactMismatch(
            f"artifact {directory} was made on task {made.get('task')!r}{shown}, asked "
            f"{task.name!r} (labels {', '.join(task.spec.labels)}); pass --transfer to "
            "apply it to another task anyway")
    if model is not None and made.get("model", model) != model:
        raise ArtifactMismatch(
            f"artifact {directory} was made on model {made['model']!r}, asked --model "
            f"{model!r}; drop --model, or pass --transfer to apply it to another model")


def evaluate_artifact(directory: Path, task: Task, model: str | None, test_size: int | None,
                      test_seed: int, batch_size: int, blackbox: str = "local",
                      transfer: bool = False, dtype: str = "float32", device: str = "auto"
                      ) -> tuple[str, str, dict[str, Any], int]:
    """(kind, model used, metrics, rows scored); `transfer`: on a task or model other than
    the artifact's own, on purpose; `dtype`/`device` as `--dtype`/`--device` read them."""
    if not transfer:
        check_fit(directory, artifact_kind(directory), task, model)
    scored = score_artifact(directory, task, model, test_size, test_seed, batch_size, blackbox,
                            dtype=dtype, device=device)
    return scored.kind, scored.model, scored.metrics(), len(scored.test)


def score_artifact(directory: Path, task: Task, model: str | None, test_size: int | None,
                   test_seed: int, batch_size: int, blackbox: str = "local", *,
                   dtype: str = "float32", device: str = "auto") -> ArtifactScores:
    """The artifact applied to the test rows as its method evaluates it (`model`: another
    model to apply it to; default the one it was made on)."""
    directory = Path(directory)
    kind = artifact_kind(directory)
    test = evaluation_rows(task, test_size, test_seed)
    queries = [task.spec.format_query(ex) for ex in test]

    def environment(name: str) -> Environment:
        return Environment(task=task.spec, test=test, model_name=name, batch_size=batch_size,
                           dtype=dtype, device=device)

    if kind == "steering":
        from fedsteer.methods.ifed_icl import load_steering
        from fedsteer.models.hooks import inject

        saved = load_steering(directory)
        env = environment(model or saved.config["model"])
        param = next(env.lm.model.parameters())
        attn, mlp = (v.to(param.device, param.dtype) for v in (saved.attn, saved.mlp))
        with torch.no_grad(), inject(env.lm, attn, mlp, saved.coef):
            scores = env.scorer().score(queries)
        return ArtifactScores(kind, env.model_name, scores.cpu().numpy(), test)
    if kind == "proxy":
        return _score_proxy(directory, queries, test, environment, model)
    if kind == "lora":
        from fedsteer.models.lora import lora_adapter

        config, weights = read_adapter(directory)
        env = environment(model or config.base_model_name_or_path)
        with torch.no_grad(), lora_adapter(env.lm, config, weights):
            scores = env.scorer().score(queries)
        return ArtifactScores(kind, env.model_name, scores.cpu().numpy(), test)
    from fedsteer.methods.bdpl import PROMPT_FILE

    saved = json.loads((directory / PROMPT_FILE).read_text())
    env = environment(model or saved["model"])
    box = env.blackbox(blackbox)
    scores = box.label_logprobs(queries, task.spec.label_words, prefix=saved["prefix"])
    return ArtifactScores(kind, env.model_name, scores, test, box.usage.to_dict())


def read_adapter(directory: Path):
    """A peft adapter directory: its `LoraConfig` and weights (numpy, by peft's names)."""
    from peft import LoraConfig
    from safetensors.numpy import load_file

    config = LoraConfig.from_pretrained(str(directory))
    return config, load_file(str(directory / "adapter_model.safetensors"))


def _score_proxy(directory: Path, queries: list[str], test: list[Example],
                 environment, model: str | None) -> ArtifactScores:
    """FedPT's output: the large model proxy-tuned with the saved averaged adapter
    (FedPT's own `proxy`, so the numbers are the method's)."""
    from fedsteer.methods.fedavg_lora import adapter_record
    from fedsteer.methods.fedpt import FedPT

    spec = json.loads((directory / PROXY_FILE).read_text())
    config, weights = read_adapter(directory / PROXY_ADAPTER)
    method = FedPT(large=model or spec["large"], alpha=float(spec["alpha"]), distill_epochs=0,
                   rank=config.r, lora_alpha=config.lora_alpha,
                   target_modules=tuple(sorted(config.target_modules)))
    env = environment(spec["small"])
    with torch.no_grad():
        logprobs = method.proxy(env, adapter_record(weights), queries)
    scores = logprobs[:, env.scorer().labels.first]
    return ArtifactScores("proxy", method.large, scores.cpu().numpy(), test)


def evaluate_endpoint(endpoint: str, task: Task, test_size: int | None, test_seed: int,
                      api_key_env: str = "OPENAI_API_KEY") -> tuple[dict[str, Any], int]:
    """A task's test rows scored through any OpenAI-compatible endpoint (`URL#NAME`), the
    black box AsynDBT uses: a served artifact checked the way a user would check it."""
    from fedsteer.blackbox import OpenAIBlackBox

    if "#" not in endpoint:
        raise ValueError(f"endpoint {endpoint!r}: use BASE_URL#MODEL, e.g. "
                         "http://127.0.0.1:8000/v1#my-artifact")
    url, name = endpoint.rsplit("#", 1)
    test = evaluation_rows(task, test_size, test_seed)
    box = OpenAIBlackBox(url, name, api_key_env=api_key_env)
    scores = box.label_logprobs([task.spec.format_query(ex) for ex in test],
                                task.spec.label_words)
    scored = ArtifactScores("endpoint", name, scores, test, box.usage.to_dict())
    return scored.metrics(), len(test)
