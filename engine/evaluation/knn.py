"""Leave-one-out k nearest neighbours over a labelled feature set, as ONE batched search.

Every item is a query against all the others; results from the query's own exclusion group
(itself, its slide, or its patient) are dropped. Instead of N searches with a filter, one
FAISS flat inner-product search asks for `k + extra` neighbours of every row, where `extra`
covers the largest exclusion group (capped); the few rows where that was not enough, or
where a score tie at the edge of the short list could hide an equally good item, are redone
exactly over the whole set. The result equals brute force with this order: higher cosine
similarity first, ties by lower row index.

Features must be L2-normalised (cosine = inner product); `xb`, `k`, `D`, `I` follow FAISS.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
from tqdm import tqdm

LOG = logging.getLogger(__name__)

# The short list holds k + min(largest group, EXTRA_CAP) + 1 candidates: enough for nearly all
# rows at a bounded memory cost (n x short list x 12 bytes); the rest take the exact path.
EXTRA_CAP = 256
QUERY_BLOCK = 4096


def _order(D: np.ndarray, I: np.ndarray) -> np.ndarray:
    """Per-row order: descending score, then ascending index (invalid slots hold -inf, and
    index n so they sort last)."""
    return np.lexsort((I, -D), axis=-1)


def exact_neighbours(xb: np.ndarray, groups: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force for the given query rows: all scores, own group masked, full stable sort.
    Returns (D, I) of shape (len(rows), k); missing slots are (-inf, -1)."""
    n = xb.shape[0]
    D_out = np.full((len(rows), k), -np.inf, np.float32)
    I_out = np.full((len(rows), k), -1, np.int64)
    kk = min(k, n)
    for start in range(0, len(rows), 256):
        block = rows[start : start + 256]
        S = xb[block] @ xb.T  # scores: len(block) x n
        S[groups[block][:, None] == groups[None, :]] = -np.inf
        # the k-th best score of each row in O(n); everything at least as good (ties
        # included) is sorted by (-score, index), which is all a full sort would decide
        kth = np.partition(S, n - kk, axis=1)[:, n - kk]
        for r in range(len(block)):
            cand = np.nonzero((S[r] >= kth[r]) & np.isfinite(S[r]))[0]
            cand = cand[np.lexsort((cand, -S[r, cand]))][:k]
            D_out[start + r, : len(cand)] = S[r, cand]
            I_out[start + r, : len(cand)] = cand
    return D_out, I_out


def loo_neighbours(
    xb: np.ndarray, groups: np.ndarray, k: int, *, extra_cap: int = EXTRA_CAP, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other-group neighbours of every row of `xb` (n x d, L2-normalised).

    groups: (n,) int exclusion group per row (row index itself = exclude only the image).
    Returns (D, I), both (n, k): cosine scores and row indices, best first; when fewer than
    k rows lie outside a row's group the tail is (-inf, -1).
    """
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    groups = np.asarray(groups, dtype=np.int64)
    n, d = xb.shape
    if groups.shape != (n,):
        raise ValueError(f"groups must have one entry per row ({n}), got shape {groups.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    largest_group = int(np.unique(groups, return_counts=True)[1].max()) if n else 0
    short = min(n, k + min(largest_group, extra_cap) + 1)
    index = faiss.IndexFlatIP(d)
    index.add(xb)
    D = np.full((n, k), -np.inf, np.float32)
    I = np.full((n, k), -1, np.int64)
    redo: list[np.ndarray] = []
    for start in tqdm(range(0, n, QUERY_BLOCK), desc="leave-one-out search", unit="block", disable=not progress):
        stop = min(n, start + QUERY_BLOCK)
        Ds, Is = index.search(xb[start:stop], short)  # short lists: block x short
        valid = (Is >= 0) & (groups[np.maximum(Is, 0)] != groups[start:stop, None])
        Dv = np.where(valid, Ds, -np.inf)
        Iv = np.where(valid, Is, n)
        order = _order(Dv, Iv)[:, :k]
        top_d = np.take_along_axis(Dv, order, axis=1)
        top_i = np.take_along_axis(Iv, order, axis=1)
        found = np.isfinite(top_d).sum(axis=1)
        if short < n:
            # Rows outside the short list score <= its last entry. A row is settled when it has
            # k results and its k-th is strictly better than that bound (else a tie or a
            # shortage might hide an item): those rows go to the exact path.
            bound = Ds[:, -1]
            settled = (found >= k) & (top_d[:, k - 1] > bound)
            redo.append(np.nonzero(~settled)[0] + start)
        D[start:stop, : top_d.shape[1]] = top_d
        I[start:stop, : top_i.shape[1]] = np.where(np.isfinite(top_d), top_i, -1)
    rows = np.concatenate(redo) if redo else np.zeros(0, np.int64)
    if len(rows):
        LOG.info("exact search for %d of %d rows (short list of %d was not conclusive)", len(rows), n, short)
        D[rows], I[rows] = exact_neighbours(xb, groups, rows, k)
    return D, I
