"""Saved artifacts (`run ... --save DIR`) applied to new inputs: `fedsteer eval --artifact DIR`.

The kind is read from what the directory holds: `steering.json` (IFed-ICL vectors and
coefficients), `proxy.json` (FedPT: a large model proxy-tuned by a small pair),
`adapter_config.json` (a peft LoRA adapter: FedAvg-LoRA) or `prompt.json` (a prompt
learned through a black box: BDPL, AsynDBT). `provenance.json` says which run made it.
"""

from __future__ import annotations

import json
import logging
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
from fedsteer.stacks import (
    KIND_MARKERS,
    ArtifactMismatch,
    artifact_kind,
    check_fit,
    check_stack,
    load_stack,
    made_for,
    missing_stages,
    read_adapter,
    read_provenance,
)

log = logging.getLogger(__name__)

__all__ = ["KIND_MARKERS", "PROVENANCE_FILE", "PROXY_ADAPTER", "PROXY_FILE",
           "ArtifactMismatch", "ArtifactScores", "artifact_kind", "check_fit",
           "evaluate_artifact", "evaluate_endpoint", "evaluate_stack", "made_for",
           "read_adapter", "read_provenance", "score_artifact", "score_stack"]


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


def evaluate_artifact(directory: Path, task: Task, model: str | None, test_size: int | None,
                      test_seed: int, batch_size: int, blackbox: str = "local",
                      transfer: bool = False, dtype: str = "float32", device: str = "auto"
                      ) -> tuple[str, str, dict[str, Any], int]:
    """(kind, model used, metrics, rows scored); `transfer`: on a task or model other than
    the artifact's own, on purpose; `dtype`/`device` as `--dtype`/`--device` read them."""
    if not transfer:
        check_fit(directory, artifact_kind(directory), task, model)
    for line in missing_stages([Path(directory)]):
        log.warning("%s", line)
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


def evaluate_stack(directories: list[Path], task: Task, model: str | None,
                   test_size: int | None, test_seed: int, batch_size: int,
                   transfer: bool = False, dtype: str = "float32", device: str = "auto"
                   ) -> tuple[str, str, dict[str, Any], int]:
    """`evaluate_artifact` of a stack (`eval --artifact a --artifact b`): every artifact
    checked against the task (unless `transfer`) and against the others."""
    if not transfer:
        for directory in directories:
            check_fit(directory, artifact_kind(directory), task, model)
    scored = score_stack(directories, task, model, test_size, test_seed, batch_size,
                         dtype=dtype, device=device)
    return scored.kind, scored.model, scored.metrics(), len(scored.test)


def score_stack(directories: list[Path], task: Task, model: str | None, test_size: int | None,
                test_seed: int, batch_size: int, *, dtype: str = "float32",
                device: str = "auto") -> ArtifactScores:
    """A stack of artifacts applied in one forward to the test rows (`Stack` in
    `fedsteer.models.adapted`, the composition `fedsteer serve` runs), on the one model
    they were all made on (`model`: that one, or refused by name)."""
    from fedsteer.models.adapted import AdaptedScorer

    directories = [Path(d) for d in directories]
    base = check_stack(directories) or model
    if base is None:
        raise ArtifactMismatch("no artifact of the stack names its model: pass --model")
    test = evaluation_rows(task, test_size, test_seed)
    env = Environment(task=task.spec, test=test, model_name=model or base,
                      batch_size=batch_size, dtype=dtype, device=device)
    adaptation = load_stack("+".join(str(d) for d in directories), directories, env.lm,
                            lambda name: env.lm if name == env.model_name else env.other_lm(name))
    scorer = AdaptedScorer(adaptation, task.spec.label_words, batch_size)
    scores = scorer.score([task.spec.format_query(ex) for ex in test])
    return ArtifactScores(adaptation.kind, env.model_name, scores.cpu().numpy(), test)


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
