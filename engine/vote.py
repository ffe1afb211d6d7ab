"""The majority vote of a ranked list of labels, one rule for the whole project: the search's
suggestion (engine.search.results) and the benchmarks' MV@k (engine.evaluation.metrics)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence


def majority_vote(labels_ranked: Sequence[str]) -> tuple[str, dict[str, int]]:
    """The majority label of a ranked list and the votes of every label.

    Tie: the label of the best-ranked result among the tied labels. Raises ValueError on an
    empty list (there is nothing to vote on: a caller's mistake, not a user's).
    """
    if len(labels_ranked) == 0:
        raise ValueError("majority_vote needs at least one label")
    votes = Counter(labels_ranked)
    best = max(votes.values())
    # the first label in rank order with the top count wins the tie
    winner = next(label for label in labels_ranked if votes[label] == best)
    return winner, dict(votes)
