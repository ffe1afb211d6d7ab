"""FAISS shard files: the on-disk unit of the vector index.

A shard is a FAISS `IndexIDMap2(IndexFlatIP(dim))` of L2-normalised float32 vectors whose ids
are the catalog's tile ids, written to a temp file and renamed (a crash never leaves half a
shard), with a JSON sidecar naming the encoder it belongs to. Shards of one encoder live in
one folder of the index dir, `<index_dir>/<encoder key>/`, so no shard of another encoder is
ever mixed into a search. The catalog's `shards` table records each file's count and sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import faiss
import numpy as np

from engine.errors import ShardError
from engine.files import atomic_write_bytes

SHARD_SUFFIX = ".faiss"


@dataclasses.dataclass(frozen=True)
class ShardEncoder:
    """What a shard's vectors were made with; two shards can be searched together only
    when these are equal."""

    name: str
    checkpoint_sha256: str
    dim: int
    target_mpp: float
    tile_px: int

    @property
    def key(self) -> str:
        """Folder name: checkpoint + grid, e.g. `931956f31d3f-1.0mpp-224px`."""
        return f"{self.checkpoint_sha256[:12]}-{self.target_mpp:g}mpp-{self.tile_px}px"

    @classmethod
    def of(cls, row) -> "ShardEncoder":
        """The shard encoder of a catalog `encoders` row (or anything with its fields)."""
        return cls(row.name, row.checkpoint_sha256, row.dim, row.target_mpp, row.tile_px)


def encoder_dir(index_dir: str | Path, encoder: ShardEncoder) -> Path:
    return Path(index_dir) / encoder.key


def sidecar_of(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def write_shard(path: str | Path, ids: np.ndarray, xb: np.ndarray, encoder: ShardEncoder) -> str:
    """Write vectors `xb` (n x dim, L2-normalised) with int64 `ids` as a shard file,
    atomically; returns the file's sha256. The sidecar is written first: a shard file never
    exists without it."""
    path = Path(path)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if xb.ndim != 2 or xb.shape[1] != encoder.dim or len(ids) != len(xb):
        raise ValueError(f"shard needs n x {encoder.dim} vectors and n ids, got {xb.shape} and {ids.shape}")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(encoder.dim))
    if len(ids):
        index.add_with_ids(xb, ids)
    data = faiss.serialize_index(index).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(data).hexdigest()
    meta = {"encoder": dataclasses.asdict(encoder), "count": int(len(ids)), "sha256": sha}
    atomic_write_bytes(sidecar_of(path), json.dumps(meta, indent=1).encode())
    atomic_write_bytes(path, data)
    return sha


def read_shard_encoder(path: str | Path) -> ShardEncoder:
    side = sidecar_of(Path(path))
    try:
        meta = json.loads(side.read_text())
        return ShardEncoder(**meta["encoder"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"shard sidecar {side} is missing or unreadable ({exc}); run `indexer verify`") from None


def read_shard(path: str | Path) -> faiss.IndexIDMap2:
    """Load a shard index (ids = tile ids)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; run `indexer verify`")
    try:
        return faiss.read_index(str(path))  # the Python wrapper returns the concrete IndexIDMap2
    except RuntimeError as exc:
        raise ShardError(f"shard {path} is corrupt ({str(exc).splitlines()[0]}); run `indexer verify`") from None


def shard_arrays(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, vectors float32 n x dim) stored in a shard."""
    index = read_shard(path)
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    flat = faiss.downcast_index(index.index)
    xb = flat.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
    return ids, xb


def list_shards(index_dir: str | Path, encoder: ShardEncoder) -> list[Path]:
    folder = encoder_dir(index_dir, encoder)
    return sorted(folder.glob(f"*{SHARD_SUFFIX}")) if folder.is_dir() else []
