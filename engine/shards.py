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
    had_shard = path.exists()
    atomic_write_bytes(sidecar_of(path), json.dumps(meta, indent=1).encode())
    try:
        atomic_write_bytes(path, data)
    except BaseException:
        # A full or read-only disk fails the (larger) shard after its sidecar was written:
        # a sidecar without its shard is an orphan nobody would clean up, so it goes too.
        if not had_shard:
            sidecar_of(path).unlink(missing_ok=True)
        raise
    return sha


_SHARD_HEADER_BYTES = 90


def shard_file_bytes(count: int, dim: int) -> int:
    """The exact size of a shard file of `count` vectors of `dim` floats: the serialised
    IndexIDMap2(IndexFlatIP) is a 90-byte header, the vectors, then the int64 ids. A cheap
    check (one stat) that catches a truncated or padded file without reading it."""
    return _SHARD_HEADER_BYTES + int(count) * (4 * int(dim) + 8)


# Stored vectors are L2-normalised (zero rows stay zero): a squared norm outside this band
# means the file's bytes are not what the writer wrote (a flipped exponent bit gave a
# vector of norm 1.6e7 that silently dominated every inner-product search).
_NORM2_TOLERANCE = 1e-4  # float32 rounding leaves ~1e-6


def read_shard_encoder(path: str | Path) -> ShardEncoder:
    side = sidecar_of(Path(path))
    try:
        meta = json.loads(side.read_text())
        return ShardEncoder(**meta["encoder"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"shard sidecar {side} is missing or unreadable ({exc}); run `indexer verify`") from None


def read_shard(path: str | Path, sha256: str | None = None) -> faiss.IndexIDMap2:
    """Load a shard index (ids = tile ids). With `sha256` (the catalog's), the file's bytes
    must hash to it; in any case every stored vector must be unit length (or zero), so a
    damaged file is refused (ShardError) rather than searched.

    The file is read once and hashed from memory. Hashing dominates: a checked load costs
    several times FAISS's bare `read_index` (bench/shard_load.py; docs/benchmarks.md), paid
    once per new shard (search keeps loaded shards; the compressed index keeps its own copy)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"shard {path} is missing; run `indexer verify`") from None
    except OSError as exc:
        raise ShardError(f"shard {path} cannot be read ({exc.strerror or exc}); run `indexer verify`") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ShardError(
            f"shard {path} is damaged: its sha256 differs from the catalog's; `indexer build` re-embeds its slides"
        )
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise ShardError(
            f"shard {path} is corrupt ({str(exc).splitlines()[0]}); `indexer build` re-embeds its slides"
        ) from None
    if not isinstance(index, faiss.IndexIDMap2) or not isinstance(faiss.downcast_index(index.index), faiss.IndexFlatIP):
        raise ShardError(
            f"shard {path} is not an IndexIDMap2(IndexFlatIP) (a {type(index).__name__}); `indexer build` re-embeds its slides"
        )
    _check_norms(path, index)
    return index


def _stored_vectors(index: faiss.IndexIDMap2) -> np.ndarray:
    """The vectors of a flat shard as a view of FAISS's own memory (no copy)."""
    flat = faiss.downcast_index(index.index)
    if not index.ntotal:
        return np.zeros((0, index.d), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def _check_norms(path: Path, index: faiss.IndexIDMap2) -> None:
    xb = _stored_vectors(index)
    norm2 = np.einsum("ij,ij->i", xb, xb)
    bad = ~((np.abs(norm2 - 1.0) <= _NORM2_TOLERANCE) | (norm2 == 0.0))  # NaN is bad too
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ShardError(
            f"shard {path} is damaged: {int(bad.sum())} vectors are not unit length (row {row} has norm {float(np.sqrt(norm2[row])):.3g}); `indexer build` re-embeds its slides"
        )


def shard_arrays(path: str | Path, sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, vectors float32 n x dim) stored in a shard (checked as in read_shard)."""
    return shard_arrays_of(read_shard(path, sha256))


def shard_arrays_of(index: faiss.IndexIDMap2) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, vectors float32 n x dim) of a loaded shard."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    flat = faiss.downcast_index(index.index)
    xb = flat.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
    return ids, xb


def list_shards(index_dir: str | Path, encoder: ShardEncoder) -> list[Path]:
    folder = encoder_dir(index_dir, encoder)
    return sorted(p for p in folder.glob(f"*{SHARD_SUFFIX}") if not p.name.startswith(".")) if folder.is_dir() else []


def list_temp_files(index_dir: str | Path, encoder: ShardEncoder) -> list[Path]:
    """engine.files.atomic_output's temp files in an encoder folder (`.NAME.PID.tmp.faiss`,
    `.tmp.json`, the older `.NAME.faiss.PID.tmp`): only temp files start with a dot there."""
    folder = encoder_dir(index_dir, encoder)
    return sorted(folder.glob(".*.tmp*")) if folder.is_dir() else []


def list_orphan_sidecars(index_dir: str | Path, encoder: ShardEncoder) -> list[Path]:
    """Sidecars (`slide-N.json`) whose shard file is not there (a write that failed on a
    full or read-only disk before the fix, or a file deleted by hand)."""
    folder = encoder_dir(index_dir, encoder)
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.glob("*.json") if not p.name.startswith(".") and not p.with_suffix(SHARD_SUFFIX).exists()
    )
