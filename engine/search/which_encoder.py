"""Which encoder searches an index: the one it was built with, unless the user names another.

`indexer build` records in the catalog (`encoders.spec`) what loads its encoder again: the
spec as given, made canonical by `canonical_spec` (``random:ARCH:SEED``, an absolute checkpoint
path, an absolute card path, or ``preset:NAME:/abs/weights``), next to the sha256 of its
weights. Search (CLI, API, web app) calls `index_encoder_spec` when no encoder is given
(--encoder, HISTOSEEK_ENCODER): the one encoder record with shards, its weights checked against
the recorded sha256, so a checkpoint that is gone or was overwritten is a clear error naming
the path and both hashes rather than a silently different index. A given encoder still
overrides, and one that is not the index's is refused (engine.search.live_index).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import EncoderRecord, Shard
from engine.errors import EncoderError, NotFound


def canonical_spec(spec: str, info=None) -> str:
    """The spec as the catalog keeps it: random weights as ``random:ARCH:SEED`` (from `info`,
    the loaded encoder's EncoderInfo, when given), every file path absolute."""
    if spec == "random" or spec.startswith("random:"):
        if info is not None and getattr(info, "is_random", False) and str(info.source).startswith("random:"):
            return str(info.source)
        parts = spec.split(":")
        arch = parts[1] if len(parts) > 1 and parts[1] else "resnet50"
        return f"random:{arch}:{parts[2] if len(parts) > 2 else 0}"
    if spec.startswith("preset:"):
        parts = spec.split(":", 2)
        if len(parts) == 3 and parts[2]:
            return f"preset:{parts[1]}:{Path(parts[2]).expanduser().resolve()}"
        return spec
    return str(Path(spec).expanduser().resolve())


def weights_file(spec: str) -> Path | None:
    """The file whose sha256 the catalog records for `spec` (checkpoint, card weights, preset
    weights); None for random weights."""
    if spec.startswith("random"):
        return None
    if spec.startswith("preset:"):
        return Path(spec.split(":", 2)[2])
    if spec.lower().endswith(".json"):
        from engine.cards import card_from_spec

        if not Path(spec).is_file():
            raise EncoderError(f"the index's encoder card {spec} is gone; restore it or search with --encoder")
        return Path(card_from_spec(spec).weights)
    return Path(spec)


def check_weights(spec: str, sha256: str) -> None:
    """An EncoderError, naming the path and both hashes, when the weights `spec` loads are
    gone or are not those recorded (sha256)."""
    from engine.files import file_sha256

    path = weights_file(spec)
    if path is None:
        return
    if not path.is_file():
        raise EncoderError(
            f"the index was built with the encoder weights {path} (sha256 {sha256}), which are gone; "
            "restore that file, or search with --encoder naming a copy of it"
        )
    now = file_sha256(path)
    if now != sha256:
        raise EncoderError(
            f"the encoder weights {path} changed since the index was built: the index was built with sha256 {sha256}, "
            f"the file now has sha256 {now}; restore the original file, rebuild the index (`indexer build`), "
            "or search with --encoder naming the original weights"
        )


def _describe(row: EncoderRecord) -> str:
    return f"{row.spec or row.name} ({row.architecture}, {row.target_mpp:g} um/px, {row.tile_px} px, sha256 {row.checkpoint_sha256[:12]})"


def index_encoder_spec(catalog: Catalog, *, verify: bool = True) -> str:
    """The spec of the encoder the index was built with: the one encoder record with shards.
    Several, or one from before the catalog kept specs, is an EncoderError saying what to
    choose; `verify` checks its weights against the recorded sha256 (check_weights)."""
    with catalog.session() as s:
        rows = s.scalars(
            sa.select(EncoderRecord)
            .where(sa.exists().where(Shard.encoder_id == EncoderRecord.id))
            .order_by(EncoderRecord.id)
        ).all()
        if not rows:
            raise NotFound("the archive has no indexed slides yet: index it first (`indexer build`)")
        if len(rows) > 1:
            listed = "; ".join(_describe(r) for r in rows)
            raise EncoderError(
                f"the index holds shards of {len(rows)} encoders: {listed}; choose one with --encoder (or HISTOSEEK_ENCODER)"
            )
        row = rows[0]
        spec, sha = row.spec, row.checkpoint_sha256
        if not spec:
            raise EncoderError(
                f"the catalog does not record how to load the index's encoder {_describe(row)} (built before encoder specs were kept); "
                "search with --encoder (or HISTOSEEK_ENCODER), or run `indexer build` once with it to record it"
            )
    if verify:
        check_weights(spec, sha)
    return spec
