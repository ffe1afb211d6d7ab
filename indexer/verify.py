"""`indexer verify`: do the catalog and the shard files agree?

Checks every shard row against its file (exists, sha256, vector count, sidecar encoder,
unit-length vectors), the file's ids against the catalog's tiles of that shard (no orphan ids
either way), each indexed slide's tile count, shard files, sidecars and temp files on disk
that no row references, and each slide's file against its fingerprint (still there, same
content).

A shard found damaged is quarantined in the catalog (unless `quarantine=False`), as search
does when it cannot load one: `indexer build` then re-embeds its slides, so "rerun `indexer
build` to repair" holds for everything verify reports except missing or changed slide
files, which need the operator (restore the file, or `indexer remove`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from tqdm import tqdm

from engine.catalog.db import Catalog
from engine.catalog.models import INDEXED, MISSING, SHARD_QUARANTINED, EncoderRecord, Shard, Slide, SlideEncoding, Tile
from engine.errors import ShardError
from engine.files import file_sha256
from engine.shards import (
    ShardEncoder,
    list_orphan_sidecars,
    list_shards,
    list_temp_files,
    read_shard_encoder,
    shard_arrays,
)
from indexer.discovery import FINGERPRINT_CACHE, FingerprintCache
from indexer.lease import other_live_leases


@dataclasses.dataclass
class VerifyReport:
    shards: int = 0
    vectors: int = 0
    slides: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"ok": self.ok}


def verify_index(
    catalog: Catalog,
    index_dir: str | Path,
    progress: bool = False,
    *,
    quarantine: bool = True,
    check_slides: bool = True,
) -> VerifyReport:
    index_dir = Path(index_dir)
    report = VerifyReport()
    damaged: dict[int, str] = {}
    with catalog.session() as s:
        encoders = {e.id: e for e in s.scalars(sa.select(EncoderRecord))}
        shards = list(s.scalars(sa.select(Shard).order_by(Shard.id)))
        for shard in tqdm(shards, unit="shard", desc="verify", disable=not progress):
            report.shards += 1
            file = index_dir / shard.path
            where = f"shard {shard.path}"
            if shard.status == SHARD_QUARANTINED:
                report.problems.append(
                    f"{where}: quarantined ({shard.error or 'damaged'}); `indexer build` re-embeds its slides"
                )
                continue
            if not file.is_file():
                report.problems.append(f"{where}: file is missing; `indexer build` re-embeds its slides")
                continue
            if file_sha256(file) != shard.sha256:
                damaged[shard.id] = "sha256 differs from the catalog's (file changed or half-written)"
                report.problems.append(f"{where}: {damaged[shard.id]}")
            try:
                if read_shard_encoder(file) != ShardEncoder.of(encoders[shard.encoder_id]):
                    damaged[shard.id] = "its sidecar names another encoder than the catalog"
                    report.problems.append(f"{where}: {damaged[shard.id]}")
                ids, _ = shard_arrays(file)
            except ShardError as exc:
                damaged[shard.id] = str(exc)
                report.problems.append(str(exc))
                continue
            report.vectors += len(ids)
            found = []
            if len(ids) != shard.count:
                found.append(f"holds {len(ids)} vectors, the catalog says {shard.count}")
            if len(np.unique(ids)) != len(ids):
                found.append("duplicate ids")
            rows = set(s.scalars(sa.select(Tile.id).where(Tile.shard_id == shard.id)))
            in_file = set(ids.tolist())
            if in_file - rows:
                found.append(f"{len(in_file - rows)} ids with no tile row (orphans), e.g. {min(in_file - rows)}")
            if rows - in_file:
                found.append(
                    f"{len(rows - in_file)} tile rows whose vector is not in the file, e.g. {min(rows - in_file)}"
                )
            if found:
                damaged.setdefault(shard.id, "; ".join(found))
            report.problems += [f"{where}: {f}" for f in found]
        unsharded = s.scalar(sa.select(sa.func.count(Tile.id)).where(Tile.shard_id.is_(None)))
        if unsharded:
            report.problems.append(f"{unsharded} tile rows belong to no shard")
        cache = FingerprintCache(index_dir / FINGERPRINT_CACHE)  # read only: verify never saves it
        counts = Counter(
            dict(s.execute(sa.select(Tile.encoding_id, sa.func.count(Tile.id)).group_by(Tile.encoding_id)).all())
        )
        if counts.get(None):
            report.problems.append(f"{counts[None]} tile rows belong to no slide encoding (written by hand?)")
        paths = dict(s.execute(sa.select(Slide.id, Slide.path)).all())
        for enc in s.scalars(sa.select(SlideEncoding).order_by(SlideEncoding.slide_id, SlideEncoding.encoder_id)):
            have = counts.get(enc.id, 0)
            where = f"slide {enc.slide_id} ({paths.get(enc.slide_id)}), encoder {encoders[enc.encoder_id].name}"
            if enc.status == INDEXED and have != enc.tile_count:
                report.problems.append(f"{where}: {have} tile rows, tile_count says {enc.tile_count}")
            if enc.status != INDEXED and have:
                report.problems.append(f"{where}: {enc.status} but has {have} tile rows")
        for slide in s.scalars(sa.select(Slide).order_by(Slide.id)):
            report.slides += 1
            if slide.status == MISSING:
                report.problems.append(
                    f"slide {slide.id} ({slide.path}) is missing, left out of search: {slide.error or 'its file is gone'}"
                )
            elif check_slides and slide.status == INDEXED:
                problem = _slide_file_problem(slide, cache)
                if problem:
                    report.problems.append(f"slide {slide.id} ({slide.path}): {problem}")
        known = {sh.path for sh in shards}
        busy = other_live_leases(catalog, index_dir, None)
        why = (
            "left by an interrupted or failed run; the next `indexer build` removes it"
            if not busy
            else f"another build is running ({busy[0].owner}): it may be its work in progress"
        )
        for enc in encoders.values():
            shard_encoder = ShardEncoder.of(enc)
            for file in list_shards(index_dir, shard_encoder):
                if file.relative_to(index_dir).as_posix() not in known:
                    report.problems.append(f"shard file {file.relative_to(index_dir)} is in no catalog row ({why})")
            for file in list_orphan_sidecars(index_dir, shard_encoder):
                report.problems.append(f"sidecar {file.relative_to(index_dir)} has no shard file ({why})")
            for file in list_temp_files(index_dir, shard_encoder):
                report.problems.append(f"temp file {file.relative_to(index_dir)} ({why})")
    if damaged and quarantine:
        with catalog.session() as s:
            for shard_id, reason in damaged.items():
                s.execute(
                    sa.update(Shard)
                    .where(Shard.id == shard_id)
                    .values(status=SHARD_QUARANTINED, error=f"indexer verify: {reason}"[:2000])
                )
        report.problems.append(
            f"{len(damaged)} damaged shard(s) quarantined: search leaves them out and `indexer build` re-embeds their slides"
        )
    return report


def _slide_file_problem(slide: Slide, cache: FingerprintCache) -> str | None:
    """Is the slide's file still there with the content it was indexed from? Fingerprints
    come from the build's cache when size and mtime are unchanged (reading ~18 MB of each of
    30,000 slides again would take hours)."""
    path = Path(slide.path)
    if not path.is_file():
        return "the slide file is missing (restore it, or `indexer remove` the slide; `indexer build` marks it missing)"
    try:
        fp, _ = cache.get(path)
    except OSError as exc:
        return f"the slide file cannot be read ({exc.strerror or exc})"
    if fp != slide.fingerprint:
        return "the slide file changed since it was indexed (another image under its name); `indexer build` indexes the new content and drops the old vectors"
    return None
