"""The compressed index for large archives: PCA-rotation + IVF-PQ codes in RAM, exact
re-ranking of a short list from float16 vectors on disk.

Layout of its folder (derived data: it can always be rebuilt from the shard files):

    ivfpq.faiss     IndexPreTransform(PCAR<pca_dim>, IndexIVFPQFastScan(nlist, 2m x 4 bits));
                    FAISS ids are row numbers of the vector file
    vectors.f16     VectorStore: one float16 row per vector ever added
    rows.npy        tile id of each row (-1: removed)
    manifest.json   parameters, row count, and the row range [start, end) of each shard key

In RAM per vector: m bytes of PQ code + 8 bytes of row id (IVF lists) + 8 bytes of tile id
(rows.npy) = 48 bytes at m = 32, whatever the dimension. The codes are "fast scan" PQ: 2m
sub-quantisers of 16 centroids (4 bits) each, whose distance tables fit in SIMD registers, so
scanning a list is several times faster than with m sub-quantisers of 256 centroids (8 bits)
in the same bytes; at 1 M tiles, with the exact re-ranking, recall was the same and slide
queries 2.8x faster (bench/search.py, docs/benchmarks.md). Indexes written with 8-bit PQ
(before the switch) still open and work. Search: IVF-PQ returns `shortlist`
candidate rows per query (approximate distances), whose float16 vectors are read back and
scored exactly (inner product), so the final order is exact among the candidates and the
recall is that of the short list. A filter that leaves few vectors is answered by exact search
over just those vectors; a filter that leaves many is applied inside IVF as a row bitmap, and
queries that still find fewer than k widen their probe until they have k or all were scanned.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import faiss
import numpy as np
import torch

from engine.errors import ShardError
from engine.files import atomic_output, atomic_write_text
from engine.index.common import IdFilter, empty_result, exact_search, gpu_available, topk_rows
from engine.index.vectorstore import VectorStore

LOG = logging.getLogger(__name__)

INDEX_FILE = "ivfpq.faiss"
VECTORS_FILE = "vectors.f16"
ROWS_FILE = "rows.npy"
MANIFEST_FILE = "manifest.json"


def default_nlist(n: int) -> int:
    """About sqrt(n) inverted lists, a power of two in [16, 65536] (1 M vectors: 1024)."""
    return int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(max(n, 1)))))))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: 1/16 of them, at least 64 (1 M vectors: 64 of 1024; 100 k:
    64 of 256). Recall@10 with 16 / 32 / 64 lists was 0.85 / 0.94 / 0.99 at 1 M tiles and
    0.89 / 0.97 / 0.997 at 100 k, while with fast-scan codes 64 lists cost a region query
    under 1 ms more than 16; a longer short list added < 0.01 (bench/search.py --sweep,
    docs/benchmarks.md)."""
    return int(min(nlist, max(64, nlist // 16)))


def train_sample_size(nlist: int) -> int:
    """Vectors to train on: enough for k-means over nlist centroids (FAISS wants 39 points
    per centroid), and never fewer than 8-bit PQ codebooks of 256 centroids would need."""
    return max(40 * nlist, 40 * 256)


def _pq_m(pca_dim: int, m: int) -> int:
    m = min(m, pca_dim)
    while pca_dim % m:
        m -= 1
    return m


class CompressedIndex:
    """IVF-PQ over row numbers + float16 vectors on disk for exact re-ranking.

    nprobe:    inverted lists scanned per query (default `default_nprobe(nlist)`)
    shortlist: candidates per query re-ranked exactly (default 100, at least k)
    exact_max: a filter that leaves at most this many vectors is answered by exact search
               over them (default 20000)
    """

    kind = "compressed"

    def __init__(self, folder: Path, index: faiss.Index, store: VectorStore, rows: np.ndarray, manifest: dict):
        self.folder = Path(folder)
        self.index = index
        self.store = store
        self.rows = rows  # tile id of each row, -1 when removed
        self._by_id: tuple[np.ndarray, np.ndarray] | None = None  # (sorted tile ids, their rows); see _id_rows
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.nprobe = int(manifest.get("nprobe", 32))
        self.shortlist = int(manifest.get("shortlist", 100))
        self.exact_max = int(manifest.get("exact_max", 20000))
        self._ivf = faiss.extract_index_ivf(index)
        # FAISS has no GPU version of fast-scan PQ; those indexes are searched on the CPU
        self._fast_scan = isinstance(faiss.downcast_index(self._ivf), faiss.IndexIVFFastScan)
        self._gpu = None
        self.use_gpu = False

    # -- building --------------------------------------------------------------------------

    @classmethod
    def train(cls, folder: str | Path, sample: np.ndarray, *, nlist: int | None = None, expected_n: int | None = None, pca_dim: int = 256, m: int = 32, pq_bits: int = 4, seed: int = 0) -> "CompressedIndex":
        """A new, empty index trained on `sample` (n x dim float32, L2-normalised), in
        `folder` (replacing what was there). nlist defaults to `default_nlist(expected_n)`;
        codes are m bytes, as 2m fast-scan 4-bit sub-quantisers (pq_bits 4, the default) or
        m 8-bit ones (pq_bits 8, the earlier layout, kept for comparison)."""
        if pq_bits not in (4, 8):
            raise ValueError("pq_bits must be 4 (fast scan) or 8")
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        dim = sample.shape[1]
        nlist = nlist or default_nlist(expected_n or len(sample))
        nlist = int(max(1, min(nlist, len(sample) // 39)))
        pca_dim = min(pca_dim, dim)
        m = _pq_m(pca_dim, m)
        # m bytes per code as 2m 4-bit sub-quantisers (fast scan: see the module docstring);
        # 8-bit: np = no polysemous training (the exact re-ranking makes it pointless)
        factory = f"PCAR{pca_dim},IVF{nlist}," + (f"PQ{2 * m}x4fs" if pq_bits == 4 else f"PQ{m}np")
        LOG.info("training compressed index %s on %d vectors", factory, len(sample))
        index = faiss.index_factory(dim, factory)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        # 10 k-means iterations instead of 25: the short list is re-ranked exactly, so the
        # last few per cent of quantisation error do not show in the results, and training
        # 1 M-tile archives stays within minutes on a small CPU
        ivf.cp.seed = ivf.pq.cp.seed = seed
        ivf.cp.niter = ivf.pq.cp.niter = 10
        index.train(sample)
        pca = faiss.downcast_VectorTransform(index.chain.at(0))
        # the full dim x dim eigenvector matrix is only needed for training (2048-d: 16 MB)
        pca.PCAMat.clear()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (INDEX_FILE, VECTORS_FILE, ROWS_FILE, MANIFEST_FILE):
            (folder / name).unlink(missing_ok=True)
        manifest = {"dim": dim, "factory": factory, "nlist": nlist, "trained_n": len(sample), "n_rows": 0, "shards": {}, "nprobe": default_nprobe(nlist), "shortlist": 100, "exact_max": 20000}
        out = cls(folder, index, VectorStore(folder / VECTORS_FILE, dim), np.zeros(0, np.int64), manifest)
        out.save()
        return out

    @classmethod
    def open(cls, folder: str | Path) -> "CompressedIndex":
        """Load an index written by `save`; ShardError when it is missing or inconsistent
        (the caller rebuilds it: it is derived from the shard files)."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
            index = faiss.read_index(str(folder / INDEX_FILE))
            rows = np.load(folder / ROWS_FILE)
            store = VectorStore(folder / VECTORS_FILE, manifest["dim"], manifest["n_rows"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ShardError(f"compressed index in {folder} is missing or unreadable ({str(exc).splitlines()[0]})") from None
        if len(rows) != manifest["n_rows"] or index.ntotal != int((rows >= 0).sum()):
            raise ShardError(f"compressed index in {folder} is inconsistent (an interrupted update?)")
        return cls(folder, index, store, rows, manifest)

    def save(self) -> None:
        """Write index, row map and manifest atomically (the vector file is append-only and
        already on disk); the manifest goes last, so a crash leaves the previous state."""
        with atomic_output(self.folder / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        with atomic_output(self.folder / ROWS_FILE) as tmp, open(tmp, "wb") as fh:
            np.save(fh, self.rows)
        self.manifest["n_rows"] = int(len(self.rows))
        atomic_write_text(self.folder / MANIFEST_FILE, json.dumps(self.manifest, indent=1))

    # -- updating --------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

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
        rows = self.store.append(xb)
        if len(rows):
            self.index.add_with_ids(xb, rows)
        self.rows = np.concatenate([self.rows, ids])
        self._by_id = None
        if key is not None:
            self.manifest["shards"][key] = [int(rows[0]) if len(rows) else len(self.rows), len(self.rows)]
        self._gpu = None

    def remove_rows(self, rows: np.ndarray) -> int:
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[self.rows[rows] >= 0]
        if len(rows):
            self.index.remove_ids(faiss.IDSelectorBatch(rows))
            self.rows[rows] = -1
            self._by_id = None
            self._gpu = None
        return len(rows)

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by tile id; returns how many were removed."""
        return self.remove_rows(np.flatnonzero(np.isin(self.rows, np.asarray(ids, dtype=np.int64)) & (self.rows >= 0)))

    def remove_shard(self, key: str) -> int:
        start, end = self.manifest["shards"].pop(key)
        return self.remove_rows(np.arange(start, end, dtype=np.int64))

    @property
    def dead_rows(self) -> int:
        return int((self.rows < 0).sum())

    # -- searching -------------------------------------------------------------------------

    def _params(self, nprobe: int, sel=None):
        return faiss.SearchParametersPreTransform(index_params=faiss.SearchParametersIVF(nprobe=int(nprobe), sel=sel))

    def _searcher(self, filtered: bool):
        if self.use_gpu and not filtered and not self._fast_scan and gpu_available():
            if self._gpu is None:
                options = faiss.GpuClonerOptions()
                options.useFloat16 = True  # PQ codes over 48 bytes need float16 lookup tables on GPU
                self._gpu = faiss.index_cpu_to_all_gpus(self.index, options)
            return self._gpu
        return self.index

    def _candidates(self, xq: np.ndarray, R: int, nprobe: int, sel=None) -> np.ndarray:
        index = self._searcher(sel is not None)
        if index is self.index:
            _, C = index.search(xq, R, params=self._params(nprobe, sel))
        else:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
            _, C = index.search(xq, R)
        return C

    def rerank(self, xq: np.ndarray, C: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among candidate rows C (nq x R, -1 = none) -> (D, tile ids)."""
        valid = C >= 0
        # each query against its own candidates only (nq x R x d, a batched matrix-vector
        # product): the short lists of different query tiles hardly overlap, so one nq x
        # (nq * R) product would compute nq times more inner products than are needed
        vecs = torch.from_numpy(self.store.get(np.where(valid, C, 0)))
        S = torch.bmm(vecs, torch.from_numpy(xq)[:, :, None])[:, :, 0].numpy()
        S = np.where(valid, S, -np.inf)
        D, pos = topk_rows(S, np.arange(C.shape[1]), k)
        rows = np.take_along_axis(C, np.maximum(pos, 0), axis=1)
        I = np.where((pos >= 0) & np.isfinite(D), self.rows[np.maximum(rows, 0)], -1)
        return np.where(I >= 0, D, -np.inf).astype(np.float32), I.astype(np.int64)

    def search(self, xq: np.ndarray, k: int, id_filter: IdFilter | None = None, *, nprobe: int | None = None, shortlist: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D cosine similarities, I tile ids) of each query."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if self.ntotal == 0 or len(xq) == 0:
            return empty_result(len(xq), k)
        nprobe = int(nprobe or self.nprobe)
        R = max(int(shortlist or self.shortlist), k)
        if id_filter is None or id_filter.is_empty:
            return self.rerank(xq, self._candidates(xq, R, nprobe), k)
        allowed = (self.rows >= 0) & id_filter.mask(self.rows)
        allowed_rows = np.flatnonzero(allowed)
        if len(allowed_rows) <= max(self.exact_max, R):
            return self._exact_rows(xq, allowed_rows, k)
        bitmap = np.packbits(allowed, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        C = self._candidates(xq, R, nprobe, sel)
        nlist = self._ivf.nlist
        short = (C >= 0).sum(axis=1) < min(k, len(allowed_rows))
        while short.any() and nprobe < nlist:
            # a selective filter leaves too few vectors in the probed lists: widen the probe
            nprobe = min(nlist, nprobe * 4)
            C[short] = self._candidates(xq[short], R, nprobe, sel)
            short = (C >= 0).sum(axis=1) < min(k, len(allowed_rows))
        return self.rerank(xq, C, k)

    def _exact_rows(self, xq: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D, I_rows = exact_search(xq, self.store.get(rows), rows, k)
        I = np.where(I_rows >= 0, self.rows[np.maximum(I_rows, 0)], -1)
        return D, I

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored (float16-rounded) vectors of tile `ids`; zeros for ids not in the index."""
        ids = np.asarray(ids, dtype=np.int64)
        sorted_ids, sorted_rows = self._id_rows()
        pos = np.searchsorted(sorted_ids, ids)
        found = (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == ids)
        out = np.zeros((len(ids), self.dim), np.float32)
        if found.any():
            out[found] = self.store.get(sorted_rows[pos[found]])
        return out

    def _id_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Live tile ids, sorted, and their rows: kept until the next add or removal, since
        sorting a million ids costs ~0.1 s and every region result and slide mosaic looks
        up vectors by id."""
        if self._by_id is None:
            alive = np.flatnonzero(self.rows >= 0)
            order = np.argsort(self.rows[alive], kind="stable")
            self._by_id = (self.rows[alive][order], alive[order])
        return self._by_id

    def all_ids(self) -> np.ndarray:
        return self.rows[self.rows >= 0]

    def ram_bytes(self) -> int:
        """Bytes this index holds in RAM: the serialised FAISS index (codes, list ids,
        centroids, PCA matrix), the row -> tile id map, and for 8-bit PQ the table of
        centroid-by-codebook terms FAISS precomputes on loading (nlist x m x 256 floats:
        32 MB at 1 M tiles; fast-scan PQ has none)."""
        ivf = faiss.downcast_index(self._ivf)
        table = ivf.precomputed_table.size() * 4 if isinstance(ivf, faiss.IndexIVFPQ) else 0
        return int(faiss.serialize_index(self.index).nbytes + self.rows.nbytes + table)
