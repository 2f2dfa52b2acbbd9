"""Methods by name: each a pure algorithm behind the seam in `base.py`.

The registry maps a CLI name to a method class, as peft maps a tuner name to its class;
runtimes look methods up here and never import one directly.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fedsteer.methods.asyndbt import AsynDBT, CenDBT, SyncDBT
from fedsteer.methods.base import Client, Environment, Method, Reply, seeded_rng
from fedsteer.methods.bdpl import BDPL
from fedsteer.methods.fedavg_lora import FedAvgLoRA
from fedsteer.methods.fedpt import FedPT
from fedsteer.methods.icl import CentralICL, LocalICL, ZeroShot
from fedsteer.methods.ifed_icl import CentralI2CL, IFedICL

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (ZeroShot, LocalICL, CentralICL, IFedICL, CentralI2CL, FedAvgLoRA, FedPT, BDPL,
                AsynDBT, SyncDBT, CenDBT)
}


def make_method(name: str, **options: Any) -> Method:
    """Build a method from its name, taking the options it knows and ignoring the rest."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    known = option_names(name)
    return cls(**{k: v for k, v in options.items() if k in known and v is not None})


def option_names(name: str) -> set[str]:
    cls = METHODS[name]
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def check_options(names: list[str], options: dict[str, Any]) -> None:
    """Refuse an option none of the methods has (a typo must not pass silently), and a value
    of the wrong type for the option's declared field (`-o rank=abc`), before anything runs."""
    known = set().union(*(option_names(n) for n in names))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"no option {', '.join(unknown)} in {', '.join(names)}; "
            f"known: {', '.join(sorted(known))}"
        )
    for name in names:
        hints = typing.get_type_hints(METHODS[name])
        for key, value in options.items():
            if key in option_names(name) and value is not None:
                _check_type(name, key, value, hints[key])


class OptionTypeError(TypeError):
    """A method option's value does not fit the type its dataclass field declares."""


def _check_type(method: str, key: str, value: Any, hint: Any) -> None:
    """Pydantic's validation of one value against the dataclass field's annotation."""
    try:
        TypeAdapter(hint).validate_python(value)
    except ValidationError as error:
        expected = getattr(hint, "__name__", None) or str(hint)
        reason = error.errors()[0]["msg"]
        raise OptionTypeError(f"option {key} of {method} expects {expected}, got {value!r} "
                        f"({reason})") from None


__all__ = [
    "METHODS", "Client", "Environment", "Method", "OptionTypeError", "Reply", "check_options",
    "make_method",
    "option_names", "seeded_rng",
]
