"""Proxy-tuning (Liu et al. 2024): steer a large LM's next-token scores with a small pair's.

    s_proxy(x) = s_large(x) + α · (s_small_tuned(x) − s_small_base(x))

on logits (log-probs differ from logits by a per-position constant, so either gives the
same distribution after a softmax). The large model is reached only through
`next_token_logprobs` — scores over the vocabulary (`LocalVocabScores` for a model loaded
here) — so it could be a black box behind an API; the small pair runs locally (the same
model with its adapter on and off).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsteer.models.scoring import LabelScorer


class VocabularyMismatch(ValueError):
    """The small and large models do not share a vocabulary, so their scores cannot mix."""


class LocalVocabScores:
    """Scores over the vocabulary at the answer position (all FedPT needs of a large model)
    of a model loaded here, batched, without gradients."""

    def __init__(self, lm, label_words: Sequence[str], batch_size: int = 16) -> None:
        self.lm, self.name = lm, lm.name
        self.scorer = LabelScorer(lm, label_words, batch_size=batch_size)

    def next_token_logprobs(self, queries: Sequence[str]) -> torch.Tensor:
        return self.scorer.next_token_logprobs(queries)


def check_shared_vocabulary(small, large) -> int:
    """Refuse a pair whose tokenizers differ; return the shared vocabulary size."""
    small_vocab, large_vocab = small.tokenizer.get_vocab(), large.tokenizer.get_vocab()
    if small_vocab != large_vocab:
        only_small = len(set(small_vocab.items()) - set(large_vocab.items()))
        raise VocabularyMismatch(
            f"{small.name} and {large.name} do not share a vocabulary ({len(small_vocab)} vs "
            f"{len(large_vocab)} tokens, {only_small} entries of {small.name} differ): "
            "proxy-tuning adds their scores token by token, so they must"
        )
    return len(small_vocab)


def proxy_logprobs(large: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor,
                   alpha: float, vocab: int) -> torch.Tensor:
    """log softmax(s_large + α(s_tuned − s_base)) over the shared vocabulary."""
    combined = large[..., :vocab] + alpha * (tuned[..., :vocab] - base[..., :vocab])
    return combined.log_softmax(-1)
