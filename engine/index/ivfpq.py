"""The approximate half of the compressed index: a PCA rotation + IVF-PQ FAISS index over
row numbers, its training and sizing rules, and candidate search (CPU, or GPU for 8-bit PQ).

The codes are "fast scan" PQ: 2m sub-quantisers of 16 centroids (4 bits) each, whose
distance tables fit in SIMD registers, so scanning a list is several times faster than with
m sub-quantisers of 256 centroids (8 bits) in the same bytes, at the same recall once the
short list is re-ranked exactly (figures: bench/search.py, docs/benchmarks.md). Indexes
written with 8-bit PQ (before the switch) still open and work.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from engine.index.common import gpu_available

LOG = logging.getLogger(__name__)


def default_nlist(n: int) -> int:
    """About sqrt(n) inverted lists, a power of two in [16, 65536] (1 M vectors: 1024)."""
    return int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(max(n, 1)))))))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: 1/16 of them, at least 64 (1 M vectors: 64 of 1024; 100 k:
    64 of 256). Fewer lists lost recall@10 measurably, while with fast-scan codes 64 lists
    cost a region query little more than 16, and a longer short list added almost nothing
    (bench/search.py --sweep, docs/benchmarks.md)."""
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


def train_ivfpq(
    sample: np.ndarray, *, nlist: int | None, expected_n: int | None, pca_dim: int, m: int, pq_bits: int, seed: int
) -> tuple[faiss.Index, str, int]:
    """An empty PCAR + IVF-PQ index trained on `sample` (n x dim float32); returns (index,
    its factory string, nlist). Codes are m bytes: 2m fast-scan 4-bit sub-quantisers
    (pq_bits 4) or m 8-bit ones (pq_bits 8, the earlier layout, kept for comparison)."""
    if pq_bits not in (4, 8):
        raise ValueError("pq_bits must be 4 (fast scan) or 8")
    dim = sample.shape[1]
    nlist = nlist or default_nlist(expected_n or len(sample))
    nlist = int(max(1, min(nlist, len(sample) // 39)))
    pca_dim = min(pca_dim, dim)
    m = _pq_m(pca_dim, m)
    # 8-bit: np = no polysemous training (the exact re-ranking makes it pointless)
    factory = f"PCAR{pca_dim},IVF{nlist}," + (f"PQ{2 * m}x4fs" if pq_bits == 4 else f"PQ{m}np")
    LOG.info("training compressed index %s on %d vectors", factory, len(sample))
    index = faiss.index_factory(dim, factory)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    # 10 k-means iterations instead of 25: the short list is re-ranked exactly, so the last
    # few per cent of quantisation error do not show in the results, and training large
    # archives stays within minutes on a small CPU
    ivf.cp.seed = ivf.pq.cp.seed = seed
    ivf.cp.niter = ivf.pq.cp.niter = 10
    index.train(sample)
    pca = faiss.downcast_VectorTransform(index.chain.at(0))
    # the full dim x dim eigenvector matrix is only needed for training (2048-d: 16 MB)
    pca.PCAMat.clear()
    return index, factory, nlist


class IvfPq:
    """A trained PCAR + IVF-PQ index over row numbers: candidate rows per query."""

    def __init__(self, index: faiss.Index):
        self.index = index
        self._ivf = faiss.extract_index_ivf(index)
        # FAISS has no GPU version of fast-scan PQ; those indexes are searched on the CPU
        self._fast_scan = isinstance(faiss.downcast_index(self._ivf), faiss.IndexIVFFastScan)
        self._gpu = None
        self.use_gpu = False

    @property
    def nlist(self) -> int:
        return int(self._ivf.nlist)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, xb: np.ndarray, rows: np.ndarray) -> None:
        if len(rows):
            self.index.add_with_ids(xb, rows)
            self._gpu = None

    def remove(self, rows: np.ndarray) -> None:
        if len(rows):
            self.index.remove_ids(faiss.IDSelectorBatch(rows))
            self._gpu = None

    def _searcher(self, filtered: bool) -> faiss.Index:
        if self.use_gpu and not filtered and not self._fast_scan and gpu_available():
            if self._gpu is None:
                options = faiss.GpuClonerOptions()
                options.useFloat16 = True  # PQ codes over 48 bytes need float16 lookup tables on GPU
                self._gpu = faiss.index_cpu_to_all_gpus(self.index, options)
            return self._gpu
        return self.index

    def candidates(self, xq: np.ndarray, R: int, nprobe: int, sel=None) -> np.ndarray:
        """nq x R candidate rows (-1: none), approximate order; `sel` a FAISS id selector."""
        index = self._searcher(sel is not None)
        if index is self.index:
            params = faiss.SearchParametersPreTransform(
                index_params=faiss.SearchParametersIVF(nprobe=int(nprobe), sel=sel)
            )
            _, C = index.search(xq, R, params=params)
        else:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
            _, C = index.search(xq, R)
        return C

    def ram_bytes(self) -> int:
        """The serialised FAISS index (codes, list ids, centroids, PCA matrix), and for 8-bit
        PQ the table of centroid-by-codebook terms FAISS precomputes on loading (nlist x m x
        256 floats; fast-scan PQ has none)."""
        ivf = faiss.downcast_index(self._ivf)
        table = ivf.precomputed_table.size() * 4 if isinstance(ivf, faiss.IndexIVFPQ) else 0
        return int(faiss.serialize_index(self.index).nbytes + table)
