"""`indexer reindex`: rebuild, convert or check the compressed search index of each encoder
in the catalog, online.

The new index is built in a generation subfolder of the encoder's index folder while
searches go on answering from the old one, then swapped in by an atomic rename of the
folder's manifest (engine.index.convert). `--convert` keeps the trained IVF-PQ index and only
rewrites its re-ranking store (e.g. an index from before issue 18, float16 of the full
vectors, into the compact default); `--check` only measures recall@10 on a sample of stored
vectors against exact search and says whether retraining pays.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import SHARD_OK, EncoderRecord, Shard
from engine.errors import ShardError
from engine.index.codec import DEFAULT_KIND
from engine.index.compressed import CompressedIndex
from engine.index.convert import convert, drift_check, rebuild
from engine.search.live_index import hidden_shards
from engine.shards import ShardEncoder, encoder_dir

LOG = logging.getLogger(__name__)


def encoder_shards(catalog: Catalog, index_dir: Path) -> list[tuple[EncoderRecord, dict[str, Path]]]:
    """Each encoder with shards, and its searchable shard files (key "path:sha256" -> file,
    as the search engine names them): not quarantined, no tiles of slides left out."""
    out = []
    with catalog.session() as s:
        hidden = hidden_shards(s)
        for row in s.scalars(sa.select(EncoderRecord).order_by(EncoderRecord.id)):
            shards = s.execute(
                sa.select(Shard.id, Shard.path, Shard.sha256).where(
                    Shard.encoder_id == row.id, Shard.status == SHARD_OK
                )
            ).all()
            files = {f"{sh.path}:{sh.sha256}": Path(index_dir) / sh.path for sh in shards if sh.id not in hidden}
            if files:
                s.expunge(row)
                out.append((row, files))
    return out


def _left_out(key: str, exc: ShardError) -> None:
    LOG.error("reindex: leaving out %s (`indexer verify` quarantines it)", exc)


def reindex(
    catalog: Catalog,
    index_dir: str | Path,
    *,
    check: bool = False,
    convert_only: bool = False,
    store: str = DEFAULT_KIND,
    queries: int = 200,
    progress: bool = False,
) -> list[dict]:
    """One report per encoder: the drift check (`check`), or what was rebuilt/converted."""
    reports = []
    for row, files in encoder_shards(catalog, Path(index_dir)):
        folder = encoder_dir(index_dir, ShardEncoder.of(row)) / "compressed"
        report = {"encoder": row.name, "folder": str(folder), "shards": len(files)}
        checksums = {key: key.rsplit(":", 1)[1] for key in files}
        if check or convert_only:
            try:
                index = CompressedIndex.open(folder)
            except ShardError as exc:
                report["error"] = f"{exc}; run `indexer reindex` to build it"
                reports.append(report)
                continue
        if check:
            report |= drift_check(index, files, queries, progress=progress)
        elif convert_only:
            report |= {"converted": convert(folder, store).manifest["rerank"]}
        else:
            index = rebuild(folder, row.dim, files, progress=progress, sha256=checksums, on_error=_left_out)
            report |= {"rebuilt": index.manifest["factory"], "tiles": index.ntotal, "store": index.manifest["rerank"]}
        reports.append(report)
    return reports
