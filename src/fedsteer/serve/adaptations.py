"""What a served name adds to the one base model: the adaptations of
`fedsteer.models.adapted` (nothing, steering, a LoRA adapter, a prompt, a proxy-tuning pair,
or a stack of them), loaded from `fedsteer run --save` directories by `fedsteer.stacks`.

The engine never knows which kind it runs, and a context is entered around each forward,
so nothing of one name leaks into another's.
"""

from __future__ import annotations

from fedsteer.models.adapted import (
    Adaptation,
    Context,
    LoraAdaptation,
    PromptAdaptation,
    ProxyAdaptation,
    Stack,
    SteeringAdaptation,
    Stream,
    no_context,
    prompt_query_ids,
)
from fedsteer.stacks import load_adaptation, load_stack

__all__ = ["Adaptation", "Context", "LoraAdaptation", "PromptAdaptation", "ProxyAdaptation",
           "Stack", "SteeringAdaptation", "Stream", "load_adaptation", "load_stack",
           "no_context", "prompt_query_ids"]
