"""Which encoder searches an index: the one it was built with, or, when one archive is indexed
with several, the one the user names (by its catalog name, spec or sha256 prefix).

`indexer build` records in the catalog (`encoders.spec`) what loads its encoder again: the
spec as given, made canonical by `canonical_spec` (``random:ARCH:SEED``, an absolute checkpoint
path, an absolute card path, or ``preset:NAME:/abs/weights``), next to the sha256 of its
weights. Search (CLI, API, web app) calls `index_encoder_spec` when no encoder is given
(--encoder, HISTOSEEK_ENCODER): the one encoder record with shards, its weights checked against
the recorded sha256, so a checkpoint that is gone or was overwritten is a clear error naming
the path and both hashes rather than a silently different index. A given encoder
(`search_encoder`: --encoder, HISTOSEEK_ENCODER, the web app's selector) is first looked up
among the catalog's encoders by name, spec or sha256 prefix, and loaded from its recorded
spec; otherwise it is a spec itself, and one whose vectors the catalog does not hold is
refused (engine.search.live_index).
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


def searchable_encoders(session) -> list[EncoderRecord]:
    """The encoder rows with shards (those search can use), oldest first."""
    return list(
        session.scalars(
            sa.select(EncoderRecord)
            .where(sa.exists().where(Shard.encoder_id == EncoderRecord.id))
            .order_by(EncoderRecord.id)
        )
    )


def encoder_choices(catalog: Catalog) -> list[dict]:
    """What a search may name (the web app's selector): per searchable encoder, its `name`
    (what to pass), architecture, grid, sha256 and whether its weights are random."""
    with catalog.session() as s:
        return [
            {
                "id": r.id,
                "name": r.name,
                "architecture": r.architecture,
                "target_mpp": r.target_mpp,
                "tile_px": r.tile_px,
                "sha256": r.checkpoint_sha256,
                "is_random": bool(r.is_random),
            }
            for r in searchable_encoders(s)
        ]


def _names(rows) -> str:
    return "; ".join(_describe(r) if r.name == r.spec else f"{r.name}: {_describe(r)}" for r in rows)


def _named(rows, wanted: str) -> list[EncoderRecord]:
    """The rows `wanted` names: by name, recorded spec, or a sha256 prefix of 6+ hex digits."""
    w = wanted.strip()
    canonical = canonical_spec(w) if w.startswith(("random", "preset:")) else None
    return [
        r
        for r in rows
        if w in (r.name, r.spec)
        or (canonical is not None and canonical == r.spec)
        or (len(w) >= 6 and r.checkpoint_sha256.startswith(w.lower()))
    ]


def _is_spec(wanted: str) -> bool:
    return wanted.startswith(("random", "preset:")) or Path(wanted).expanduser().is_file()


def search_encoder(catalog: Catalog, wanted: str | None, *, verify: bool = True) -> tuple[str, dict | None]:
    """(spec to load, the catalog row as {id, name, target_mpp, tile_px} or None) of the
    encoder a search uses: `wanted` (configured or chosen) as a catalog encoder's name, spec
    or sha256 prefix, else as a spec of its own (None for the row: found by its weights'
    sha256 when the index is opened); without `wanted`, the index's only encoder
    (index_encoder_spec). A name that is neither is an EncoderError listing the names."""
    if not wanted:
        spec = index_encoder_spec(catalog, verify=verify)
        with catalog.session() as s:
            row = searchable_encoders(s)[0]
            return spec, {"id": row.id, "name": row.name, "target_mpp": row.target_mpp, "tile_px": row.tile_px}
    with catalog.session() as s:
        rows = searchable_encoders(s)
        found = _named(rows, wanted)
        if len(found) > 1:
            raise EncoderError(
                f"{wanted!r} names {len(found)} of the index's encoders: {_names(found)}; choose one by its sha256 prefix"
            )
        if not found:
            if _is_spec(wanted):
                return wanted, None
            listed = _names(rows) if rows else "none yet: index it first (`indexer build`)"
            raise EncoderError(
                f"no encoder {wanted!r} in this archive's index, and no such encoder file; the index's encoders: {listed}"
            )
        row = found[0]
        spec, sha = row.spec, row.checkpoint_sha256
        grid = {"id": row.id, "name": row.name, "target_mpp": row.target_mpp, "tile_px": row.tile_px}
        if not spec:
            if _is_spec(wanted):
                return wanted, grid
            raise EncoderError(
                f"the catalog does not record how to load the encoder {_describe(row)} (built before encoder specs were kept); "
                "search with --encoder naming its weights, or run `indexer build` once with it to record it"
            )
    if verify:
        check_weights(spec, sha)
    return spec, grid


def index_encoder_spec(catalog: Catalog, *, verify: bool = True) -> str:
    """The spec of the encoder the index was built with: the one encoder record with shards.
    Several, or one from before the catalog kept specs, is an EncoderError saying what to
    choose; `verify` checks its weights against the recorded sha256 (check_weights)."""
    with catalog.session() as s:
        rows = searchable_encoders(s)
        if not rows:
            raise NotFound("the archive has no indexed slides yet: index it first (`indexer build`)")
        if len(rows) > 1:
            raise EncoderError(
                f"the index holds shards of {len(rows)} encoders: {_names(rows)}; choose one by name with --encoder "
                "(or HISTOSEEK_ENCODER, or the web app's encoder selector)"
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
