"""Saved artifacts (`run ... --save`) read back as adaptations of a base model, alone or
stacked: `fedsteer eval --artifact a --artifact b`, `fedsteer serve --artifact name=a+b`,
`fedsteer run METHOD --on-top-of a`.

The kind is read from what the directory holds: `steering.json` (IFed-ICL vectors and
coefficients), `proxy.json` (FedPT: a large model proxy-tuned by a small pair),
`adapter_config.json` (a peft LoRA adapter: FedAvg-LoRA) or `prompt.json` (a prompt
learned through a black box: BDPL, AsynDBT). `provenance.json` says which run made it.
A stack's artifacts must all be made on one model and one task (so one tokenizer and one
label set), one per steering point; a mismatch is refused naming the artifact and field.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsteer.data import Task
from fedsteer.eval.record import PIPELINE_KEYS, PROVENANCE_FILE
from fedsteer.methods.fedpt import PROXY_ADAPTER, PROXY_FILE
from fedsteer.models.adapted import (
    POINTS,
    Adaptation,
    LoraAdaptation,
    PromptAdaptation,
    ProxyAdaptation,
    Stack,
    SteeringAdaptation,
    in_place,
)
from fedsteer.models.load import LoadedModel
from fedsteer.models.proxy import check_shared_vocabulary

__all__ = ["KIND_MARKERS", "ArtifactMismatch", "artifact_kind", "check_fit", "check_stack",
           "load_adaptation", "load_stack", "made_for", "missing_stages", "on_top_of",
           "pipeline_costs", "read_adapter", "read_provenance", "split_stack", "stack_name",
           "stack_record"]

log = logging.getLogger(__name__)

KIND_MARKERS = (("steering", "steering.json"), ("proxy", PROXY_FILE),
                ("lora", "adapter_config.json"), ("prompt", "prompt.json"))


class ArtifactMismatch(ValueError):
    """An artifact asked to run on a task or model other than the one it was made on, or
    beside artifacts made on another."""


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


def read_adapter(directory: Path):
    """A peft adapter directory: its `LoraConfig` and weights (numpy, by peft's names)."""
    from peft import LoraConfig
    from safetensors.numpy import load_file

    config = LoraConfig.from_pretrained(str(directory))
    return config, load_file(str(directory / "adapter_model.safetensors"))


# ------------------------------------------------------------------- stacks
def split_stack(spec: str | Sequence[str | Path]) -> list[Path]:
    """`a+b+c`, or a list of such, as the directories of one stack, in order (a directory
    whose own name holds a "+" is taken whole)."""
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    found = [Path(p) for s in specs
             for p in ([s] if Path(s).is_dir() else str(s).split("+")) if p]
    if not found:
        raise ValueError(f"no artifact in the stack {spec!r}")
    return found


def check_stack(directories: Sequence[Path]) -> str | None:
    """The one model the stack's artifacts were made on (None: none says); refuses, naming
    the artifact and the field, artifacts made on different models, tasks or label sets
    (another model's tokenizer would give another vocabulary), or two artifacts that steer
    the same point (two prompts, two sets of vectors)."""
    first: dict[str, tuple[Path, Any]] = {}
    points: dict[str, Path] = {}
    for directory in directories:
        kind = artifact_kind(directory)
        point = POINTS[kind]
        if point in points:
            raise ArtifactMismatch(
                f"stack: {directory} and {points[point]} both steer the {point} ({kind}); a "
                "stack takes one artifact per point")
        points[point] = directory
        made = made_for(directory, kind)
        for key in ("model", "task", "labels"):
            if key not in made:
                continue
            if key in first and first[key][1] != made[key]:
                raise ArtifactMismatch(
                    f"stack: artifact {directory} was made with {key} {made[key]!r}, artifact "
                    f"{first[key][0]} with {key} {first[key][1]!r}; a stack's artifacts must "
                    f"share their base model, tokenizer and task")
            first.setdefault(key, (directory, made[key]))
    return first["model"][1] if "model" in first else None


def missing_stages(directories: Sequence[Path]) -> list[str]:
    """What an artifact was trained on top of that the stack applying it does not hold (by
    digest): its numbers were made for a model steered by those too."""
    held = {artifact_sha256(d) for d in directories}
    lines = []
    for directory in directories:
        for entry in read_provenance(directory).get("stack") or []:
            if entry.get("sha256") not in held:
                lines.append(f"{directory} was trained on top of {entry.get('path')} "
                             f"({entry.get('kind')}), which is not applied with it here; add "
                             "it to the stack to get the model it was trained for")
    return lines


def load_stack(name: str, directories: Sequence[Path], base: LoadedModel,
               load_model: Callable[[str], LoadedModel]) -> Adaptation:
    """One artifact's adaptation, or a `Stack` of several (checked by `check_stack`), each
    part named by its directory so an error says which."""
    directories = [Path(d) for d in directories]
    for line in missing_stages(directories):
        log.warning("%s", line)
    if len(directories) == 1:
        return load_adaptation(name, directories[0], base, load_model)
    check_stack(directories)
    parts = [load_adaptation(str(d), d, base, load_model) for d in directories]
    info = {"kind": "stack", "source": "+".join(str(d) for d in directories),
            "parts": stack_record(directories)}
    return Stack(name, base, "stack", info, parts)


def artifact_sha256(directory: Path) -> str:
    """A digest of every file of the artifact (names and bytes; provenance.json aside, it
    is information about the run): which exact artifact a stacked run was trained on."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*")
                       if p.is_file() and p.name != PROVENANCE_FILE):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def stack_record(directories: Sequence[Path]) -> list[dict[str, Any]]:
    """What a record and a provenance.json say of a stack: each artifact's path, kind,
    digest and provenance (the run that made it)."""
    return [{"path": str(d), "kind": artifact_kind(d), "sha256": artifact_sha256(d),
             "provenance": read_provenance(d)} for d in directories]


@contextmanager
def on_top_of(directories: Sequence[Path], task: Task, base: LoadedModel,
              others: Sequence[LoadedModel] = ()) -> Iterator[list[dict[str, Any]]]:
    """The artifacts applied in place to every forward of `base` (their prompt also before
    every input of `others`: FedPT's small model) for the body: a run that trains a new
    point on top of them. Yields the stack's record; refuses an artifact made on another
    model or task, by name."""
    directories = [Path(d) for d in directories]
    for directory in directories:
        check_fit(directory, artifact_kind(directory), task, base.name)
    check_stack(directories)
    stack = load_stack("on-top-of", directories, base, lambda name: _no_model(name))
    if not isinstance(stack, Stack):
        stack = Stack(stack.name, base, "stack", {}, [stack])
    with in_place(stack, others):
        yield stack_record(directories)


def pipeline_costs(own: dict[str, Any], stack: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A run's totals plus those of every distinct artifact it was trained on top of, and of
    theirs (by digest: a stage two later stages both stand on counts once), and the stages
    counted: what the whole pipeline cost."""
    seen: dict[str, dict[str, Any]] = {}

    def walk(entries: Sequence[dict[str, Any]]) -> None:
        for entry in entries:
            provenance = entry.get("provenance") or {}
            seen.setdefault(entry.get("sha256") or entry.get("path"), provenance.get("costs") or {})
            walk(provenance.get("stack") or [])

    walk(stack)
    total = {key: float(own.get(key, 0)) + sum(float(c.get(key, 0)) for c in seen.values())
             for key in PIPELINE_KEYS}
    total["stages"] = len(seen) + 1
    total["stages_without_costs"] = sum(not c for c in seen.values())
    return total


def stack_name(stack: Sequence[dict[str, Any]], method: str) -> str:
    """`bdpl+ifed-icl`: each stage's method, in order (a stage's own, not its stack's)."""
    stages = [(e.get("provenance") or {}).get("method", e.get("kind", "?")).split("+")[-1]
              for e in stack]
    return "+".join([*stages, method])


def _no_model(name: str) -> LoadedModel:
    raise ArtifactMismatch(f"a proxy ({name} as its small model) cannot be trained on top of; "
                           "train it last, on top of the others")


# ------------------------------------------------------------------ loading
def load_adaptation(name: str, directory: Path, base: LoadedModel,
                    load_model: Callable[[str], LoadedModel]) -> Adaptation:
    """The adaptation a `fedsteer run --save` directory holds, on the base model.

    `load_model` loads any extra model a kind needs (FedPT's small pair), once per name."""
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
    config, arrays = read_adapter(directory)
    weights = {k: torch.tensor(np.asarray(v, dtype=np.float32), device="cpu")  # masters
               for k, v in arrays.items()}
    return config, weights, config.base_model_name_or_path


def _load_proxy(name: str, directory: Path, base: LoadedModel, info: dict[str, Any],
                load_model: Callable[[str], LoadedModel]) -> ProxyAdaptation:
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
        raise ArtifactMismatch(f"artifact {name!r} was made on {made_on!r}, but the base model "
                               f"is {base.name!r}: use --model {made_on}")
