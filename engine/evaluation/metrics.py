"""Retrieval metrics, defined once: Acc@k, MV@k, mMV@k, mAP@k and the majority vote.

Every function takes the ranked labels of the retrieved neighbours of each query, already
filtered by the leave-one-out exclusion (same image / slide / patient). Labels are integer
class codes; a slot without a neighbour (fewer than k candidates survived the exclusion)
holds MISSING and never counts as a hit nor as a vote.

Definitions (DESIGN.md, "Metrics"):

- Acc@k: a query is correct when at least one of its top-k results has its label.
- MV@k: a query is correct when the majority label of its top-k equals its label. Ties are
  broken by rank: among the labels with the most votes, the one whose best-ranked result
  comes first wins (so MV@1 == Acc@1).
- mMV@k: MV@k per class of the queries, then the unweighted mean over those classes.
- mAP@k: mean over queries of AP@k = (1 / R_k) * sum_{i<=k} P@i * rel_i, with R_k the number
  of relevant results in the top k (AP@k = 0 when R_k = 0), as in SISH / RetCCL-style
  histopathology search papers. This normalises by what was retrieved, not by the size of the
  class in the data set, so it stays comparable across data sets of different sizes.
  `normalise="k"` gives SISH's variant (eval.py): (1 / k) * sum_{i<=k} P@i * rel_i.
- macro-F1@k: the majority vote of the top k is the query's predicted class; F1 per class
  (2 TP / (2 TP + FP + FN), 0 when the class is neither predicted nor true), averaged over the
  classes that occur as a label or a prediction, as scikit-learn's `classification_report`
  "macro avg" does (Yottixel). A query without any result predicts nothing: it is a false
  negative of its class and adds no class.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MISSING = -1


def encode_labels(labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """String labels -> (int64 codes, sorted class names) with classes[codes[i]] == labels[i]."""
    classes = sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    return np.fromiter((index[x] for x in labels), dtype=np.int64, count=len(labels)), classes


def _check(query: np.ndarray, neighbours: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    query = np.asarray(query, dtype=np.int64)
    neighbours = np.asarray(neighbours, dtype=np.int64)
    if neighbours.ndim != 2 or query.ndim != 1 or neighbours.shape[0] != query.shape[0]:
        raise ValueError(
            f"expected query labels (n,) and neighbour labels (n, K), got {query.shape} and {neighbours.shape}"
        )
    if not 1 <= k <= neighbours.shape[1]:
        raise ValueError(f"k must be between 1 and {neighbours.shape[1]} (neighbours retrieved), not {k}")
    return query, neighbours[:, :k]


def hits_at_k(query: np.ndarray, neighbours: np.ndarray, k: int) -> np.ndarray:
    """Per query (bool): is any of the top-k of its label (Acc@k before averaging)."""
    query, top = _check(query, neighbours, k)
    return (top == query[:, None]).any(axis=1)


def majority_at_k(neighbours: np.ndarray, k: int) -> np.ndarray:
    """Per query: the majority-vote class code of the top-k (MISSING when nothing was
    retrieved), with the rank tie rule of `engine.vote.majority_vote`."""
    neighbours = np.asarray(neighbours, dtype=np.int64)
    _, top = _check(np.zeros(neighbours.shape[0], np.int64), neighbours, k)
    present = top != MISSING
    # votes[i, j]: how many of row i's top-k share the label at position j
    votes = ((top[:, :, None] == top[:, None, :]) & present[:, None, :]).sum(axis=2)
    votes[~present] = 0
    # argmax takes the first position holding the largest count: the best-ranked tied label
    winner = votes.argmax(axis=1)
    label = top[np.arange(top.shape[0]), winner]
    label[~present.any(axis=1)] = MISSING
    return label


def mv_hits_at_k(query: np.ndarray, neighbours: np.ndarray, k: int) -> np.ndarray:
    """Per query (bool): does the majority vote of the top-k equal its label."""
    query, _ = _check(query, neighbours, k)
    return majority_at_k(neighbours, k) == query


AP_NORMALISATIONS = ("retrieved", "k")


def average_precision_at_k(
    query: np.ndarray, neighbours: np.ndarray, k: int, normalise: str = "retrieved"
) -> np.ndarray:
    """Per query: AP@k (see the module docstring); 0 when no top-k result is relevant.
    normalise: "retrieved" divides by the relevant results in the top k (histoseek, RetCCL
    style), "k" by k (SISH eval.py)."""
    if normalise not in AP_NORMALISATIONS:
        raise ValueError(f"normalise must be one of {AP_NORMALISATIONS}, not {normalise!r}")
    query, top = _check(query, neighbours, k)
    rel = (top == query[:, None]).astype(np.float64)
    precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    total = (precision * rel).sum(axis=1)
    if normalise == "k":
        return total / k
    found = rel.sum(axis=1)
    return np.divide(total, found, out=np.zeros_like(total), where=found > 0)


def acc_at_k(query: np.ndarray, neighbours: np.ndarray, k: int) -> float:
    return float(hits_at_k(query, neighbours, k).mean())


def mv_at_k(query: np.ndarray, neighbours: np.ndarray, k: int) -> float:
    return float(mv_hits_at_k(query, neighbours, k).mean())


def macro_mean(per_query: np.ndarray, query: np.ndarray) -> float:
    """Mean over the classes present among the queries of the per-class mean."""
    query = np.asarray(query, dtype=np.int64)
    classes = np.unique(query)
    return float(np.mean([per_query[query == c].mean() for c in classes]))


def mmv_at_k(query: np.ndarray, neighbours: np.ndarray, k: int) -> float:
    return macro_mean(mv_hits_at_k(query, neighbours, k), query)


def map_at_k(query: np.ndarray, neighbours: np.ndarray, k: int, normalise: str = "retrieved") -> float:
    return float(average_precision_at_k(query, neighbours, k, normalise).mean())


def f1_per_class(true: np.ndarray, predicted: np.ndarray) -> dict[int, float]:
    """F1 of every class that occurs in `true` or (other than MISSING) in `predicted`."""
    true = np.asarray(true, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    classes = np.union1d(true, predicted[predicted != MISSING])
    out = {}
    for c in classes:
        tp = int(((predicted == c) & (true == c)).sum())
        fp = int(((predicted == c) & (true != c)).sum())
        fn = int(((predicted != c) & (true == c)).sum())
        out[int(c)] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def macro_f1(true: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean of `f1_per_class` (scikit-learn's macro average)."""
    per = f1_per_class(true, predicted)
    return float(np.mean(list(per.values()))) if per else 0.0


