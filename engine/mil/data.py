"""Bags for MIL from the index: a slide's tile vectors read straight from its shard (no
re-embedding), its label from a catalog metadata column, its group (patient) for the folds.

A run is trained on the features of ONE encoder (weights sha256 + grid); that and the label
set form the run's input contract, checked again whenever the run predicts."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import sqlalchemy as sa

from engine.catalog.db import Catalog
from engine.catalog.models import (
    INDEXED,
    SHARD_QUARANTINED,
    EncoderRecord,
    Shard,
    Slide,
    SlideEncoding,
    Tile,
    tile_of_encoder,
)
from engine.errors import DatasetError, EncoderError, NotFound
from engine.shards import shard_arrays

LOG = logging.getLogger(__name__)

# Slide columns a label or a group may come from; any other name is looked up in `extra`.
COLUMNS = ("diagnosis", "site", "label", "collection", "patient")
GROUPS = ("patient", "slide")


@dataclasses.dataclass(frozen=True)
class Contract:
    """What a run's model expects as input: features of this encoder (name, weights sha256,
    width, grid) and these classes of this label column, in this order."""

    encoder_name: str
    encoder_sha256: str
    dim: int
    target_mpp: float
    tile_px: int
    label_column: str
    classes: tuple[str, ...]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_json(cls, doc: dict) -> "Contract":
        return cls(**{**doc, "classes": tuple(doc["classes"])})

    def check_encoder(self, row: EncoderRecord, what: str) -> None:
        """Refuse features of another encoder: a model trained on one feature space gives
        confident nonsense on another's."""
        if (row.checkpoint_sha256, row.dim, row.target_mpp, row.tile_px) != (
            self.encoder_sha256,
            self.dim,
            self.target_mpp,
            self.tile_px,
        ):
            raise EncoderError(
                f"{what} has features of encoder {row.name} (sha256 {row.checkpoint_sha256[:12]}, {row.dim}-d, {row.target_mpp:g} um/px, {row.tile_px} px) "
                f"but this MIL run was trained on {self.encoder_name} (sha256 {self.encoder_sha256[:12]}, {self.dim}-d, {self.target_mpp:g} um/px, {self.tile_px} px): "
                f"index the slide with that encoder, or train a run on this one ({row.name})"
            )


@dataclasses.dataclass
class Bag:
    slide_id: int
    name: str
    label: str | None
    group: str
    features: np.ndarray  # n x dim float32, L2-normalised as stored
    tile_ids: np.ndarray  # int64, = FAISS ids
    boxes: np.ndarray  # n x 3 int64: level-0 x, y, size


@dataclasses.dataclass
class BagSet:
    bags: list[Bag]
    classes: tuple[str, ...]
    contract: Contract
    notes: list[str]

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[b.label] for b in self.bags], np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([b.group for b in self.bags])


def slide_value(slide: Slide, column: str) -> str | None:
    value = getattr(slide, column) if column in COLUMNS else (slide.extra or {}).get(column)
    return None if value is None or str(value).strip() == "" else str(value).strip()


def pick_encoder(s, encoder: str | None) -> EncoderRecord:
    """The encoder row whose indexed slides to use: `encoder` matches its name or a prefix
    of its sha256; None: the only encoder with indexed slides."""
    counts = s.execute(
        sa.select(EncoderRecord, sa.func.count(Slide.id))
        .join(SlideEncoding, SlideEncoding.encoder_id == EncoderRecord.id)
        .join(Slide, Slide.id == SlideEncoding.slide_id)
        .where(Slide.status == INDEXED, SlideEncoding.status == INDEXED)
        .group_by(EncoderRecord.id)
    ).all()
    if not counts:
        raise DatasetError("the catalog has no indexed slides: run `indexer build` first")
    listing = "; ".join(f"{row.name} (sha256 {row.checkpoint_sha256[:12]}, {n} slides)" for row, n in counts)
    if encoder is None:
        if len(counts) > 1:
            raise DatasetError(
                f"slides are indexed with several encoders, choose one by name or sha256 prefix: {listing}"
            )
        return counts[0][0]
    found = [
        row
        for row, _ in counts
        if encoder in (row.name, Path(row.name).name)
        or (len(encoder) >= 6 and row.checkpoint_sha256.startswith(encoder.lower()))
    ]
    if len(found) != 1:
        raise DatasetError(f"encoder {encoder!r} matches {len(found)} of the encoders with indexed slides: {listing}")
    return found[0]


