"""Runtimes: they sample clients, move messages, count costs and checkpoint; no method math."""

from fedsteer.federation.inprocess import InProcessRuntime, RunOutcome, RuntimeConfig
from fedsteer.federation.payloads import InvalidReply, check_reply

__all__ = ["InProcessRuntime", "InvalidReply", "RunOutcome", "RuntimeConfig", "check_reply"]
