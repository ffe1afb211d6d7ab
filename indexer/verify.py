"""`indexer verify`: do the catalog and the shard files agree?

Checks every shard row against its file (exists, sha256, vector count, sidecar encoder),
the file's ids against the catalog's tiles of that shard (no orphan ids either way), each
indexed slide's tile count, and shard files on disk that no row references.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from tqdm import tqdm

from engine.catalog.db import Catalog
from engine.catalog.models import INDEXED, Encoder, Shard, Slide, Tile
from engine.errors import ShardError
from engine.files import file_sha256
from engine.shards import ShardEncoder, list_shards, read_shard_encoder, shard_arrays


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


def verify_index(catalog: Catalog, index_dir: str | Path, progress: bool = False) -> VerifyReport:
    index_dir = Path(index_dir)
    report = VerifyReport()
    with catalog.session() as s:
        encoders = {e.id: e for e in s.scalars(sa.select(Encoder))}
        shards = list(s.scalars(sa.select(Shard).order_by(Shard.id)))
        for shard in tqdm(shards, unit="shard", desc="verify", disable=not progress):
            report.shards += 1
            file = index_dir / shard.path
            where = f"shard {shard.path}"
            if not file.is_file():
                report.problems.append(f"{where}: file is missing")
                continue
            if file_sha256(file) != shard.sha256:
                report.problems.append(f"{where}: sha256 differs from the catalog's (file changed or half-written)")
            try:
                if read_shard_encoder(file) != ShardEncoder.of(encoders[shard.encoder_id]):
                    report.problems.append(f"{where}: its sidecar names another encoder than the catalog")
                ids, _ = shard_arrays(file)
            except ShardError as exc:
                report.problems.append(str(exc))
                continue
            report.vectors += len(ids)
            if len(ids) != shard.count:
                report.problems.append(f"{where}: holds {len(ids)} vectors, the catalog says {shard.count}")
            if len(np.unique(ids)) != len(ids):
                report.problems.append(f"{where}: duplicate ids")
            rows = set(s.scalars(sa.select(Tile.id).where(Tile.shard_id == shard.id)))
            in_file = set(ids.tolist())
            if in_file - rows:
                report.problems.append(f"{where}: {len(in_file - rows)} ids with no tile row (orphans), e.g. {min(in_file - rows)}")
            if rows - in_file:
                report.problems.append(f"{where}: {len(rows - in_file)} tile rows whose vector is not in the file, e.g. {min(rows - in_file)}")
        unsharded = s.scalar(sa.select(sa.func.count(Tile.id)).where(Tile.shard_id.is_(None)))
        if unsharded:
            report.problems.append(f"{unsharded} tile rows belong to no shard")
        counts = Counter(dict(s.execute(sa.select(Tile.slide_id, sa.func.count(Tile.id)).group_by(Tile.slide_id)).all()))
        for slide in s.scalars(sa.select(Slide).order_by(Slide.id)):
            report.slides += 1
            have = counts.get(slide.id, 0)
            if slide.status == INDEXED and have != slide.tile_count:
                report.problems.append(f"slide {slide.id} ({slide.path}): {have} tile rows, tile_count says {slide.tile_count}")
            if slide.status != INDEXED and have:
                report.problems.append(f"slide {slide.id} ({slide.path}) is {slide.status} but has {have} tile rows")
        known = {sh.path for sh in shards}
        for enc in encoders.values():
            for file in list_shards(index_dir, ShardEncoder.of(enc)):
                if file.relative_to(index_dir).as_posix() not in known:
                    report.problems.append(f"shard file {file.relative_to(index_dir)} is in no catalog row (left by an interrupted run; the next `indexer build` removes it)")
    return report
