"""Runtimes: they sample clients, move messages, count costs and checkpoint; no method math.



"""

from fedsteer.federation.inprocess import InProcessRuntime
from fedsteer.federation.payloads import InvalidReply, check_reply
from fedsteer.federation.runtime import (
    CheckpointMismatch,
    RunOutcome,
    Runtime,
    RuntimeConfig,
    sample_clients,
)

__all__ = [
    "CheckpointMismatch", "InProcessRuntime", "InvalidReply", "RunOutcome", "Runtime",
    "RuntimeConfig", "check_reply", "sample_clients",
]
