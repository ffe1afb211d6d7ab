"""The step of `indexer build` before any embedding: rank 0 lists the archive, every rank
fingerprints its share of the files, then rank 0 repairs what an interrupted run left and
registers the slides (indexer/register.py), and every rank gets the result.

Kept apart from indexer/build.py, which runs the whole build and embeds the slides.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa

from engine import distributed
from engine.catalog.db import Catalog
from engine.config import Settings
from engine.encoder import Encoder
from engine.shards import ShardEncoder
from indexer.discovery import (
    FINGERPRINT_CACHE,
    SLIDE_EXTENSIONS,
    FingerprintCache,
    describe_files,
    find_slide_files,
    match_archive_metadata,
)
from indexer.lease import Lease
from indexer.register import Registration, encoder_row, register, repair

LOG = logging.getLogger(__name__)


def prepare(
    catalog: Catalog,
    settings: Settings,
    root: Path,
    encoder: Encoder,
    shard_encoder: ShardEncoder,
    metadata,
    collection,
    ctx,
    lease: Lease | None,
) -> tuple[Registration | None, int | None, list[str]]:
    """Rank 0: list, fingerprint (shared), repair, register. Returns (registration,
    encoder id, notes), broadcast to every rank."""
    paths = ctx.broadcast(find_slide_files(root) if ctx.is_main else None)
    files = _fingerprint_share(root, paths, Path(settings.index_dir) / FINGERPRINT_CACHE, ctx)
    # the other ranks stop with rank 0's error, if it has one
    return ctx.on_main(
        _register_on_main, catalog, settings, root, files, encoder, shard_encoder, metadata, collection, lease
    )


def _fingerprint_share(root: Path, paths: list[Path], cache_file: Path, ctx: distributed.DistContext):
    """Each rank fingerprints every world_size-th file; everyone gets all, in order."""
    cache = FingerprintCache(cache_file)
    mine = describe_files(root, paths[ctx.rank :: ctx.world_size], cache)
    gathered = ctx.all_gather((mine, cache.new))
    files = [None] * len(paths)
    for r, (part, _) in enumerate(gathered):
        files[r :: ctx.world_size] = part
    if ctx.is_main:
        for _, entries in gathered:
            cache.update(entries)
        cache.save()
    return files


def _register_on_main(catalog, settings, root, files, encoder, shard_encoder, metadata, collection, lease):
    notes = [] if files else [f"no slide files under {root} (looked for {', '.join(sorted(SLIDE_EXTENSIONS))})"]
    # always matched: without metadata files a TCGA barcode in a file name still gives the patient
    match = match_archive_metadata(metadata, [f.relpath for f in files])
    meta = match.by_relpath
    notes += match.report_lines()
    spec = _recorded_spec(settings, encoder)
    index_dir = Path(settings.index_dir)

    def others() -> list[str]:
        return [f"{o.owner}, started {o.started_at:%Y-%m-%d %H:%M}" for o in lease.others()]

    # One transaction: the encoder's row (new on its first build) is committed with the
    # slides' rows for it or not at all, so a build that stops here leaves no encoder row
    # that nothing uses. Two builds starting together on a new encoder both insert its row;
    # the second one's insert breaks the unique constraint, and its second try finds the row.
    for attempt in (1, 2):
        try:
            with catalog.session() as s:
                enc = encoder_row(s, encoder.info, shard_encoder, spec)
                reg = Registration()
                repair(s, index_dir, shard_encoder, enc, reg, other_builds=others)
                found = register(
                    s, root, files, index_dir=index_dir, metadata=meta, collection=collection, encoder_id=enc.id
                )
                found.repaired, found.files_to_delete = reg.repaired, reg.files_to_delete + found.files_to_delete
                encoder_id = enc.id
            break
        except sa.exc.IntegrityError:
            if attempt == 2:
                raise
            LOG.info("another build registered the encoder or a slide at the same moment; trying again")
    # Files go only after the commit: a kill in between leaves orphans the next run removes.
    for file in found.files_to_delete:
        file.unlink(missing_ok=True)
    notes += found.repaired
    notes += [f"moved: {old} -> {new}" for old, new in found.moved]
    notes += [f"changed since it was indexed, its old tiles and vectors dropped: {rel}" for rel in found.replaced]
    notes += [f"same content as {first}, not indexed twice: {rel}" for rel, first in found.duplicates]
    notes += [f"back in the archive: {rel}" for rel in found.back]
    if found.missing:
        notes.append(
            f"{len(found.missing)} catalog slides under {root} are gone or unreadable, marked missing and left out of search "
            f"(restore the files, or drop them with `indexer remove`): {', '.join(found.missing[:5])}"
        )
    return found, encoder_id, notes


def _recorded_spec(settings: Settings, encoder: Encoder) -> str | None:
    """What loads this build's encoder again, as the catalog keeps it (engine.search.which_encoder):
    search uses it when no encoder is given."""
    from engine.search.which_encoder import canonical_spec

    return canonical_spec(settings.encoder, encoder.info) if settings.encoder else None
