"""The architecture map: every supported model type exposes hookable residual writers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from fedsteer.models.arch import (
    ARCHITECTURES,
    UnknownArchitectureError,
    hidden_size,
    layer_modules,
    num_layers,
)

HIDDEN, LAYERS, VOCAB = 32, 3, 128
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
)
_GEMMA = dict(_DECODER, head_dim=8)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_DECODER),
    "qwen2": lambda: Qwen2Config(**_DECODER),
    "qwen3": lambda: Qwen3Config(**_DECODER, head_dim=8),
    "mistral": lambda: MistralConfig(**_DECODER),
    "gemma": lambda: GemmaConfig(**_GEMMA),
    "gemma2": lambda: Gemma2Config(**_GEMMA),
    "gemma3_text": lambda: Gemma3TextConfig(**_GEMMA),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4),
}


def _gemma3_multimodal() -> nn.Module:
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**_GEMMA).to_dict(),
        vision_config=vision,
        mm_tokens_per_image=4,
    )
    return Gemma3ForConditionalGeneration(config)


def _build(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    if model_type == "gemma3":
        return _gemma3_multimodal().eval()
    return AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()


@pytest.mark.parametrize("model_type", [*CONFIGS, "gemma3"])
def test_hooks_fire_once_per_layer_with_residual_shaped_tensors(model_type: str) -> None:
    model = _build(model_type)
    assert model.config.model_type == model_type
    layers = layer_modules(model)
    assert num_layers(model) == len(layers) == LAYERS
    assert hidden_size(model) == HIDDEN
    assert [lm.index for lm in layers] == list(range(LAYERS))

    seen: list[tuple[str, int, torch.Size]] = []

    def hook_for(kind: str, index: int, is_tuple: bool):
        def hook(_module, _inputs, output):
            tensor = output[0] if is_tuple else output
            assert isinstance(tensor, torch.Tensor)
            seen.append((kind, index, tensor.shape))

        return hook

    handles = []
    for lm in layers:
        handles.append(
            lm.attention.register_forward_hook(
                hook_for("attn", lm.index, lm.attention_returns_tuple)
            )
        )
        handles.append(lm.mlp.register_forward_hook(hook_for("mlp", lm.index, False)))
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (2, 5)))
    for handle in handles:
        handle.remove()

    expected = {
        (kind, i, torch.Size([2, 5, HIDDEN])) for i in range(LAYERS) for kind in ("attn", "mlp")
    }
    assert len(seen) == 2 * LAYERS
    assert set(seen) == expected


def test_replacing_attention_output_changes_logits() -> None:
    """A hook's return value must reach the residual stream (the whole point of the map)."""
    model = _build("llama")
    ids = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        lm = layer_modules(model)[0]
        handle = lm.attention.register_forward_hook(lambda m, i, o: (o[0] + 1.0, *o[1:]))
        steered = model(input_ids=ids).logits
        handle.remove()
    assert not torch.allclose(base, steered)


def test_unknown_architecture_names_model_type_and_known_ones() -> None:
    model = BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    with pytest.raises(UnknownArchitectureError, match="'bert'") as info:
        layer_modules(model)
    assert "llama" in str(info.value) and "gpt2" in str(info.value)
    with pytest.raises(UnknownArchitectureError):
        num_layers(model)
    assert issubclass(UnknownArchitectureError, ValueError)


def test_model_without_config_is_unknown() -> None:
    with pytest.raises(UnknownArchitectureError, match="None"):
        layer_modules(nn.Linear(2, 2))


def test_peft_wrapped_model_is_unwrapped() -> None:
    peft = pytest.importorskip("peft")
    model = _build("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert num_layers(wrapped) == LAYERS
    assert layer_modules(wrapped)[0].attention is model.model.layers[0].self_attn


def test_every_listed_architecture_is_tested() -> None:
    assert set(ARCHITECTURES) == {*CONFIGS, "gemma3"}


def test_an_emulator_keeps_evenly_spaced_layers_and_still_scores():
    from fedsteer.models import load_model
    from fedsteer.models.load import UnknownModelError, emulator_layers

    assert emulator_layers(24, 6) == [0, 5, 9, 14, 18, 23]
    assert emulator_layers(2, 1) == [0]
    with pytest.raises(ValueError):
        emulator_layers(4, 5)
    from fedsteer.models.scoring import LabelScorer

    small = load_model("emulator:1:tiny-random")
    assert small.num_layers == 1 and small.model.config.num_hidden_layers == 1
    scorer = LabelScorer(small, [" yes", " no"], batch_size=2)
    cached = scorer.score(["a b:", "c:"], prefix="x: yes\n")
    fresh = scorer.score(["a b:", "c:"], prefix="x: yes\n", reuse_prefix=False)
    torch.testing.assert_close(cached, fresh)  # renumbered layers index the KV cache right
    with pytest.raises(UnknownModelError, match="emulator:K:BASE"):
        load_model("emulator:tiny-random")
