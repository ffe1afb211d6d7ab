"""The vector index layer: plain functions and small classes over numpy arrays and FAISS.

- `FlatShardIndex`: exact search over shard files searched as one (`IndexShards`).
- `CompressedIndex`: PCA-rotation + IVF-PQ in RAM, exact re-ranking from float16 on disk.
- `open_index` / `sync_index` / `choose_kind`: the automatic choice by size and keeping an
  index in step with the shards of the catalog (add/remove without rebuild).
- `exact_search`, `recall_at_k`, `IdFilter`: the brute-force reference and id filters.
"""

from engine.index.common import IdFilter, exact_search, gpu_available, merge_topk, recall_at_k
from engine.index.compressed import CompressedIndex, default_nlist
from engine.index.flat import FlatShardIndex
from engine.index.lifecycle import FLAT_MAX_TILES, INDEX_KINDS, choose_kind, open_index, sync_index

__all__ = [
    "FLAT_MAX_TILES",
    "INDEX_KINDS",
    "CompressedIndex",
    "FlatShardIndex",
    "IdFilter",
    "choose_kind",
    "default_nlist",
    "exact_search",
    "gpu_available",
    "merge_topk",
    "open_index",
    "recall_at_k",
    "sync_index",
]