def macro_f1_at_k(query: np.ndarray, neighbours: np.ndarray, k: int) -> float:
    """macro-F1 of the majority-vote predictions of the top k."""
    query, _ = _check(query, neighbours, k)
    return macro_f1(query, majority_at_k(neighbours, k))


def retrieval_metrics(query: np.ndarray, neighbours: np.ndarray, ks: Sequence[int], classes: Sequence[str]) -> dict:
    """All metrics at every k, overall and per class, as fractions in [0, 1].

    Returns {"overall": {"acc@1": .., "mv@1": .., "mmv@1": .., "map@1": .., ...},
             "per_class": {name: {"count": n, "acc@1": .., "mv@1": .., "map@1": ..}}}.
    """
    query = np.asarray(query, dtype=np.int64)
    overall: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {}
    present = np.unique(query)
    for c in present:
        per_class[classes[c]] = {"count": int((query == c).sum())}
    for k in ks:
        acc = hits_at_k(query, neighbours, k)
        mv = mv_hits_at_k(query, neighbours, k)
        ap = average_precision_at_k(query, neighbours, k)
        overall[f"acc@{k}"] = float(acc.mean())
        overall[f"mv@{k}"] = float(mv.mean())
        overall[f"mmv@{k}"] = macro_mean(mv, query)
        overall[f"map@{k}"] = float(ap.mean())
        for c in present:
            sel = query == c
            row = per_class[classes[c]]
            row[f"acc@{k}"] = float(acc[sel].mean())
            row[f"mv@{k}"] = float(mv[sel].mean())
            row[f"map@{k}"] = float(ap[sel].mean())
    return {"overall": overall, "per_class": per_class}
