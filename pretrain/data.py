"""Training data: a stream of tiles, two augmented views each, in fixed-size batches per rank.

Sources (`open_source`):
- a folder of tile images (searched recursively, one directory listing in memory at a time),
  or a text file listing image paths, one per line;
- a catalog URL (sqlite:///..., postgresql+psycopg://...): the tiles of indexed slides, read on
  the fly from the slide files at their level-0 coordinates (no tile is written to disk),
  paged through by tile id.

Nothing holds the whole tile list: the stream is read in blocks of `shuffle_block` items,
each block permuted with a seed of (seed, epoch, block). Stream position p goes to rank
p % world; a rank's items form its batches in order; loader worker w makes batches
skip, skip + W, ... So a batch's content and its views depend only on (seed, epoch, world,
batch size, position), never on the number of workers, and a resumed run skips whole
batches without decoding them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import sqlalchemy as sa
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from engine.cache import LRUCache
from engine.errors import ConfigError, HistoseekError
from engine.images import IMAGE_SUFFIXES, encoder_input, open_rgb
from pretrain.augment import AugmentConfig, two_views

LOG = logging.getLogger(__name__)


class ImageFolderSource:
    """Tile images under a folder (sorted walk) or listed in a text file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def items(self) -> Iterator[str]:
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as fh:
                base = self.path.parent
                for line in fh:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield str(base / line)
            return
        yield from _walk_images(self.path)

    def count(self) -> int:
        return sum(1 for _ in self.items())

    def load(self, item: str) -> Image.Image:
        return open_rgb(item)

    def describe(self, item: str) -> str:
        return item


def _walk_images(folder: Path) -> Iterator[str]:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _walk_images(Path(entry.path))
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            yield entry.path


class CatalogTileSource:
    """Tiles of indexed slides in a histoseek catalog, read from the slides with OpenSlide.

    tile_px: pixels a tile is read out at (its level-0 box is stored in the catalog).
    slide_root: folder that relative slide paths in the catalog are relative to.
    """

    PAGE = 5000
    OPEN_SLIDES = 16  # per process: enough for batches that mix slides, few file handles

    def __init__(self, url: str, tile_px: int = 224, slide_root: Path | None = None):
        self.url = url
        self.tile_px = tile_px
        self.slide_root = Path(slide_root) if slide_root else Path.cwd()
        self._engine = None
        self._engine_pid = None
        self._slides = _slide_cache(self.OPEN_SLIDES)

    def __getstate__(self):
        # engines and open slides (and the cache's lock) do not cross process boundaries
        state = dict(self.__dict__)
        state.update(_engine=None, _engine_pid=None, _slides=None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._slides = _slide_cache(self.OPEN_SLIDES)  # workers open their own

    def _db(self) -> sa.Engine:
        from engine.catalog.db import make_engine

        if self._engine is None or self._engine_pid != os.getpid():
            self._engine = make_engine(self.url)
            self._engine_pid = os.getpid()
        return self._engine

    def _query(self):
        from engine.catalog.models import INDEXED, Slide, Tile

        return (
            sa.select(Tile.id, Slide.path, Tile.x, Tile.y, Tile.size)
            .join(Slide, Tile.slide_id == Slide.id)
            .where(Slide.status == INDEXED)
        )

    def count(self) -> int:
        from engine.catalog.models import INDEXED, Slide, Tile

        query = (
            sa.select(sa.func.count())
            .select_from(Tile)
            .join(Slide, Tile.slide_id == Slide.id)
            .where(Slide.status == INDEXED)
        )
        try:
            with self._db().connect() as conn:
                return int(conn.execute(query).scalar_one())
        except sa.exc.SQLAlchemyError as exc:
            raise ConfigError(
                f"cannot read tiles from the catalog {sa.engine.make_url(self.url).render_as_string(hide_password=True)}: {exc.__class__.__name__}: {exc.orig if hasattr(exc, 'orig') else exc}"
            ) from None

    def items(self) -> Iterator[tuple[int, str, int, int, int]]:
        from engine.catalog.models import Tile

        last_id = None
        while True:
            query = self._query().order_by(Tile.id).limit(self.PAGE)
            if last_id is not None:
                query = query.where(Tile.id > last_id)
            with self._db().connect() as conn:
                rows = [tuple(r) for r in conn.execute(query)]
            if not rows:
                return
            yield from rows
            last_id = rows[-1][0]

    def _slide(self, path: str):
        from engine.slides import open_slide

        full = str(self.slide_root / path)
        return self._slides.get_or_build(full, lambda: open_slide(full))

    def load(self, item: tuple[int, str, int, int, int]) -> Image.Image:
        from engine.slides import read_box

        _, path, x, y, size0 = item
        return read_box(self._slide(path), x, y, size0, self.tile_px)

    def describe(self, item) -> str:
        tile_id, path, x, y, size0 = item
        return f"tile {tile_id} of {path} at ({x}, {y}), {size0} px"


def _slide_cache(size: int) -> LRUCache:
    return LRUCache(size, on_evict=lambda slide: slide.close())


def open_source(data: str, tile_px: int = 224, slide_root: Path | None = None):
    """The tile source named by `data`: a catalog URL, a folder, or a list file."""
    if "://" in data:
        return CatalogTileSource(data, tile_px=tile_px, slide_root=slide_root)
    path = Path(data).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() in (".txt", ".lst")):
        return ImageFolderSource(path)
    if path.is_file():
        raise ConfigError(f"{data}: expected a folder of tile images, a .txt list of image paths, or a catalog URL")
    raise ConfigError(f"{data}: no such folder or file")


