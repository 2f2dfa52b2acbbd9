"""Built-in tasks and user spec files, both loaded through the same validating row loader."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from fedsteer import settings
from fedsteer.data.errors import DataError
from fedsteer.data.loading import load_examples
from fedsteer.data.schema import Example, Task, TaskSpec, template_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_REVIEW = "Review: {text}\nSentiment:"

# name -> (template, label words); label names come from the data's meta.json.
BUILTIN_SPECS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": (_REVIEW, (" negative", " positive")),
    "mr": (_REVIEW, (" negative", " positive")),
    "sst5": (_REVIEW, (" terrible", " bad", " okay", " good", " great")),
    "subj": ("Input: {text}\nType:", (" subjective", " objective")),
    "trec": (
        "Question: {text}\nAnswer type:",
        (" abbreviation", " description", " entity", " person", " location", " number"),
    ),
    "agnews": ("Article: {text}\nTopic:", (" world", " sports", " business", " technology")),
    "rte": ("{text}\nQuestion: {text_pair} True or False?\nAnswer:", (" true", " false")),
    "cb": (
        "{text}\nQuestion: {text_pair} True, False or Neither?\nAnswer:",
        (" true", " false", " neither"),
    ),
}

SPEC_SUFFIXES = (".toml", ".yaml", ".yml")
DEFAULT_TEMPLATE = "Input: {text}\nLabel:"
DEFAULT_PAIR_TEMPLATE = "{text}\n{text_pair}\nLabel:"
_REQUIRED_KEYS = ("name", "labels", "train", "test")
_OPTIONAL_KEYS = ("label_words", "template", "pair", "dev", "demo_separator", "source")


def builtin_task_names() -> list[str]:
    """Names `load_task` accepts without a spec file."""
    return list(BUILTIN_SPECS)


def load_task(
    name_or_spec: str | Path, data_dir: Path | None = None, max_chars: int = 2000
) -> Task:
    """Load a built-in task by name, or a user's task from a .toml/.yaml/.yml spec file."""
    if isinstance(name_or_spec, str) and name_or_spec in BUILTIN_SPECS:
        return _load_builtin(name_or_spec, data_dir, max_chars)
    path = Path(name_or_spec)
    if path.suffix.lower() in SPEC_SUFFIXES:
        return _load_spec_file(path, max_chars)
    raise ValueError(
        f"unknown task {str(name_or_spec)!r}: use a built-in name "
        f"({', '.join(BUILTIN_SPECS)}) or a path to a .toml/.yaml/.yml spec file"
    )


def _load_builtin(name: str, data_dir: Path | None, max_chars: int) -> Task:
    task_dir = Path(data_dir if data_dir is not None else settings.data_dir()) / name
    meta_path = task_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"task {name!r} not found (no meta.json in {task_dir}; "
            f"{settings.DATA_DIR_ENV} / --data-dir must hold <task>/meta.json and its splits)",
            meta_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    template, words = BUILTIN_SPECS[name]
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != len(words):
        raise DataError(
            f"expected {len(words)} label names for {name!r}, got {labels!r}", meta_path,
            field="labels",
        )
    spec = TaskSpec(name=name, labels=tuple(labels), label_words=words, template=template)
    splits = {s: _split_file(task_dir, s) for s in ("train", "test", "dev")}
    loaded = {
        split: load_examples(path, spec.labels, pair=spec.is_pair, max_chars=max_chars)
        for split, path in splits.items()
        if split != "dev" or path.is_file()
    }
    _check_split_sizes(meta, loaded, meta_path)
    return Task(spec, loaded["train"], loaded["test"], loaded.get("dev"), meta.get("source", ""))


def _split_file(task_dir: Path, split: str) -> Path:
    """`<split>.jsonl`, else the compressed `<split>.jsonl.gz` the package ships; when neither
    exists, the plain name, so the error names a file a user could put there."""
    plain = task_dir / f"{split}.jsonl"
    packed = task_dir / f"{split}.jsonl.gz"
    return packed if not plain.is_file() and packed.is_file() else plain


def _check_split_sizes(meta: dict, loaded: dict[str, list[Example]], meta_path: Path) -> None:
    """A row count that disagrees with meta.json means a truncated or mixed-up file."""
    for split, expected in (meta.get("splits") or {}).items():
        if split in loaded and len(loaded[split]) != expected:
            raise DataError(
                f"meta.json says {split} has {expected} rows, file has {len(loaded[split])}",
                meta_path,
                field="splits",
            )


