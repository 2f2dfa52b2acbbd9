"""Where each decoder layer's residual-stream writers live, per architecture.

Steering methods hook the modules whose *output* is added to the residual stream. Keeping
that knowledge here means a new architecture is one table row, not a hunt through methods.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "ARCHITECTURES",
    "LayerModules",
    "UnknownArchitectureError",
    "hidden_size",
    "keep_layers",
    "layer_modules",
    "num_layers",
]


class UnknownArchitectureError(ValueError):
    """The model's `config.model_type` has no entry in `ARCHITECTURES`."""


@dataclass(frozen=True, eq=False)
class LayerModules:
    """One decoder layer's residual writers.

    A forward hook on `attention` or `mlp` sees (and may replace) exactly what is added to the
    residual stream; when `attention_returns_tuple` the tensor is element 0 of the output.
    """

    index: int
    attention: nn.Module
    mlp: nn.Module
    attention_returns_tuple: bool

    def __repr__(self) -> str:  # module reprs are pages long; the types are what matter
        return (
            f"LayerModules({self.index}, attention={type(self.attention).__name__}, "
            f"mlp={type(self.mlp).__name__}, "
            f"attention_returns_tuple={self.attention_returns_tuple})"
        )


@dataclass(frozen=True)
class _ArchSpec:
    """Dotted paths: `layers` from the top model (first match wins), the rest from a layer."""

    layers: tuple[str, ...]
    attention: str
    mlp: str
    attention_returns_tuple: bool


_LLAMA_LIKE = _ArchSpec(("model.layers", "layers"), "self_attn", "mlp", True)
# Gemma2/3 normalise each sub-block's output *before* the residual add, so the raw self_attn /
# mlp outputs are not what the residual stream receives: the post-norms' outputs are.
_GEMMA_SANDWICH = _ArchSpec(
    ("model.layers", "layers"), "post_attention_layernorm", "post_feedforward_layernorm", False
)

ARCHITECTURES: dict[str, _ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA_SANDWICH,
    "gemma3_text": _GEMMA_SANDWICH,
    "gemma3": _ArchSpec(
        ("model.language_model.layers", "language_model.layers"),
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        False,
    ),
    "gpt2": _ArchSpec(("transformer.h", "h"), "attn", "mlp", True),
}


def _unwrap(model: nn.Module) -> nn.Module:
    """PEFT wrappers hide the transformers model one level down."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _get_path(root: nn.Module, dotted: str) -> nn.Module | None:
    obj: object = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _spec_for(model: nn.Module) -> _ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type) if model_type else None
    if spec is None:
        raise UnknownArchitectureError(
            f"Unsupported architecture {model_type!r}; fedsteer knows: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add a row to fedsteer.models.arch.ARCHITECTURES."
        )
    return spec


def _layer_list(model: nn.Module, spec: _ArchSpec) -> nn.ModuleList:
    for path in spec.layers:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UnknownArchitectureError(
        f"{type(model).__name__} ({model.config.model_type}) has none of the expected layer "
        f"lists {spec.layers}"
    )


def layer_modules(model: nn.Module) -> list[LayerModules]:
    """Each decoder layer's attention and MLP residual writers, in depth order."""
    model = _unwrap(model)
    spec = _spec_for(model)
    result = []
    for i, layer in enumerate(_layer_list(model, spec)):
        attention, mlp = _get_path(layer, spec.attention), _get_path(layer, spec.mlp)
        if attention is None or mlp is None:
            raise UnknownArchitectureError(
                f"layer {i} of {model.config.model_type} lacks {spec.attention!r} or {spec.mlp!r}"
            )
        result.append(LayerModules(i, attention, mlp, spec.attention_returns_tuple))
    return result


def num_layers(model: nn.Module) -> int:
    """Decoder depth, counted from the module tree so it matches `layer_modules`."""
    model = _unwrap(model)
    return len(_layer_list(model, _spec_for(model)))


def hidden_size(model: nn.Module) -> int:
    """Residual-stream width (the text model's, for multimodal configs)."""
    model = _unwrap(model)
    _spec_for(model)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def keep_layers(model: nn.Module, keep: list[int]) -> None:
    """Drop every decoder layer not in `keep`, in place (an Offsite-Tuning emulator).

    Each kept attention's `layer_idx` is renumbered, so KV caches index the new depth, and
    the config's depth (and per-layer `layer_types`) follow.
    """
    model = _unwrap(model)
    spec = _spec_for(model)
    layers = _layer_list(model, spec)
    kept = [layers[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    path = next(path for path in spec.layers if _get_path(model, path) is layers)
    parent_path, _, attribute = path.rpartition(".")
    parent = _get_path(model, parent_path) if parent_path else model
    setattr(parent, attribute, nn.ModuleList(kept))
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
