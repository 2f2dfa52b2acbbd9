"""Shared fixtures: a tiny random model (built once per session) and a private cache dir."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_lm():
    from fedsteer.models import build_tiny_random

    return build_tiny_random(seed=0)
