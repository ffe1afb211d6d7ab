"""Open slides and their deep-zoom generators, kept per worker (LRU), looked up by catalog
id only: a request names a slide id, never a path, and the path comes from the catalog.

What is served must be the slide the catalog describes (issue 11: a removed slide's tiles
still answered 200; a slide file overwritten under the archive kept serving old pixels, or
new pixels under old metadata). So every lookup re-reads the slide's catalog row (it must
still exist and be indexed); an entry is keyed by id and content fingerprint; a slide is
opened only after its file's fingerprint matched the catalog's, and a cached handle is used
only while its file's (device, inode, size, mtime) are those it was verified with. Anything
else is a SlideChanged error (409 at the edge), never pixels.

Reads are bounded in memory whatever the slide's size: see webapp/slide_reading.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
from pathlib import Path

import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from engine.cache import LRUCache
from engine.catalog import Catalog, models
from engine.errors import NotFound, SlideChanged, SlideError
from engine.slides import fingerprint, open_slide
from webapp.archive import get_slide
from webapp.slide_reading import DZ_OVERLAP, DZ_TILE_PX, Overview, deepzoom_tile_box, fit, read_scaled


@dataclasses.dataclass
class OpenedSlide:
    slide_id: int
    fingerprint: str
    path: Path
    stat: tuple[int, int, int, int]  # (device, inode, size, mtime_ns) the file was verified with
    slide: openslide.OpenSlide
    deepzoom: DeepZoomGenerator
    overview: Overview | None = None
    overview_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def key(self) -> tuple[int, str]:
        return (self.slide_id, self.fingerprint)


def _file_stat(slide_id: int, path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns) of a slide's file; SlideChanged when it is gone."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _file_error(slide_id, path, exc) from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _file_error(slide_id: int, path: Path, exc: OSError) -> SlideError:
    """The error to raise for an OSError on a slide's file: SlideChanged when it is gone."""
    if isinstance(exc, FileNotFoundError):
        return SlideChanged(
            f"slide {slide_id} ({path.name}): its file is gone since it was indexed; restore it, or run `indexer build` to update the catalog"
        )
    return SlideError(f"slide {slide_id} ({path.name}): its file cannot be read ({exc.strerror or exc})")


