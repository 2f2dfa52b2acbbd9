"""Black-box LLMs: what AsynDBT-style methods may use — label scores, never weights.

`LocalBlackBox` wraps a local model (the default); `OpenAIBlackBox` any OpenAI-compatible
endpoint, such as the one `fedsteer serve` (`fedsteer.serve`) runs.
"""

from fedsteer.blackbox.base import BlackBox, BlackBoxError, Usage
from fedsteer.blackbox.http import OpenAIBlackBox, score_label_words
from fedsteer.blackbox.local import LocalBlackBox

__all__ = ["BlackBox", "BlackBoxError", "LocalBlackBox", "OpenAIBlackBox", "Usage",
           "open_blackbox", "score_label_words"]


def open_blackbox(spec: str, lm_of, batch_size: int) -> BlackBox:
    """The black box a spec names: "local", this process's model (`lm_of()`, loaded only
    then) behind `LocalBlackBox`; "openai:BASE_URL#MODEL", an OpenAI-compatible endpoint
    (key from $OPENAI_API_KEY), e.g. one `fedsteer serve` runs."""
    if spec == "local":
        return LocalBlackBox(lm_of(), batch_size=batch_size)
    if spec.startswith("openai:") and "#" in spec:
        url, model = spec.removeprefix("openai:").rsplit("#", 1)
        return OpenAIBlackBox(url, model)
    raise ValueError(f"black box {spec!r}: use 'local' or 'openai:BASE_URL#MODEL'")
