"""`indexer build` as a library function: a slide archive into shard files and catalog rows.

One process or many (torchrun): rank 0 lists the archive, every rank fingerprints its share
of the files, rank 0 repairs what an interrupted run left and registers the slides (those
steps: indexer/prepare.py), then the slides still to index are balanced over the ranks by
file size. Each rank embeds its slides and commits each one as soon as its last tile is
embedded (see indexer/writer.py).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from tqdm import tqdm

from engine import distributed
from engine.catalog.db import Catalog
from engine.catalog.models import EncoderRecord
from engine.config import Settings
from engine.encoder import Encoder
from engine.errors import CatalogError, ConfigError, ShardError
from engine.features import default_workers
from engine.files import write_error_advice
from engine.shards import ShardEncoder
from indexer.distributed import check_catalog_for, split_by_size
from indexer.lease import Lease
from indexer.pipeline import PlanSampler, SlidePlan, iter_plans, plan_slide, tile_batches
from indexer.prepare import prepare
from indexer.writer import commit_slide, fail_slide

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildSummary:
    """What a build did. `failures` are (path, message); `tiles` counts tiles embedded in
    this run; `seconds` is the embedding phase's wall time, `encoder_seconds` the part of it
    spent inside the encoder (close to `seconds` when decoding keeps the encoder busy)."""

    indexed: int = 0
    skipped: int = 0
    failed: int = 0
    tiles: int = 0
    seconds: float = 0.0
    encoder_seconds: float = 0.0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    ranks: list[dict] = dataclasses.field(default_factory=list)  # per rank: slides, tiles, seconds

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def to_json(self) -> dict:
        doc = dataclasses.asdict(self)
        doc["failures"] = [{"path": p, "error": e} for p, e in self.failures]
        doc["tiles_per_s"] = round(self.tiles_per_s, 2)
        return doc

    def merge(self, other: "BuildSummary") -> None:
        self.indexed += other.indexed
        self.failed += other.failed
        self.tiles += other.tiles
        self.seconds = max(self.seconds, other.seconds)
        self.encoder_seconds = max(self.encoder_seconds, other.encoder_seconds)
        self.failures += other.failures
        self.notes += other.notes


def build_archive(
    settings: Settings,
    archive_dir: str | Path,
    *,
    metadata: str | Path | Sequence[str | Path] | None = None,
    collection: str | None = None,
    min_tissue: float = 0.5,
    default_mpp: float | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    ctx: distributed.DistContext | None = None,
    encoder: Encoder | None = None,
) -> BuildSummary:
    """Index every slide under `archive_dir` into the catalog and shard files of
    `settings`; see the module docstring. Under torchrun (RANK/WORLD_SIZE set) each rank
    calls this and every rank returns the same, whole-job summary. `encoder`: an already
    loaded encoder to use instead of loading `settings.encoder` (benchmarks, tests)."""
    root = Path(archive_dir)
    if not root.is_dir():
        raise ConfigError(f"archive folder {root} does not exist or is not a folder")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"the minimum tissue fraction must be within 0..1, got {min_tissue}")
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
    _check_writable(Path(settings.index_dir))
    ctx = distributed.context_from_env() if ctx is None else ctx
    check_catalog_for(ctx, settings.catalog_url)
    distributed.join(ctx)
    try:
        if encoder is None:
            encoder = Encoder.from_spec(
                settings.require_encoder(), device=ctx.device_for(settings.device), precision=settings.precision
            )
        # the encoder sets the grid (a card's mpp/input_px) unless --target-mpp/--tile-px override
        target_mpp, tile_px = settings.grid_for(encoder.info)
        shard_encoder = ShardEncoder(
            encoder.info.name, encoder.info.checkpoint_sha256, encoder.dim, target_mpp, tile_px
        )
        # Rank 0 migrates the schema alone; concurrent Alembic runs would race.
        catalog = _operator_errors(settings, Catalog, settings.catalog_url) if ctx.is_main else None
        ctx.barrier()
        catalog = catalog or Catalog(settings.catalog_url, upgrade_schema=False)
        # Only rank 0 holds the lease: the files of the other ranks are the same job's.
        lease = _operator_errors(settings, Lease(catalog, settings.index_dir).acquire) if ctx.is_main else None
        try:
            return _operator_errors(
                settings,
                _build,
                catalog,
                settings,
                root,
                encoder,
                shard_encoder,
                metadata,
                collection,
                ctx,
                lease,
                default_mpp,
                min_tissue,
                workers,
                batch_size,
                progress,
            )
        finally:
            if lease is not None:
                lease.release()
            catalog.dispose()
    finally:
        if ctx.active:
            distributed.shutdown()


def _build(
    catalog,
    settings,
    root,
    encoder,
    shard_encoder,
    metadata,
    collection,
    ctx,
    lease,
    default_mpp,
    min_tissue,
    workers,
    batch_size,
    progress,
) -> BuildSummary:
    """build_archive's work once the catalog is open and the lease held."""
    reg, encoder_id, notes = prepare(catalog, settings, root, encoder, shard_encoder, metadata, collection, ctx, lease)
    if ctx.is_main:
        _record_grid_source(catalog, encoder_id, settings.grid_source(encoder.info))
    LOG.info(
        "%d slides under %s: %d already indexed, %d to index over %d process(es)",
        len(reg.jobs) + reg.already_indexed,
        root,
        reg.already_indexed,
        len(reg.jobs),
        ctx.world_size,
    )
    shares = split_by_size([(sid, size) for sid, _, size in reg.jobs], ctx.world_size)
    paths = {sid: path for sid, path, _ in reg.jobs}
    mine = [(sid, Path(paths[sid])) for sid in shares[ctx.rank]]
    plan_fn = functools.partial(
        plan_slide,
        default_mpp=default_mpp,
        target_mpp=shard_encoder.target_mpp,
        tile_px=shard_encoder.tile_px,
        min_tissue=min_tissue,
    )
    local = _embed_slides(
        catalog,
        settings,
        encoder,
        shard_encoder,
        encoder_id,
        mine,
        plan_fn,
        encodings=reg.encodings,
        workers=default_workers() if workers is None else workers,
        batch_size=batch_size,
        progress=progress and ctx.is_main,
        total_slides=len(reg.jobs),
    )
    ctx.barrier()
    summary = BuildSummary(skipped=reg.already_indexed, notes=notes)
    for rank, part in enumerate(ctx.all_gather(local)):
        summary.merge(part)
        summary.ranks.append(
            {
                "rank": rank,
                "indexed": part.indexed,
                "failed": part.failed,
                "tiles": part.tiles,
                "seconds": round(part.seconds, 2),
                "encoder_seconds": round(part.encoder_seconds, 2),
            }
        )
    summary.failures.sort()
    return summary


