"""`fedsteer serve`: the base model and every adapted model a federation produced, behind one
OpenAI-compatible endpoint.

One copy of the base weights; each `--artifact NAME=DIR` (IFed-ICL steering, a LoRA adapter,
a tuned prompt, a FedPT proxy pair) is chosen per request by the OpenAI `model` field, as
vLLM chooses LoRA adapters. Rooms: `adaptations` (what a name adds to a forward), `engine`
(the model thread, batching per name), `protocol` (OpenAI's wire format), `api` (HTTP,
authentication, limits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fedsteer.models.load import LoadedModel
from fedsteer.serve.adaptations import Adaptation, load_stack
from fedsteer.serve.api import Limits, Server, make_app
from fedsteer.stacks import split_stack

__all__ = ["Limits", "Server", "build_adaptations", "make_app", "parse_artifact"]


def parse_artifact(spec: str) -> tuple[str, list[Path]]:
    """`NAME=DIR` (or `NAME=DIR1+DIR2+...`, a stack served as one name) as `--artifact`
    takes it."""
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"--artifact {spec!r}: use NAME=DIR, e.g. sst2-steered=runs/ifed/art, "
                         "or NAME=DIR1+DIR2 for a stack")
    return name, split_stack(directory)


def build_adaptations(base: LoadedModel, artifacts: Sequence[str],
                      load_model: Callable[[str], LoadedModel]) -> dict[str, Adaptation]:
    """The base under its own name, then each artifact under its name (names unique)."""
    served: dict[str, Adaptation] = {base.name: Adaptation(base.name, base,
                                                           info={"source": base.name})}
    others: dict[str, LoadedModel] = {base.name: base}

    def load_once(name: str) -> LoadedModel:
        if name not in others:
            others[name] = load_model(name)
        return others[name]

    for spec in artifacts:
        name, directories = parse_artifact(spec)
        if name in served:
            raise ValueError(f"--artifact {spec!r}: the name {name!r} is already served")
        served[name] = load_stack(name, directories, base, load_once)
    return served
