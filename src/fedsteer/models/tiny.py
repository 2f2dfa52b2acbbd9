"""`tiny-random`: a small random Llama with a real tokenizer, for fast end-to-end tests.

A real (SmolLM2) tokenizer keeps chat templates, special tokens and padding behaviour honest,
while random weights keep the whole model under a second to build.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from fedsteer.models.load import TINY_RANDOM, LoadedModel, finalize
from fedsteer.models.registry import REGISTRY, resolve_parts
from fedsteer.settings import cache_dir

__all__ = ["build_tiny_random", "smollm2_tokenizer", "tiny_config"]

log = logging.getLogger(__name__)


def _tokenizer_dir() -> Path:
    return cache_dir() / "tokenizers" / "smollm2"


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer, read from its GGUF once (~4 s) and cached in plain HF form."""
    folder = _tokenizer_dir()
    if not (folder / "tokenizer_config.json").is_file():
        gguf = resolve_parts(REGISTRY["smollm2-135m"])[0]
        log.info("extracting the SmolLM2 tokenizer from %s (once)", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_config(vocab_size: int, tokenizer: PreTrainedTokenizerBase | None = None) -> LlamaConfig:
    """Tiny Llama dims: big enough for GQA and two layers of hooks, small enough to be instant."""
    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **special,
    )


def build_tiny_random(seed: int = 0) -> LoadedModel:
    """A deterministic (per `seed`) random tiny Llama with the SmolLM2 tokenizer."""
    tokenizer = smollm2_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return finalize(model, tokenizer, TINY_RANDOM)
