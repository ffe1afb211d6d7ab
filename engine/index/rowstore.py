"""The re-ranking half of the compressed index: the stored rows on disk (VectorStore, coded
by engine.index.codec: float16 of the full vector, or a compact 512 B code) with the tile id
of each row, re-ranking of candidate rows, search over all of a few rows, and vectors looked
up by tile id. With the float16 full-dim layout the scores are exact; with a compact code
they are those of the coded vectors."""

from __future__ import annotations

import numpy as np
import torch

from engine.index.codec import Codec
from engine.index.common import exact_search, topk_rows
from engine.index.vectorstore import VectorStore


class RowStore:
    """Row r of the vector file holds tile `rows[r]` (-1 once removed)."""

    def __init__(self, store: VectorStore, rows: np.ndarray, codec: Codec | None = None):
        self.store = store
        self.rows = rows
        self.codec = codec or Codec("f16", store.dim)
        self._by_id: tuple[np.ndarray, np.ndarray] | None = None  # (sorted tile ids, their rows); see _id_rows

    def append(self, ids: np.ndarray, xb: np.ndarray) -> np.ndarray:
        """Store vectors of tile `ids`; returns their row numbers."""
        rows = self.store.append(self.codec.encode(xb))
        self.rows = np.concatenate([self.rows, ids])
        self._by_id = None
        return rows

    def live(self, rows: np.ndarray) -> np.ndarray:
        """Those of `rows` not removed yet."""
        return rows[self.rows[rows] >= 0]

    def mark_removed(self, rows: np.ndarray) -> None:
        self.rows[rows] = -1
        self._by_id = None

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Live rows holding any of tile `ids`."""
        return np.flatnonzero(np.isin(self.rows, np.asarray(ids, dtype=np.int64)) & (self.rows >= 0))

    def all_ids(self) -> np.ndarray:
        return self.rows[self.rows >= 0]

    def rerank(self, xq: np.ndarray, C: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among candidate rows C (nq x R, -1 = none) -> (D, tile ids)."""
        valid = C >= 0
        qv, offset = self.codec.query(xq)
        # each query against its own candidates only (nq x R x d, a batched matrix-vector
        # product): the short lists of different query tiles hardly overlap, so one nq x
        # (nq * R) product would compute nq times more inner products than are needed
        vecs = torch.from_numpy(self.store.get(np.where(valid, C, 0)))
        S = torch.bmm(vecs, torch.from_numpy(qv)[:, :, None])[:, :, 0].numpy() + offset[:, None]
        S = np.where(valid, S, -np.inf)
        D, pos = topk_rows(S, np.arange(C.shape[1]), k)
        rows = np.take_along_axis(C, np.maximum(pos, 0), axis=1)
        I = np.where((pos >= 0) & np.isfinite(D), self.rows[np.maximum(rows, 0)], -1)
        return np.where(I >= 0, D, -np.inf).astype(np.float32), I.astype(np.int64)

    def exact(self, xq: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, tile ids) of each query over all of just `rows`."""
        qv, offset = self.codec.query(xq)
        D, I_rows = exact_search(qv, self.store.get(rows), rows, k)
        D = D + offset[:, None]
        I = np.where(I_rows >= 0, self.rows[np.maximum(I_rows, 0)], -1)
        return D, I

    def vectors(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """Stored vectors of tile `ids` (float16-rounded, or decoded from the compact code);
        zeros for ids not stored."""
        ids = np.asarray(ids, dtype=np.int64)
        sorted_ids, sorted_rows = self._id_rows()
        pos = np.searchsorted(sorted_ids, ids)
        found = (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == ids)
        out = np.zeros((len(ids), dim), np.float32)
        if found.any():
            out[found] = self.codec.decode(self.store.get(sorted_rows[pos[found]]))
        return out

    def _id_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Live tile ids, sorted, and their rows: kept until the next add or removal, since
        sorting a million ids is not free and every region result and slide mosaic looks
        up vectors by id."""
        if self._by_id is None:
            alive = np.flatnonzero(self.rows >= 0)
            order = np.argsort(self.rows[alive], kind="stable")
            self._by_id = (self.rows[alive][order], alive[order])
        return self._by_id
