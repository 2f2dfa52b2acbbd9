"""Black-box LLMs: what AsynDBT-style methods may use — label scores, never weights.

`LocalBlackBox` wraps a local model (the default); `OpenAIBlackBox` any OpenAI-compatible
endpoint; `fedsteer serve` (serve.py) puts a local model behind such an endpoint.
"""

from fedsteer.blackbox.base import BlackBox, BlackBoxError, Usage
from fedsteer.blackbox.http import OpenAIBlackBox, score_label_words
from fedsteer.blackbox.local import LocalBlackBox

__all__ = ["BlackBox", "BlackBoxError", "LocalBlackBox", "OpenAIBlackBox", "Usage",
           "score_label_words"]
