"""Metrics on hand-checked tiny cases, ties included, and against a plain-Python reference."""

from __future__ import annotations

import numpy as np
import pytest

from engine.evaluation.metrics import (
    MISSING,
    acc_at_k,
    average_precision_at_k,
    encode_labels,
    majority_at_k,
    map_at_k,
    mmv_at_k,
    mv_at_k,
    retrieval_metrics,
)
from engine.vote import majority_vote


def test_majority_vote_counts_and_plain_majority():
    assert majority_vote(["a", "b", "b"]) == ("b", {"a": 1, "b": 2})


def test_majority_vote_tie_goes_to_best_ranked_label():
    # a and b both have 2 votes; b's best result is rank 1, a's rank 2
    assert majority_vote(["b", "a", "a", "b", "c"])[0] == "b"
    assert majority_vote(["c", "a", "b", "a", "b"])[0] == "a"
    assert majority_vote(["x", "y", "z"])[0] == "x"


def test_majority_vote_refuses_empty():
    with pytest.raises(ValueError):
        majority_vote([])


# Three queries, labels 0,1,0, with five ranked neighbours each (worked out by hand below).
Q = np.array([0, 1, 0])
N = np.array(
    [
        [1, 0, 0, 1, 2],  # top1 miss; top3 {1,0,0} -> 0 wins; top5 0:2,1:2 tie -> 1 (rank 1) wins
        [1, 0, 0, 0, 1],  # top1 hit; top3 0 wins (miss); top5 0:3 -> miss
        [2, 2, 1, 0, MISSING],  # top1 miss; top3 2 wins; top5 (4 present) 2 wins; acc@5 hit
    ]
)


def test_acc_at_k_by_hand():
    assert acc_at_k(Q, N, 1) == pytest.approx(1 / 3)
    assert acc_at_k(Q, N, 3) == pytest.approx(2 / 3)
    assert acc_at_k(Q, N, 5) == pytest.approx(1.0)


def test_majority_by_hand_including_tie_and_missing():
    assert majority_at_k(N, 1).tolist() == [1, 1, 2]
    assert majority_at_k(N, 3).tolist() == [0, 0, 2]
    assert majority_at_k(N, 5).tolist() == [1, 0, 2]
    assert majority_at_k(np.array([[MISSING, MISSING]]), 2).tolist() == [MISSING]


def test_mv_and_mmv_by_hand():
    assert mv_at_k(Q, N, 1) == pytest.approx(1 / 3)
    assert mv_at_k(Q, N, 3) == pytest.approx(1 / 3)
    assert mv_at_k(Q, N, 5) == pytest.approx(0.0)
    # class 0: queries 0 and 2 -> MV@3 hits [True, False] -> 0.5; class 1: query 1 -> miss -> 0
    assert mmv_at_k(Q, N, 3) == pytest.approx(0.25)
    # class 0 MV@1: 0/2; class 1: 1/1 -> macro 0.5, while micro MV@1 is 1/3
    assert mmv_at_k(Q, N, 1) == pytest.approx(0.5)


def test_average_precision_by_hand():
    ap = average_precision_at_k(Q, N, 5)
    # q0 relevant at ranks 2,3: (1/2 + 2/3) / 2
    # q1 relevant at ranks 1,5: (1/1 + 2/5) / 2
    # q2 relevant at rank 4: (1/4) / 1
    assert ap.tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, (1 + 2 / 5) / 2, 1 / 4])
    assert map_at_k(Q, N, 1) == pytest.approx(1 / 3)
    assert average_precision_at_k(np.array([3]), np.array([[1, 2]]), 2).tolist() == [0.0]


def _reference(q, ranked, k):
    """Plain-Python restatement of the definitions, for random cross-checks."""
    top = [x for x in ranked[:k] if x != MISSING]
    acc = q in top
    mv = bool(top) and majority_vote(top)[0] == q
    rel = [x == q for x in ranked[:k]]
    prec = [sum(rel[: i + 1]) / (i + 1) for i in range(k)]
    ap = sum(p for p, r in zip(prec, rel) if r) / sum(rel) if any(rel) else 0.0
    return acc, mv, ap


