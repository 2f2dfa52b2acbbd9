"""Examples, task specs and tasks: the one place that decides how a task is shown to an LM."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One labelled row; `text_pair` is set only for pair tasks (rte, cb)."""

    text: str
    label: int
    text_pair: str | None = None


def template_fields(template: str) -> set[str]:
    """Placeholder names in `template`, so a spec can be checked before any row is formatted."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@dataclass(frozen=True)
class TaskSpec:
    """How a task is shown to a causal LM: a query template and one label word per label.

    Label words carry their leading space so `query + word` tokenizes as the LM saw in training.
    """

    name: str
    labels: tuple[str, ...]
    label_words: tuple[str, ...]
    template: str
    demo_separator: str = "\n\n"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "label_words", tuple(self.label_words))
        if len(self.labels) < 2:
            raise ValueError(f"task {self.name!r}: needs at least 2 labels, got {len(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            twice = sorted({label for label in self.labels if self.labels.count(label) > 1})
            raise ValueError(f"task {self.name!r}: label names must differ; twice: {twice}")
        if len(self.label_words) != len(self.labels):
            raise ValueError(
                f"task {self.name!r}: {len(self.labels)} labels but "
                f"{len(self.label_words)} label words"
            )
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"task {self.name!r}: label words must differ: {self.label_words}")
        if any(not word.strip() for word in self.label_words):
            raise ValueError(f"task {self.name!r}: empty label word in {self.label_words}")
        fields = template_fields(self.template)
        if fields not in ({"text"}, {"text", "text_pair"}):
            raise ValueError(
                f"task {self.name!r}: template placeholders must be {{text}} or "
                f"{{text}} and {{text_pair}}, got {sorted(fields)}"
            )

    @property
    def is_pair(self) -> bool:
        """True when the template shows two texts (entailment-style tasks)."""
        return "text_pair" in template_fields(self.template)

    def format_query(self, ex: Example) -> str:
        """The prompt that ends right before the label word the LM should score."""
        if self.is_pair and ex.text_pair is None:
            raise ValueError(f"task {self.name!r} is a pair task but the example has no text_pair")
        return self.template.format(text=ex.text, text_pair=ex.text_pair)

    def format_demo(self, ex: Example) -> str:
        """A worked example: the query followed by its label word."""
        return self.format_query(ex) + self.label_words[ex.label]

    def demo_prefix(self, demos: Sequence[Example]) -> str:
        """Demos each followed by the separator, so the query can be appended directly."""
        return "".join(self.format_demo(ex) + self.demo_separator for ex in demos)


@dataclass
class Task:
    """A spec plus its splits; `dev` is None when the task ships without one."""

    spec: TaskSpec
    train: list[Example]
    test: list[Example]
    dev: list[Example] | None = None
    source: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def num_labels(self) -> int:
        return len(self.spec.labels)