class VectorReader:
    """Tile vectors of slides, reading each shard file once (checked against the catalog's
    sha256 and unit norms by engine.shards)."""

    def __init__(self, catalog: Catalog, index_dir: str | Path):
        self.catalog, self.index_dir = catalog, Path(index_dir)
        self._shard_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def slide(self, slide_id: int, encoder_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tile ids, vectors n x dim, boxes n x 3) of a slide indexed with `encoder_id`, in
        tile id order (a slide of a catalog with several encoders has tiles of each)."""
        with self.catalog.session() as s:
            rows = s.execute(
                sa.select(Tile.id, Tile.x, Tile.y, Tile.size, Tile.shard_id)
                .where(
                    Tile.slide_id == slide_id,
                    tile_of_encoder(encoder_id),
                )
                .order_by(Tile.id)
            ).all()
            shards = {
                r.id: r
                for r in s.scalars(sa.select(Shard).where(Shard.id.in_({r[4] for r in rows if r[4] is not None})))
            }
        if not rows:
            raise DatasetError(f"slide {slide_id} has no tiles in the index (no tissue found?)")
        ids = np.array([r[0] for r in rows], np.int64)
        boxes = np.array([(r[1], r[2], r[3]) for r in rows], np.int64)
        out = None
        for shard_id in sorted({r[4] for r in rows}, key=lambda v: -1 if v is None else v):
            shard = shards.get(shard_id)
            if shard is None or shard.status == SHARD_QUARANTINED:
                raise DatasetError(
                    f"slide {slide_id}: its shard is missing or quarantined; run `indexer build` to re-embed it"
                )
            if shard_id not in self._shard_cache:
                self._shard_cache = {
                    shard_id: shard_arrays(self.index_dir / shard.path, shard.sha256)
                }  # slides rarely share shards: keep one
            sids, sx = self._shard_cache[shard_id]
            pos = {int(t): i for i, t in enumerate(sids)}
            want = [i for i, r in enumerate(rows) if r[4] == shard_id]
            try:
                rows_in_shard = [pos[int(ids[i])] for i in want]
            except KeyError:
                raise DatasetError(
                    f"slide {slide_id}: shard {shard.path} lacks some of its tiles; run `indexer verify`"
                ) from None
            if out is None:
                out = np.zeros((len(ids), sx.shape[1]), np.float32)
            out[want] = sx[rows_in_shard]
        return ids, out, boxes


def load_bags(
    catalog_url: str,
    index_dir: str | Path,
    label_column: str,
    *,
    encoder: str | None = None,
    group: str = "patient",
    slide_ids: Iterable[int] | None = None,
    progress: bool = False,
) -> BagSet:
    """The indexed slides of one encoder that carry a `label_column` value, as bags."""
    if group not in GROUPS:
        raise DatasetError(f"group must be one of {', '.join(GROUPS)}, not {group!r}")
    catalog = Catalog(catalog_url)
    notes: list[str] = []
    try:
        with catalog.session() as s:
            enc = pick_encoder(s, encoder)
            indexed_with = sa.select(SlideEncoding.slide_id).where(
                SlideEncoding.encoder_id == enc.id, SlideEncoding.status == INDEXED
            )
            query = sa.select(Slide).where(Slide.status == INDEXED, Slide.id.in_(indexed_with)).order_by(Slide.id)
            if slide_ids is not None:
                query = query.where(Slide.id.in_(list(slide_ids)))
            slides = list(s.scalars(query))
        labelled = [(sl, slide_value(sl, label_column)) for sl in slides]
        unlabelled = sum(1 for _, lab in labelled if lab is None)
        labelled = [(sl, lab) for sl, lab in labelled if lab is not None]
        if unlabelled:
            notes.append(f"{unlabelled} indexed slides without a {label_column!r} value left out")
        classes = tuple(sorted({lab for _, lab in labelled}))
        if len(classes) < 2:
            raise DatasetError(
                f"column {label_column!r} gives {len(classes)} class(es) over {len(labelled)} indexed slides of encoder {enc.name}; MIL needs at least 2 (columns: {', '.join(COLUMNS)} or a key of the metadata's extra JSON)"
            )
        no_patient = 0
        bags = []
        reader = VectorReader(catalog, index_dir)
        from tqdm.auto import tqdm

        for sl, lab in tqdm(labelled, desc="reading tile features", unit="slide", disable=not progress):
            ids, x, boxes = reader.slide(sl.id, enc.id)
            patient = sl.patient if group == "patient" else None
            no_patient += group == "patient" and not patient
            bags.append(Bag(sl.id, Path(sl.path).name, lab, patient or f"slide:{sl.id}", x, ids, boxes))
        if no_patient:
            notes.append(f"{no_patient} slides without a patient are each their own group")
        contract = Contract(
            enc.name, enc.checkpoint_sha256, enc.dim, enc.target_mpp, enc.tile_px, label_column, classes
        )
    finally:
        catalog.dispose()
    return BagSet(bags, classes, contract, notes)


def slide_row(catalog: Catalog, slide_id: int, contract: Contract) -> tuple[Slide, EncoderRecord | None]:
    """The slide and the encoder of its features to use: the run's encoder when the slide is
    indexed with it, else its first indexed encoder (which `Contract.check_encoder` refuses
    with a message saying what to do), None when it is indexed with none."""
    with catalog.session() as s:
        slide = s.get(Slide, slide_id)
        if slide is None:
            raise NotFound(f"no slide with id {slide_id} in the catalog (`indexer status` lists them)")
        same = s.scalars(
            sa.select(EncoderRecord)
            .join(SlideEncoding, SlideEncoding.encoder_id == EncoderRecord.id)
            .where(
                SlideEncoding.slide_id == slide_id,
                SlideEncoding.status == INDEXED,
                EncoderRecord.checkpoint_sha256 == contract.encoder_sha256,
                EncoderRecord.target_mpp == contract.target_mpp,
                EncoderRecord.tile_px == contract.tile_px,
            )
        ).first()
        return slide, same or (s.get(EncoderRecord, slide.encoder_id) if slide.encoder_id else None)
