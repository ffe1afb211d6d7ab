"""Leave-one-out k-NN: hand-checked tiny cases (ties, exclusion groups, too few others) and
the batched search against a plain brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from engine.encoder import l2_normalise
from engine.evaluation.knn import exact_neighbours, loo_neighbours


def brute_force(xb, groups, k):
    """One query at a time, in plain Python: sort others by (-score, index)."""
    D, I = [], []
    for q in range(len(xb)):
        cands = sorted((-float(np.dot(xb[q], xb[j])), j) for j in range(len(xb)) if groups[j] != groups[q])[:k]
        D.append([-s for s, _ in cands] + [-np.inf] * (k - len(cands)))
        I.append([j for _, j in cands] + [-1] * (k - len(cands)))
    return np.array(D), np.array(I)


# Five unit vectors in 2-d with exact ties: rows 1 and 2 are identical, row 3 is the
# mirror of row 0 about row 1's direction.
X = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], np.float32)


def test_image_exclusion_by_hand_with_ties():
    D, I = loo_neighbours(X, np.arange(5), 3)
    # row 0: scores to 1,2,3,4 = .6,.6,0,-1 -> tie 1/2 by index
    assert I[0].tolist() == [1, 2, 3]
    # row 1: to 2 = 1.0, to 0 = .6, to 3 = .8 -> 2, 3, 0
    assert I[1].tolist() == [2, 3, 0]
    assert I[2].tolist() == [1, 3, 0]
    assert D[1].tolist() == pytest.approx([1.0, 0.8, 0.6])


def test_group_exclusion_drops_the_whole_slide():
    groups = np.array([7, 7, 8, 8, 9])  # rows 0,1 one slide; 2,3 another
    D, I = loo_neighbours(X, groups, 2)
    assert I[0].tolist() == [2, 3]  # 1 is the same slide
    assert I[1].tolist() == [2, 3]
    assert I[2].tolist() == [1, 0]
    assert I[4].tolist() == [3, 1]  # -1*0 + 0*1 = 0 for row 3 beats -0.6 for rows 1 and 2


def test_fewer_others_than_k_leaves_missing_slots():
    D, I = loo_neighbours(X, np.array([0, 0, 0, 0, 1]), 2)
    assert I[4].tolist() == [3, 1]
    assert I[0].tolist() == [4, -1] and D[0][1] == -np.inf


@pytest.mark.parametrize("extra_cap", [0, 2, 256])
def test_batched_search_equals_brute_force(extra_cap):
    rng = np.random.default_rng(1)
    # four entries of +-0.5 per row: unit norm and every score a multiple of 0.25, exact in any
    # summation order, so there are many true ties; groups of uneven size up to 12
    signs = rng.choice([-0.5, 0.5], (200, 8)).astype(np.float32)
    keep = np.argsort(rng.random((200, 8)), axis=1)[:, :4]
    xb = np.zeros((200, 8), np.float32)
    np.put_along_axis(xb, keep, np.take_along_axis(signs, keep, axis=1), axis=1)
    groups = np.repeat(np.arange(40), rng.integers(1, 13, 40))[:200]
    groups = np.concatenate([groups, np.arange(1000, 1000 + 200 - len(groups))])
    D, I = loo_neighbours(xb, groups, 7, extra_cap=extra_cap)
    Dr, Ir = brute_force(xb, groups, 7)
    assert (I == Ir).all()
    assert D == pytest.approx(Dr, abs=1e-6)


def test_exact_path_alone_equals_brute_force():
    rng = np.random.default_rng(2)
    xb = l2_normalise(rng.normal(size=(50, 4)).astype(np.float32))
    groups = rng.integers(0, 10, 50)
    D, I = exact_neighbours(xb, groups, np.arange(50), 5)
    assert (I == brute_force(xb, groups, 5)[1]).all()


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError):
        loo_neighbours(X, np.arange(4), 2)
    with pytest.raises(ValueError):
        loo_neighbours(X, np.arange(5), 0)
