"""The index of one encoder's shard files, kept in step with the catalog: exact (flat) for
small archives, compressed (IVF-PQ + exact re-ranking) for large ones, chosen by size.

`sync_index` brings an index to a given set of shards: shards that are new are added, shards
that are gone (or were rewritten: the key includes the file's sha256) are removed. Neither
needs a rebuild; only the first compressed index is trained, on a sample of all shards.

Every shard is loaded checked (engine.shards.read_shard: the catalog's sha256 when given,
unit-length vectors). A shard that fails is handed to `on_error(key, error)` and left out,
so one damaged file costs its own slides, not the whole search; without `on_error` the
error is raised as before.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from engine.errors import ShardError
from engine.index.compressed import CompressedIndex, default_nlist, train_sample_size
from engine.index.flat import FlatShardIndex
from engine.shards import read_shard, shard_arrays, shard_arrays_of

LOG = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "compressed")
# Up to this many tiles the exact flat index is used. Flat search reads every vector for each
# batch of query tiles (8 kB per 2048-d tile), so it is bound by memory bandwidth and grows
# linearly with the archive, while the compressed index stays fast with recall@10 near 1
# (measured figures: bench/search.py --sweep, docs/benchmarks.md). Below ~20 k tiles there
# is too little to train the compressed index well, and flat is fast enough.
FLAT_MAX_TILES = 20_000
# While a compressed index is filled, it is saved this often (seconds): an interrupted build
# then resumes from its last save. A save writes the FAISS index (~50 B per tile).
SAVE_EVERY_S = 300.0


def choose_kind(n_tiles: int, requested: str = "auto", flat_max: int = FLAT_MAX_TILES) -> str:
    if requested not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, not {requested!r}")
    if requested != "auto":
        return requested
    return "flat" if n_tiles <= flat_max else "compressed"


OnError = Callable[[str, ShardError], None]


def _read_checked(key: str, path: Path, sha256: dict[str, str] | None, on_error: OnError | None):
    """The shard loaded checked (read_shard), or None when it fails and `on_error` took the
    error (without `on_error` it is raised)."""
    try:
        return read_shard(path, (sha256 or {}).get(key))
    except ShardError as exc:
        if on_error is None:
            raise
        on_error(key, exc)
        return None


def _loadable(shards: dict[str, Path], sha256: dict[str, str] | None, on_error: OnError | None) -> dict[str, int]:
    """key -> vector count of the shards that load (checked); the others go to on_error."""
    counts = {}
    for key, path in shards.items():
        index = _read_checked(key, path, sha256, on_error)  # one shard in memory at a time
        if index is not None:
            counts[key] = index.ntotal
    return counts


def _training_sample(
    shards: dict[str, Path], counts: dict[str, int], size: int, seed: int, progress: bool
) -> np.ndarray:
    """About `size` vectors drawn uniformly from the shards in `counts` (key -> vector count;
    one shard in memory at a time)."""
    rng = np.random.default_rng(seed)
    total = sum(counts.values())
    # a little over size/total, so the draw is not short of `size` by chance; cut back below
    frac = min(1.0, 1.05 * size / max(total, 1))
    parts = []
    for key, count in tqdm(counts.items(), desc="sampling for training", unit="shard", disable=not progress):
        if not count:
            continue
        _, xb = shard_arrays(shards[key])
        take = rng.random(len(xb)) < frac
        parts.append(xb[take])
    if not parts:
        return np.zeros((0, 0), np.float32)
    sample = np.concatenate(parts)
    return sample[np.sort(rng.permutation(len(sample))[:size])] if len(sample) > size else sample


def sync_index(
    index,
    shards: dict[str, Path],
    *,
    progress: bool = False,
    sha256: dict[str, str] | None = None,
    on_error: OnError | None = None,
    save_every_s: float = SAVE_EVERY_S,
) -> tuple[int, int]:
    """Make `index` hold exactly the given shards (key -> file); returns (added, removed)
    shard counts. `sha256`: key -> the checksum each file must have; `on_error`: called
    with (key, ShardError) for a shard that fails to load, which is then left out (else
    the error is raised). A compressed index is saved every `save_every_s` seconds while
    shards are added, so an interrupted fill resumes from there (the shards it holds are
    in its manifest) instead of from the start."""
    current = index.keys
    gone = sorted(current - set(shards))
    new = [key for key in shards if key not in current]
    for key in gone:
        index.remove_shard(key)
    added = 0
    saved = time.monotonic()
    for key in tqdm(new, desc="loading shards", unit="shard", disable=not progress or len(new) < 2):
        loaded = _read_checked(key, shards[key], sha256, on_error)
        if loaded is None:
            continue
        if isinstance(index, FlatShardIndex):
            index.add_shard(key, loaded)
        else:
            ids, xb = shard_arrays_of(loaded)
            index.add(ids, xb, key=key)
            if time.monotonic() - saved >= save_every_s:
                index.save()
                saved = time.monotonic()
        added += 1
    if isinstance(index, CompressedIndex) and (added or gone):
        index.save()
    return added, len(gone)


def open_index(
    kind: str,
    dim: int,
    shards: dict[str, Path],
    *,
    folder: Path,
    use_gpu: bool = False,
    progress: bool = False,
    seed: int = 0,
    sha256: dict[str, str] | None = None,
    on_error: OnError | None = None,
    save_every_s: float = SAVE_EVERY_S,
):
    """An index of `kind` ('flat' or 'compressed') holding `shards`. A compressed index is
    reopened from `folder` when it is there and of this dimension, and trained when not.
    `sha256`, `on_error` and `save_every_s` as in sync_index; an index found in `folder`
    half filled (an interrupted build) is filled on from where it was last saved."""
    if kind == "flat":
        index = FlatShardIndex(dim, use_gpu=use_gpu)
    elif kind == "compressed":
        index = None
        if (folder / "manifest.json").exists():
            try:
                index = CompressedIndex.open(folder)
            except ShardError as exc:
                LOG.warning("%s; rebuilding it from the shard files", exc)
            if index is not None and index.dim != dim:
                index = None
        if index is None:
            counts = _loadable(shards, sha256, on_error)
            shards = {key: shards[key] for key in counts}  # damaged ones reported once, here
            total = sum(counts.values())
            nlist = default_nlist(total)
            sample = _training_sample(shards, counts, train_sample_size(nlist), seed, progress)
            if len(sample) < 40 * 256:
                raise ShardError(
                    f"the compressed index needs at least {40 * 256} vectors to train, the archive has {total}; use the flat index"
                )
            index = CompressedIndex.train(folder, sample, nlist=nlist, seed=seed)
        index.use_gpu = use_gpu
    else:
        raise ValueError(f"index kind must be 'flat' or 'compressed', not {kind!r}")
    sync_index(index, shards, progress=progress, sha256=sha256, on_error=on_error, save_every_s=save_every_s)
    return index
