"""How the compressed index stores each vector for re-ranking its short list (the row store
on disk, engine.index.vectorstore), and how a query is scored against what is stored.

Kinds (named in the index's manifest, key "rerank"; an index without the key has the first):

    f16      float16 of the full vector: 2 bytes per dimension (2048-d: 4,096 B per tile);
             scores are exact up to float16 rounding. The layout before issue 18.
    pca-f16  float16 of the vector's PCA rotation y = A (x - mean), A the width x dim
             projection the IVF-PQ index already learns (PCAR256: 512 B per tile).
    pca-sq8  8 bits per dimension of a separately trained PCA rotation (512-d: 512 B per
             tile), each dimension quantised uniformly over its range in the training sample.

For the PCA kinds, x ~ mean + A^T y, so <x, q> ~ <y, A q> + <mean, q>: the query stays
exact, only the stored side loses what lies outside the top principal directions (for
embeddings of low intrinsic dimension, little). A query is turned once into (qv, offset) and
every stored row r scores <widened(r), qv> + offset, so re-ranking is one batched product
over the codes as they are stored, however they are coded. Which kind is the default was
chosen by measurement (bench/search.py --compare-stores, docs/benchmarks.md, issue 18).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from engine.files import atomic_output

KINDS = ("f16", "pca-f16", "pca-sq8")
DEFAULT_KIND = "pca-f16"
DEFAULT_WIDTH = {"pca-f16": 256, "pca-sq8": 512}
STORE_FILES = {"f16": "vectors.f16", "pca-f16": "rerank.f16", "pca-sq8": "rerank.u8"}
PARAMS_FILE = "rerank.npz"


class Codec:
    """Encodes vectors (n x dim float32) as stored rows (n x width) and scores queries."""

    def __init__(self, kind: str, dim: int, A=None, mean=None, lo=None, step=None):
        if kind not in KINDS:
            raise ValueError(f"re-ranking store must be one of {KINDS}, not {kind!r}")
        self.kind, self.dim = kind, int(dim)
        self.A = None if A is None else np.ascontiguousarray(A, np.float32)  # width x dim
        self.mean = None if mean is None else np.ascontiguousarray(mean, np.float32)
        self.lo = None if lo is None else np.ascontiguousarray(lo, np.float32)
        self.step = None if step is None else np.ascontiguousarray(step, np.float32)

    @property
    def width(self) -> int:
        return self.dim if self.A is None else len(self.A)

    @property
    def dtype(self):
        return np.uint8 if self.kind == "pca-sq8" else np.float16

    @property
    def file(self) -> str:
        return STORE_FILES[self.kind]

    @property
    def row_bytes(self) -> int:
        return self.width * np.dtype(self.dtype).itemsize

    def spec(self) -> dict:
        return {"kind": self.kind, "width": self.width, "file": self.file}

    def ram_bytes(self) -> int:
        return sum(a.nbytes for a in (self.A, self.mean, self.lo, self.step) if a is not None)

    # -- building --------------------------------------------------------------------------

    @classmethod
    def train(cls, kind: str, sample: np.ndarray, *, pca: tuple | None = None, width: int | None = None) -> "Codec":
        """A codec of `kind` for vectors like `sample` (n x dim float32). `pca`: (A, mean)
        to reuse for 'pca-f16' (the IVF-PQ index's rotation), else one is trained."""
        dim = sample.shape[1]
        if kind == "f16":
            return cls(kind, dim)
        width = min(int(width or DEFAULT_WIDTH[kind]), dim)
        if pca is None or len(pca[0]) != width:
            pca = train_pca(sample, width)
        out = cls(kind, dim, *pca)
        if kind == "pca-sq8":
            y = out.project(sample)
            lo, hi = y.min(axis=0), y.max(axis=0)
            margin = 0.02 * (hi - lo)  # vectors beyond the sample's range are clipped to it
            out.lo, out.step = lo - margin, np.maximum((hi - lo + 2 * margin) / 255, 1e-12)
        return out

    def project(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) @ self.A.T

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Rows to store for vectors x (n x dim float32)."""
        if self.kind == "f16":
            return np.ascontiguousarray(x, np.float16)
        y = self.project(x)
        if self.kind == "pca-f16":
            return y.astype(np.float16)
        return np.clip(np.rint((y - self.lo) / self.step), 0, 255).astype(np.uint8)

    # -- scoring ---------------------------------------------------------------------------

    def query(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(qv nq x width, offset nq): the similarity of query i with a stored row r (widened
        to float32) is <r, qv[i]> + offset[i]."""
        xq = np.ascontiguousarray(xq, np.float32)
        if self.kind == "f16":
            return xq, np.zeros(len(xq), np.float32)
        qp = xq @ self.A.T
        offset = xq @ self.mean
        if self.kind == "pca-sq8":
            offset = offset + qp @ self.lo
            qp = qp * self.step
        return np.ascontiguousarray(qp, np.float32), offset.astype(np.float32)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Vectors (n x dim) from stored rows widened to float32: for the PCA kinds the
        reconstruction mean + A^T y, scaled to unit length (used as queries, e.g. mosaics)."""
        if self.kind == "f16":
            return rows
        y = rows * self.step + self.lo if self.kind == "pca-sq8" else rows
        x = y @ self.A + self.mean
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    # -- persistence -----------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        if self.kind == "f16":
            return
        arrays = {"A": self.A, "mean": self.mean}
        if self.kind == "pca-sq8":
            arrays |= {"lo": self.lo, "step": self.step}
        with atomic_output(Path(folder) / PARAMS_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, folder: Path, spec: dict | None, dim: int) -> "Codec":
        """The codec a manifest's "rerank" entry names (None: the float16 full-dim layout)."""
        if spec is None or spec["kind"] == "f16":
            return cls("f16", dim)
        with np.load(Path(folder) / PARAMS_FILE) as z:
            return cls(spec["kind"], dim, **{key: z[key] for key in z.files})


def train_pca(sample: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(A width x dim, mean dim): the top `width` principal directions of `sample`."""
    pca = faiss.PCAMatrix(sample.shape[1], width)
    pca.train(np.ascontiguousarray(sample, np.float32))
    return index_pca(pca)


def index_pca(pca) -> tuple[np.ndarray, np.ndarray]:
    """(A, mean) of a trained FAISS PCAMatrix (also the PCAR of an IVF-PQ index: its random
    rotation keeps A orthonormal, which is all the inner products need)."""
    pca = faiss.downcast_VectorTransform(pca)
    A = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)
    return A.astype(np.float32), faiss.vector_to_array(pca.mean).astype(np.float32)