def _record_grid_source(catalog: Catalog, encoder_id: int, source: dict[str, str]) -> None:
    """Say in the encoder row's `normalisation` JSON whether its grid is the encoder's own or
    an override ({"grid_source": {"target_mpp": "encoder"|"override", "tile_px": ...}}): the
    catalog keeps no other column for it, and `indexer status` reads it from there."""
    with catalog.session() as s:
        row = s.get(EncoderRecord, encoder_id)
        if row is not None and (row.normalisation or {}).get("grid_source") != source:
            row.normalisation = {**(row.normalisation or {}), "grid_source": source}


def _check_writable(index_dir: Path) -> None:
    """Fail before any work (not hours later, at the first shard) when the index folder
    cannot be created or written."""
    probe = index_dir / f".write-test.{os.getpid()}.tmp"
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as exc:
        advice = write_error_advice(exc, f"the index folder {index_dir}")
        raise ConfigError(
            advice
            or f"cannot write to the index folder {index_dir} ({exc.strerror or exc}); choose a writable index folder",
            setting="index_dir",
        ) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def _operator_errors(settings: Settings, func, *args):
    """Run `func`, turning a full or read-only disk (index folder or catalog) into one line
    that says what to do, instead of a traceback. What was being written is not kept:
    shard files go when their commit fails (indexer/writer.py), temp files never stay."""
    try:
        return func(*args)
    except sa.exc.OperationalError as exc:
        advice = write_error_advice(exc, "the catalog database")
        if advice is None:
            raise
        raise CatalogError(advice) from None
    except OSError as exc:
        advice = write_error_advice(exc, f"the index folder {settings.index_dir}")
        if advice is None:
            raise
        raise ConfigError(advice) from None


