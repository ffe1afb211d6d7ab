"""Plain functions shared by the index kinds: exact top-k over numpy arrays, merging of
partial results, id filters, recall against an exact reference.

Conventions as in FAISS: `xq` queries (nq x d), `xb` database vectors, `k` neighbours, `D`
similarities (inner products of L2-normalised vectors, i.e. cosine; larger is closer), `I`
ids, -1 where fewer than k results exist.
"""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np


@dataclasses.dataclass(frozen=True)
class IdFilter:
    """Which ids a search may return: only `include` (when given) and never `exclude`."""

    include: np.ndarray | None = None
    exclude: np.ndarray | None = None

    def __post_init__(self):
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.unique(np.asarray(value, dtype=np.int64)))

    @property
    def is_empty(self) -> bool:
        return self.include is None and (self.exclude is None or len(self.exclude) == 0)

    def mask(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the `ids` this filter lets through."""
        ok = np.ones(len(ids), bool) if self.include is None else np.isin(ids, self.include)
        if self.exclude is not None and len(self.exclude):
            ok &= ~np.isin(ids, self.exclude)
        return ok

    def selector(self):
        """A FAISS IDSelector over ids (keep the returned object alive during the search:
        the selectors reference each other's memory)."""
        keep = []
        sel = None
        if self.include is not None:
            sel = faiss.IDSelectorBatch(self.include)
            keep.append(sel)
        if self.exclude is not None and len(self.exclude):
            inner = faiss.IDSelectorBatch(self.exclude)
            not_sel = faiss.IDSelectorNot(inner)
            keep += [inner, not_sel]
            sel = not_sel if sel is None else faiss.IDSelectorAnd(sel, not_sel)
            keep.append(sel)
        return None if sel is None else _Kept(sel, keep)


class _Kept:
    """A selector plus the Python objects it points into."""

    def __init__(self, sel, keep):
        self.sel = sel
        self.keep = keep


def empty_result(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def topk_rows(S: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns of each row of the similarity matrix S (nq x n) -> (D, I) sorted by
    descending similarity, ids taken from `ids` (n,)."""
    nq, n = S.shape
    D, I = empty_result(nq, k)
    if n == 0:
        return D, I
    kk = min(k, n)
    part = np.argpartition(-S, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (nq, 1))
    vals = np.take_along_axis(S, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    part = np.take_along_axis(part, order, axis=1)
    D[:, :kk] = np.take_along_axis(vals, order, axis=1)
    I[:, :kk] = ids[part]
    return D, I


def exact_search(
    xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k of xq over (ids, xb), streamed in chunks of xb;
    the reference every approximate structure is tested against."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    D, I = empty_result(len(xq), k)
    for start in range(0, len(xb), chunk):
        part = np.asarray(xb[start : start + chunk], dtype=np.float32)
        Dc, Ic = topk_rows(xq @ part.T, np.asarray(ids[start : start + chunk], dtype=np.int64), k)
        D, I = merge_topk([D, Dc], [I, Ic], k)
    return D, I


def merge_topk(Ds: list[np.ndarray], Is: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge several (D, I) results of the same queries into one top-k (missing = -1)."""
    D = np.concatenate(Ds, axis=1)
    I = np.concatenate(Is, axis=1)
    D = np.where(I < 0, -np.inf, D).astype(np.float32)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    D, I = np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)
    if D.shape[1] < k:
        pad_D, pad_I = empty_result(len(D), k - D.shape[1])
        D, I = np.hstack([D, pad_D]), np.hstack([I, pad_I])
    return D, I


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k ids that the approximate top-k also returns."""
    hits = 0
    total = 0
    for a, e in zip(I_approx[:, :k], I_exact[:, :k]):
        e = e[e >= 0]
        hits += len(np.intersect1d(a[a >= 0], e))
        total += len(e)
    return hits / total if total else 1.0


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
