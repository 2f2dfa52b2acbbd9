"""The label scorer gives exactly what a one-by-one manual computation gives."""

from __future__ import annotations

import pytest
import torch

from fedsteer.models.scoring import LabelScorer, LabelWordError

WORDS = (" negative", " positive")
QUERIES = [
    "Review: a gorgeous, witty film\nSentiment:",
    "Review: dull\nSentiment:",
    "Review: I would not watch this again, not even for free, not even twice\nSentiment:",
]
PREFIX = "Review: great fun\nSentiment: positive\n\nReview: a mess\nSentiment: negative\n\n"


def manual_scores(lm, prefix: str, queries, words, multi_token=False) -> torch.Tensor:
    """Unbatched reference: one sequence at a time, full logits, no cache."""
    tok = lm.tokenizer
    rows = []
    for q in queries:
        ids = (tok(prefix)["input_ids"] + tok(q, add_special_tokens=False)["input_ids"]
               if prefix else tok(q)["input_ids"])
        row = []
        for w in words:
            label = tok(w, add_special_tokens=False)["input_ids"]
            label = label if multi_token else label[:1]
            with torch.no_grad():
                logits = lm.model(torch.tensor([ids + label])).logits[0]
            logp = logits.log_softmax(-1)
            row.append(sum(logp[len(ids) - 1 + i, t] for i, t in enumerate(label)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("prefix", ["", PREFIX])
@pytest.mark.parametrize("reuse", [True, False])
def test_batched_scores_match_manual(tiny_lm, prefix, reuse):
    scorer = LabelScorer(tiny_lm, WORDS, batch_size=2)
    got = scorer.score(QUERIES, prefix=prefix, reuse_prefix=reuse)
    want = manual_scores(tiny_lm, prefix, QUERIES, WORDS)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_prefix_reuse_equals_reencoding(tiny_lm):
    scorer = LabelScorer(tiny_lm, WORDS, batch_size=3)
    torch.testing.assert_close(
        scorer.score(QUERIES, PREFIX, reuse_prefix=True),
        scorer.score(QUERIES, PREFIX, reuse_prefix=False), atol=1e-5, rtol=1e-5,
    )


def test_multi_token_scores_match_manual(tiny_lm):
    words = (" terribly boring", " wonderful")
    scorer = LabelScorer(tiny_lm, words, batch_size=2, multi_token=True)
    got = scorer.score(QUERIES, prefix=PREFIX)
    torch.testing.assert_close(
        got, manual_scores(tiny_lm, PREFIX, QUERIES, words, multi_token=True),
        atol=1e-4, rtol=1e-4,
    )


def test_label_words_must_differ_in_first_token(tiny_lm):
    with pytest.raises(LabelWordError, match="first tokens"):
        LabelScorer(tiny_lm, (" positive review", " positive"))


def test_empty_query_list(tiny_lm):
    assert LabelScorer(tiny_lm, WORDS).score([]).shape == (0, 2)


def test_vocabulary_scores_batched_by_length_come_back_in_input_order(tiny_lm):
    queries = [QUERIES[2], QUERIES[1], QUERIES[0], QUERIES[1]]  # lengths: long, short, mid
    scorer = LabelScorer(tiny_lm, WORDS, batch_size=2)
    got = scorer.next_token_logprobs(queries)
    want = torch.cat([scorer.logprobs([q]) for q in queries]).detach()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    first = [tiny_lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    torch.testing.assert_close(got[:, first], scorer.score(queries), atol=1e-4, rtol=1e-4)
