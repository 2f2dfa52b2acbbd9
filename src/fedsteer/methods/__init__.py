"""Methods by name: each a pure algorithm behind the seam in `base.py`.

The registry maps a CLI name to a method class, as peft maps a tuner name to its class;
runtimes look methods up here and never import one directly. Methods are found through
Python entry points (group `fedsteer.methods`): fedsteer registers its own there, and any
installed package can add one (`examples/my_method`), with no change to fedsteer.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
import typing
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fedsteer.methods.asyndbt import AsynDBT, CenDBT, SyncDBT
from fedsteer.methods.base import (
    Aggregator,
    AnyMethod,
    AsyncMethod,
    Client,
    Environment,
    Method,
    MethodBase,
    Reply,
    seeded_rng,
)
from fedsteer.methods.bdpl import BDPL
from fedsteer.methods.fedavg_lora import FedAvgLoRA
from fedsteer.methods.fedpt import FedPT
from fedsteer.methods.icl import CentralICL, LocalICL, ZeroShot
from fedsteer.methods.ifed_icl import CentralI2CL, IFedICL

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "fedsteer.methods"
#: fedsteer's own methods: also its entry points; here for a source tree run uninstalled
BUILTIN: tuple[type[Method], ...] = (ZeroShot, LocalICL, CentralICL, IFedICL, CentralI2CL,
                                     FedAvgLoRA, FedPT, BDPL, AsynDBT, SyncDBT, CenDBT)


class MethodRegistry(Mapping[str, type[MethodBase]]):
    """Every method by name: the built-ins, then each installed package's entry points in
    `fedsteer.methods`, loaded on first use. A plugin that fails to load, is not a `Method`
    dataclass, names itself differently, or takes a built-in's name is left out with a
    warning: one broken package must not break fedsteer."""

    def __init__(self) -> None:
        self._methods: dict[str, type[MethodBase]] | None = None
        self.origins: dict[str, str] = {}

    def _loaded(self) -> dict[str, type[MethodBase]]:
        if self._methods is None:
            self._methods = {cls.name: cls for cls in BUILTIN}
            self.origins = dict.fromkeys(self._methods, "fedsteer")
            for point in entry_points(group=ENTRY_POINT_GROUP):
                self._add(point)
        return self._methods

    def _add(self, point) -> None:
        origin = point.dist.name if point.dist is not None else point.value
        if origin == "fedsteer":
            return  # the built-ins, registered above
        try:
            cls = point.load()
        except Exception as error:  # noqa: BLE001 - any failure of someone else's package
            log.warning("method plugin %r from %s failed to load: %r", point.name, origin, error)
            return
        problem = plugin_problem(point.name, cls, self._methods)
        if problem:
            log.warning("method plugin %r from %s left out: %s", point.name, origin, problem)
            return
        self._methods[point.name], self.origins[point.name] = cls, origin

    def __getitem__(self, name: str) -> type[MethodBase]:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def origin(self, name: str) -> str:
        self._loaded()
        return self.origins[name]


def plugin_problem(name: str, cls: Any, known: dict[str, type[MethodBase]]) -> str | None:
    """Why an entry point's object cannot be a method, or None."""
    if name in known:
        return f"{name!r} is taken by {known[name].__module__}.{known[name].__name__}"
    if not (isinstance(cls, type) and issubclass(cls, (Method, AsyncMethod))):
        return f"{cls!r} is not a subclass of fedsteer.methods.Method or AsyncMethod"
    if not dataclasses.is_dataclass(cls):
        return f"{cls.__name__} is not a dataclass (its fields are its options)"
    if getattr(cls, "name", None) != name:
        return f"{cls.__name__}.name is {getattr(cls, 'name', None)!r}, the entry point {name!r}"
    return None


METHODS = MethodRegistry()


def describe_options(name: str) -> list[dict[str, Any]]:
    """Each option of a method: name, type, default and the one-line comment beside the field
    in its source (what `fedsteer methods` prints)."""
    cls = METHODS[name]
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
        out.append({"name": f.name, "type": getattr(hints[f.name], "__name__", str(hints[f.name])),
                    "default": default, "help": comments.get(f.name, "")})
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """`field: type = default  # help` (or a `#:` line above it), over the class and its bases."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above = ""
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#:"):
                above = (above + " " + stripped[2:].strip()).strip()
                continue
            match = re.match(r"(\w+)\s*:[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$", stripped)
            if match and (match.group(2) or above):
                comments[match.group(1)] = match.group(2) or above
            above = ""
    return comments


def make_method(name: str, **options: Any) -> AnyMethod:
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
        takes = (f"known: {', '.join(sorted(known))}" if known else
                 f"{' and '.join(names)} take{'s' if len(names) == 1 else ''} no options")
        raise ValueError(f"no option {', '.join(unknown)} in {', '.join(names)}; {takes}")
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
    "METHODS", "Aggregator", "AnyMethod", "AsyncMethod", "Client", "Environment", "Method",
    "MethodBase", "OptionTypeError", "Reply", "check_options",
    "describe_options", "make_method", "option_names", "seeded_rng",
]
