"""Scores from answer probabilities: label probabilities, ratings, filters, histograms (pure functions).

A score is the probability of each label as the model's whole answer, normalised over the labels: for label
token sequences l_1..l_k, log P(label) = sum_i log P(l_i | prompt, l_<i) + log P(end | prompt, l_1..l_k), then a
softmax over the labels. `end` is the end of the answer: any of the tokens generation stops at (the chat template's
end of the assistant turn, e.g. <|im_end|>, from the checkpoint's generation_config). Without it a label that is a
prefix of another could never lose to it: on a 1-10 scale P("10") = P("1") P("0" | "1") <= P("1") always.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pipeline.config import Criterion, FilterRule
from pipeline.io.schema import column

HISTOGRAM_BINS = 10


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    """Each label's token ids as the start of the assistant's answer; labels must tokenise distinctly."""
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    for label, seq in zip(labels, ids):
        if not seq:
            raise ValueError(f"label {label!r} has no tokens")
    if len({tuple(s) for s in ids}) != len(ids):
        raise ValueError(f"labels {list(labels)} do not tokenise to distinct token sequences")
    return ids


def answer_logprob(steps: Sequence[Any], label: Sequence[int], end_ids: Sequence[int]) -> float:
    """log P(the answer is exactly `label`): `steps[t]` holds the next-token log-probabilities after the prompt and
    label[:t], for t = 0..len(label); the label's tokens, then any of `end_ids` to end the answer."""
    if len(steps) != len(label) + 1:
        raise ValueError(f"{len(steps)} steps for a label of {len(label)} tokens (needs one more, for the end)")
    logprob = sum(float(steps[t][token]) for t, token in enumerate(label))
    return logprob + logsumexp([float(steps[-1][e]) for e in end_ids])


def logsumexp(logprobs: Sequence[float]) -> float:
    """log of the summed probabilities (e.g. of ending the answer with any of several end tokens)."""
    top = max(logprobs)
    return top + math.log(sum(math.exp(lp - top) for lp in logprobs))


def normalize(logprobs: Sequence[float]) -> list[float]:
    """Softmax over the labels' sequence log-probabilities."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def evaluate(criterion: Criterion, logprobs: Sequence[float]) -> dict[str, Any]:
    """The output columns of one criterion from its labels' sequence log-probabilities."""
    labels = criterion.answers
    probs = normalize(logprobs)
    out: dict[str, Any] = {column("label_probs", criterion): list(zip(labels, probs)),
                           column("label", criterion): labels[max(range(len(probs)), key=probs.__getitem__)]}
    if criterion.scale is not None:
        rating = sum(p * int(label) for p, label in zip(probs, labels))
        out[column("rating", criterion)] = rating
        out[column("score", criterion)] = (rating - criterion.scale.min) / (criterion.scale.max - criterion.scale.min)
    else:
        out[column("score", criterion)] = probs[0]
    return out


def passes(rule: FilterRule | None, *, score: float | None, rating: float | None = None) -> bool:
    """Whether one criterion's result passes its rule (no rule: passes; no score, e.g. an error row: fails)."""
    if rule is None:
        return True
    if score is None:
        return False
    checks = [
        rule.min_score is None or score >= rule.min_score,
        rule.max_score is None or score <= rule.max_score,
        rule.min_rating is None or (rating is not None and rating >= rule.min_rating),
        rule.max_rating is None or (rating is not None and rating <= rule.max_rating),
    ]
    return all(checks)


def histogram(scores: Sequence[float | None], bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of scores in `bins` equal bins over [0, 1] (1.0 falls in the last bin); None is skipped."""
    counts = [0] * bins
    for s in scores:
        if s is not None and not math.isnan(s):
            counts[min(int(s * bins), bins - 1)] += 1
    return counts