class SlideCache:
    def __init__(self, catalog: Catalog, capacity: int = 16, tile_cache_bytes: int = 0):
        self.catalog = catalog
        # Handles pushed out are not closed: a request in another thread may still read from
        # one; the garbage collector closes it once nothing refers to it.
        self._open: LRUCache[OpenedSlide] = LRUCache(max(1, capacity))
        # Makes "is it there, else drop this slide's other entries and add it" one step.
        self._lock = threading.Lock()
        # encoded deep-zoom tiles, bounded in bytes (0: none kept)
        self.tile_bytes: LRUCache[bytes] = LRUCache(max(1, tile_cache_bytes), weight=len)

    # -- which slide ---------------------------------------------------------------------

    def _row(self, slide_id: int):
        """The slide's catalog row as it is now: NotFound when removed, SlideChanged when
        `indexer build` found its file missing or changed, SlideError when not indexed."""
        row = get_slide(self.catalog, slide_id)
        name = Path(row.path).name
        if row.status == models.MISSING:
            raise SlideChanged(
                f"slide {slide_id} ({name}): its file is missing or changed since it was indexed; restore it, or run `indexer build` to re-index it"
            )
        if row.status != models.INDEXED:
            why = f" ({row.error})" if row.error else ""
            raise SlideError(
                f"slide {slide_id} ({name}) cannot be shown: it is {row.status}, not indexed{why}; run `indexer build`"
            )
        return row

    def get(self, slide_id: int) -> OpenedSlide:
        """The open slide of catalog id `slide_id`, checked against the catalog and its file
        on every call (a primary-key query and a stat: cheap next to a tile)."""
        row = self._row(slide_id)
        key = (slide_id, row.fingerprint)
        opened = self._open.get(key)
        if opened is not None:
            try:
                same = opened.path == Path(row.path) and _file_stat(slide_id, opened.path) == opened.stat
            except SlideError:
                self._drop(opened)  # the file is gone: this handle must not serve again
                raise
            if same:
                return opened
            # moved in the catalog, or the file was touched, replaced or rewritten since it
            # was verified: open it afresh, which checks its content again
            self._drop(opened)
        opened = self._open_verified(slide_id, row)
        with self._lock:
            existing = self._open.get(key)
            if existing is not None and existing.path == opened.path and existing.stat == opened.stat:
                opened.slide.close()  # another thread opened it first; this one was never shared
                return existing
            self._open.pop_where(lambda k: k[0] == slide_id)
            self._open.put(key, opened)
        return opened

    def _open_verified(self, slide_id: int, row) -> OpenedSlide:
        """Open the slide only when its file's content is the one indexed (fingerprint), and
        did not change while it was being checked and opened."""
        path = Path(row.path)
        before = _file_stat(slide_id, path)
        try:
            found = fingerprint(path)
        except OSError as exc:
            raise _file_error(slide_id, path, exc) from None
        if found != row.fingerprint:
            raise SlideChanged(
                f"slide {slide_id} ({path.name}): the slide file changed since it was indexed (its content is not the slide the catalog describes); run `indexer build` to re-index it"
            )
        slide = open_slide(path)
        try:
            # limit_bounds=False keeps deep-zoom pixel coordinates equal to level-0
            # coordinates, so matched regions (level-0 boxes) are drawn without an offset.
            deepzoom = DeepZoomGenerator(slide, tile_size=DZ_TILE_PX, overlap=DZ_OVERLAP, limit_bounds=False)
            after = _file_stat(slide_id, path)
        except openslide.OpenSlideError as exc:
            slide.close()
            raise SlideError(f"slide {slide_id} ({path.name}) cannot be read: {exc}") from None
        except SlideError:
            slide.close()
            raise
        if after != before:
            slide.close()
            raise SlideChanged(
                f"slide {slide_id} ({path.name}): the slide file changed while it was being opened; try again, and run `indexer build` if it keeps changing"
            )
        return OpenedSlide(slide_id, row.fingerprint, path, before, slide, deepzoom)

    def _drop(self, opened: OpenedSlide) -> None:
        with self._lock:
            if self._open.get(opened.key) is opened:
                self._open.pop(opened.key)

    @contextlib.contextmanager
    def _reading(self, opened: OpenedSlide, what: str):
        """OpenSlide errors while reading as a SlideError (422). OpenSlide keeps a handle
        in error once a read failed (every later call fails, even `dimensions`), so the
        handle is dropped: the next request opens the file afresh (issue 11, finding 9)."""
        try:
            yield
        except (openslide.OpenSlideError, OSError) as exc:
            self._drop(opened)
            raise SlideError(
                f"cannot read {what} of slide {opened.slide_id} ({opened.path.name}): {exc}; the file may be damaged (`indexer verify` checks slide files)"
            ) from None

    # -- what the routes serve -------------------------------------------------------------

    def dzi(self, slide_id: int) -> str:
        return self.get(slide_id).deepzoom.get_dzi("jpeg")

    def encoded_tile(self, slide_id: int, level: int, col: int, row: int, pil_format: str) -> bytes:
        """A deep-zoom tile encoded as JPEG or PNG, from the tile cache when there. The
        key holds the slide's fingerprint: a cached tile is only ever the indexed content."""
        opened = self.get(slide_id)
        key = (slide_id, opened.fingerprint, level, col, row, pil_format)
        data = self.tile_bytes.get(key)
        if data is None:
            buf = io.BytesIO()
            self._read_tile(opened, level, col, row).save(
                buf, format=pil_format, **({"quality": 80} if pil_format == "JPEG" else {})
            )
            data = buf.getvalue()
            self.tile_bytes.put(key, data)
        return data

    def _read_tile(self, opened: OpenedSlide, level: int, col: int, row: int) -> Image.Image:
        box, size = deepzoom_tile_box(opened, level, col, row)
        with self._reading(opened, f"deep-zoom tile {level}/{col}_{row}"):
            return read_scaled(opened, *box, *size)

    def region(self, slide_id: int, x: int, y: int, w: int, h: int, max_px: int) -> Image.Image:
        """The level-0 box (x, y, w, h) scaled to fit max_px, from the coarsest pyramid level
        that still has enough pixels (or the overview); outside-scan pixels are white. Not
        engine.slides.read_box: that reads squares in one read whatever their size, and a
        box here may be any rectangle of a slide without a pyramid (reads stay bounded)."""
        opened = self.get(slide_id)
        with self._reading(opened, "a region"):
            width, height = opened.slide.dimensions
            if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
                raise NotFound(f"region ({x}, {y}, {w}, {h}) is outside the slide ({width} x {height})")
            return read_scaled(opened, x, y, w, h, *fit(w, h, max_px))

    def thumbnail(self, slide_id: int, max_px: int) -> Image.Image:
        opened = self.get(slide_id)
        with self._reading(opened, "the thumbnail"):
            width, height = opened.slide.dimensions
            return read_scaled(opened, 0, 0, width, height, *fit(width, height, max_px))
