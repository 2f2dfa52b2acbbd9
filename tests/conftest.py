"""Shared fixtures: a tiny random model (built once per session) and a private cache dir."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_lm():
    from fedsteer.models import build_tiny_random

    return build_tiny_random(seed=0)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that applies a thread budget (a ClientApp called in this process sets it for
    good, as its own process would) leaves torch's thread count as it found it."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
