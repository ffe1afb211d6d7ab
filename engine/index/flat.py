"""Exact search over all shard files of one encoder, searched as one index.

Each shard is an `IndexIDMap2(IndexFlatIP)` whose ids are tile ids; they are combined in an
`IndexShards(d, threaded=False, successive_ids=False)` so each shard keeps its own ids and the
merged top-k is exactly what one unsharded flat index over the same vectors returns. Shards
are added and removed one by one (no rebuild when slides come and go). On a machine with
faiss-gpu and CUDA the shards are also copied to the GPU for unfiltered searches (same
results). Filtered searches run shard by shard on the CPU with an id selector and merge the
partial top-k: `IndexShards` (faiss 1.15) does not pass search parameters, hence selectors,
on to its shards reliably.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from engine.index.common import IdFilter, empty_result, gpu_available, merge_topk

LOG = logging.getLogger(__name__)


class FlatShardIndex:
    """Exact inner-product search over named shards (`key` -> faiss IndexIDMap2)."""

    kind = "flat"

    def __init__(self, dim: int, use_gpu: bool = False):
        self.dim = int(dim)
        self.use_gpu = bool(use_gpu) and gpu_available()
        self._shards: dict[str, faiss.Index] = {}
        self._ids: dict[str, np.ndarray] = {}
        self._combined: faiss.IndexShards | None = None
        self._gpu = None

    @property
    def ntotal(self) -> int:
        return sum(index.ntotal for index in self._shards.values())

    @property
    def keys(self) -> set[str]:
        return set(self._shards)

    def add_shard(self, key: str, index: faiss.Index) -> None:
        if index.d != self.dim:
            raise ValueError(f"shard {key} has {index.d}-d vectors, the index {self.dim}-d")
        if key in self._shards:
            raise ValueError(f"shard {key} is already loaded")
        self._shards[key] = index
        self._ids[key] = faiss.vector_to_array(index.id_map).astype(np.int64)
        self._combined = self._gpu = None

    def add_arrays(self, key: str, ids: np.ndarray, xb: np.ndarray) -> None:
        """A shard from arrays (tests, benchmarks)."""
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
        self.add_shard(key, index)

    def remove_shard(self, key: str) -> None:
        del self._shards[key]
        del self._ids[key]
        self._combined = self._gpu = None

    def _index(self):
        if self._combined is None:
            # not threaded: `indexer build` writes one shard per slide, so there may be
            # hundreds of small shards, and a thread per shard costs more than it saves
            combined = faiss.IndexShards(self.dim, False, False)
            for index in self._shards.values():
                if index.ntotal:
                    combined.add_shard(index)
            self._combined = combined
        if self.use_gpu:
            if self._gpu is None:
                self._gpu = faiss.index_cpu_to_all_gpus(self._combined)
            return self._gpu
        return self._combined

    def search(self, xq: np.ndarray, k: int, id_filter: IdFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D similarities, I tile ids) of each query; exact."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if self.ntotal == 0 or len(xq) == 0:
            return empty_result(len(xq), k)
        filtered = id_filter is not None and not id_filter.is_empty
        if not filtered:
            D, I = self._index().search(xq, k)
        else:
            kept = id_filter.selector()
            params = faiss.SearchParameters(sel=kept.sel)
            parts = [shard.search(xq, k, params=params) for shard in self._shards.values() if shard.ntotal]
            D, I = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        return D, I.astype(np.int64)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of tile `ids` (rows of zeros for ids not in the index)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), self.dim), np.float32)
        for key, shard_ids in self._ids.items():
            hit = np.isin(ids, shard_ids)
            for pos in np.flatnonzero(hit):
                out[pos] = self._shards[key].reconstruct(int(ids[pos]))
        return out

    def all_ids(self) -> np.ndarray:
        return np.concatenate(list(self._ids.values())) if self._ids else np.zeros(0, np.int64)

    def ram_bytes(self) -> int:
        return sum(index.ntotal * (self.dim * 4 + 8 * 2) for index in self._shards.values())