def _read_spec(path: Path) -> dict[str, Any]:
    """Parse TOML or YAML into a mapping, reporting syntax errors with their line."""
    if not path.is_file():
        raise DataError("spec file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError("spec file is not valid UTF-8", path) from None
    if path.suffix.lower() == ".toml":
        try:
            spec = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise DataError(f"invalid TOML: {err}", path) from None
    else:
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise DataError(f"invalid YAML: {err}", path, line) from None
    if not isinstance(spec, dict):
        raise DataError("spec must be a mapping of keys to values", path)
    return spec


def _check_keys(spec: dict[str, Any], path: Path) -> None:
    for key in _REQUIRED_KEYS:
        if key not in spec:
            raise DataError("missing spec key", path, field=key)
    for key in spec:
        if key not in _REQUIRED_KEYS + _OPTIONAL_KEYS:
            allowed = ", ".join(_REQUIRED_KEYS + _OPTIONAL_KEYS)
            raise DataError(f"unknown spec key (allowed: {allowed})", path, field=key)
    for key in ("name", "train", "test", "dev", "template", "demo_separator", "source"):
        if key in spec and not isinstance(spec[key], str):
            raise DataError(f"expected a string, got {type(spec[key]).__name__}", path, field=key)
    for key in ("labels", "label_words"):
        value = spec.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError("expected a list of strings", path, field=key)
    if "pair" in spec and not isinstance(spec["pair"], bool):
        raise DataError("expected true or false", path, field="pair")


def _spec_template(spec: dict[str, Any], path: Path) -> str:
    """The template decides pair-ness; an explicit `pair` must agree with it."""
    pair = spec.get("pair")
    if "template" not in spec:
        return DEFAULT_PAIR_TEMPLATE if pair else DEFAULT_TEMPLATE
    template = spec["template"]
    fields = template_fields(template)
    if fields not in ({"text"}, {"text", "text_pair"}):
        raise DataError(
            f"placeholders must be {{text}} or {{text}} and {{text_pair}}, got {sorted(fields)}",
            path,
            field="template",
        )
    if pair is not None and pair != ("text_pair" in fields):
        want = "needs {text_pair}" if pair else "must not use {text_pair}"
        raise DataError(f"pair = {str(pair).lower()} but the template {want}", path,
                        field="template")
    return template


def _load_spec_file(path: Path, max_chars: int) -> Task:
    return task_from_spec(_read_spec(path), path, max_chars)


def _data_path(spec_path: Path, value: str, split: str) -> Path:
    """A relative data path stays inside the spec's folder (a shared spec must not reach
    elsewhere on the reader's disk); an absolute path is the user's explicit choice."""
    if Path(value).is_absolute():
        return Path(value)
    folder = spec_path.parent.resolve()
    data_path = (folder / value).resolve()
    if not data_path.is_relative_to(folder):
        raise DataError(f"{value!r} leaves the spec's folder {folder}; move the file beside "
                        "the spec or give an absolute path", spec_path, field=split)
    return data_path


def task_from_spec(raw: dict[str, Any], path: Path, max_chars: int = 2000) -> Task:
    """A user's task from spec keys (as in a spec file); data paths are relative to
    `path`'s folder, and `path` is what errors name (the spec file, or where flags came from).
    """
    _check_keys(raw, path)
    labels = tuple(raw["labels"])
    words = tuple(raw.get("label_words") or (" " + label for label in labels))
    kwargs = {"demo_separator": raw["demo_separator"]} if "demo_separator" in raw else {}
    try:
        spec = TaskSpec(raw["name"], labels, words, _spec_template(raw, path), **kwargs)
    except ValueError as err:
        if isinstance(err, DataError):
            raise
        raise DataError(str(err), path) from None
    splits = {}
    for split in ("train", "test", "dev"):
        if split in raw:
            data_path = _data_path(path, raw[split], split)
            splits[split] = load_examples(
                data_path, labels, pair=spec.is_pair, max_chars=max_chars
            )
    source = raw.get("source", str(path))
    return Task(spec, splits["train"], splits["test"], splits.get("dev"), source)