def test_vectorised_metrics_equal_plain_reference_on_random_rankings():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 4, 300)
    n = rng.integers(0, 4, (300, 7))
    n[rng.random((300, 7)) < 0.05] = MISSING
    n = np.sort(n, axis=1)[:, ::-1].copy()  # MISSING slots last, as the search returns them
    rng.shuffle(n[:, :3], axis=1)
    for k in (1, 3, 5, 7):
        ref = np.array([_reference(int(a), list(b), k) for a, b in zip(q, n)], dtype=float)
        assert acc_at_k(q, n, k) == pytest.approx(ref[:, 0].mean())
        assert mv_at_k(q, n, k) == pytest.approx(ref[:, 1].mean())
        assert map_at_k(q, n, k) == pytest.approx(ref[:, 2].mean())
        per_class = [ref[q == c, 1].mean() for c in np.unique(q)]
        assert mmv_at_k(q, n, k) == pytest.approx(np.mean(per_class))


def test_retrieval_metrics_names_classes_and_counts():
    codes, classes = encode_labels(["TUM", "ADI", "TUM"])
    assert classes == ["ADI", "TUM"] and codes.tolist() == [1, 0, 1]
    report = retrieval_metrics(codes, np.array([[1, 0], [1, 1], [0, 1]]), [1, 2], classes)
    assert report["per_class"]["TUM"]["count"] == 2
    assert report["per_class"]["ADI"]["acc@2"] == 0.0
    assert report["overall"]["acc@1"] == pytest.approx(1 / 3)
    # TUM: [1,0] tie -> TUM (hit), [0,1] tie -> ADI (miss) = 0.5; ADI: [1,1] -> miss = 0
    assert report["overall"]["mmv@2"] == pytest.approx((0.5 + 0.0) / 2)


def test_k_larger_than_retrieved_is_a_clear_error():
    with pytest.raises(ValueError, match="k must be"):
        acc_at_k(Q, N, 6)


def test_sish_map_normalises_by_k_and_histoseek_by_what_was_retrieved():
    from engine.evaluation.metrics import average_precision_at_k

    q = np.array([0, 1])
    n = np.array([[1, 0, 0, -1], [-1, -1, -1, -1]])
    # q0: relevant at ranks 2, 3 -> precision 1/2, 2/3
    assert average_precision_at_k(q, n, 4, normalise="k").tolist() == pytest.approx([(1 / 2 + 2 / 3) / 4, 0.0])
    assert average_precision_at_k(q, n, 4).tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, 0.0])
    with pytest.raises(ValueError, match="normalise"):
        average_precision_at_k(q, n, 4, normalise="class")


def test_macro_f1_is_sklearns_macro_average_including_missing_predictions():
    from sklearn.metrics import f1_score

    from engine.evaluation.metrics import MISSING, macro_f1, macro_f1_at_k

    rng = np.random.default_rng(3)
    for _ in range(20):
        true = rng.integers(0, 4, 30)
        pred = rng.integers(-1, 5, 30)  # -1: no prediction; 4: a class no query has
        labels = sorted(set(true) | set(pred[pred != MISSING]))
        want = f1_score(true, np.where(pred == MISSING, 99, pred), labels=labels, average="macro", zero_division=0)
        assert macro_f1(true, pred) == pytest.approx(want)
    # top-2 votes with a tie: [1, 0] -> 1 (best-ranked), [0, 0] -> 0, [-1, -1] -> nothing
    q = np.array([0, 0, 1])
    n = np.array([[1, 0], [0, 0], [-1, -1]])
    # predictions 1, 0, none: class 0 tp1 fn1 -> 2/3; class 1 fp1 fn1 -> 0
    assert macro_f1_at_k(q, n, 2) == pytest.approx((2 / 3 + 0) / 2)
