"""Frozen models for steering: offline registry, loading, and per-architecture hook points."""

from fedsteer.models.arch import (
    LayerModules,
    UnknownArchitectureError,
    hidden_size,
    layer_modules,
    num_layers,
)
from fedsteer.models.load import (
    TINY_RANDOM,
    GGUFSizeError,
    LoadedModel,
    UnknownModelError,
    load_model,
    load_placed,
    model_status,
)
from fedsteer.models.registry import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelNotInstalledError,
    ModelSpec,
    list_models,
)
from fedsteer.models.tiny import build_tiny_random

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "TINY_RANDOM",
    "GGUFSizeError",
    "LayerModules",
    "LoadedModel",
    "ModelNotInstalledError",
    "ModelSpec",
    "UnknownArchitectureError",
    "UnknownModelError",
    "build_tiny_random",
    "hidden_size",
    "layer_modules",
    "list_models",
    "load_model",
    "load_placed",
    "model_status",
    "num_layers",
]