class _SlideState:
    """Unit-length vectors of a slide as its batches arrive (batches may span slides)."""

    def __init__(self, plan: SlidePlan, dim: int):
        self.plan = plan
        self.features = np.zeros((len(plan.boxes), dim), np.float32)
        self.done = np.zeros(len(plan.boxes), bool)
        self.error: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.done.all())


def _embed_slides(
    catalog,
    settings,
    encoder,
    shard_encoder,
    encoder_id,
    jobs,
    plan_fn,
    *,
    encodings,
    workers,
    batch_size,
    progress,
    total_slides,
) -> BuildSummary:
    """Embed `jobs` (slide id, path) with `encoder`; `encodings`: slide id -> its
    SlideEncoding id for this encoder (registration made them)."""
    summary = BuildSummary()
    states: dict[int, _SlideState] = {}
    announced: collections.deque[SlidePlan] = collections.deque()
    sampler = PlanSampler(
        iter_plans(jobs, plan_fn), shard_encoder.tile_px, announced.append, settings.decoder, encoder.device
    )
    slide_bar = tqdm(total=total_slides, unit="slide", desc="slides", disable=not progress, position=0)
    tile_bar = tqdm(total=0, unit="tile", desc="tiles", disable=not progress, position=1, leave=False)

    def fail(plan: SlidePlan, error: str) -> None:
        fail_slide(catalog, plan.slide_id, error, plan.info, encoder_id=encoder_id)
        summary.failed += 1
        summary.failures.append((str(plan.path), error))
        slide_bar.update(1)

    def finish(slide_id: int, state: _SlideState) -> None:
        plan = state.plan
        del states[slide_id]
        if state.error:
            fail(plan, state.error)
        else:
            try:
                commit_slide(
                    catalog,
                    Path(settings.index_dir),
                    shard_encoder,
                    encoder_id,
                    slide_id,
                    plan.info,
                    plan.boxes,
                    state.features,
                    encoding_id=encodings.get(slide_id),
                )
            except ShardError as exc:
                fail(plan, str(exc))
                return
            summary.indexed += 1
            summary.tiles += len(plan.boxes)
            slide_bar.update(1)
        slide_bar.set_postfix_str(plan.path.name, refresh=False)

    def take_announced() -> None:
        while announced:
            plan = announced.popleft()
            if plan.note:
                summary.notes.append(plan.note)
            if plan.error:
                fail(plan, plan.error)
            else:
                states[plan.slide_id] = _SlideState(plan, encoder.dim)
                tile_bar.total += len(plan.boxes)
                tile_bar.refresh()

    start = time.perf_counter()
    for keys, batch, errors in tile_batches(sampler, batch_size, workers, encoder.device):
        take_announced()
        for slide_id, _, message in errors:
            state = states.get(slide_id)
            if state is not None and state.error is None:
                state.error = f"tile read failed: {message}"
        if batch is not None:
            t0 = time.perf_counter()
            feats = encoder.embed_unit(batch)
            summary.encoder_seconds += time.perf_counter() - t0
            for (slide_id, index), vec in zip(keys, feats):
                state = states[slide_id]
                state.features[index] = vec
                state.done[index] = True
        for slide_id, index, _ in errors:
            states[slide_id].done[index] = True
        tile_bar.update(len(keys) + len(errors))
        for slide_id in [sid for sid, st in states.items() if st.complete]:
            finish(slide_id, states[slide_id])
    take_announced()
    for slide_id, state in list(states.items()):
        if not state.complete and state.error is None:
            state.error = "some tiles never came back from the decoding workers; run the build again"
        finish(slide_id, state)
    summary.seconds = time.perf_counter() - start
    tile_bar.close()
    slide_bar.close()
    return summary
