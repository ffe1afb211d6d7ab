"""Converting, rebuilding and checking a compressed index while searches go on.

- `convert_store`: the same IVF-PQ index (same codes, lists and row numbers, so the same
  candidates for every query) with its row store rewritten in another layout, e.g. an index
  written before issue 18 (float16 of the full 2048-d vector, 4,096 B per tile) into the
  compact default (float16 of its PCA-256 rotation, 512 B). Streams the old store in chunks.
- `rebuild`: a freshly trained index of the given shard files (nlist sized for the archive as
  it is now), filled by streaming them; resumable: an interrupted rebuild continues in the
  same generation folder the next time.
- `swap_in`: new indexes are built in a generation subfolder `gen-...` of the index folder,
  then made current by rewriting the folder's manifest.json as a pointer {"current": name}
  (an atomic rename). A process that opened the old index keeps answering from it (its
  files stay until the next swap, `prune`), one that opens the folder afterwards gets the new.
- `drift_check`: recall@10 of the current index on a sample of stored vectors (tiles of the
  shard files, each query's own tile left out) against exact search over all shards; below
  the floor (0.95) retraining pays.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from engine.files import atomic_write_text
from engine.index.codec import DEFAULT_KIND, Codec, index_pca
from engine.index.common import merge_topk, recall_at_k, topk_rows
from engine.index.compressed import (
    BUILDING_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    ROWS_FILE,
    VECTORS_FILE,
    CompressedIndex,
    new_index,
    resolve,
)
from engine.index.ivfpq import default_nlist
from engine.shards import shard_arrays

LOG = logging.getLogger(__name__)

RECALL_FLOOR = 0.95


def convert_store(index: CompressedIndex, dest: str | Path, kind: str = DEFAULT_KIND, chunk: int = 65536):
    """A copy of `index` in `dest` whose row store is in layout `kind`; the IVF-PQ part is
    written unchanged, so candidates are the same for every query. Rows removed from the
    index are carried along (row numbers must not change)."""
    store = index.store
    if kind == "pca-f16":
        pca = index_pca(index.index.chain.at(0))
        codec = Codec.train(kind, np.zeros((1, index.dim), np.float32), pca=pca, width=len(pca[0]))
    else:
        rng = np.random.default_rng(0)
        sample_rows = np.sort(rng.choice(store.n, size=min(store.n, 50_000), replace=False))
        codec = Codec.train(kind, index.rowstore.codec.decode(store.get(sample_rows)))
    params = {key: index.manifest[key] for key in ("factory", "nlist", "trained_n")}
    out = new_index(dest, faiss.clone_index(index.index), codec, **params)
    for start in range(0, store.n, chunk):
        rows = np.arange(start, min(store.n, start + chunk))
        out.store.append(codec.encode(index.rowstore.codec.decode(store.get(rows))))
    out.rowstore.rows = index.rows.copy()
    for key in ("shards", "nprobe", "shortlist", "exact_max"):
        out.manifest[key] = json.loads(json.dumps(index.manifest[key]))
    out.save()
    return CompressedIndex.open(dest)


def new_generation(top: Path) -> Path:
    """A new, not yet existing generation folder name under `top` (sorts by creation time)."""
    while True:
        path = Path(top) / f"gen-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        if not path.exists():
            return path


def start_generation(top: Path) -> Path:
    """A new generation folder name, recorded as the one being built (so the saves of the
    index filling it go through, and an interrupted rebuild finds it again)."""
    generation = new_generation(top)
    atomic_write_text(Path(top) / BUILDING_FILE, json.dumps({"folder": generation.name}))
    return generation


def swap_in(top: str | Path, generation: str | Path) -> None:
    """Make `generation` (a subfolder of `top` holding a saved index) the index of `top`,
    atomically; the one it replaces is kept as "previous" until the next swap."""
    top, generation = Path(top), Path(generation)
    if generation.parent != top:
        raise ValueError(f"{generation} is not a generation folder of {top}")
    CompressedIndex.open(generation)  # complete and consistent, or ShardError
    before = resolve(top)
    previous = "." if before == top else before.name
    atomic_write_text(top / MANIFEST_FILE, json.dumps({"current": generation.name, "previous": previous}, indent=1))
    (top / BUILDING_FILE).unlink(missing_ok=True)
    prune(top)


def prune(top: Path) -> None:
    """Delete generations (and the files of a pre-generation index in `top` itself) other
    than the current one and the one before it."""
    pointer = json.loads((top / MANIFEST_FILE).read_text())
    keep = {pointer.get("current"), pointer.get("previous")}
    building = _building(top)
    for path in top.glob("gen-*"):
        if path.is_dir() and path.name not in keep and path != building:
            shutil.rmtree(path, ignore_errors=True)
    if "." not in keep:
        for name in (INDEX_FILE, ROWS_FILE, VECTORS_FILE, "rerank.f16", "rerank.u8", "rerank.npz"):
            (top / name).unlink(missing_ok=True)


def _building(top: Path) -> Path | None:
    try:
        return top / json.loads((top / BUILDING_FILE).read_text())["folder"]
    except (OSError, ValueError, KeyError):
        return None


def rebuild(top: str | Path, dim: int, shards: dict[str, Path], **options) -> CompressedIndex:
    """Train and fill a new index of `shards` in a generation subfolder of `top`, then swap
    it in; an interrupted rebuild is resumed in its folder. `options` go to
    engine.index.lifecycle.open_index (progress, seed, sha256, on_error, save_every_s)."""
    from engine.index.lifecycle import open_index

    top = Path(top)
    top.mkdir(parents=True, exist_ok=True)
    generation = _building(top)
    if generation is None or not generation.is_dir():
        generation = start_generation(top)
    else:
        LOG.info("resuming the rebuild in %s", generation)
    index = open_index("compressed", dim, shards, folder=generation, **options)
    swap_in(top, generation)
    return index


def convert(top: str | Path, kind: str = DEFAULT_KIND) -> CompressedIndex:
    """Rewrite the current index of `top` with row store `kind` in a new generation and
    swap it in (the IVF-PQ part unchanged: no retraining)."""
    top = Path(top)
    generation = start_generation(top)
    out = convert_store(CompressedIndex.open(top), generation, kind)
    swap_in(top, generation)
    return out


def sample_queries(shards: dict[str, Path], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of about `n` tiles drawn uniformly from the shard files."""
    rng = np.random.default_rng(seed)
    counts = {key: len(shard_arrays(path)[0]) for key, path in shards.items()}
    total = sum(counts.values())
    picks = np.sort(rng.choice(total, size=min(n, total), replace=False))
    ids, xs, start = [], [], 0
    for key, count in counts.items():
        mine = picks[(picks >= start) & (picks < start + count)] - start
        if len(mine):
            sid, xb = shard_arrays(shards[key])
            ids.append(sid[mine])
            xs.append(xb[mine])
        start += count
    return np.concatenate(ids), np.concatenate(xs).astype(np.float32)


