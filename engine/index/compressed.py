"""The compressed index for large archives: PCA-rotation + IVF-PQ codes in RAM, re-ranking
of a short list from a memory-mapped row store on disk.

Layout of its folder (derived data: it can always be rebuilt from the shard files):

    ivfpq.faiss     IndexPreTransform(PCAR<pca_dim>, IndexIVFPQFastScan(nlist, 2m x 4 bits));
                    FAISS ids are row numbers of the row store
    rerank.f16      the row store (engine.index.codec, manifest key "rerank"): one row per
                    vector ever added; by default float16 of the PCA-256 rotation the index
                    learns (512 B per tile). Indexes written before issue 18 have no "rerank"
                    key and store float16 of the full vector in vectors.f16 (4,096 B per
                    2048-d tile): they keep working, and `indexer reindex --convert` (engine.
                    index.convert) rewrites them in the compact layout.
    rerank.npz      the codec's projection (compact layouts only)
    rows.npy        tile id of each row (-1: removed)
    manifest.json   parameters, row count, and the row range [start, end) of each shard key

The folder's manifest.json may instead point at a generation subfolder ({"current":
"gen-..."}) holding the files above: `indexer reindex` builds a new index in a new
generation and swaps it in by rewriting this pointer atomically (engine.index.convert).

In RAM per vector: m bytes of PQ code + 8 bytes of row id (IVF lists) + 8 bytes of tile id
(rows.npy) = 48 bytes at m = 32, whatever the dimension (fast-scan codes: engine.index.ivfpq).
Search: IVF-PQ returns `shortlist`
candidate rows per query (approximate distances), whose stored rows are read back and scored
(inner product; exact for float16 full vectors, of the coded vectors otherwise, recall@10
against exact float32 search measured in docs/benchmarks.md). A filter that leaves few vectors is answered by exact search
over just those vectors; a filter that leaves many is applied inside IVF as a row bitmap, and
queries that still find fewer than k widen their probe until they have k or all were scanned.

The parts: engine.index.ivfpq (training, sizing rules, candidate search), engine.index.rowstore
(the vectors on disk, the row -> tile id map, exact re-ranking); this module keeps them in
step on disk and answers queries.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np

from engine.errors import ShardError
from engine.files import atomic_output, atomic_write_text
from engine.index.codec import DEFAULT_KIND, Codec, index_pca
from engine.index.common import IdFilter, empty_result
from engine.index.ivfpq import IvfPq, default_nlist, default_nprobe, train_ivfpq, train_sample_size
from engine.index.rowstore import RowStore
from engine.index.vectorstore import VectorStore

LOG = logging.getLogger(__name__)

__all__ = ["CompressedIndex", "default_nlist", "default_nprobe", "train_sample_size"]

INDEX_FILE = "ivfpq.faiss"
VECTORS_FILE = "vectors.f16"
ROWS_FILE = "rows.npy"
MANIFEST_FILE = "manifest.json"
PARAMS_FILE = "rerank.npz"
BUILDING_FILE = "building.json"  # names the generation being built (engine.index.convert)


class CompressedIndex:
    """IVF-PQ over row numbers + float16 vectors on disk for exact re-ranking.

    nprobe:    inverted lists scanned per query (default `default_nprobe(nlist)`)
    shortlist: candidates per query re-ranked exactly (default 100, at least k)
    exact_max: a filter that leaves at most this many vectors is answered by exact search
               over them (default 20000)
    """

    kind = "compressed"

    def __init__(
        self,
        folder: Path,
        index: faiss.Index,
        store: VectorStore,
        rows: np.ndarray,
        manifest: dict,
        codec: Codec | None = None,
    ):
        self.folder = Path(folder)
        self.ivfpq = IvfPq(index)
        self.rowstore = RowStore(store, rows, codec)
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.nprobe = int(manifest.get("nprobe", 32))
        self.shortlist = int(manifest.get("shortlist", 100))
        self.exact_max = int(manifest.get("exact_max", 20000))

    # -- the parts, under the names callers know -------------------------------------------

    @property
    def index(self) -> faiss.Index:
        return self.ivfpq.index

    @property
    def store(self) -> VectorStore:
        return self.rowstore.store

    @property
    def rows(self) -> np.ndarray:
        """Tile id of each row, -1 when removed."""
        return self.rowstore.rows

    @property
    def use_gpu(self) -> bool:
        return self.ivfpq.use_gpu

    @use_gpu.setter
    def use_gpu(self, value: bool) -> None:
        self.ivfpq.use_gpu = bool(value)

    # -- building --------------------------------------------------------------------------

    @classmethod
    def train(cls, folder: str | Path, sample: np.ndarray, **options) -> "CompressedIndex":
        """A new, empty index trained on `sample`, in `folder`: see `train_index`."""
        return train_index(folder, sample, **options)

    @classmethod
    def open(cls, folder: str | Path) -> "CompressedIndex":
        """Load an index written by `save`: see `open_folder`."""
        return open_folder(folder)

    def save(self) -> None:
        """Write index, row map and manifest: see `save_index`."""
        save_index(self)

    # -- updating --------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return self.ivfpq.ntotal

    @property
    def keys(self) -> set[str]:
        return set(self.manifest["shards"])

    def add(self, ids: np.ndarray, xb: np.ndarray, key: str | None = None) -> None:
        """Add vectors with tile `ids` (no retraining); `key` names the shard they came from
        so `remove_shard` can take them out again. Call `save()` to persist."""
        ids = np.asarray(ids, dtype=np.int64)
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        if xb.ndim != 2 or xb.shape[1] != self.dim or len(ids) != len(xb):
            raise ValueError(f"need n x {self.dim} vectors and n ids, got {xb.shape} and {ids.shape}")
        rows = self.rowstore.append(ids, xb)
        self.ivfpq.add(xb, rows)
        if key is not None:
            self.manifest["shards"][key] = [int(rows[0]) if len(rows) else len(self.rows), len(self.rows)]

    def remove_rows(self, rows: np.ndarray) -> int:
        rows = self.rowstore.live(np.asarray(rows, dtype=np.int64))
        if len(rows):
            self.ivfpq.remove(rows)
            self.rowstore.mark_removed(rows)
        return len(rows)

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by tile id; returns how many were removed."""
        return self.remove_rows(self.rowstore.rows_of(ids))

    def remove_shard(self, key: str) -> int:
        start, end = self.manifest["shards"].pop(key)
        return self.remove_rows(np.arange(start, end, dtype=np.int64))

    # -- searching -------------------------------------------------------------------------

    def rerank(self, xq: np.ndarray, C: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among candidate rows C (nq x R, -1 = none) -> (D, tile ids)."""
        return self.rowstore.rerank(xq, C, k)

    def search(
        self,
        xq: np.ndarray,
        k: int,
        id_filter: IdFilter | None = None,
        *,
        nprobe: int | None = None,
        shortlist: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D cosine similarities, I tile ids) of each query."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if self.ntotal == 0 or len(xq) == 0:
            return empty_result(len(xq), k)
        nprobe = int(nprobe or self.nprobe)
        R = max(int(shortlist or self.shortlist), k)
        if id_filter is None or id_filter.is_empty:
            return self.rerank(xq, self.ivfpq.candidates(xq, R, nprobe), k)
        allowed = (self.rows >= 0) & id_filter.mask(self.rows)
        allowed_rows = np.flatnonzero(allowed)
        if len(allowed_rows) <= max(self.exact_max, R):
            return self.rowstore.exact(xq, allowed_rows, k)
        return self.rerank(xq, filtered_candidates(self.ivfpq, xq, R, nprobe, allowed, min(k, len(allowed_rows))), k)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of tile `ids` (float16-rounded, or decoded from the compact code,
        unit length); zeros for ids not in the index."""
        return self.rowstore.vectors(ids, self.dim)

    def all_ids(self) -> np.ndarray:
        return self.rowstore.all_ids()

    def ram_bytes(self) -> int:
        """Bytes this index holds in RAM: the FAISS index (engine.index.ivfpq), the row ->
        tile id map and the codec's projection (the row store is memory-mapped)."""
        return int(self.ivfpq.ram_bytes() + self.rows.nbytes + self.rowstore.codec.ram_bytes())

    def disk_bytes(self) -> int:
        """Bytes of the row store on disk (the re-ranking copies of the vectors)."""
        return int(self.store.nbytes)


def save_index(index: CompressedIndex) -> None:
    """Write index, row map and manifest atomically (the row store is append-only and
    already on disk); the manifest goes last, so a crash after an add leaves the previous
    state (a crash between the files leaves them inconsistent: open_folder says so, and the
    index is rebuilt). An index `indexer reindex` replaced is not saved over the new one."""
    if superseded(index.folder):
        LOG.warning("index in %s was replaced by `indexer reindex`; not saving over it", index.folder)
        return
    with atomic_output(index.folder / INDEX_FILE) as tmp:
        faiss.write_index(index.index, str(tmp))
    with atomic_output(index.folder / ROWS_FILE) as tmp, open(tmp, "wb") as fh:
        np.save(fh, index.rows)
    index.manifest["n_rows"] = int(len(index.rows))
    atomic_write_text(index.folder / MANIFEST_FILE, json.dumps(index.manifest, indent=1))


def filtered_candidates(
    ivfpq: IvfPq, xq: np.ndarray, R: int, nprobe: int, allowed: np.ndarray, want: int
) -> np.ndarray:
    """Candidate rows (nq x R, -1 = none) among the `allowed` rows (a bool per row), the
    filter applied inside IVF as a row bitmap. Queries that find fewer than `want` widen
    their probe until they have them or every list was scanned."""
    bitmap = np.packbits(allowed, bitorder="little")  # must outlive `sel`, which points into it
    sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
    C = ivfpq.candidates(xq, R, nprobe, sel)
    nlist = ivfpq.nlist
    short = (C >= 0).sum(axis=1) < want
    while short.any() and nprobe < nlist:
        # a selective filter leaves too few vectors in the probed lists: widen the probe
        nprobe = min(nlist, nprobe * 4)
        C[short] = ivfpq.candidates(xq[short], R, nprobe, sel)
        short = (C >= 0).sum(axis=1) < want
    return C


def train_index(
    folder: str | Path,
    sample: np.ndarray,
    *,
    nlist: int | None = None,
    expected_n: int | None = None,
    pca_dim: int = 256,
    m: int = 32,
    pq_bits: int = 4,
    seed: int = 0,
    store: str = DEFAULT_KIND,
) -> CompressedIndex:
    """A new, empty index trained on `sample` (n x dim float32, L2-normalised), in `folder`
    (replacing what was there). nlist defaults to `default_nlist(expected_n)`; codes are m
    bytes, as 2m fast-scan 4-bit sub-quantisers (pq_bits 4, the default) or m 8-bit ones
    (pq_bits 8, the earlier layout, kept for comparison). `store`: how the vectors are kept
    for re-ranking (engine.index.codec.KINDS; default the compact float16 PCA rotation)."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index, factory, nlist = train_ivfpq(
        sample, nlist=nlist, expected_n=expected_n, pca_dim=pca_dim, m=m, pq_bits=pq_bits, seed=seed
    )
    codec = Codec.train(store, sample, pca=index_pca(index.chain.at(0)))
    return new_index(folder, index, codec, factory=factory, nlist=nlist, trained_n=len(sample))


def new_index(folder: str | Path, index: faiss.Index, codec: Codec, **params) -> CompressedIndex:
    """An index in `folder` (its files replaced) from a trained, possibly filled FAISS index
    and a codec; the row store starts empty. `params`: factory, nlist, trained_n."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (INDEX_FILE, VECTORS_FILE, ROWS_FILE, MANIFEST_FILE, PARAMS_FILE, codec.file):
        (folder / name).unlink(missing_ok=True)
    codec.save(folder)
    dim, nlist = codec.dim, params["nlist"]
    manifest = {
        "dim": dim,
        **params,
        "n_rows": 0,
        "shards": {},
        "nprobe": default_nprobe(nlist),
        "shortlist": 100,
        "exact_max": 20000,
        "rerank": codec.spec(),
    }
    store = VectorStore(folder / codec.file, codec.width, dtype=codec.dtype)
    out = CompressedIndex(folder, index, store, np.zeros(0, np.int64), manifest, codec)
    out.save()
    return out


def open_folder(folder: str | Path) -> CompressedIndex:
    """Load an index written by `CompressedIndex.save`; ShardError when it is missing or
    inconsistent (the caller rebuilds it: it is derived from the shard files). A folder
    whose manifest points at a generation subfolder opens that."""
    folder = resolve(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        index = faiss.read_index(str(folder / INDEX_FILE))
        rows = np.load(folder / ROWS_FILE)
        codec = Codec.load(folder, manifest.get("rerank"), manifest["dim"])
        store = VectorStore(folder / codec.file, codec.width, manifest["n_rows"], dtype=codec.dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ShardError(
            f"compressed index in {folder} is missing or unreadable ({str(exc).splitlines()[0]})"
        ) from None
    if len(rows) != manifest["n_rows"] or index.ntotal != int((rows >= 0).sum()):
        raise ShardError(f"compressed index in {folder} is inconsistent (an interrupted update?)")
    return CompressedIndex(folder, index, store, rows, manifest, codec)


def resolve(folder: str | Path) -> Path:
    """The folder holding the index files: `folder`, or the generation subfolder its
    manifest points at ({"current": name}, written by engine.index.convert.swap_in)."""
    folder = Path(folder)
    try:
        current = json.loads((folder / MANIFEST_FILE).read_text()).get("current")
    except (OSError, ValueError):
        return folder
    return folder / current if current else folder


def superseded(folder: Path) -> bool:
    """True when `folder` (a generation subfolder, or a top folder whose files were
    replaced by a pointer) is no longer the one its parent's pointer names, and is not the
    generation being built (named in BUILDING_FILE)."""
    for top in (folder, folder.parent):
        try:
            current = json.loads((top / MANIFEST_FILE).read_text()).get("current")
        except (OSError, ValueError, AttributeError):
            continue
        if current is None:
            continue
        try:
            building = json.loads((top / BUILDING_FILE).read_text()).get("folder")
        except (OSError, ValueError, AttributeError):
            building = None
        return folder not in (top / current, top / str(building))
    return False
