"""An append-only file of fixed-width rows (float16 or uint8 codes) on disk, read through a
memmap.

The compressed index keeps only PQ codes in RAM; the vectors it re-ranks its short list with
live here, read by row number: float16 of the full vector (the earlier layout, 2 bytes per
dimension, 2048-d: 4 KiB per tile) or a compact code of it (engine.index.codec: 512 B). Rows
are never rewritten in place: a removed vector keeps its row (marked dead, -1, in the index's
row map) for the life of the index folder -- there is no compaction; a rebuild from the
shard files starts a new file. Appending is the only write, and a crash can at worst leave a
tail of rows that no manifest counts; opening the store cuts that tail off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

LOG = logging.getLogger(__name__)


class VectorStore:
    """Rows of `dim` values of `dtype` (float16 or uint8) in one file; `n` = rows that belong
    to the index."""

    def __init__(self, path: str | Path, dim: int, n: int = 0, dtype=np.float16):
        self.path = Path(path)
        self.dim = int(dim)
        self.n = int(n)
        self.dtype = np.dtype(dtype)
        self._map: np.memmap | None = None
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        size = self.path.stat().st_size
        row_bytes = self.dim * self.dtype.itemsize
        if size < self.n * row_bytes:
            raise OSError(f"vector file {self.path} holds {size // row_bytes} rows, its manifest counts {self.n}")
        if size > self.n * row_bytes:
            LOG.warning(
                "vector file %s has %d uncounted rows (an interrupted add); cutting them off",
                self.path,
                size // row_bytes - self.n,
            )
            os.truncate(self.path, self.n * row_bytes)

    @property
    def nbytes(self) -> int:
        return self.n * self.dim * self.dtype.itemsize

    def append(self, xb: np.ndarray) -> np.ndarray:
        """Append rows (n x dim, cast to the store's dtype); returns their row numbers."""
        xb = np.ascontiguousarray(xb, dtype=self.dtype)
        if xb.ndim != 2 or xb.shape[1] != self.dim:
            raise ValueError(f"need n x {self.dim} vectors, got {xb.shape}")
        with open(self.path, "ab") as fh:
            fh.write(xb.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        rows = np.arange(self.n, self.n + len(xb), dtype=np.int64)
        self.n += len(xb)
        self._map = None
        return rows

    def _memmap(self) -> np.ndarray:
        if self._map is None or len(self._map) != self.n:
            if self.n == 0:
                return np.zeros((0, self.dim), self.dtype)
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n, self.dim))
        return self._map

    def get(self, rows: np.ndarray) -> np.ndarray:
        """`rows` widened to float32 (any shape; the result has a trailing axis of `dim`),
        read in sorted order, which the disk prefers."""
        rows = np.asarray(rows, dtype=np.int64)
        shape = rows.shape
        rows = rows.ravel()
        if len(rows) == 0:
            return np.zeros((*shape, self.dim), np.float32)
        order = np.argsort(rows, kind="stable")
        raw = np.empty((len(rows), self.dim), self.dtype)
        raw[order] = self._memmap()[rows[order]]
        # torch widens float16 with the CPU's F16C instructions (and uint8 too) faster than numpy's cast, which
        # was the costliest step of re-ranking a short list (docs/benchmarks.md)
        return torch.from_numpy(raw).float().numpy().reshape(*shape, self.dim)