def drift_check(
    index: CompressedIndex, shards: dict[str, Path], n_queries: int = 200, seed: int = 0, progress: bool = False
) -> dict:
    """Recall@10 of `index` on `n_queries` stored tiles against exact search over all
    `shards` (each query's own tile left out of both), and whether retraining pays: recall
    below RECALL_FLOOR, or the archive grown past the lists the index was trained with."""
    ids, xq = sample_queries(shards, n_queries, seed)
    k = 10
    D_ex = I_ex = None
    for key in tqdm(shards, desc="exact search", unit="shard", disable=not progress):
        sid, xb = shard_arrays(shards[key])
        S = xq @ xb.T
        S[sid[None, :] == ids[:, None]] = -np.inf  # not the query's own tile
        Dc, Ic = topk_rows(S, sid, k)
        D_ex, I_ex = (Dc, Ic) if D_ex is None else merge_topk([D_ex, Dc], [I_ex, Ic], k)
    _, I = index.search(xq, k + 1)
    I = np.stack([np.r_[row[row != own], [-1]][:k] for row, own in zip(I, ids)])
    recall = recall_at_k(I, I_ex, k)
    nlist, wanted = int(index.manifest["nlist"]), default_nlist(index.ntotal)
    grown = wanted >= 4 * nlist
    return {
        "queries": int(len(ids)),
        "tiles": int(index.ntotal),
        "recall_at_10": round(float(recall), 4),
        "floor": RECALL_FLOOR,
        "nlist": nlist,
        "nlist_for_size": wanted,
        "store": index.manifest.get("rerank", {"kind": "f16"})["kind"],
        "retrain": bool(recall < RECALL_FLOOR or grown),
    }
