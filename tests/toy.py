"""A toy sentiment task the method tests share: a spec, and labelled rows on demand."""

from __future__ import annotations

from fedsteer.data import Example, TaskSpec

SPEC = TaskSpec(name="toy-sentiment", labels=("negative", "positive"),
                label_words=(" negative", " positive"), template="Review: {text}\nSentiment:")
WORDS = ["great", "awful", "fine", "dull", "witty", "a mess", "lovely", "boring", "superb"]


def examples(n: int, offset: int = 0) -> list[Example]:
    return [Example(text=f"{WORDS[(i + offset) % len(WORDS)]} film {i}", label=(i + offset) % 2)
            for i in range(n)]