def shuffled_stream(source, seed: int, epoch: int, block: int) -> Iterator[tuple[int, Any]]:
    """(position, item) in block-shuffled order; blocks of `block` items in stream order."""
    buf: list = []
    block_index = 0

    def flush():
        gen = torch.Generator().manual_seed(sample_seed(seed, epoch, block_index, salt=1))
        return [buf[i] for i in torch.randperm(len(buf), generator=gen).tolist()]

    pos = 0
    for item in source.items():
        buf.append(item)
        if len(buf) == block:
            for it in flush():
                yield pos, it
                pos += 1
            buf, block_index = [], block_index + 1
    if buf:
        for it in flush():
            yield pos, it
            pos += 1


def sample_seed(seed: int, epoch: int, index: int, salt: int = 0) -> int:
    """A well-mixed 32-bit seed from (seed, epoch, index): neighbouring tiles get unrelated
    random streams."""
    return int(np.random.SeedSequence([seed, epoch, index, salt]).generate_state(1)[0])


class TwoViewBatches(IterableDataset):
    """Batches (index, views_q, views_k) of one rank for one epoch; views are uint8
    B x 3 x crop_px x crop_px. Use with DataLoader(batch_size=None)."""

    def __init__(
        self,
        source,
        *,
        epoch: int,
        seed: int,
        rank: int,
        world: int,
        batch_size: int,
        num_batches: int,
        skip_batches: int = 0,
        augment: AugmentConfig = AugmentConfig(),
        shuffle_block: int = 16384,
    ):
        if not 0 <= skip_batches <= num_batches:
            raise ValueError(f"skip_batches must be in [0, {num_batches}], got {skip_batches}")
        self.source = source
        self.epoch, self.seed = epoch, seed
        self.rank, self.world = rank, world
        self.batch_size, self.num_batches, self.skip_batches = batch_size, num_batches, skip_batches
        self.augment = augment
        self.shuffle_block = shuffle_block

    def _mine(self, batch: int, worker: int, workers: int) -> bool:
        return batch >= self.skip_batches and (batch - self.skip_batches) % workers == worker

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pending: list[tuple[int, Any]] = []
        for pos, item in shuffled_stream(self.source, self.seed, self.epoch, self.shuffle_block):
            if pos % self.world != self.rank:
                continue
            batch = (pos // self.world) // self.batch_size
            if batch >= self.num_batches:
                return
            if self._mine(batch, worker, workers):
                pending.append((pos, item))
                if len(pending) == self.batch_size:
                    with _one_thread(info is None):
                        made = self._make_batch(batch, pending)
                    yield made
                    pending = []

    def _make_batch(self, batch: int, members: Sequence[tuple[int, Any]]):
        tiles: list[torch.Tensor | None] = []
        for _pos, item in members:
            try:
                tiles.append(encoder_input(self.source.load(item), None))
            except HistoseekError as exc:
                LOG.warning("skipping unreadable %s: %s", self.source.describe(item), exc)
                tiles.append(None)
        good = [i for i, t in enumerate(tiles) if t is not None]
        if not good:
            raise HistoseekError(
                f"batch {batch}: none of its {len(members)} tiles could be read (first: {self.source.describe(members[0][1])})"
            )
        views_q, views_k = [], []
        for i, (pos, _) in enumerate(members):
            # an unreadable tile is replaced by a readable one of the same batch, so batches keep their size
            tile = tiles[i] if tiles[i] is not None else tiles[good[i % len(good)]]
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, pos))
            vq, vk = two_views(tile, self.augment, gen)
            views_q.append(vq)
            views_k.append(vk)
        return batch, torch.stack(views_q), torch.stack(views_k)


@contextlib.contextmanager
def _one_thread(active: bool):
    """Per-tile augmentations are many tiny ops: in the training process (no loader workers)
    run them on one thread, as loader workers do; thread hand-offs would cost more than the
    ops themselves."""
    if not active:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C and SIGTERM (torchrun signals the whole process group) are for the training
    # process, which stops cleanly after the step; a worker dying on them would break the
    # batch stream first. Workers still exit when the training process goes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: TwoViewBatches, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        worker_init_fn=_ignore_stop_signals if workers else None,
    )
